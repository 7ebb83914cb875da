"""The object a training loop talks to: masks + criterion + threshold policy + granularity.

Units. With ``granularity="weight"`` every weight is a unit and its mask entry is set
directly. With ``"neuron"`` (rows of Linear layers) or ``"channel"`` (filters of Conv
layers) a unit is a whole output row, and removing unit j of layer L also zeroes

* L's bias entry j and the scale/shift entry j of a batch norm that follows L, so the
  unit emits exactly 0, and
* the matching input columns of the layers that consume L's output (they only ever
  multiply zeros), so that the counted sparsity is what :func:`compact_model` removes.

Only layers whose units are removable exactly take part (see
:mod:`dtp_search.pruning.structure`): never the classifier, never a ResNet convolution
that feeds a residual sum, never a grouped or depthwise convolution, nor an attention
in-projection (a tensor without units: it is pruned weight by weight, or not at all).

Layers are the prunable tensors of :func:`~dtp_search.pruning.masks.prunable_tensors`,
named as that function describes (``"layer1.0.conv1"``, ``"encoder.0.self_attn.in_proj"``);
:attr:`DynamicPruner.tensors` maps each selected name to its tensor.

Layer selection. ``layers`` (a :class:`~dtp_search.pruning.masks.LayerSelection`) names
the prunable layers the pruner manages; only they get masks, and the others stay dense
and are never written — not even the input columns of an unselected layer that consumes
a pruned unit. That is still exact: a pruned unit emits exactly 0 (its row, bias and
norm entries are masked), so those columns multiply zeros, and :func:`compact_model`
removes them with the unit. A unit followed by a norm without affine entries emits a
constant instead of 0, so such a layer takes part only when all of its consumers are
selected (their columns are then masked). The network is traced whole, so an unselected
layer still counts as a consumer and does not make its producers unprunable.
:meth:`DynamicPruner.sparsity` is over the selected layers; ``sparsity(model)`` over
every prunable layer.

Collapse. ``min_keep`` is the fewest units a layer may keep — a fraction of the layer
when < 1, a count when ≥ 1, nothing when 0. A policy decision that asks a layer for fewer
is a *collapse*, handled as ``on_collapse`` says:

* ``"restore"`` (default): the layer's largest-magnitude units are restored up to the
  floor and training goes on; :attr:`DynamicPruner.restored` counts how often, per layer.
  Global thresholds routinely take a large, redundant layer under a 1 % floor at high
  sparsity (a CIFAR ``simple_cnn`` classifier at 95 %) and the restored network is a
  useful point of the front.
* ``"prune"``: :class:`LayerCollapse` is raised at once, so a search spends no more
  time on a configuration whose result the floor, not the policy, would decide.
* ``"penalize"``: restored as with ``"restore"``; the pruner behaves the same, and the
  search layer records the result but keeps it out of the Pareto front when the run
  *ends* with a layer at the floor (:attr:`DynamicPruner.floored`).

Either way a restored network is not what the policy asked for: :attr:`DynamicPruner.floored`
names the layers whose current mask is the floor's, not the policy's.

A decision that leaves a layer with no unit at all raises :class:`LayerCollapse`
whatever ``on_collapse`` says when ``min_keep`` is 0: there is nothing to restore, and a
layer that emits only its bias cuts the network (chance accuracy for the rest of the trial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dtp_search.pruning.criteria import GRANULARITIES, Criterion, Magnitude
from dtp_search.pruning.masks import (
    PRUNABLE_TYPES,
    LayerSelection,
    PrunableTensor,
    WeightMask,
    attach_mask,
    attach_masks,
    layer_sparsity,
    prunable_tensors,
    restore_masks,
    snapshot_masks,
    sparsity,
)
from dtp_search.pruning.policies import LayerView, ThresholdPolicy, Thresholds, global_threshold
from dtp_search.pruning.structure import UnitGroup, trace_units

COLLAPSE_ACTIONS = ("restore", "prune", "penalize")


class LayerCollapse(RuntimeError):
    """A policy asked a layer to keep fewer units than ``min_keep`` allows (see the module
    docstring). ``epoch`` is the training time of the decision (``None``: the final masks)."""

    def __init__(
        self, layer: str, kept: int, total: int, minimum: int, unit: str, epoch: float | None
    ) -> None:
        self.layer, self.kept, self.total, self.minimum = layer, kept, total, minimum
        self.epoch = epoch
        when = "in the final masks" if epoch is None else f"at epoch {epoch:.2f}"
        floor = f"min_keep allows no fewer than {minimum}" if minimum else "min_keep=0"
        super().__init__(
            f"the policy would leave layer {layer} with {kept} of {total} {unit}s {when} ({floor})"
        )


def check_floor(min_keep: Any, on_collapse: Any) -> None:
    """Raise ``ValueError`` naming the setting unless ``min_keep`` and ``on_collapse`` are valid."""
    if (
        isinstance(min_keep, bool)
        or not isinstance(min_keep, (int, float))
        or min_keep < 0
        or (min_keep >= 1 and not float(min_keep).is_integer())
    ):
        raise ValueError(
            f"min_keep={min_keep} is not allowed; allowed: a fraction in "
            "[0, 1) or a whole count >= 1"
        )
    if on_collapse not in COLLAPSE_ACTIONS:
        raise ValueError(
            f"on_collapse={on_collapse!r} is not allowed; allowed: {list(COLLAPSE_ACTIONS)}"
        )


_UNIT_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "neuron": (nn.Linear,),
    "channel": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}


@dataclass
class _Layer:
    name: str
    tensor: PrunableTensor
    mask: WeightMask
    structured: bool
    units: torch.Tensor | None = None  # structured: keep state per output unit
    unit_masks: list[WeightMask] = field(default_factory=list)  # bias, norm scale and shift

    @property
    def module(self) -> nn.Module:
        return self.tensor.module

    @property
    def unit_size(self) -> int:
        return 1 if not self.structured else self.mask.mask[0].numel()


class DynamicPruner:
    """Attaches masks to ``model`` and updates them as ``policy`` dictates.

    Call :meth:`step` after every optimizer step; it feeds the criterion and, when the
    policy says so, recomputes the masks and returns the thresholds it used (``None``
    when it did nothing). Call :meth:`finalize` when the pruning phase ends.

    Args:
        granularity: ``"weight"``, ``"neuron"`` or ``"channel"`` (see the module docstring).
        min_keep: units every layer keeps (fraction < 1, count ≥ 1, 0 = no protection).
        on_collapse: ``"restore"`` or ``"prune"``: what a decision under ``min_keep`` does.
        example_input: one input batch; needed to trace the network for structured units.
        layers: the prunable layers to mask (``None``: all of them); the rest stay dense.
            A selection that matches nothing raises ``ValueError`` (see :class:`LayerSelection`).
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
    ) -> None:
        self.model = model
        self.policy = policy
        self.criterion = criterion or Magnitude()
        self.granularity = granularity
        self.min_keep = float(min_keep)
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={granularity!r} is not supported; allowed: {list(GRANULARITIES)}"
            )
        for who, allowed in (
            (f"policy {policy.name}", policy.granularities),
            (f"criterion {self.criterion.name}", self.criterion.granularities),
        ):
            if granularity not in allowed:
                raise ValueError(
                    f"granularity={granularity!r} is not supported by {who}; "
                    f"allowed: {list(allowed)}"
                )
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

        groups = {}
        if granularity != "weight":
            if example_input is None:
                raise ValueError(
                    f"granularity={granularity!r} needs example_input to trace the model"
                )
            groups = trace_units(model, example_input)
        self.masks = attach_masks(
            model,
            straight_through=policy.recovers,
            mask_factory=policy.mask_factory(),
            layers=set(selected),
        )
        #: ``{layer name: PrunableTensor}`` of the selected (masked) layers, in model order.
        self.tensors: dict[str, PrunableTensor] = {n: tensors[n] for n in self.masks}
        modules = dict(model.named_modules())
        self._layers: dict[str, _Layer] = {}
        self._inputs: dict[str, tuple[str, int]] = {}  # consumer -> (producer, factor)
        for name, mask in self.masks.items():
            tensor = self.tensors[name]
            module = tensor.module
            if granularity == "weight":
                self._layers[name] = _Layer(name, tensor, mask, structured=False)
                continue
            group = groups.get(name) if tensor.has_units else None
            if group is None or not isinstance(module, _UNIT_TYPES[granularity]):
                continue
            if not self._exact(group, modules):
                continue
            out = mask.mask.shape[0]
            layer = _Layer(
                name,
                tensor,
                mask,
                structured=True,
                units=torch.ones(out, dtype=torch.bool, device=mask.mask.device),
            )
            if getattr(module, "bias", None) is not None:
                layer.unit_masks.append(attach_mask(module, "bias"))
            for norm in group.norms:
                norm_module = modules[norm]
                if norm_module.affine:
                    layer.unit_masks += [
                        attach_mask(norm_module, "weight"),
                        attach_mask(norm_module, "bias"),
                    ]
            self._layers[name] = layer
            for consumer in group.consumers:
                if consumer.name in self.masks:  # unselected consumers stay untouched
                    self._inputs[consumer.name] = (name, consumer.factor)
        if not self._layers:
            kinds = "/".join(t.__name__ for t in _UNIT_TYPES.get(granularity, PRUNABLE_TYPES))
            among = "" if layers is None else f" among the selected layers {selected}"
            selected_groups = {
                n: g
                for n, g in groups.items()
                if n in self.masks and g is not None and self._exact(g, modules)
            }
            raise ValueError(
                f"granularity={granularity!r}: this model has no {kinds} layer whose "
                f"units can be removed exactly{among} (classifier and residual "
                "outputs are excluded); allowed here: "
                f"{self.allowed_granularities(selected_groups, modules)}"
            )
        self.criterion.attach({name: layer.tensor for name, layer in self._layers.items()})
        self._magnitude = Magnitude()
        self._magnitude.attach({name: layer.tensor for name, layer in self._layers.items()})
        self.last_thresholds: Thresholds = {}
        self.finalized = False

    def _exact(self, group: UnitGroup, modules: dict[str, nn.Module]) -> bool:
        """Whether removing a unit of ``group`` is exact with this selection: a norm without
        affine entries maps a pruned unit's 0 to a constant, which only the consumers'
        masked columns cancel, so all of them must be selected."""
        if all(getattr(modules[n], "affine", True) for n in group.norms):
            return True
        return all(c.name in self.masks for c in group.consumers)

    @staticmethod
    def allowed_granularities(groups: dict, modules: dict[str, nn.Module]) -> list[str]:
        out = ["weight"]
        for g, types in _UNIT_TYPES.items():
            if any(grp is not None and isinstance(modules[n], types) for n, grp in groups.items()):
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

    def _view(self, layer: _Layer, criterion: Criterion, dense: bool) -> LayerView:
        mask = layer.mask
        weight = layer.tensor.weight.detach()
        if layer.structured:
            score, keep = criterion.unit_scores(layer.name, dense), layer.units.clone()
        else:
            score, keep = criterion.scores(layer.name, dense), mask.bool_mask
        return LayerView(
            layer.name, weight, score, keep, mask, layer.unit_size, layer.tensor.original
        )

    # -- writing masks ----------------------------------------------------------------

    def _min_units(self, n: int) -> int:
        if self.min_keep == 0:
            return 0
        if self.min_keep < 1:
            return min(max(math.ceil(self.min_keep * n), 1), n)
        return min(int(self.min_keep), n)

    @torch.no_grad()
    def _protect(self, layer: _Layer, keep: torch.Tensor) -> torch.Tensor:
        m = self._min_units(keep.numel())
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
            self._magnitude.unit_scores(layer.name, dense=True)
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
                layer.units.copy_(keep)
            else:
                layer.mask.set_(keep)
        if self.granularity != "weight":
            self._sync_structured()

    @torch.no_grad()
    def _sync_structured(self) -> None:
        """Rebuild weight/bias/norm masks from the unit states (rows) and producers (columns)."""
        for name, mask in self.masks.items():
            layer = self._layers.get(name)
            rows = layer.units if layer is not None else None
            cols = None
            if name in self._inputs:
                producer, factor = self._inputs[name]
                cols = self._layers[producer].units.repeat_interleave(factor)
            m = mask.mask
            shape = (m.shape[0], m.shape[1]) + (1,) * (m.ndim - 2)
            keep = torch.ones(shape, dtype=torch.bool, device=m.device)
            if rows is not None:
                keep = keep & rows.view(-1, 1, *([1] * (m.ndim - 2)))
            if cols is not None:
                keep = keep & cols.view(1, -1, *([1] * (m.ndim - 2)))
            mask.set_(keep.expand_as(m))
            if layer is not None:
                for unit_mask in layer.unit_masks:
                    unit_mask.set_(rows)

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
            n = self.masks[name].mask.numel()
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
