"""Threshold policies: how the pruning threshold θ moves while the network trains.

A policy sees, for every prunable layer l, the importance scores S_l (|W_l ⊙ M_l|
for the magnitude criterion) and the time t in epochs, and returns one threshold
θ_l(t) per layer. The mask rule shared by all policies here is

    M_l ← 1[S_l ≥ θ_l(t)]        (a weight is pruned when its score is below θ).

Because a pruned weight has score 0, masks only tighten as long as θ > 0; policies
that let weights recover (splicing) override :meth:`ThresholdPolicy.update_masks`.

Time is measured in (fractional) epochs so that the same config means the same
schedule whatever the batch size. No policy updates masks before ``start_epoch``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dtp_search.pruning.masks import WeightMask


@dataclass
class LayerView:
    """What a policy may look at for one layer (tensors are detached)."""

    name: str
    weight: torch.Tensor  # effective weight W ⊙ M
    score: torch.Tensor  # importance, same shape as weight
    mask: WeightMask


class ThresholdPolicy(ABC):
    """Maps importance scores and training time to per-layer thresholds θ_l(t).

    Args:
        start_epoch: no mask update happens before this time (dense warm-up).
        update_every: masks are recomputed every this many optimizer steps.
    """

    name: ClassVar[str]

    def __init__(self, *, start_epoch: float = 0.0, update_every: int = 50) -> None:
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.start_epoch = float(start_epoch)
        self.update_every = int(update_every)

    def is_active(self, epoch: float) -> bool:
        """Whether masks may change at time ``epoch``."""
        return epoch >= self.start_epoch

    @abstractmethod
    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        """θ_l(t) for every layer."""

    @torch.no_grad()
    def update_masks(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        """Set ``M_l = 1[S_l ≥ θ_l]`` in place and return the thresholds used."""
        theta = self.thresholds(layers, epoch)
        for layer in layers:
            layer.mask.set_(layer.score >= theta[layer.name])
        return theta

    def final_epoch(self) -> float:
        """Time after which θ no longer changes; the post-pruning phase evaluates θ here."""
        return self.start_epoch

    def describe(self) -> dict[str, Any]:
        """Constructor arguments, for logs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class ConstantThreshold(ThresholdPolicy):
    """One fixed threshold for every layer: a weight is pruned when |w| < θ.

        θ_l(t) = θ   for all l, t ≥ start_epoch.
    """

    name = "constant"

    def __init__(self, theta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if theta < 0:
            raise ValueError(f"theta must be >= 0, got {theta}")
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

    def __init__(self, q: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if q < 0:
            raise ValueError(f"q must be >= 0, got {q}")
        self.q = float(q)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return {layer.name: self.q * float(layer.weight.float().std(unbiased=False))
                for layer in layers}


def _ramp(epoch: float, start: float, end: float) -> float:
    """Progress r ∈ [0, 1] of ``epoch`` through [start, end] (a step at ``start`` if end ≤ start)."""
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / (end - start), 0.0), 1.0)


class ScheduledThreshold(ThresholdPolicy):
    """A global threshold that rises from θ₀ to θ₁ between ``start_epoch`` and ``end_epoch``.

        r(t) = clip((t − t_s) / (t_e − t_s), 0, 1)
        θ(t) = θ₀ + (θ₁ − θ₀) · g(r),   g(r) = r (linear)  or  1 − (1 − r)³ (cubic)

    The cubic ramp raises θ fast while the network has many redundant weights and
    slowly near the end, like AGP's sparsity schedule.
    """

    name = "scheduled"
    SHAPES: ClassVar[tuple[str, ...]] = ("linear", "cubic")

    def __init__(self, theta_start: float, theta_end: float, *, end_epoch: float,
                 shape: str = "linear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if theta_start < 0 or theta_end < 0:
            raise ValueError(f"thresholds must be >= 0, got {theta_start}, {theta_end}")
        if shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}, got {shape!r}")
        if end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be >= start_epoch ({self.start_epoch})")
        self.theta_start = float(theta_start)
        self.theta_end = float(theta_end)
        self.end_epoch = float(end_epoch)
        self.shape = shape

    def theta(self, epoch: float) -> float:
        r = _ramp(epoch, self.start_epoch, self.end_epoch)
        g = r if self.shape == "linear" else 1.0 - (1.0 - r) ** 3
        return self.theta_start + (self.theta_end - self.theta_start) * g

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        theta = self.theta(epoch)
        return {layer.name: theta for layer in layers}

    def final_epoch(self) -> float:
        return self.end_epoch


def quantile_threshold(scores: torch.Tensor, sparsity: float) -> float:
    """The smallest threshold θ with ``mean(scores < θ) == k / n``, k = ⌊sparsity · n⌋.

    θ is the (k+1)-th smallest score, so the rule ``keep = score ≥ θ`` prunes exactly k
    entries when scores are distinct. ``torch.kthvalue`` finds it in O(n) — no sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    k = min(max(math.floor(sparsity * n + 1e-9), 0), n)
    if k == 0:
        return 0.0
    if k == n:
        return math.inf
    return float(torch.kthvalue(flat.float(), k + 1).values)


class AGPThreshold(ThresholdPolicy):
    """Automated gradual pruning (Zhu & Gupta, 2017): θ follows a sparsity target.

        s(t) = s_f + (s_i − s_f) · (1 − (t − t₀)/(t₁ − t₀))³   for t₀ ≤ t ≤ t₁,
        s(t) = s_f                                             for t > t₁.

    At each update θ is the magnitude quantile that prunes a fraction s(t): one θ over
    the scores of all layers together (``scope="global"``) or one θ_l per layer
    (``scope="layer"``, every layer at sparsity s(t)).
    """

    name = "agp"
    SCOPES: ClassVar[tuple[str, ...]] = ("global", "layer")

    def __init__(self, final_sparsity: float, *, end_epoch: float, initial_sparsity: float = 0.0,
                 scope: str = "global", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key, s in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {s}")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity ({initial_sparsity}) must be <= "
                             f"final_sparsity ({final_sparsity})")
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}")
        if end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be >= start_epoch ({self.start_epoch})")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.end_epoch = float(end_epoch)
        self.scope = scope

    def target_sparsity(self, epoch: float) -> float:
        r = _ramp(epoch, self.start_epoch, self.end_epoch)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - r) ** 3

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        s = self.target_sparsity(epoch)
        if self.scope == "layer":
            return {layer.name: quantile_threshold(layer.score, s) for layer in layers}
        theta = quantile_threshold(torch.cat([layer.score.reshape(-1) for layer in layers]), s)
        return {layer.name: theta for layer in layers}

    def final_epoch(self) -> float:
        return self.end_epoch


POLICIES: dict[str, type[ThresholdPolicy]] = {
    cls.name: cls
    for cls in (ConstantThreshold, StdScaledThreshold, ScheduledThreshold, AGPThreshold)
}


def build_policy(name: str, params: Mapping[str, Any]) -> ThresholdPolicy:
    """Instantiate the policy registered as ``name`` with keyword ``params``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; allowed: {sorted(POLICIES)}") from None
    return cls(**params)
