"""Fixed and scheduled thresholds: θ is given (``constant``), proportional to each layer's
weight spread (``std_scaled``) or ramped between two values (``scheduled``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies._schedule import ramp, window_end
from dtp_search.pruning.policies.base import LayerView, ThresholdPolicy


class ConstantThreshold(ThresholdPolicy):
    """One fixed threshold for every layer: a weight is pruned when |w| < θ.

    θ_l(t) = θ   for all l, t ≥ start_epoch.
    """

    name = "constant"
    supports_recovery = True

    def __init__(self, theta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _validate.at_least("theta", theta)
        self.theta = float(theta)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return {layer.name: self.theta for layer in layers}


class StdScaledThreshold(ThresholdPolicy):
    """Per-layer threshold proportional to the spread of the layer's weights (Han et al., 2015).

        θ_l = q · std(W_l ⊙ M_l)

    The standard deviation is taken over the whole effective weight tensor, zeros of
    pruned weights included (as in Han et al.'s Caffe code, where pruned weights are
    zeroed). Taking it over the surviving weights only would make θ grow at every
    update (survivors are the large weights), a runaway; over the full tensor the
    iteration θ ← q·sqrt(E[w² 1(|w| ≥ θ)]) decreases to a fixed point.
    """

    name = "std_scaled"
    supports_recovery = True

    def __init__(self, q: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _validate.at_least("q", q)
        self.q = float(q)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return {
            layer.name: self.q * float(layer.weight.float().std(unbiased=False)) for layer in layers
        }


class ScheduledThreshold(ThresholdPolicy):
    """A global threshold that rises from θ₀ to θ₁ between ``start_epoch`` and ``end_epoch``.

        r(t) = clip((t − t_s) / (t_e − t_s), 0, 1)
        θ(t) = θ₀ + (θ₁ − θ₀) · g(r),   g(r) = r (linear)  or  1 − (1 − r)³ (cubic)

    The cubic ramp raises θ fast while the network has many redundant weights and
    slowly near the end, like AGP's sparsity schedule.
    """

    name = "scheduled"
    supports_recovery = True
    SHAPES: ClassVar[tuple[str, ...]] = ("linear", "cubic")

    def __init__(
        self,
        theta_start: float,
        theta_end: float,
        *,
        end_epoch: float,
        shape: str = "linear",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _validate.at_least("thresholds", theta_start, theta_end)
        _validate.one_of("shape", shape, self.SHAPES)
        self.theta_start = float(theta_start)
        self.theta_end = float(theta_end)
        self.end_epoch = window_end(end_epoch, self.start_epoch)
        self.shape = shape

    def theta(self, epoch: float) -> float:
        r = ramp(epoch, self.start_epoch, self.end_epoch)
        g = r if self.shape == "linear" else 1.0 - (1.0 - r) ** 3
        return self.theta_start + (self.theta_end - self.theta_start) * g

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        theta = self.theta(epoch)
        return {layer.name: theta for layer in layers}

    def final_epoch(self) -> float:
        return self.end_epoch
