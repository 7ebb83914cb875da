"""Which output units (neurons, channels) of a network can be removed, and what else goes with them.

Removing output unit j of a layer L (row j of a Linear, filter j of a Conv) is only an
exact structural edit when everything downstream of that unit is either

* *unit-wise* — it maps unit j to unit j alone and 0 to 0: ReLU-like activations
  (ReLU, ReLU6, LeakyReLU, ELU, GELU, SiLU, Hardswish, tanh, Mish), dropout, pooling
  over the positions of a channel, and batch norm (whose entry j must then go too), or
* a *consumer* — the next Linear/Conv layer, whose input column(s) j are removed; after a
  flatten of a C×H×W map, channel j is the block of H·W inputs ``j·HW … (j+1)·HW − 1``.

Units live on an axis: dimension 1 of a Conv output ``[N, C, …]``, the last dimension
of a Linear output ``[…, F]`` (the same axis when the output is ``[N, F]``). Batch norm,
pooling, a flatten from dimension 1 and a Conv consumer act on dimension 1, a Linear
consumer on the last one; each counts only when it acts on the units' axis (a Linear
applied to the tokens ``[N, T, F]`` of a transformer keeps its units on the last axis,
where a ``BatchNorm1d`` would normalise over T).

Anything else — a residual ``add``, a ``cat``, a reshape, a product with another tensor
(the ``x * scale`` of a squeeze-excitation block), a norm that normalises across units
(``LayerNorm``, ``GroupNorm``), an activation that maps 0 elsewhere (sigmoid,
``Hardsigmoid``: 0 ↦ ½), an attention module, the network's output — mixes or exposes
the units, so such a layer keeps all of its units. In a ResNet this excludes the stem
and the second convolution of every block (they feed the residual sum), and leaves the
first convolution of every block prunable.

Grouped and depthwise convolutions (``groups > 1``) take no part: removing an output
channel of one would move the channels after it into another group, and removing an
input channel of one would leave its group short, so neither such a producer nor any
producer that such a conv consumes is unit-prunable. Neither is a layer the network
calls more than once (shared weights).

We trace the model with ``torch.fx`` and propagate shapes with ``ShapeProp``.
``torch.ao.pruning._experimental`` has a structured pruner built on the same idea,
but it is private, matches a fixed list of layer patterns and has no notion of
residual connections, so we keep this small, general walk instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dtp_search.pruning.masks import PRUNABLE_TYPES

# Element-wise and 0 ↦ 0: any axis.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Hardswish,
    nn.Mish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.mish,
    torch.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "contiguous"}
# Pool over the positions of each channel (dimension 1 stays): the units must be on dim 1.
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# The axis of a tensor that holds a producer's units.
_CHANNEL, _LAST = 1, -1


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, which keeps ``torch.nn`` modules whole; here also the user's
    subclasses of the layers, norms and attention the walk classifies by type (a subclass
    of ``nn.MultiheadAttention`` has data-dependent branches fx cannot trace through)."""

    _LEAVES: tuple[type[nn.Module], ...] = (
        *PRUNABLE_TYPES,
        nn.MultiheadAttention,
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
    )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._LEAVES) or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a producer's units: input unit j is columns ``j·factor … (j+1)·factor − 1``."""

    name: str
    factor: int = 1


@dataclass
class UnitGroup:
    """A layer whose output units can be removed, with the norms and consumers that go with them."""

    name: str
    norms: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)


def trace_units(model: nn.Module, example_input: torch.Tensor) -> dict[str, UnitGroup | None]:
    """For every prunable layer: its :class:`UnitGroup`, or ``None`` when its units cannot be
    removed exactly (see the module docstring).

    Raises ``ValueError`` when the model cannot be traced by ``torch.fx``.
    """
    try:
        graph = _Tracer().trace(model)
        gm = fx.GraphModule(model, graph, model.__class__.__name__)
    except Exception as exc:  # fx raises a variety of errors on dynamic control flow
        raise ValueError(f"structured pruning needs a torch.fx-traceable model ({exc})") from exc
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    model.train(was_training)
    modules = dict(gm.named_modules())
    out: dict[str, UnitGroup | None] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], PRUNABLE_TYPES):
            calls[node.target] = calls.get(node.target, 0) + 1
            out[node.target] = _follow(node, modules) if calls[node.target] == 1 else None
    return out


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _on(axis: int, ndim: int | None, wanted: int) -> bool:
    """Whether units on ``axis`` of an ``ndim``-dimensional tensor sit on axis ``wanted``."""
    return axis == wanted or ndim == 2


def _follow(producer: fx.Node, modules: dict[str, nn.Module]) -> UnitGroup | None:
    layer = modules[producer.target]
    if getattr(layer, "groups", 1) != 1:  # grouped/depthwise conv: see the module docstring
        return None
    group = UnitGroup(producer.target)
    axis = _LAST if isinstance(layer, nn.Linear) else _CHANNEL
    stack: list[tuple[fx.Node, int]] = [(producer, 1)]
    seen: set[fx.Node] = set()
    while stack:
        node, factor = stack.pop()
        ndim = _ndim(node)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            kind = _classify(user, node, modules)
            if kind == "consumer":
                module = modules[user.target]
                reads = _LAST if isinstance(module, nn.Linear) else _CHANNEL
                if getattr(module, "groups", 1) != 1 or not _on(axis, ndim, reads):
                    return None
                group.consumers.append(Consumer(user.target, factor))
            elif kind == "norm":
                if factor != 1 or not _on(axis, ndim, _CHANNEL):
                    return None
                group.norms.append(user.target)
                stack.append((user, factor))
            elif kind == "unitwise" or (
                kind == "pool" and _on(axis, ndim, _CHANNEL) and (ndim or 0) >= 3
            ):
                stack.append((user, factor))
            elif kind == "flatten" and _on(axis, ndim, _CHANNEL) and ndim is not None:
                shape = node.meta["tensor_meta"].shape
                stack.append((user, factor * math.prod(shape[2:])))
            else:
                return None
    return group if group.consumers else None


def _classify(user: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What ``user`` does with the units of ``source``: ``"consumer"``, ``"norm"`` (batch
    norm), ``"unitwise"`` (element-wise, 0 ↦ 0), ``"pool"`` (over the positions of each
    channel), ``"flatten"`` (from dimension 1) or ``"other"``."""
    if user.op == "call_module":
        m = modules[user.target]
        if isinstance(m, PRUNABLE_TYPES):
            return "consumer" if user.args and user.args[0] is source else "other"
        if isinstance(m, _NORM_TYPES):
            return "norm"
        if isinstance(m, _ELEMENTWISE_MODULES):
            return "unitwise"
        if isinstance(m, _POOL_MODULES):
            return "pool"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        return "other"
    if user.op == "call_function":
        first = bool(user.args) and user.args[0] is source
        if user.target in _ELEMENTWISE_FUNCTIONS and first:
            return "unitwise"
        if user.target in _POOL_FUNCTIONS and first:
            return "pool"
        if user.target is torch.flatten and first and _flatten_from_dim1(user):
            return "flatten"
        return "other"
    if user.op == "call_method":
        if user.target in _ELEMENTWISE_METHODS:
            return "unitwise"
        if user.target == "flatten" and _flatten_from_dim1(user):
            return "flatten"
    return "other"


def _flatten_from_dim1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1
