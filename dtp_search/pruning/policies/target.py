"""Sparsity targets: θ is the score quantile that prunes a fraction s(t) of the units, and
``agp`` moves s(t) along Zhu & Gupta's cubic schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies._schedule import ramp, window_end
from dtp_search.pruning.policies.allocation import ALLOCATIONS, allocate
from dtp_search.pruning.policies.base import LayerView, ThresholdPolicy


class AGPThreshold(ThresholdPolicy):
    """Automated gradual pruning (Zhu & Gupta, 2017): θ follows a sparsity target.

        s(t) = s_f + (s_i − s_f) · (1 − (t − t₀)/(t₁ − t₀))³   for t₀ ≤ t ≤ t₁,
        s(t) = s_f                                             for t > t₁.

    At each update the thresholds θ_l prune a fraction s(t) of the weights, shared among
    the layers as ``allocation`` says (:mod:`~dtp_search.pruning.policies.allocation`):
    ``global`` (one θ over all scores), ``uniform`` (every layer at s(t)), ``erk`` or
    ``lamp``. ``allocation=None`` follows the older ``scope``: ``global`` → ``global``,
    ``layer`` → ``uniform``; any other value supersedes ``scope``.
    """

    name = "agp"
    supports_recovery = True
    SCOPES: ClassVar[tuple[str, ...]] = ("global", "layer")

    def __init__(
        self,
        final_sparsity: float,
        *,
        end_epoch: float,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        allocation: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _validate.fraction("final_sparsity", final_sparsity)
        _validate.fraction("initial_sparsity", initial_sparsity)
        if initial_sparsity > final_sparsity:
            raise ValueError(
                f"initial_sparsity ({initial_sparsity}) must be <= "
                f"final_sparsity ({final_sparsity})"
            )
        _validate.one_of("scope", scope, self.SCOPES)
        if allocation is not None:
            _validate.one_of("allocation", allocation, ALLOCATIONS)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.end_epoch = window_end(end_epoch, self.start_epoch)
        self.scope = scope
        self.allocation = allocation or ("uniform" if scope == "layer" else "global")

    def target_sparsity(self, epoch: float) -> float:
        r = ramp(epoch, self.start_epoch, self.end_epoch)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - r) ** 3

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return allocate(layers, self.target_sparsity(epoch), self.allocation)

    def final_epoch(self) -> float:
        return self.end_epoch
