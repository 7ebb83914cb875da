"""Which output units (neurons, channels) of a network can be removed, and what else goes with them.

Removing output unit j of a layer L (row j of a Linear, filter j of a Conv) is only an
exact structural edit when everything downstream of that unit is either

* *unit-wise* — it maps channel j to channel j alone and 0 to 0: ReLU-like activations,
  tanh, pooling, dropout, and batch norm (whose entry j must then go too), or
* a *consumer* — the next Linear/Conv layer, whose input column(s) j are removed; after a
  flatten of a C×H×W map, channel j is the block of H·W inputs ``j·HW … (j+1)·HW − 1``.

Anything else — a residual ``add``, a ``cat``, a reshape, the network's output — mixes
or exposes the units, so such a layer keeps all of its units. In a ResNet this excludes
the stem and the second convolution of every block (they feed the residual sum), and
leaves the first convolution of every block prunable.

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

_UNITWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_UNITWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh,
    F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_UNITWISE_METHODS = {"relu", "tanh", "contiguous"}
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises a variety of errors on dynamic control flow
        raise ValueError(f"structured pruning needs a torch.fx-traceable model ({exc})") from exc
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    model.train(was_training)
    modules = dict(gm.named_modules())
    out: dict[str, UnitGroup | None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], PRUNABLE_TYPES):
            out[node.target] = _follow(node, modules)
    return out


def _follow(producer: fx.Node, modules: dict[str, nn.Module]) -> UnitGroup | None:
    group = UnitGroup(producer.target)
    stack: list[tuple[fx.Node, int]] = [(producer, 1)]
    seen: set[fx.Node] = set()
    while stack:
        node, factor = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            kind = _classify(user, node, modules)
            if kind == "consumer":
                module = modules[user.target]
                if getattr(module, "groups", 1) != 1:
                    return None
                group.consumers.append(Consumer(user.target, factor))
            elif kind == "norm":
                if factor != 1:
                    return None
                group.norms.append(user.target)
                stack.append((user, factor))
            elif kind == "unitwise":
                stack.append((user, factor))
            elif kind == "flatten":
                shape = node.meta["tensor_meta"].shape
                stack.append((user, factor * math.prod(shape[2:])))
            else:
                return None
    return group if group.consumers else None


def _classify(user: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> str:
    if user.op == "call_module":
        m = modules[user.target]
        if isinstance(m, PRUNABLE_TYPES):
            return "consumer"
        if isinstance(m, _NORM_TYPES):
            return "norm"
        if isinstance(m, _UNITWISE_MODULES):
            return "unitwise"
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return "flatten"
        return "other"
    if user.op == "call_function":
        if user.target in _UNITWISE_FUNCTIONS and user.args and user.args[0] is source:
            return "unitwise"
        if user.target is torch.flatten and _flatten_from_dim1(user):
            return "flatten"
        return "other"
    if user.op == "call_method":
        if user.target in _UNITWISE_METHODS:
            return "unitwise"
        if user.target == "flatten" and _flatten_from_dim1(user):
            return "flatten"
    return "other"


def _flatten_from_dim1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1
