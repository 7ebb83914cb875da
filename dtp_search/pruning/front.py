"""Accuracy-versus-sparsity fronts.

A fold records one :class:`FrontPoint` per mask update during training, one for the
final (fine-tuned) model, and a one-shot *sweep*: global magnitude thresholds above
the final one, applied without retraining, that trace how accuracy falls as more
weights go — up to ≥ 99 % sparsity. A point may also carry the costs of its network
(``costs``: FLOPs, parameters, latency of the compacted network as fractions of the dense
one, :mod:`dtp_search.pruning.cost`), so that a front can be drawn against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from dtp_search.pruning.pruner import DynamicPruner


@dataclass(frozen=True)
class FrontPoint:
    sparsity: float
    accuracy: float
    threshold: float
    epoch: float
    source: str  # "update" (during training), "final", or "sweep" (one-shot)
    costs: dict[str, float] = field(default_factory=dict)  # e.g. {"flops": 0.4}; may be empty

    def as_dict(self) -> dict:
        return asdict(self)


def sweep_targets(start: float, n_points: int = 10, max_sparsity: float = 0.995) -> list[float]:
    """``n_points`` sparsity levels above ``start`` up to ``max_sparsity``.

    Spaced geometrically in density d = 1 − s, so that points crowd where accuracy
    changes fastest (high sparsity).
    """
    if n_points < 1:
        return []
    d0 = max(1.0 - start, 1e-12)
    d1 = 1.0 - max(max_sparsity, start + (1.0 - start) * 0.5)
    densities = d0 * (d1 / d0) ** (np.arange(1, n_points + 1) / n_points)
    return [float(1.0 - d) for d in densities]


@torch.no_grad()
def one_shot_sweep(
    pruner: DynamicPruner,
    evaluate: Callable[[nn.Module], float],
    *,
    n_points: int = 10,
    max_sparsity: float = 0.995,
    epoch: float = float("nan"),
) -> list[FrontPoint]:
    """Accuracy at increasing one-shot global magnitude thresholds; masks are restored after.

    For each target sparsity s, θ is the global quantile of the magnitude scores of the
    pruner's units (|W ⊙ M| per weight, or the RMS of a neuron/channel) that prunes a
    fraction s of their weights, and the masks become ``M ∧ 1[S ≥ θ]``
    (:meth:`DynamicPruner.tighten_globally`). Only the pruner's selected layers are
    tightened and counted (:meth:`DynamicPruner.sparsity`); layers it left out of its
    :class:`~dtp_search.pruning.masks.LayerSelection` stay dense.
    """
    saved = pruner.snapshot()
    start = pruner.sparsity()
    points = []
    try:
        for target in sweep_targets(start, n_points, max_sparsity):
            theta = pruner.tighten_globally(target)
            points.append(
                FrontPoint(pruner.sparsity(), float(evaluate(pruner.model)), theta, epoch, "sweep")
            )
    finally:
        pruner.restore(saved)
    return points


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``values`` (n × d, all maximised) that no other row dominates."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(values >= values[i], axis=1) & np.any(values > values[i], axis=1)
        keep[i] = not dominated.any()
    return keep
