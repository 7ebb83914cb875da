"""Per-layer sparsity allocation (``policy.allocation``) of the sparsity-target policies:
how a network-wide target s is shared among the layers, as one threshold θ_l per layer.

* ``global`` — one θ over the scores of all layers together (units weighted by their
  size): the layers' sparsities follow from where their scores fall.
* ``uniform`` — every layer at sparsity s: θ_l is layer l's own s-quantile.
* ``erk`` — Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the lottery"): layer l with
  weight shape (n_out, n_in, k_h, k_w) keeps a density

      d_l = ε · (n_out + n_in + k_h + k_w) / (n_out · n_in · k_h · k_w)

  ((n_out + n_in)/(n_out · n_in) for a Linear layer), ε chosen so that the kept total
  Σ_l d_l · N_l is (1 − s) · Σ_l N_l (N_l: the layer's weights). A layer whose d_l
  would exceed 1 is kept dense and ε is solved again over the others, until none does
  (the loop of the authors' code). Small layers stay denser, large ones sparser.
* ``lamp`` — Layer-Adaptive Magnitude-based Pruning (Lee et al. 2021): in each layer the
  scores sorted ascending, S_(1) ≤ … ≤ S_(n), score unit u by

      LAMP(u) = S_u² / Σ_{v ≥ u} S_v²,

  then one global threshold on the LAMP scores prunes a fraction s of the weights. A
  layer's largest unit scores 1, so every layer keeps it.

Each returns per-layer thresholds on the *original* scores (keep = S_l ≥ θ_l), so the
policies' mask rule, recovery band and the pruner's ``min_keep`` work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dtp_search.pruning.policies.base import LayerView, Thresholds
from dtp_search.pruning.policies.quantile import global_threshold, quantile_threshold

ALLOCATIONS = ("global", "uniform", "erk", "lamp")


def allocate(layers: Sequence[LayerView], sparsity: float, allocation: str) -> Thresholds:
    """Per-layer thresholds θ_l that prune a fraction ``sparsity`` of the weights of
    ``layers`` under ``allocation`` (one of :data:`ALLOCATIONS`; see the module docstring)."""
    if allocation == "global":
        theta = global_threshold(layers, sparsity)
        return {layer.name: theta for layer in layers}
    if allocation == "uniform":
        return {layer.name: quantile_threshold(layer.score, sparsity) for layer in layers}
    if allocation == "erk":
        densities = erk_densities([tuple(layer.weight.shape) for layer in layers], sparsity)
        return {
            layer.name: quantile_threshold(layer.score, 1.0 - d)
            for layer, d in zip(layers, densities, strict=True)
        }
    if allocation == "lamp":
        return _lamp_thresholds(layers, sparsity)
    raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """ERK densities d_l (kept fractions) of layers with weight ``shapes`` at network
    sparsity ``sparsity``: d_l = ε·Σ(shape_l)/Π(shape_l), the layers that would exceed
    1 kept dense and ε solved again over the rest."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    keep_total = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        # kept weights the sparse layers must share, and Σ raw_l · N_l over them
        rest = keep_total - sum(sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        if divisor <= 0 or rest <= 0:
            eps = 0.0 if divisor > 0 else math.inf
            break
        eps = rest / divisor
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        # the densest only, as in the reference loop: ε then grows for the others
        top = max(raw[i] for i in over)
        dense |= {i for i in over if raw[i] == top}
    return [1.0 if i in dense else min(1.0, max(0.0, eps * raw[i])) for i in range(len(shapes))]


def lamp_scores(score: torch.Tensor) -> torch.Tensor:
    """LAMP(u) = S_u² / Σ_{v ≥ u} S_v² over the ascending order of ``score`` (same shape;
    a layer whose scores are all 0 scores 0)."""
    flat = score.reshape(-1).double()
    sq, order = torch.sort(flat * flat)
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # Σ_{v ≥ u}
    lamp = torch.where(tail > 0, sq / tail.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    out = torch.empty_like(lamp)
    out[order] = lamp
    return out.reshape(score.shape).float()


def _lamp_thresholds(layers: Sequence[LayerView], sparsity: float) -> Thresholds:
    """One global threshold τ on the LAMP scores, read back as θ_l on each layer's own
    scores: the smallest score the layer keeps (∞ when it keeps none)."""
    views = [
        LayerView(v.name, v.weight, lamp_scores(v.score), v.keep, v.mask, v.unit_size)
        for v in layers
    ]
    tau = global_threshold(views, sparsity)
    out = {}
    for layer, view in zip(layers, views, strict=True):
        kept = layer.score[view.score >= tau]
        out[layer.name] = float(kept.min()) if kept.numel() else math.inf
    return out
