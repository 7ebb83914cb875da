"""Masks over a whole network: attach them to every prunable tensor, measure sparsity,
snapshot and restore them."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from dtp_search.pruning.masks.parametrization import WeightMask, attach_mask
from dtp_search.pruning.masks.tensors import prunable_tensors


def attach_masks(
    model: nn.Module,
    *,
    straight_through: bool = False,
    mask_factory: Callable[..., WeightMask] = WeightMask,
    layers: Collection[str] | None = None,
) -> dict[str, WeightMask]:
    """Register a mask (``mask_factory(shape, ...)``, a :class:`WeightMask` by default) on
    every prunable tensor (:func:`prunable_tensors`), or on those whose layer names are in
    ``layers``.

    Idempotent: layers that already carry a mask keep it (its ``straight_through``
    flag is updated). Returns ``{layer name: mask parametrization}``, in model order.
    """
    masks: dict[str, WeightMask] = {}
    for t in prunable_tensors(model):
        if layers is not None and t.name not in layers:
            continue
        existing = t.mask
        if existing is not None:
            existing.straight_through = straight_through
            masks[t.name] = existing
            continue
        masks[t.name] = attach_mask(
            t.module, t.attr, straight_through=straight_through, mask_factory=mask_factory
        )
    return masks


@torch.no_grad()
def sparsity(model: nn.Module, layers: Collection[str] | None = None) -> float:
    """Fraction of prunable weights (the tensors of :func:`prunable_tensors`: Linear/Conv
    weights and attention in-projections; biases and norms excluded) that are zero,
    s = Σ_l #{w ∈ W_l ⊙ M_l : w = 0} / Σ_l numel(W_l).

    Over *every* prunable layer, masked or not — the model's sparsity as inference sees
    it, so layers a pruner left out (see :class:`LayerSelection`) count as the dense
    layers they are — or over the layers named in ``layers`` only
    (:meth:`DynamicPruner.sparsity` passes its selected layers).

    Counts zeros of the *effective* weight, so weights that are exactly zero
    for another reason count too — they cost nothing at inference either way.
    """
    zeros, total = 0, 0
    for t in prunable_tensors(model):
        if layers is not None and t.name not in layers:
            continue
        w = t.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def layer_sparsity(model: nn.Module, layers: Collection[str] | None = None) -> dict[str, float]:
    """Per-layer fraction of zero effective weights: of every prunable layer (unmasked ones
    included, at their natural sparsity, ~0), or of those named in ``layers``."""
    return {
        t.name: float((t.weight.detach() == 0).float().mean())
        for t in prunable_tensors(model)
        if layers is None or t.name in layers
    }


@torch.no_grad()
def snapshot_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every mask in ``model`` (weights, biases, norms), for :func:`restore_masks`."""
    return {name: m.mask.clone() for name, m in model.named_modules() if isinstance(m, WeightMask)}


@torch.no_grad()
def restore_masks(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, WeightMask):
            m.mask.copy_(saved[name])
