"""The pass over the fx graph that labels every tensor's unit axis with channel atoms and
unites the atoms a sum or product ties together (see :mod:`.trace`)."""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

from dtp_search.pruning.layers import ChannelPadShortcut
from dtp_search.pruning.masks import PRUNABLE_TYPES
from dtp_search.pruning.structure._atoms import Atoms
from dtp_search.pruning.structure._ops import (
    ADD,
    ADD_METHODS,
    METADATA_FUNCTIONS,
    METADATA_METHODS,
    MUL,
    MUL_METHODS,
    NORM_TYPES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    REDUCTIONS,
    ZERO_KEEPING_FUNCTIONS,
    ZERO_KEEPING_METHODS,
    ZERO_KEEPING_MODULES,
    ZERO_LOSING_FUNCTIONS,
    ZERO_LOSING_METHODS,
    ZERO_LOSING_MODULES,
    Label,
    UnknownOp,
    arg,
    first_arg,
    flatten_dims,
    is_depthwise,
    node_ndim,
    node_shape,
    tensor_meta,
)


class Walk(Atoms):
    """Union-find over channel atoms, filled by one pass over the fx graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.labels: dict[fx.Node, Label | None] = {}
        self.calls: dict[str, int] = defaultdict(int)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] += 1

    def pin(self, *nodes: object) -> None:
        for node in nodes:
            for label in self._labels_in(node):
                self.pinned.update(label.atoms)

    def _labels_in(self, value: object) -> list[Label]:
        if isinstance(value, fx.Node):
            label = self.labels.get(value)
            return [label] if label is not None else []
        if isinstance(value, (list, tuple)):
            return [lab for v in value for lab in self._labels_in(v)]
        if isinstance(value, dict):
            return [lab for v in value.values() for lab in self._labels_in(v)]
        return []

    # -- the pass -----------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.pin(node.args)
                continue
            try:
                self.labels[node] = self._visit(node)
            except UnknownOp:
                self.pin(node.args, node.kwargs)
                self.labels[node] = None

    def _visit(self, node: fx.Node) -> Label | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[node.target])
        if node.op == "call_function":
            return self._function(node, node.target)
        if node.op == "call_method":
            return self._method(node, node.target)
        raise UnknownOp

    def _module(self, node: fx.Node, m: nn.Module) -> Label | None:
        x = first_arg(node)
        label = self.labels.get(x) if isinstance(x, fx.Node) else None
        shared = self.calls[node.target] > 1
        if isinstance(m, PRUNABLE_TYPES):
            return self._layer(node, m, label, shared)
        if isinstance(m, NORM_TYPES):
            if shared or label is None or label.dim != 1:
                raise UnknownOp
            if not m.affine:
                return Label(1, label.atoms, exact=False)
            for j, atom in enumerate(label.atoms):
                self.members.append(("norm", node.target, j, atom))
            return Label(1, label.atoms, exact=True)  # masked scale and shift: exactly 0
        if isinstance(m, ChannelPadShortcut):
            if label is None or label.dim != 1 or shared:
                raise UnknownOp
            front, back = self.new(m.front), self.new(m.back)
            for j, atom in enumerate(front):
                self.members.append(("pad", node.target, j, atom))
            for j, atom in enumerate(back):
                self.members.append(("pad", node.target, -(j + 1), atom))
            return Label(1, front + label.atoms + back, label.exact)
        if isinstance(m, ZERO_KEEPING_MODULES):
            return label
        if isinstance(m, ZERO_LOSING_MODULES):
            return None if label is None else Label(label.dim, label.atoms, exact=False)
        if isinstance(m, POOL_MODULES):
            return self._pool(node, label)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, label, m.start_dim, m.end_dim)
        raise UnknownOp

    def _layer(
        self, node: fx.Node, m: nn.Module, label: Label | None, shared: bool
    ) -> Label | None:
        out_dim = node_ndim(node) - 1 if isinstance(m, nn.Linear) else 1
        if shared:  # shared weights: one row serves several tensors
            raise UnknownOp
        if is_depthwise(m):
            if label is None or label.dim != 1:
                raise UnknownOp
            for j, atom in enumerate(label.atoms):
                self.members.append(("rows", node.target, j, atom))
            return Label(1, label.atoms, exact=True)  # masked filter and bias: exactly 0
        if getattr(m, "groups", 1) != 1:
            raise UnknownOp
        if label is not None:
            reads = node_ndim(first_arg(node)) - 1 if isinstance(m, nn.Linear) else 1
            if label.dim != reads or len(label.atoms) != m.weight.shape[1]:
                raise UnknownOp
            for c, atom in enumerate(label.atoms):
                self.members.append(("cols", node.target, c, atom))
                if not label.exact:
                    self.inexact.append((node.target, atom))
        atoms = self.new(m.weight.shape[0])
        for j, atom in enumerate(atoms):
            self.members.append(("rows", node.target, j, atom))
        return Label(out_dim, atoms, exact=True)

    def _function(self, node: fx.Node, fn: object) -> Label | None:
        if fn in METADATA_FUNCTIONS:
            return None
        x = first_arg(node)
        label = self.labels.get(x) if isinstance(x, fx.Node) else None
        if fn in ZERO_KEEPING_FUNCTIONS:
            return label
        if fn in ZERO_LOSING_FUNCTIONS:
            return None if label is None else Label(label.dim, label.atoms, exact=False)
        if fn in POOL_FUNCTIONS:
            return self._pool(node, label)
        if fn is torch.flatten:
            return self._flatten(node, x, label, *flatten_dims(node))
        if fn in ADD:
            return self._binary(node, product=False)
        if fn in MUL:
            return self._binary(node, product=True)
        if fn in (operator.truediv, torch.div) and not isinstance(arg(node, 1), fx.Node):
            return label
        if fn is torch.cat:
            return self._cat(node)
        if fn is operator.getitem:
            return self._getitem(node, label)
        if fn in REDUCTIONS:
            return self._reduce(node, label)
        if fn is F.pad:
            return self._pad(node, label)
        raise UnknownOp

    def _method(self, node: fx.Node, name: str) -> Label | None:
        if name in METADATA_METHODS and tensor_meta(node) is None:
            return None
        label = self.labels.get(first_arg(node))
        if name in ZERO_KEEPING_METHODS:
            return label
        if name in ZERO_LOSING_METHODS:
            return None if label is None else Label(label.dim, label.atoms, exact=False)
        if name == "flatten":
            return self._flatten(node, first_arg(node), label, *flatten_dims(node))
        if name in ("view", "reshape"):
            return self._reshape(node, label)
        if name in ADD_METHODS:
            return self._binary(node, product=False)
        if name in MUL_METHODS:
            return self._binary(node, product=True)
        if name in ("div", "div_") and not isinstance(arg(node, 1), fx.Node):
            return label
        if name in REDUCTIONS:
            return self._reduce(node, label)
        raise UnknownOp

    # -- operations ----------------------------------------------------------------------

    def _pool(self, node: fx.Node, label: Label | None) -> Label | None:
        if label is None:
            return None
        if label.dim != 1 or node_ndim(node) < 3:
            raise UnknownOp
        return label

    def _flatten(
        self, node: fx.Node, x: object, label: Label | None, start: int, end: int
    ) -> Label | None:
        if label is None:
            return None
        ndim = node_ndim(x)
        start, end = start % ndim, end % ndim
        if start == end:
            return label
        if label.dim != 1 or start != 1 or end != ndim - 1:
            raise UnknownOp
        per = math.prod(node_shape(x)[2:])
        return Label(1, [a for a in label.atoms for _ in range(per)], label.exact)

    def _reshape(self, node: fx.Node, label: Label | None) -> Label | None:
        """A view/reshape that flattens ``[N, C, …]`` to ``[N, C·…]`` is a flatten."""
        if label is None:
            return None
        x = first_arg(node)
        src, dst = node_shape(x), node_shape(node)
        if src == dst:
            return label
        if len(dst) == 2 and len(src) > 2 and dst[0] == src[0] and label.dim == 1:
            return self._flatten(node, x, label, 1, -1)
        raise UnknownOp

    def _binary(self, node: fx.Node, *, product: bool) -> Label | None:
        a, b = arg(node, 0), arg(node, 1)
        la = self.labels.get(a) if isinstance(a, fx.Node) else None
        lb = self.labels.get(b) if isinstance(b, fx.Node) else None
        if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):  # a scalar operand
            label = la or lb
            if label is None:
                return None
            return label if product else Label(label.dim, label.atoms, exact=False)
        if la is not None and lb is not None:
            if la.dim != lb.dim or len(la.atoms) != len(lb.atoms):
                raise UnknownOp
            for p, q in zip(la.atoms, lb.atoms, strict=True):
                self.union(p, q)
            exact = (la.exact or lb.exact) if product else (la.exact and lb.exact)
            return Label(la.dim, la.atoms, exact)
        label, other = (la, b) if la is not None else (lb, a)
        if label is None:
            return None
        # The other tensor has no channel label: fine only when it is broadcast along the
        # unit axis (one value for every channel).
        shape = node_shape(other)
        ndim = node_ndim(node)
        dim = label.dim - ndim  # from the right, as broadcasting aligns
        if shape is not None and len(shape) >= -dim and shape[dim] != 1:
            raise UnknownOp
        return label if product else Label(label.dim, label.atoms, exact=False)

    def _cat(self, node: fx.Node) -> Label | None:
        tensors = arg(node, 0)
        dim = arg(node, 1, "dim", 0)
        labels = [self.labels.get(t) for t in tensors]
        if any(lab is None for lab in labels):
            raise UnknownOp
        ndim = node_ndim(node)
        dim %= ndim
        if all(lab.dim == dim for lab in labels):
            atoms = [a for lab in labels for a in lab.atoms]
            return Label(dim, atoms, all(lab.exact for lab in labels))
        raise UnknownOp

    def _getitem(self, node: fx.Node, label: Label | None) -> Label | None:
        if label is None:
            if isinstance(first_arg(node), fx.Node) and tensor_meta(first_arg(node)) is None:
                return None  # an item of a tuple (a module's several outputs)
            raise UnknownOp
        index = arg(node, 1)
        index = index if isinstance(index, tuple) else (index,)
        if (
            all(isinstance(i, slice) for i in index)
            and len(index) > label.dim
            and index[label.dim] == slice(None)
        ):
            return label
        raise UnknownOp

    def _reduce(self, node: fx.Node, label: Label | None) -> Label | None:
        if label is None:
            return None
        dims = arg(node, 1, "dim", None)
        if dims is None:
            raise UnknownOp
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        ndim = node_ndim(first_arg(node))
        dims = {d % ndim for d in dims}
        if label.dim != 1 or 0 in dims or 1 in dims:
            raise UnknownOp
        return label

    def _pad(self, node: fx.Node, label: Label | None) -> Label | None:
        if label is None:
            return None
        widths = list(arg(node, 1, "pad"))
        mode = arg(node, 2, "mode", "constant")
        value = arg(node, 3, "value", None)
        ndim = node_ndim(node)
        # F.pad lists (before, after) pairs from the last dimension backwards.
        per_dim = {
            ndim - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)
        }
        before, after = per_dim.get(label.dim, (0, 0))
        if before == after == 0:
            return (
                label
                if mode == "constant" and not value
                else Label(label.dim, label.atoms, exact=False)
            )
        if mode != "constant" or value:
            raise UnknownOp
        # Zero channels whose count is a constant of the code: they can never go.
        return Label(
            label.dim,
            self.new(before, pinned=True) + label.atoms + self.new(after, pinned=True),
            label.exact,
        )
