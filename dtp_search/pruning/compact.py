"""Export a structurally pruned network as a smaller dense one.

A unit j of a layer (neuron or channel) is *dead* when everything it can emit is
exactly zero: its weight row, its bias entry, and — when a batch norm follows — that
norm's scale and shift entries are all zero, so the unit outputs 0 in every mode and
its consumers' input columns multiply zeros. :func:`compact_model` removes dead units
of every layer whose units are removable (see :mod:`dtp_search.pruning.structure`),
the matching norm entries and the matching input columns of the consumers. The result
is a plain ``nn.Module`` without parametrizations that computes the same function.

Grouped and depthwise convolutions are neither producers nor consumers of removable
units (see :mod:`dtp_search.pruning.structure`), so they are copied unchanged and stay
valid (``in_channels = W.shape[1] · groups``). Attention in-projections have no units and
keep their shape; only their masks are baked in.

Layers without a mask (left out of a pruner's layer selection) need no special case:
deadness is read from the baked weights, not from masks, so such a layer keeps all of
its own units and only loses the input columns that read a dead unit of a pruned
producer — columns that multiply zeros, even though its weights there are not zero.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.pruning.structure import UnitGroup, trace_units


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
def dead_units(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    """Boolean vector: which output units of ``group``'s layer emit exactly zero."""
    modules = dict(model.named_modules())
    layer = modules[group.name]
    w = layer.weight
    dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    if layer.bias is not None:
        dead &= layer.bias == 0
    for norm_name in group.norms:
        norm = modules[norm_name]
        if norm.affine:
            dead &= (norm.weight == 0) & (norm.bias == 0)
        else:  # without affine entries the norm maps 0 to −mean/σ, which is not 0
            dead &= False
    return dead


@torch.no_grad()
def compact_model(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A smaller copy of ``model`` with every dead unit removed; same outputs as ``model``.

    ``example_input`` (one batch, e.g. ``torch.zeros(1, C, H, W)``) is used to trace
    the network and propagate shapes.
    """
    plain = strip_masks(model)
    groups = {name: g for name, g in trace_units(plain, example_input).items() if g is not None}
    modules = dict(plain.named_modules())
    keep_out: dict[str, torch.Tensor] = {}
    keep_in: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        alive = ~dead_units(plain, group)
        if alive.all():
            continue
        if not alive.any():  # keep one unit so that every layer stays a valid module
            alive[0] = True
        keep_out[name] = alive.nonzero().flatten()
        for consumer in group.consumers:
            cols = alive.repeat_interleave(consumer.factor)
            keep_in[consumer.name] = cols.nonzero().flatten()
        for norm_name in group.norms:
            _slice_norm(modules[norm_name], keep_out[name])
    for name in set(keep_out) | set(keep_in):
        _slice_layer(modules[name], keep_out.get(name), keep_in.get(name))
    return plain


def _slice_layer(layer: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    w = layer.weight.data
    if rows is not None:
        w = w.index_select(0, rows)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data.index_select(0, rows).clone())
    if cols is not None:
        w = w.index_select(1, cols)
    layer.weight = nn.Parameter(w.clone())
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = w.shape[0], w.shape[1]
    else:
        layer.out_channels, layer.in_channels = w.shape[0], w.shape[1] * layer.groups


def _slice_norm(norm: nn.Module, rows: torch.Tensor) -> None:
    for key in ("weight", "bias"):
        t = getattr(norm, key)
        if t is not None:
            setattr(norm, key, nn.Parameter(t.data.index_select(0, rows).clone()))
    for key in ("running_mean", "running_var"):
        t = getattr(norm, key)
        if t is not None:
            setattr(norm, key, t.index_select(0, rows).clone())
    norm.num_features = len(rows)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
