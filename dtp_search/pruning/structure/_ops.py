"""What the channel walk knows about operations: which keep a zeroed channel at exactly 0,
which pool, sum or multiply, and how to read shapes and arguments off an fx node."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# Element-wise and 0 ↦ 0.
ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Mish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
ZERO_KEEPING_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardtanh,
    F.mish,
    torch.tanh,
    F.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
}
ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
# Element-wise, but 0 ↦ something else (sigmoid(0) = ½).
ZERO_LOSING_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
ZERO_LOSING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
ZERO_LOSING_METHODS = {"sigmoid"}
# Pool over the positions of each channel (dimension 1 stays).
POOL_MODULES: tuple[type[nn.Module], ...] = (
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
POOL_FUNCTIONS = {
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
REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
MUL = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_"}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Calls that read a tensor's metadata, not its values.
METADATA_METHODS = {"size", "dim", "numel", "type", "to", "float", "half", "bfloat16", "double"}
METADATA_FUNCTIONS = {getattr, len}


def is_depthwise(layer: nn.Module) -> bool:
    """Whether ``layer`` is a depthwise convolution: one filter per input channel."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == layer.in_channels == layer.out_channels


@dataclass
class Label:
    """The atoms of a tensor's unit axis ``dim``, and whether a zeroed atom is exactly 0 there."""

    dim: int
    atoms: list[int]
    exact: bool = True


class UnknownOp(Exception):
    """The walk does not know how an operation maps channels: its inputs get pinned."""


def first_arg(node: fx.Node) -> object:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def arg(node: fx.Node, i: int, key: str | None = None, default: object = None) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default) if key else default


def tensor_meta(node: object):
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def node_shape(node: object) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


def node_ndim(node: object) -> int:
    shape = node_shape(node)
    if shape is None:
        raise UnknownOp
    return len(shape)


def flatten_dims(node: fx.Node) -> tuple[int, int]:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end
