"""Units the pruner decides on — one masked tensor, or one
:class:`~dtp_search.pruning.structure.ChannelGroup` of coupled units — and the index maps
that write the units' keep states into weight, bias and norm masks.

Units. With ``granularity="weight"`` every weight is a unit and its mask entry is set
directly. With ``"neuron"`` (Linear layers) or ``"channel"`` (Conv layers) a unit is one
coupled channel of a :class:`~dtp_search.pruning.structure.ChannelGroup`: channel j of
every layer that a residual sum, a product, a concatenation, a depthwise convolution or a
norm ties together (:mod:`dtp_search.pruning.structure`). The pruner decides on groups
as a policy decides on layers — one ``LayerView`` per group, named after its first
producer, with one score per unit, the mean of the producers' unit scores (see
:func:`group_scores`) — and removing a unit zeroes

* every producer's row and bias entry and every batch norm's scale and shift entry on
  it, so the unit emits exactly 0, and
* the matching input columns of the selected layers that consume it (they only ever
  multiply zeros), so that the counted sparsity is what :func:`compact_model` removes.

A group takes part only when all its producers are selected layers of the granularity's
kind; channels that reach the output (the classifier's units) and everything the walk
pins stay. An attention in-projection has no units: it is pruned weight by weight, or
not at all. ``round_to`` keeps a multiple of that many units per group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from dtp_search.pruning.criteria import GRANULARITIES, Criterion, Magnitude
from dtp_search.pruning.masks import PrunableTensor, WeightMask, attach_mask
from dtp_search.pruning.policies.base import ThresholdPolicy
from dtp_search.pruning.structure import ChannelGroup

UNIT_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "neuron": (nn.Linear,),
    "channel": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}


@dataclass
class Layer:
    """What the pruner decides on: one masked tensor (``granularity="weight"``), or one
    :class:`~dtp_search.pruning.structure.ChannelGroup` of coupled units, represented by
    its first producer's ``tensor`` and ``mask``."""

    name: str
    tensor: PrunableTensor
    mask: WeightMask
    structured: bool
    group: ChannelGroup | None = None
    units: torch.Tensor | None = None  # structured: keep state per unit
    unit_size: int = 1  # weights per unit: the unit's rows in every producer

    @property
    def module(self) -> nn.Module:
        return self.tensor.module


def group_scores(layer: Layer, criterion: Criterion, dense: bool) -> torch.Tensor:
    """A group's unit scores: the mean, over its producers' rows, of the criterion's
    unit scores, S_u = mean_{(l, j) ∈ u} s_l(j) — one layer's unit scores when the
    group has one producer, and on the same scale otherwise."""
    total = None
    count = 0
    for name, rows in layer.group.rows.items():
        scores = criterion.unit_scores(name, dense).to(rows.device)[rows]
        total = scores.sum(dim=1) if total is None else total + scores.sum(dim=1)
        count += rows.shape[1]
    return total / count


@torch.no_grad()
def round_units(
    layer: Layer, keep: torch.Tensor, round_to: int, magnitude: Magnitude
) -> torch.Tensor:
    """Keep a multiple of ``round_to`` units (or all of them): the group's best pruned
    units by dense magnitude come back until the count is rounded up."""
    kept, n = int(keep.sum()), keep.numel()
    target = min(n, math.ceil(kept / round_to) * round_to)
    if round_to == 1 or target == kept:
        return keep
    dense = group_scores(layer, magnitude, dense=True).masked_fill(keep, -math.inf)
    keep = keep.clone()
    keep[torch.topk(dense, target - kept).indices] = True
    return keep


def check_granularity(granularity: str, policy: ThresholdPolicy, criterion: Criterion) -> None:
    """Raise ``ValueError`` unless ``granularity`` is known and both ``policy`` and
    ``criterion`` support it."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity={granularity!r} is not supported; allowed: {list(GRANULARITIES)}"
        )
    for who, allowed in (
        (f"policy {policy.name}", policy.granularities),
        (f"criterion {criterion.name}", criterion.granularities),
    ):
        if granularity not in allowed:
            raise ValueError(
                f"granularity={granularity!r} is not supported by {who}; allowed: {list(allowed)}"
            )


class UnitMasks:
    """The index maps of the structured layers: which rows, input columns, bias entries
    and norm entries every group's units own, and the bias and norm masks attached for them."""

    def __init__(self) -> None:
        self._rows: dict[str, list[tuple[Layer, torch.Tensor]]] = defaultdict(list)
        self._cols: dict[str, list[tuple[Layer, torch.Tensor]]] = defaultdict(list)
        self._norms: dict[str, list[tuple[Layer, torch.Tensor]]] = defaultdict(list)
        self._unit_masks: dict[str, list[WeightMask]] = {}

    def add(
        self, layer: Layer, masks: dict[str, WeightMask], modules: dict[str, nn.Module]
    ) -> None:
        """Register the rows, columns and entries of ``layer``'s group (its device is that
        of the group's first producer's mask), attaching bias and norm masks as needed."""
        group = layer.group
        device = layer.mask.mask.device
        for name, rows in group.rows.items():
            self._rows[name].append((layer, rows.to(device)))
            module = modules[name]
            if getattr(module, "bias", None) is not None and name not in self._unit_masks:
                self._unit_masks[name] = [attach_mask(module, "bias")]
        for name, cols in group.columns.items():
            if name in masks:  # unselected consumers stay untouched
                self._cols[name].append((layer, cols.to(device)))
        for name, entries in group.norms.items():
            norm = modules[name]
            self._norms[name].append((layer, entries.to(device)))
            if norm.affine and name not in self._unit_masks:
                self._unit_masks[name] = [
                    attach_mask(norm, "weight"),
                    attach_mask(norm, "bias"),
                ]

    @torch.no_grad()
    def sync(self, masks: dict[str, WeightMask]) -> None:
        """Rebuild the weight, bias and norm masks from the unit states: rows of producers,
        input columns of consumers, entries of biases and norms."""
        for name, mask in masks.items():
            m = mask.mask
            rows = _unit_keep(self._rows.get(name, []), m.shape[0], m.device)
            shape = (m.shape[0], m.shape[1]) + (1,) * (m.ndim - 2)
            keep = rows.view(-1, *([1] * (m.ndim - 1))).expand(shape)
            if name in self._cols:
                cols = _unit_keep(self._cols[name], m.shape[1], m.device)
                keep = keep & cols.view(1, -1, *([1] * (m.ndim - 2)))
            mask.set_(keep.expand_as(m))
            if name in self._unit_masks:
                self._unit_masks[name][0].set_(rows)
        for name, refs in self._norms.items():
            if name in self._unit_masks:
                n = self._unit_masks[name][0].mask.shape[0]
                entries = _unit_keep(refs, n, self._unit_masks[name][0].mask.device)
                for unit_mask in self._unit_masks[name]:
                    unit_mask.set_(entries)


def _unit_keep(refs: list[tuple[Layer, torch.Tensor]], n: int, device) -> torch.Tensor:
    """One bool per row/column/entry of a tensor of length ``n``: the state of the unit
    each belongs to (``True`` outside every group)."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    for layer, index in refs:
        keep[index] = layer.units.view(-1, 1).expand_as(index)
    return keep
