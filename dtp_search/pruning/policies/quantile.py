"""Score quantiles: the threshold θ that prunes a given fraction of the units, in one
layer or over all layers together (sparsity-target policies and the pruner's ``min_keep``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dtp_search.pruning.policies.base import LayerView

_EXACT_QUANTILE_LIMIT = 1 << 25  # entries; beyond, thresholds come from a sample
_QUANTILE_SAMPLE = 1 << 22


def quantile_threshold(
    scores: torch.Tensor, sparsity: float, weights: torch.Tensor | None = None
) -> float:
    """The smallest threshold θ such that ``keep = scores ≥ θ`` prunes a fraction ``sparsity``.

    Unweighted: θ is the (k+1)-th smallest score, k = ⌊sparsity · n⌋, so exactly k entries
    are pruned when scores are distinct; ``torch.kthvalue`` finds it in O(n), no sort.
    Above 2²⁵ scores, θ is estimated from a uniform sample of 2²² of them.

    Weighted (one weight per entry, e.g. the number of weights in a neuron): the longest
    prefix of the ascending scores whose total weight stays within ``sparsity · Σw`` is
    pruned, and θ is the first score after it.

    Ties: when the scores on both sides of the cut are equal, θ is the next float32 above
    them, so every tied entry is pruned and the pruned fraction is at least ``sparsity``.
    """
    flat = scores.reshape(-1).float()
    n = flat.numel()
    if weights is None and n > _EXACT_QUANTILE_LIMIT and 0 < sparsity < 1:
        # Very large models: the quantile of a fixed-size uniform sample (its error is
        # about 1/sqrt(sample) in sparsity, ~0.05 % here) instead of a selection over
        # every weight at each mask update.
        gen = torch.Generator(device=flat.device).manual_seed(n)
        flat = flat[torch.randint(n, (_QUANTILE_SAMPLE,), generator=gen, device=flat.device)]
        n = flat.numel()
    if weights is None:
        k = min(max(math.floor(sparsity * n + 1e-9), 0), n)
    else:
        order = torch.argsort(flat)
        flat = flat[order]
        cum = torch.cumsum(weights.reshape(-1).double()[order], 0)
        k = int((cum <= sparsity * float(cum[-1]) * (1 + 1e-12)).sum()) if n else 0
    if k == 0:
        return 0.0
    if k == n:
        return math.inf
    if weights is None:
        theta = float(torch.kthvalue(flat, k + 1).values)
        # the k-th smallest equals θ exactly when fewer than k scores lie below θ
        tie = int((flat < theta).sum()) < k
    else:
        theta = float(flat[k])
        tie = float(flat[k - 1]) == theta
    if tie:
        # A tie across the cut: no θ prunes exactly k. Keeping the tie (θ at it) can undo
        # the pruning altogether — per-step gradient scores of a sparse network are 0 for
        # the pruned weights and many live ones, and θ = 0 keeps every weight — so θ moves
        # just past it and the whole tie is pruned: the target is a lower bound.
        # (the next float32: scores are compared as float32, where the next float64
        # would round back onto the tie)
        t = torch.tensor(theta, dtype=torch.float32)
        theta = float(torch.nextafter(t, torch.tensor(math.inf)))
    return theta


def global_threshold(layers: Sequence[LayerView], sparsity: float) -> float:
    """One θ over the units of all layers that prunes a fraction ``sparsity`` of their weights."""
    scores = torch.cat([layer.score.reshape(-1) for layer in layers])
    if all(layer.unit_size == 1 for layer in layers):
        return quantile_threshold(scores, sparsity)
    weights = torch.cat(
        [
            torch.full((layer.score.numel(),), float(layer.unit_size), device=scores.device)
            for layer in layers
        ]
    )
    return quantile_threshold(scores, sparsity, weights)
