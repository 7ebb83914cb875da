"""Learned thresholds: θ_l is a trainable parameter of each layer's mask (``soft_threshold``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dtp_search.pruning.masks import SoftThresholdMask, WeightMask
from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies.base import Keeps, LayerView, ThresholdPolicy, Thresholds


class SoftThreshold(ThresholdPolicy):
    """Soft threshold reparameterization (STR, Kusupati et al. 2020): learned θ_l.

        W_eff = sign(W) · relu(|W| − g(s_l)),   g = sigmoid,   s_l trainable, s_l(0) = s_init,

    with weight decay ``threshold_decay`` on s_l; sparsity is whatever training settles
    on. At the end of the pruning phase the shrunk weights are baked in and their zeros
    become a binary mask, which the post-pruning phase keeps fixed.
    """

    name = "soft_threshold"
    granularities = ("weight",)

    def __init__(
        self, s_init: float = -5.0, *, threshold_decay: float = 5e-4, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        _validate.at_least("threshold_decay", threshold_decay)
        self.s_init = float(s_init)
        self.threshold_decay = float(threshold_decay)

    def mask_factory(self) -> Callable[..., WeightMask]:
        return functools.partial(SoftThresholdMask, s_init=self.s_init)

    def dense_epochs(self, epochs: int) -> int:
        return 0  # the learned threshold shrinks weights from the first step

    def param_groups(self, masks: Mapping[str, WeightMask]) -> list[dict[str, Any]]:
        params = [m.s for m in masks.values() if isinstance(m, SoftThresholdMask)]
        return [{"params": params, "weight_decay": self.threshold_decay}] if params else []

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {
            layer.name: layer.mask.threshold()
            for layer in layers
            if isinstance(layer.mask, SoftThresholdMask)
        }

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        return {}, self.thresholds(layers, epoch)  # the soft threshold acts in the forward pass

    def final_masks(self, layers: Sequence[LayerView]) -> tuple[Keeps, Thresholds]:
        """Keep what the learned thresholds let through; :meth:`finalized` then bakes it in."""
        theta = self.thresholds(layers, self.start_epoch)
        return {
            layer.name: layer.mask.soft_keep(layer.original)
            for layer in layers
            if isinstance(layer.mask, SoftThresholdMask)
        }, theta

    def finalized(self, layers: Sequence[LayerView]) -> None:
        for layer in layers:
            if isinstance(layer.mask, SoftThresholdMask):
                layer.mask.harden(layer.original)
