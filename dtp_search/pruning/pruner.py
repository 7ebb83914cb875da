"""The object a training loop talks to: masks + criterion + threshold policy."""

from __future__ import annotations

import math

import torch
from torch import nn

from dtp_search.pruning.criteria import Criterion, Magnitude
from dtp_search.pruning.masks import attach_masks, effective_weight, sparsity
from dtp_search.pruning.policies import LayerView, ThresholdPolicy


class DynamicPruner:
    """Attaches masks to ``model`` and updates them as ``policy`` dictates.

    Call :meth:`step` after every optimizer step; it recomputes masks every
    ``policy.update_every`` steps once the policy is active and returns the
    thresholds it used (``None`` when it did nothing).
    """

    def __init__(self, model: nn.Module, policy: ThresholdPolicy,
                 criterion: Criterion | None = None, *, straight_through: bool = False) -> None:
        self.model = model
        self.policy = policy
        self.criterion = criterion or Magnitude()
        self.masks = attach_masks(model, straight_through=straight_through)
        self._modules = dict(model.named_modules())
        self.last_thresholds: dict[str, float] = {}

    def layer_views(self) -> list[LayerView]:
        views = []
        for name, mask in self.masks.items():
            module = self._modules[name]
            views.append(LayerView(name=name, weight=effective_weight(module),
                                   score=self.criterion.scores(module), mask=mask))
        return views

    @torch.no_grad()
    def update(self, epoch: float) -> dict[str, float]:
        """Recompute every mask for time ``epoch``, unconditionally."""
        self.last_thresholds = self.policy.update_masks(self.layer_views(), epoch)
        return self.last_thresholds

    def step(self, step: int, epoch: float) -> dict[str, float] | None:
        """Update masks if ``step`` falls on the policy's update grid and it is active."""
        if step % self.policy.update_every != 0 or not self.policy.is_active(epoch):
            return None
        return self.update(epoch)

    def finalize(self) -> dict[str, float]:
        """Apply the policy's final threshold (the start of the post-pruning phase)."""
        return self.update(max(self.policy.final_epoch(), self.policy.start_epoch))

    def sparsity(self) -> float:
        return sparsity(self.model)

    def mean_threshold(self) -> float:
        """Size-weighted mean of the last thresholds (the global θ when all layers share one)."""
        if not self.last_thresholds:
            return 0.0
        total, acc = 0, 0.0
        for name, theta in self.last_thresholds.items():
            n = self.masks[name].mask.numel()
            if math.isfinite(theta):
                acc += theta * n
                total += n
        return acc / total if total else math.inf
