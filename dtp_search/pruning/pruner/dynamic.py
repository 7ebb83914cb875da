"""The object a training loop talks to: masks + criterion + threshold policy + granularity.

Units (weights, or coupled channels: :mod:`.units`) and collapse under ``min_keep``
(:mod:`.collapse`) have their own modules.

Layers are the prunable tensors of :func:`~dtp_search.pruning.masks.prunable_tensors`,
named as that function describes (``"layer1.0.conv1"``, ``"encoder.0.self_attn.in_proj"``);
:attr:`DynamicPruner.tensors` maps each selected name to its tensor.

Layer selection. ``layers`` (a :class:`~dtp_search.pruning.masks.LayerSelection`) names
the prunable layers the pruner manages; only they get masks, and the others stay dense
and are never written — not even the input columns of an unselected layer that consumes
a pruned unit. That is still exact: a pruned unit emits exactly 0 (its rows, bias and
norm entries are masked), so those columns multiply zeros, and :func:`compact_model`
removes them with the unit. A unit that passes something that does not keep 0 (a norm
without affine entries, a sigmoid) on its way to a consumer takes part only when that
consumer is selected (its columns are then masked). The network is traced whole, so an
unselected layer still counts as a consumer and does not make its producers unprunable.
:meth:`DynamicPruner.sparsity` is over the selected layers; ``sparsity(model)`` over
every prunable layer.

Collapse: see :mod:`dtp_search.pruning.pruner.collapse`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dtp_search.pruning.criteria import Criterion, Magnitude
from dtp_search.pruning.masks import (
    PRUNABLE_TYPES,
    LayerSelection,
    PrunableTensor,
    attach_masks,
    layer_sparsity,
    prunable_tensors,
    restore_masks,
    snapshot_masks,
    sparsity,
)
from dtp_search.pruning.policies.base import LayerView, ThresholdPolicy, Thresholds
from dtp_search.pruning.policies.quantile import global_threshold
from dtp_search.pruning.pruner.collapse import LayerCollapse, check_floor, min_units
from dtp_search.pruning.pruner.units import (
    UNIT_TYPES,
    Layer,
    UnitMasks,
    check_granularity,
    group_scores,
    round_units,
)
from dtp_search.pruning.structure import ChannelGroup, trace_channels


class DynamicPruner:
    """Attaches masks to ``model`` and updates them as ``policy`` dictates.

    Call :meth:`step` after every optimizer step; it feeds the criterion and, when the
    policy says so, recomputes the masks and returns the thresholds it used (``None``
    when it did nothing). Call :meth:`finalize` when the pruning phase ends.

    Args:
        granularity: ``"weight"``, ``"neuron"`` or ``"channel"`` (see :mod:`.units`).
        min_keep: units every layer keeps (fraction < 1, count ≥ 1, 0 = no protection).
        on_collapse: ``"restore"`` or ``"prune"``: what a decision under ``min_keep`` does.
        example_input: one input batch; needed to trace the network for structured units.
        layers: the prunable layers to mask (``None``: all of them); the rest stay dense.
            A selection that matches nothing raises ``ValueError`` (see :class:`LayerSelection`).
        round_to: structured pruning keeps a multiple of this many units in every group
            (rounding up with the group's best pruned units), where that helps the kernels.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: ThresholdPolicy,
        criterion: Criterion | None = None,
        *,
        granularity: str = "weight",
        min_keep: float = 0.01,
        on_collapse: str = "restore",
        example_input: torch.Tensor | None = None,
        layers: LayerSelection | None = None,
        round_to: int = 1,
    ) -> None:
        self.model = model
        self.policy = policy
        self.criterion = criterion or Magnitude()
        self.granularity = granularity
        self.min_keep = float(min_keep)
        check_granularity(granularity, policy, self.criterion)
        check_floor(min_keep, on_collapse)
        self.on_collapse = on_collapse
        self.selection = layers if layers is not None else LayerSelection()
        tensors = {t.name: t for t in prunable_tensors(model)}
        names = list(tensors)
        selected = self.selection.select(names) if layers is not None else names
        self.restored: dict[str, int] = {}  # layer -> decisions the min_keep floor overrode
        self.floored: set[str] = set()  # layers whose current mask is the floor's
        self.recovered = 0  # units the policy turned back on (0 → 1), over the whole run
        self._epoch: float | None = None  # time of the decision being written

        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to={round_to!r} is not allowed; allowed: a whole count >= 1")
        self.round_to = round_to

        groups: list[ChannelGroup] = []
        if granularity != "weight":
            if example_input is None:
                raise ValueError(
                    f"granularity={granularity!r} needs example_input to trace the model"
                )
            groups = trace_channels(model, example_input).groups
        self.masks = attach_masks(
            model,
            straight_through=policy.recovers,
            mask_factory=policy.mask_factory(),
            layers=set(selected),
        )
        #: ``{layer name: PrunableTensor}`` of the selected (masked) layers, in model order.
        self.tensors: dict[str, PrunableTensor] = {n: tensors[n] for n in self.masks}
        self._layers: dict[str, Layer] = {}
        modules = dict(model.named_modules())
        if granularity == "weight":
            for name, mask in self.masks.items():
                self._layers[name] = Layer(name, self.tensors[name], mask, structured=False)
        else:
            self._attach_groups([g for g in groups if self._takes_part(g, modules)], modules)
        if not self._layers:
            kinds = "/".join(t.__name__ for t in UNIT_TYPES.get(granularity, PRUNABLE_TYPES))
            among = "" if layers is None else f" among the selected layers {selected}"
            raise ValueError(
                f"granularity={granularity!r}: this model has no {kinds} layer whose "
                f"units can be removed exactly{among} (channels that reach the output, or an "
                "operation the structure walk does not know, stay); allowed here: "
                f"{self.allowed_granularities(groups, modules, self.masks)}"
            )
        # The tensors whose scores decide: every masked layer, or every group's producers.
        scored = (
            {name: layer.tensor for name, layer in self._layers.items()}
            if granularity == "weight"
            else {n: self.tensors[n] for layer in self._layers.values() for n in layer.group.rows}
        )
        self.criterion.attach(scored)
        self._magnitude = Magnitude()
        self._magnitude.attach(scored)
        self.last_thresholds: Thresholds = {}
        self.finalized = False

    def _takes_part(self, group: ChannelGroup, modules: dict[str, nn.Module]) -> bool:
        """Whether the pruner decides on ``group``: all of its producers are selected and of
        the granularity's kind, and every consumer that reads it through a path that loses
        a pruned unit's 0 (a norm without affine entries, a sigmoid) is selected too, so
        that its input columns are masked."""
        kinds = UNIT_TYPES[self.granularity]
        return all(n in self.masks and isinstance(modules[n], kinds) for n in group.rows) and all(
            n in self.masks for n in group.inexact
        )

    def _attach_groups(self, groups: list[ChannelGroup], modules: dict[str, nn.Module]) -> None:
        """One structured :class:`~dtp_search.pruning.pruner.units.Layer` per group, and the
        index maps that turn the unit states into the rows and columns of weight masks, bias
        masks and norm masks."""
        self._unit_masks = UnitMasks()
        for group in groups:
            first = group.producers[0]
            mask = self.masks[first]
            device = mask.mask.device
            layer = Layer(
                group.name,
                self.tensors[first],
                mask,
                structured=True,
                group=group,
                units=torch.ones(group.size, dtype=torch.bool, device=device),
                unit_size=sum(
                    self.masks[n].mask[0].numel() * rows.shape[1] for n, rows in group.rows.items()
                ),
            )
            self._layers[group.name] = layer
            self._unit_masks.add(layer, self.masks, modules)

    @staticmethod
    def allowed_granularities(
        groups: list[ChannelGroup], modules: dict[str, nn.Module], masks: dict | None = None
    ) -> list[str]:
        out = ["weight"]
        for g, types in UNIT_TYPES.items():
            if any(
                all(isinstance(modules[n], types) for n in grp.rows)
                and (masks is None or all(n in masks for n in grp.rows))
                for grp in groups
            ):
                out.append(g)
        return out

    @property
    def layer_names(self) -> list[str]:
        """Layers whose units the policy decides on."""
        return list(self._layers)

    def layer_views(self) -> list[LayerView]:
        """What the policy sees; recovering policies get scores of the dense weights."""
        return [
            self._view(layer, self.criterion, self.policy.recovers)
            for layer in self._layers.values()
        ]

    def _view(self, layer: Layer, criterion: Criterion, dense: bool) -> LayerView:
        mask = layer.mask
        weight = layer.tensor.weight.detach()
        if layer.structured:
            score, keep = group_scores(layer, criterion, dense), layer.units.clone()
        else:
            score, keep = criterion.scores(layer.name, dense), mask.bool_mask
        return LayerView(
            layer.name, weight, score, keep, mask, layer.unit_size, layer.tensor.original
        )

    # -- writing masks ----------------------------------------------------------------

    @torch.no_grad()
    def _protect(self, layer: Layer, keep: torch.Tensor) -> torch.Tensor:
        m = min_units(self.min_keep, keep.numel())
        kept = int(keep.sum())
        if kept >= max(m, 1):
            self.floored.discard(layer.name)
            return keep
        if m == 0 or self.on_collapse == "prune":
            unit = "weight" if not layer.structured else self.granularity
            raise LayerCollapse(layer.name, kept, keep.numel(), m, unit, self._epoch)
        self.restored[layer.name] = self.restored.get(layer.name, 0) + 1
        self.floored.add(layer.name)
        dense = (
            group_scores(layer, self._magnitude, dense=True)
            if layer.structured
            else self._magnitude.scores(layer.name, dense=True)
        )
        # Flat indices are in logical (NCHW) order: work on a contiguous copy, whatever
        # the memory format of the scores (channels-last conv weights).
        keep = keep.clone(memory_format=torch.contiguous_format)
        keep.view(-1)[torch.topk(dense.reshape(-1), m).indices] = True
        return keep

    @torch.no_grad()
    def write(self, keeps: dict[str, torch.Tensor], *, protect: bool = True) -> None:
        """Set the masks of the layers in ``keeps`` (one bool per unit), honouring ``min_keep``
        unless ``protect`` is False."""
        for name, keep in keeps.items():
            layer = self._layers[name]
            keep = keep.to(layer.mask.mask.device).bool()
            old = layer.units if layer.structured else layer.mask.bool_mask
            self.recovered += int((keep & ~old.view_as(keep)).sum())
            if protect:
                keep = self._protect(layer, keep)
            if layer.structured:
                layer.units.copy_(round_units(layer, keep, self.round_to, self._magnitude))
            else:
                layer.mask.set_(keep)
        if self.granularity != "weight":
            self._unit_masks.sync(self.masks)

    # -- the training-loop interface ------------------------------------------------------

    @torch.no_grad()
    def update(self, epoch: float) -> Thresholds:
        """Recompute every mask for time ``epoch``, unconditionally."""
        keeps, theta = self.policy.masks(self.layer_views(), epoch)
        self._epoch = epoch
        self.write(keeps)
        self.last_thresholds = theta or self.last_thresholds
        return self.last_thresholds

    def step(self, step: int, epoch: float) -> Thresholds | None:
        """After optimizer step ``step`` (1-based): observe, and update masks if the policy says so."""
        if self.criterion.needs_observation:
            self.criterion.observe()
        if not self.policy.should_update(step, epoch):
            return None
        return self.update(epoch)

    @torch.no_grad()
    def finalize(self) -> Thresholds:
        """End the pruning phase: apply the policy's final masks and freeze them.

        Straight-through gradients are switched off, so the post-pruning phase
        fine-tunes the surviving weights only.
        """
        keeps, theta = self.policy.final_masks(self.layer_views())
        self._epoch = None
        self.write(keeps)
        self.policy.finalized(self.layer_views())
        self.last_thresholds = theta or self.last_thresholds
        self._freeze()
        return self.last_thresholds

    def _freeze(self) -> None:
        for mask in self.masks.values():
            mask.straight_through = False
        self.criterion.detach()
        self.finalized = True

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed fold needs beyond ``model.state_dict()`` (which holds the
        masks, the original weights and learned thresholds): unit states, the policy's
        and the criterion's running state, and the mask flags that finalisation flips."""
        return {
            "finalized": self.finalized,
            "last_thresholds": dict(self.last_thresholds),
            "units": {
                n: layer.units.clone() for n, layer in self._layers.items() if layer.structured
            },
            "policy": self.policy.state_dict(),
            "criterion": self.criterion.state_dict(),
            "learning": {
                n: bool(m.learning) for n, m in self.masks.items() if hasattr(m, "learning")
            },
            "restored": dict(self.restored),
            "floored": sorted(self.floored),
            "recovered": self.recovered,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after ``model.load_state_dict``)."""
        self.last_thresholds = dict(state["last_thresholds"])
        # absent in older checkpoints
        self.restored = dict(state.get("restored", {}))
        self.floored = set(state.get("floored", ()))
        self.recovered = int(state.get("recovered", 0))
        for name, units in state["units"].items():
            self._layers[name].units.copy_(units)
        self.policy.load_state_dict(state["policy"])
        self.criterion.load_state_dict(state["criterion"])
        for name, learning in state["learning"].items():
            self.masks[name].learning = learning
            self.masks[name].s.requires_grad_(learning)
        if state["finalized"]:
            self._freeze()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for parameters the policy adds (learned thresholds)."""
        return self.policy.param_groups(self.masks)

    # -- measuring ------------------------------------------------------------------

    def sparsity(self) -> float:
        """Fraction of zero effective weights over the selected (masked) layers — what the
        policy's sparsity targets and the one-shot sweep refer to. Layers left out of the
        selection are not counted: ``pruning.sparsity(model)`` counts every prunable layer."""
        return sparsity(self.model, self.masks)

    def layer_sparsity(self) -> dict[str, float]:
        """Per-layer sparsity of the selected layers."""
        return layer_sparsity(self.model, self.masks)

    def mean_threshold(self) -> float:
        """Size-weighted mean of the last thresholds (the global θ when all layers share one)."""
        total, acc = 0, 0.0
        for name, theta in self.last_thresholds.items():
            layer = self._layers.get(name)
            n = (
                layer.units.numel() * layer.unit_size
                if layer is not None and layer.structured
                else self.masks[name].mask.numel()
            )
            if math.isfinite(theta):
                acc += theta * n
                total += n
        return acc / total if total else (math.inf if self.last_thresholds else 0.0)

    def snapshot(self) -> dict[str, torch.Tensor]:
        state = snapshot_masks(self.model)
        for name, layer in self._layers.items():
            if layer.structured:
                state[f"units:{name}"] = layer.units.clone()
        return state

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        restore_masks(self.model, {k: v for k, v in state.items() if not k.startswith("units:")})
        for name, layer in self._layers.items():
            if layer.structured:
                layer.units.copy_(state[f"units:{name}"])

    @torch.no_grad()
    def tighten_globally(self, target: float) -> float:
        """One-shot: prune further by *magnitude* until a fraction ``target`` of the
        participating layers' weights is gone (one global θ over units, weighted by unit
        size); masks only tighten and ``min_keep`` is not applied. Returns θ."""
        views = [self._view(layer, self._magnitude, dense=False) for layer in self._layers.values()]
        theta = global_threshold(views, target)
        self.write({v.name: v.keep & (v.score >= theta) for v in views}, protect=False)
        return theta
