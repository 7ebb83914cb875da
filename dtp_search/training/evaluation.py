"""Scoring a network: its top-1 accuracy on a set of batches, and the costs a fold
measures of it (:class:`CostProbe`), for the final model and the one-shot sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.data import TensorBatches
from dtp_search.pruning import CostMeter, DynamicPruner, FrontPoint, one_shot_sweep


@torch.no_grad()
def evaluate(model: nn.Module, batches: TensorBatches) -> float:
    """Top-1 accuracy of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches.device)
    # cached(): every masked weight W ⊙ M is computed once per pass, not once per batch.
    with parametrize.cached():
        for x, y in batches:
            correct += (model(x).argmax(dim=1) == y).sum()
    model.train(was_training)
    return float(correct) / max(batches.num_samples, 1)


@dataclass(frozen=True)
class CostProbe:
    """What a fold measures of its pruned network's cost, as fractions of the dense
    network (:class:`~dtp_search.pruning.CostMeter`): every measure of ``meter`` for the
    final model (:attr:`FoldResult.costs`, and the final front point's); ``sweep``: the
    measures each point of the one-shot sweep gets (the front's axis); ``epochs``: fold →
    the epochs whose :class:`EpochRecord` carries every measure too (the fidelity rung)."""

    meter: CostMeter
    sweep: tuple[str, ...] = ()
    epochs: Mapping[int, Collection[int]] = field(default_factory=dict)


def measured_sweep(
    pruner: DynamicPruner,
    evaluate: Callable[[nn.Module], float],
    cost: CostProbe | None,
    *,
    n_points: int,
    max_sparsity: float,
    epoch: float,
) -> list[FrontPoint]:
    """:func:`~dtp_search.pruning.one_shot_sweep`, each point with the costs ``cost.sweep``
    of its swept network (the masks of the point, compacted), measured where it is scored."""
    measures = cost.sweep if cost is not None else ()
    costs: list[dict[str, float]] = []

    def scored(model: nn.Module) -> float:
        if measures:
            costs.append(cost.meter.measure(model, only=measures))
        return evaluate(model)

    points = one_shot_sweep(
        pruner, scored, n_points=n_points, max_sparsity=max_sparsity, epoch=epoch
    )
    if not measures:
        return points
    return [dataclasses.replace(p, costs=c) for p, c in zip(points, costs, strict=True)]
