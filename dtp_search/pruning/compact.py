"""Export a structurally pruned network as a smaller dense one.

A unit of a :class:`~dtp_search.pruning.structure.ChannelGroup` (a neuron, or a channel
coupled across residual sums, concatenations, depthwise convolutions and norms) is
*dead* when it contributes exactly nothing: every producer's weight row and bias entry
and every affine norm's scale and shift entry on it are zero, so it emits 0 in every
mode, and the consumers that read it through a path that loses that 0 have zero input
columns for it. :func:`compact_model` removes dead units everywhere they appear —
producer rows, norm entries, consumer columns, depthwise filters, zero channels of an
option-A shortcut — and returns a plain ``nn.Module`` without parametrizations that
computes the same function with smaller dense kernels.

Grouped convolutions that are not depthwise, attention and everything else the walk
pins keep their shape; only their masks are baked in.

Layers without a mask (left out of a pruner's layer selection) need no special case:
deadness is read from the baked weights, not from masks, so such a layer keeps its own
units unless they are all zero, and loses the input columns that read a dead unit of a
pruned producer — columns that multiply zeros, even though its weights there are not zero.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.pruning.layers import ChannelPadShortcut
from dtp_search.pruning.structure import ChannelGroup, is_depthwise, trace_channels


@torch.no_grad()
def strip_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parametrization baked in (``W ⊙ M`` becomes the weight).

    Every parametrized tensor — a layer's ``weight``, a bias or norm entry, an attention's
    ``in_proj_weight`` — becomes a plain ``nn.Parameter`` holding the value the forward
    pass used, with the ``requires_grad`` flag of the dense original; every module gets its
    own class back, so the copy is an instance of the user's classes and pickles as one.

    ``parametrize.remove_parametrizations`` cannot be used on a deep copy: the copy
    shares the dynamically created ``Parametrized<Module>`` class with the original, and
    removal deletes the property from that class, breaking the original model. So the
    copy gets its plain class back and plain parameters here instead.
    """
    baked = {
        (name, t): (getattr(m, t).detach().clone(), _trainable(m, t))
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m)
        for t in m.parametrizations
    }
    plain = copy.deepcopy(model)
    for name, m in plain.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        tensors = list(m.parametrizations.keys())
        del m._modules["parametrizations"]
        m.__class__ = m.__class__.__bases__[0]
        for t in tensors:
            value, requires_grad = baked[(name, t)]
            m.register_parameter(t, nn.Parameter(value, requires_grad=requires_grad))
    return plain


def _trainable(module: nn.Module, tensor_name: str) -> bool:
    """Whether the dense original of a parametrized tensor requires grad (True if unknown)."""
    original = getattr(getattr(module.parametrizations, tensor_name), "original", None)
    return True if original is None else bool(original.requires_grad)


@torch.no_grad()
def dead_units(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Boolean vector: which units of ``group`` contribute exactly nothing.

    A unit is dead when every producer row and bias entry, and the scale and shift of every
    affine norm on it, are zero (it emits exactly 0), and every consumer that reads it
    through a path that does not keep that 0 (``group.inexact``) has zero input columns
    for it.
    """
    modules = dict(model.named_modules())
    dead = torch.ones(group.size, dtype=torch.bool)
    for name, rows in group.rows.items():
        layer = modules[name]
        w = layer.weight.detach().cpu()
        zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
        if layer.bias is not None:
            zero &= layer.bias.detach().cpu() == 0
        dead &= zero[rows].all(dim=1)
    for name, entries in group.norms.items():
        norm = modules[name]
        if norm.affine:
            zero = (norm.weight.detach().cpu() == 0) & (norm.bias.detach().cpu() == 0)
            dead &= zero[entries].all(dim=1)
    for name in group.inexact:
        w = modules[name].weight.detach().cpu()
        cols = w.transpose(0, 1).reshape(w.shape[1], -1)
        dead &= (cols == 0).all(dim=1)[group.columns[name]].all(dim=1)
    return dead


@torch.no_grad()
def compact_model(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A smaller copy of ``model`` with every dead unit removed; same outputs as ``model``.

    ``example_input`` (one batch, e.g. ``torch.zeros(1, C, H, W)``) is used to trace
    the network and propagate shapes. Every :class:`ChannelGroup` loses its dead units:
    producer rows and bias entries, norm entries, consumer input columns, depthwise filters
    (whose ``groups`` follow) and the zero channels of a
    :class:`~dtp_search.pruning.layers.ChannelPadShortcut` (whose ``front``/``back``
    follow). A group whose units are all dead keeps one, so every layer stays valid.
    """
    plain = strip_masks(model)
    structure = trace_channels(plain, example_input.to(_device(plain)))
    modules = dict(plain.named_modules())
    drop_rows: dict[str, set[int]] = defaultdict(set)
    drop_cols: dict[str, set[int]] = defaultdict(set)
    drop_norm: dict[str, set[int]] = defaultdict(set)
    drop_pad: dict[str, set[int]] = defaultdict(
        set, {k: set(v) for k, v in structure.zero_channels.items()}
    )
    for group in structure.groups:
        dead = dead_units(plain, group)
        if dead.all():
            dead[0] = False
        if not dead.any():
            continue
        for table, drop in (
            (group.rows, drop_rows),
            (group.columns, drop_cols),
            (group.norms, drop_norm),
            (group.pads, drop_pad),
        ):
            for name, index in table.items():
                drop[name].update(index[dead].flatten().tolist())
    for name in set(drop_rows) | set(drop_cols):
        layer = modules[name]
        _slice_layer(
            layer,
            _kept(layer.weight.shape[0], drop_rows.get(name)),
            None if is_depthwise(layer) else _kept(layer.weight.shape[1], drop_cols.get(name)),
        )
    for name, drop in drop_norm.items():
        _slice_norm(modules[name], _kept(modules[name].num_features, drop))
    for name, drop in drop_pad.items():
        pad = modules[name]  # front zero channel j is entry j, back zero channel j is −(j+1)
        pad.front -= sum(1 for i in drop if i >= 0)
        pad.back -= sum(1 for i in drop if i < 0)
    return plain


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _kept(n: int, drop: set[int] | None) -> torch.Tensor | None:
    if not drop:
        return None
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _slice_layer(layer: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    w = layer.weight.data
    depthwise = is_depthwise(layer)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data.index_select(0, rows.to(w.device)).clone())
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    layer.weight = nn.Parameter(w.clone())
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = w.shape[0], w.shape[1]
        return
    if depthwise:  # one filter per remaining channel
        layer.groups = w.shape[0]
    layer.out_channels, layer.in_channels = w.shape[0], w.shape[1] * layer.groups


def _slice_norm(norm: nn.Module, rows: torch.Tensor | None) -> None:
    if rows is None:
        return
    for key in ("weight", "bias"):
        t = getattr(norm, key)
        if t is not None:
            setattr(norm, key, nn.Parameter(t.data.index_select(0, rows.to(t.device)).clone()))
    for key in ("running_mean", "running_var"):
        t = getattr(norm, key)
        if t is not None:
            setattr(norm, key, t.index_select(0, rows.to(t.device)).clone())
    norm.num_features = len(rows)


def layout(model: nn.Module) -> dict[str, dict[str, int]]:
    """The attributes of ``model`` that compaction changes and that no tensor records:
    ``groups`` of depthwise convolutions and ``front``/``back`` of every
    :class:`~dtp_search.pruning.layers.ChannelPadShortcut`. A compacted network rebuilt
    from its constructor gets them back with :func:`apply_layout` before its weights load."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ChannelPadShortcut):
            out[name] = {"front": m.front, "back": m.back}
        elif isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            out[name] = {"groups": m.groups}
    return out


def apply_layout(model: nn.Module, saved: dict[str, dict[str, int]]) -> None:
    """Set the attributes :func:`layout` recorded (``ValueError`` for an unknown module)."""
    modules = dict(model.named_modules())
    for name, attrs in saved.items():
        if name not in modules:
            raise ValueError(f"the saved layout names module {name!r}, which the model lacks")
        for key, value in attrs.items():
            setattr(modules[name], key, int(value))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
