"""Which output units (neurons, channels) of a network can be removed, and what goes with them.

Channels are coupled. Removing channel j of a convolution is only a structural edit when
every tensor that channel j flows into loses that channel too, and every layer that
writes into the same channel of a shared tensor loses it as well:

* a residual sum ``a + b`` ties channel j of ``a`` to channel j of ``b`` — in a ResNet the
  stem, the second convolution of every block and every projection shortcut write into
  one *residual stream*, and its channel j is removed from all of them or from none;
* a product ``x * s`` (the scale of a squeeze-excitation block) ties them the same way;
* a concatenation ``cat([a, b], 1)`` makes channel j of ``b`` channel ``C_a + j`` of the
  result;
* a depthwise convolution (``groups == in_channels == out_channels``) maps its input
  channel j to its output channel j, so its filter j goes with the channel;
* a batch norm's entries j, and the input columns j of every consuming Linear/Conv layer
  (after a flatten of a C×H×W map, the block of H·W columns ``j·HW … (j+1)·HW − 1``).

We find the couplings with a ``torch.fx`` trace (shapes from ``ShapeProp``): every
channel a layer writes is an *atom*; the walk labels every tensor's unit axis with the
atoms of its channels, and a sum or product *unites* the atoms at equal positions
(union-find). A *channel group* is an equivalence class of atoms; groups that span the
same layers in the same way form one :class:`ChannelGroup`, which the pruner treats like
one layer with ``size`` units (unit ``u`` is one equivalence class).

A group is *pinned* — never removable — when any of its channels reaches something the
walk cannot edit: the network's output (so the classifier keeps its units), a norm that
normalises across units (``LayerNorm``, ``GroupNorm``), attention, a reshape other than
a flatten, a grouped convolution that is not depthwise, a layer the network calls more
than once (shared weights), a zero-padding of the channel axis written as ``F.pad`` (its
pad widths are constants of the code), or any operation the walk does not know.

Exactness. A removed unit must contribute exactly nothing. Its producers' rows and bias
entries, and its affine norms' scale and shift, are zeroed, so it emits exactly 0; the
walk follows whether that 0 survives to each consumer (ReLU-like activations, pooling,
dropout, a product with anything keep it; ``sigmoid``, a non-affine norm, adding a
constant do not). A consumer that reads a unit through such a path is *inexact*: the
unit is removable only if that consumer's input columns are masked too.

Zero channels. :class:`~dtp_search.pruning.layers.ChannelPadShortcut` (the option-A shortcut of
the CIFAR ResNets) appends zero channels ``front`` and ``back``; the walk knows the
module, makes its zero channels atoms without producers, and a compacted network keeps
only the zero channels whose residual channel survives by lowering ``front``/``back``.

Why our own walk rather than Torch-Pruning's ``DependencyGraph`` (DepGraph, Fang et al.
2023): the dependency graph is built for physically removing channels once, from an
autograd trace, while dynamic threshold pruning needs the coupling as *index maps* it can
mask, score and restore on every mask update, on a model whose weights are parametrized;
it also maps unknown channel operations (an option-A channel pad) index to index without
a word, which silently mis-couples the CIFAR ResNets. ``torch.ao.pruning``'s structured
pruner is private and matches a fixed list of layer patterns. The walk below is small and
exact about what it does not know (it pins). ``scripts/bench_torch_pruning.py`` compares
the result with Torch-Pruning.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dtp_search.pruning.layers import ChannelPadShortcut
from dtp_search.pruning.masks import PRUNABLE_TYPES

# Element-wise and 0 ↦ 0.
_ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
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
_ZERO_KEEPING_FUNCTIONS = {
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
_ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
# Element-wise, but 0 ↦ something else (sigmoid(0) = ½).
_ZERO_LOSING_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_ZERO_LOSING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
_ZERO_LOSING_METHODS = {"sigmoid"}
# Pool over the positions of each channel (dimension 1 stays).
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
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Calls that read a tensor's metadata, not its values.
_METADATA_METHODS = {"size", "dim", "numel", "type", "to", "float", "half", "bfloat16", "double"}
_METADATA_FUNCTIONS = {getattr, len}


def is_depthwise(layer: nn.Module) -> bool:
    """Whether ``layer`` is a depthwise convolution: one filter per input channel."""
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == layer.in_channels == layer.out_channels


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, which keeps ``torch.nn`` modules whole; here also the user's
    subclasses of the layers, norms and attention the walk classifies by type (a subclass
    of ``nn.MultiheadAttention`` has data-dependent branches fx cannot trace through), and
    the option-A channel-pad shortcut."""

    _LEAVES: tuple[type[nn.Module], ...] = (
        *PRUNABLE_TYPES,
        nn.MultiheadAttention,
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        ChannelPadShortcut,
    )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._LEAVES) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class ChannelGroup:
    """Coupled channels the pruner removes together: ``size`` units, unit ``u`` made of

    * rows ``rows[layer][u]`` (a ``[size, r]`` index tensor) of every *producer* layer — the
      weight rows (filters, neurons) and bias entries that write the channel, depthwise
      filters included;
    * entries ``norms[norm][u]`` of every batch norm on the channel;
    * input columns ``columns[layer][u]`` (``[size, c]``; c = H·W after a flatten) of every
      *consumer* layer that reads it;
    * zero channels ``pads[module][u]`` of a
      :class:`~dtp_search.pruning.layers.ChannelPadShortcut` that write into it (entry j
      is its front zero channel j, entry −(j+1) its back zero channel j).

    ``inexact`` names the consumers that read the units through a path on which a zeroed
    unit no longer emits exactly 0 (see the module docstring). ``name`` is the first
    producer's layer name in model order (with ``#k`` appended when several groups start
    at the same layer); ``producers`` lists the producers in model order.
    """

    name: str
    size: int
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    pads: dict[str, torch.Tensor] = field(default_factory=dict)
    inexact: frozenset[str] = frozenset()

    @property
    def producers(self) -> list[str]:
        return list(self.rows)

    @property
    def layers(self) -> set[str]:
        """Every Linear/Conv layer the group touches (producers and consumers)."""
        return set(self.rows) | set(self.columns)


@dataclass
class _Label:
    """The atoms of a tensor's unit axis ``dim``, and whether a zeroed atom is exactly 0 there."""

    dim: int
    atoms: list[int]
    exact: bool = True


class _Walk:
    """Union-find over channel atoms, filled by one pass over the fx graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        # (kind, module name, index within the module's tensor, atom)
        self.members: list[tuple[str, str, int, int]] = []
        self.inexact: list[tuple[str, int]] = []  # (consumer, atom) read through a lossy path
        self.labels: dict[fx.Node, _Label | None] = {}
        self.calls: dict[str, int] = defaultdict(int)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] += 1

    # -- union-find ---------------------------------------------------------------------

    def new(self, n: int, pinned: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pinned:
            self.pinned.update(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def pin(self, *nodes: object) -> None:
        for node in nodes:
            for label in self._labels_in(node):
                self.pinned.update(label.atoms)

    def _labels_in(self, value: object) -> list[_Label]:
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
            except _Unknown:
                self.pin(node.args, node.kwargs)
                self.labels[node] = None

    def _visit(self, node: fx.Node) -> _Label | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "call_module":
            return self._module(node, self.modules[node.target])
        if node.op == "call_function":
            return self._function(node, node.target)
        if node.op == "call_method":
            return self._method(node, node.target)
        raise _Unknown

    def _module(self, node: fx.Node, m: nn.Module) -> _Label | None:
        x = _first(node)
        label = self.labels.get(x) if isinstance(x, fx.Node) else None
        shared = self.calls[node.target] > 1
        if isinstance(m, PRUNABLE_TYPES):
            return self._layer(node, m, label, shared)
        if isinstance(m, _NORM_TYPES):
            if shared or label is None or label.dim != 1:
                raise _Unknown
            if not m.affine:
                return _Label(1, label.atoms, exact=False)
            for j, atom in enumerate(label.atoms):
                self.members.append(("norm", node.target, j, atom))
            return _Label(1, label.atoms, exact=True)  # masked scale and shift: exactly 0
        if isinstance(m, ChannelPadShortcut):
            if label is None or label.dim != 1 or shared:
                raise _Unknown
            front, back = self.new(m.front), self.new(m.back)
            for j, atom in enumerate(front):
                self.members.append(("pad", node.target, j, atom))
            for j, atom in enumerate(back):
                self.members.append(("pad", node.target, -(j + 1), atom))
            return _Label(1, front + label.atoms + back, label.exact)
        if isinstance(m, _ZERO_KEEPING_MODULES):
            return label
        if isinstance(m, _ZERO_LOSING_MODULES):
            return None if label is None else _Label(label.dim, label.atoms, exact=False)
        if isinstance(m, _POOL_MODULES):
            return self._pool(node, label)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x, label, m.start_dim, m.end_dim)
        raise _Unknown

    def _layer(
        self, node: fx.Node, m: nn.Module, label: _Label | None, shared: bool
    ) -> _Label | None:
        out_dim = _ndim(node) - 1 if isinstance(m, nn.Linear) else 1
        if shared:  # shared weights: one row serves several tensors
            raise _Unknown
        if is_depthwise(m):
            if label is None or label.dim != 1:
                raise _Unknown
            for j, atom in enumerate(label.atoms):
                self.members.append(("rows", node.target, j, atom))
            return _Label(1, label.atoms, exact=True)  # masked filter and bias: exactly 0
        if getattr(m, "groups", 1) != 1:
            raise _Unknown
        if label is not None:
            reads = _ndim(_first(node)) - 1 if isinstance(m, nn.Linear) else 1
            if label.dim != reads or len(label.atoms) != m.weight.shape[1]:
                raise _Unknown
            for c, atom in enumerate(label.atoms):
                self.members.append(("cols", node.target, c, atom))
                if not label.exact:
                    self.inexact.append((node.target, atom))
        atoms = self.new(m.weight.shape[0])
        for j, atom in enumerate(atoms):
            self.members.append(("rows", node.target, j, atom))
        return _Label(out_dim, atoms, exact=True)

    def _function(self, node: fx.Node, fn: object) -> _Label | None:
        if fn in _METADATA_FUNCTIONS:
            return None
        x = _first(node)
        label = self.labels.get(x) if isinstance(x, fx.Node) else None
        if fn in _ZERO_KEEPING_FUNCTIONS:
            return label
        if fn in _ZERO_LOSING_FUNCTIONS:
            return None if label is None else _Label(label.dim, label.atoms, exact=False)
        if fn in _POOL_FUNCTIONS:
            return self._pool(node, label)
        if fn is torch.flatten:
            return self._flatten(node, x, label, *_flatten_dims(node))
        if fn in _ADD:
            return self._binary(node, product=False)
        if fn in _MUL:
            return self._binary(node, product=True)
        if fn in (operator.truediv, torch.div) and not isinstance(_arg(node, 1), fx.Node):
            return label
        if fn is torch.cat:
            return self._cat(node)
        if fn is operator.getitem:
            return self._getitem(node, label)
        if fn in _REDUCTIONS:
            return self._reduce(node, label)
        if fn is F.pad:
            return self._pad(node, label)
        raise _Unknown

    def _method(self, node: fx.Node, name: str) -> _Label | None:
        if name in _METADATA_METHODS and _tensor_meta(node) is None:
            return None
        label = self.labels.get(_first(node))
        if name in _ZERO_KEEPING_METHODS:
            return label
        if name in _ZERO_LOSING_METHODS:
            return None if label is None else _Label(label.dim, label.atoms, exact=False)
        if name == "flatten":
            return self._flatten(node, _first(node), label, *_flatten_dims(node))
        if name in ("view", "reshape"):
            return self._reshape(node, label)
        if name in _ADD_METHODS:
            return self._binary(node, product=False)
        if name in _MUL_METHODS:
            return self._binary(node, product=True)
        if name in ("div", "div_") and not isinstance(_arg(node, 1), fx.Node):
            return label
        if name in _REDUCTIONS:
            return self._reduce(node, label)
        raise _Unknown

    # -- operations ----------------------------------------------------------------------

    def _pool(self, node: fx.Node, label: _Label | None) -> _Label | None:
        if label is None:
            return None
        if label.dim != 1 or _ndim(node) < 3:
            raise _Unknown
        return label

    def _flatten(
        self, node: fx.Node, x: object, label: _Label | None, start: int, end: int
    ) -> _Label | None:
        if label is None:
            return None
        ndim = _ndim(x)
        start, end = start % ndim, end % ndim
        if start == end:
            return label
        if label.dim != 1 or start != 1 or end != ndim - 1:
            raise _Unknown
        per = math.prod(_shape(x)[2:])
        return _Label(1, [a for a in label.atoms for _ in range(per)], label.exact)

    def _reshape(self, node: fx.Node, label: _Label | None) -> _Label | None:
        """A view/reshape that flattens ``[N, C, …]`` to ``[N, C·…]`` is a flatten."""
        if label is None:
            return None
        x = _first(node)
        src, dst = _shape(x), _shape(node)
        if src == dst:
            return label
        if len(dst) == 2 and len(src) > 2 and dst[0] == src[0] and label.dim == 1:
            return self._flatten(node, x, label, 1, -1)
        raise _Unknown

    def _binary(self, node: fx.Node, *, product: bool) -> _Label | None:
        a, b = _arg(node, 0), _arg(node, 1)
        la = self.labels.get(a) if isinstance(a, fx.Node) else None
        lb = self.labels.get(b) if isinstance(b, fx.Node) else None
        if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):  # a scalar operand
            label = la or lb
            if label is None:
                return None
            return label if product else _Label(label.dim, label.atoms, exact=False)
        if la is not None and lb is not None:
            if la.dim != lb.dim or len(la.atoms) != len(lb.atoms):
                raise _Unknown
            for p, q in zip(la.atoms, lb.atoms, strict=True):
                self.union(p, q)
            exact = (la.exact or lb.exact) if product else (la.exact and lb.exact)
            return _Label(la.dim, la.atoms, exact)
        label, other = (la, b) if la is not None else (lb, a)
        if label is None:
            return None
        # The other tensor has no channel label: fine only when it is broadcast along the
        # unit axis (one value for every channel).
        shape = _shape(other)
        ndim = _ndim(node)
        dim = label.dim - ndim  # from the right, as broadcasting aligns
        if shape is not None and len(shape) >= -dim and shape[dim] != 1:
            raise _Unknown
        return label if product else _Label(label.dim, label.atoms, exact=False)

    def _cat(self, node: fx.Node) -> _Label | None:
        tensors = _arg(node, 0)
        dim = _arg(node, 1, "dim", 0)
        labels = [self.labels.get(t) for t in tensors]
        if any(lab is None for lab in labels):
            raise _Unknown
        ndim = _ndim(node)
        dim %= ndim
        if all(lab.dim == dim for lab in labels):
            atoms = [a for lab in labels for a in lab.atoms]
            return _Label(dim, atoms, all(lab.exact for lab in labels))
        raise _Unknown

    def _getitem(self, node: fx.Node, label: _Label | None) -> _Label | None:
        if label is None:
            if isinstance(_first(node), fx.Node) and _tensor_meta(_first(node)) is None:
                return None  # an item of a tuple (a module's several outputs)
            raise _Unknown
        index = _arg(node, 1)
        index = index if isinstance(index, tuple) else (index,)
        if (
            all(isinstance(i, slice) for i in index)
            and len(index) > label.dim
            and index[label.dim] == slice(None)
        ):
            return label
        raise _Unknown

    def _reduce(self, node: fx.Node, label: _Label | None) -> _Label | None:
        if label is None:
            return None
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            raise _Unknown
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        ndim = _ndim(_first(node))
        dims = {d % ndim for d in dims}
        if label.dim != 1 or 0 in dims or 1 in dims:
            raise _Unknown
        return label

    def _pad(self, node: fx.Node, label: _Label | None) -> _Label | None:
        if label is None:
            return None
        widths = list(_arg(node, 1, "pad"))
        mode = _arg(node, 2, "mode", "constant")
        value = _arg(node, 3, "value", None)
        ndim = _ndim(node)
        # F.pad lists (before, after) pairs from the last dimension backwards.
        per_dim = {
            ndim - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)
        }
        before, after = per_dim.get(label.dim, (0, 0))
        if before == after == 0:
            return (
                label
                if mode == "constant" and not value
                else _Label(label.dim, label.atoms, exact=False)
            )
        if mode != "constant" or value:
            raise _Unknown
        # Zero channels whose count is a constant of the code: they can never go.
        return _Label(
            label.dim,
            self.new(before, pinned=True) + label.atoms + self.new(after, pinned=True),
            label.exact,
        )

    # -- the groups ----------------------------------------------------------------------

    def groups(self, order: dict[str, int]) -> list[ChannelGroup]:
        classes: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        pinned_roots = {self.find(a) for a in self.pinned}
        for kind, module, index, atom in self.members:
            root = self.find(atom)
            if root not in pinned_roots:
                classes[root].append((kind, module, index))
        inexact = defaultdict(set)
        for consumer, atom in self.inexact:
            inexact[self.find(atom)].add(consumer)
        families: dict[tuple, list[tuple[int, list[tuple[str, str, int]]]]] = defaultdict(list)
        for root, members in classes.items():
            members.sort(key=lambda m: (order.get(m[1], math.inf), m[0], m[2]))
            signature = (
                tuple((k, mod) for k, mod, _ in members),
                frozenset(inexact.get(root, ())),
            )
            families[signature].append((root, members))
        out: list[ChannelGroup] = []
        taken: dict[str, int] = defaultdict(int)
        for (signature, lossy), units in families.items():
            if not any(kind == "rows" for kind, _ in signature):
                continue  # zero channels only: nothing to decide (compaction removes them)
            units.sort(key=lambda u: [m[2] for m in u[1]])
            group = ChannelGroup(name="", size=len(units), inexact=lossy)
            for kind, module in dict.fromkeys(signature):
                table = {"rows": group.rows, "norm": group.norms, "cols": group.columns}.get(
                    kind, group.pads
                )
                table[module] = torch.tensor(
                    [
                        [i for k, mod, i in members if (k, mod) == (kind, module)]
                        for _, members in units
                    ],
                    dtype=torch.long,
                )
            first = group.producers[0]
            taken[first] += 1
            group.name = first if taken[first] == 1 else f"{first}#{taken[first]}"
            out.append(group)
        out.sort(key=lambda g: (order.get(g.producers[0], math.inf), g.name))
        return out

    def zero_channels(self) -> dict[str, list[int]]:
        """For every pad module: its zero channels (entries as in :attr:`ChannelGroup.pads`)
        that no layer writes and no pinned tensor needs (compaction may drop them)."""
        pinned_roots = {self.find(a) for a in self.pinned}
        written = {self.find(atom) for kind, _, _, atom in self.members if kind != "pad"}
        out: dict[str, list[int]] = defaultdict(list)
        for kind, module, index, atom in self.members:
            root = self.find(atom)
            if kind == "pad" and root not in pinned_roots and root not in written:
                out[module].append(index)
        return dict(out)


class _Unknown(Exception):
    """The walk does not know how an operation maps channels: its inputs get pinned."""


def _first(node: fx.Node) -> object:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def _arg(node: fx.Node, i: int, key: str | None = None, default: object = None) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default) if key else default


def _tensor_meta(node: object):
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _shape(node: object) -> tuple[int, ...] | None:
    meta = _tensor_meta(node)
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


def _ndim(node: object) -> int:
    shape = _shape(node)
    if shape is None:
        raise _Unknown
    return len(shape)


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


@dataclass
class Structure:
    """The result of :func:`trace_channels`: the removable :class:`ChannelGroup` s, and the
    zero channels of :class:`~dtp_search.pruning.layers.ChannelPadShortcut` modules that nothing
    writes (``{module: [output positions]}``), which compaction drops as well."""

    groups: list[ChannelGroup]
    zero_channels: dict[str, list[int]]


def trace_channels(model: nn.Module, example_input: torch.Tensor) -> Structure:
    """The coupled channel groups of ``model`` (see the module docstring).

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
    walk = _Walk(gm)
    walk.run()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return Structure(walk.groups(order), walk.zero_channels())
