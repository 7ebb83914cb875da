"""Baselines every policy is compared against: no pruning (``dense``), one-shot global
magnitude pruning after dense training (``oneshot_global``) and random masks (``random``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies.allocation import ALLOCATIONS, allocate
from dtp_search.pruning.policies.base import Keeps, LayerView, ThresholdPolicy, Thresholds


class DenseBaseline(ThresholdPolicy):
    """No pruning: the accuracy every pruned network is compared against (sparsity 0)."""

    name = "dense"

    def should_update(self, step: int, epoch: float) -> bool:
        return False

    def dense_epochs(self, epochs: int) -> int:
        return int(epochs)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {}

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        return {}, {}


class OneShotGlobal(ThresholdPolicy):
    """What most users do today: train dense, prune once, fine-tune.

    At the end of the pruning phase (which here trains dense) the masks come from
    ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=amount)`` on
    the layers' scores — the fraction ``amount`` of smallest scores across all layers —
    and the post-pruning phase fine-tunes the survivors. With ``allocation`` other than
    ``global`` the fraction ``amount`` is shared among the layers as
    :mod:`~dtp_search.pruning.policies.allocation` says (``uniform``, ``erk``, ``lamp``).
    """

    name = "oneshot_global"
    granularities = ("weight",)

    def __init__(self, amount: float, *, allocation: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _validate.fraction("amount", amount)
        if allocation is not None:  # None: global, as before the setting existed
            _validate.one_of("allocation", allocation, ALLOCATIONS)
        self.amount = float(amount)
        self.allocation = allocation or "global"

    def should_update(self, step: int, epoch: float) -> bool:
        return False

    def dense_epochs(self, epochs: int) -> int:
        return int(epochs)  # the whole pruning phase trains dense

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return allocate(layers, self.amount, self.allocation)

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        if self.allocation != "global":
            return super().masks(layers, epoch)
        holders = [_ScoreHolder(layer.score) for layer in layers]
        prune.global_unstructured(
            [(h, "weight") for h in holders],
            pruning_method=prune.L1Unstructured,
            amount=self.amount,
        )
        keeps = {layer.name: h.weight_mask.bool() for layer, h in zip(layers, holders, strict=True)}
        kept = [layer.score[keeps[layer.name]] for layer in layers]
        theta = min((float(k.min()) for k in kept if k.numel()), default=math.inf)
        return keeps, {layer.name: theta for layer in layers}


class _ScoreHolder(nn.Module):
    """A stand-in module whose ``weight`` is a score tensor, so that ``torch.nn.utils.prune``
    can compute masks without touching (or re-parametrizing) the real layer."""

    def __init__(self, score: torch.Tensor) -> None:
        super().__init__()
        # Contiguous: torch.nn.utils.prune flattens with view(-1), which channels-last
        # (NHWC) conv scores do not allow.
        self.weight = nn.Parameter(
            score.detach().clone(memory_format=torch.contiguous_format), requires_grad=False
        )


class RandomBaseline(ThresholdPolicy):
    """Random masks: at the first update after ``start_epoch`` every layer loses a random
    fraction ``sparsity`` of its units (``torch.nn.utils.prune.RandomUnstructured``, driven
    by the fold's torch seed); the masks then stay fixed. Tells how much of a policy's
    result is owed to *which* weights it picks rather than to how many."""

    name = "random"
    _state_attrs = ("_done",)

    def __init__(self, sparsity: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _validate.fraction("sparsity", sparsity)
        self.sparsity = float(sparsity)
        self._done = False

    def should_update(self, step: int, epoch: float) -> bool:
        return not self._done and super().should_update(step, epoch)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {}

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        if self._done:
            return {}, {}
        self._done = True
        method = prune.RandomUnstructured(amount=self.sparsity)
        # torch.nn.utils.prune flattens with view(-1): give it contiguous (NCHW) tensors.
        keeps = {}
        for layer in layers:
            score = layer.score.contiguous()
            keeps[layer.name] = method.compute_mask(score, torch.ones_like(score)).bool()
        return keeps, {}
