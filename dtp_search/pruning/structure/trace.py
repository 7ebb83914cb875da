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

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dtp_search.pruning.layers import ChannelPadShortcut
from dtp_search.pruning.masks import PRUNABLE_TYPES
from dtp_search.pruning.structure._walk import Walk
from dtp_search.pruning.structure.groups import Structure


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
    walk = Walk(gm)
    walk.run()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return Structure(walk.groups(order), walk.zero_channels())
