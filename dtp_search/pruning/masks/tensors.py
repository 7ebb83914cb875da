"""What is prunable in a network, and the layer name each prunable tensor goes by.

What is prunable (:func:`prunable_tensors`), and the *layer name* each tensor goes by —
the name that :class:`LayerSelection` globs, pruner masks, thresholds and reports use:

* the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (grouped and depthwise
  convolutions included), named by its module, as ``model.named_modules()`` gives it
  (``"features.0.0"``, ``"fc"``; ``""`` for a model that is itself one layer). The output
  projection ``out_proj`` of an ``nn.MultiheadAttention`` is such a Linear
  (``"encoder.0.self_attn.out_proj"``);
* the input projection of every ``nn.MultiheadAttention``, a raw parameter of the
  attention module rather than a layer: ``in_proj_weight`` (E_q+E_k+E_v = 3E rows), named
  ``"<attention>.in_proj"`` (``"encoder.0.self_attn.in_proj"``), or — when key and value
  dimensions differ from the embedding (``kdim``/``vdim``, ``_qkv_same_embed_dim=False``) —
  ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, named ``"<attention>.q_proj"``,
  ``".k_proj"``, ``".v_proj"``. The attention module is listed before its ``out_proj``.

Only Linear and Conv weights have output units (rows, filters) that neuron/channel
granularity can remove; the in-projection is pruned weight by weight only. Biases and
norm parameters are never prunable tensors (structured pruning masks them along with
their unit). A :class:`PrunableTensor` maps a layer name to its owning module and the
attribute that holds the tensor; its mask is a parametrization (:mod:`.parametrization`)
on ``module.<attr>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dtp_search.pruning.masks.parametrization import WeightMask, get_mask, original_weight

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


_IN_PROJECTIONS = {
    "in_proj_weight": "in_proj",
    "q_proj_weight": "q_proj",
    "k_proj_weight": "k_proj",
    "v_proj_weight": "v_proj",
}


@dataclass(frozen=True, eq=False)
class PrunableTensor:
    """One prunable tensor: the layer ``name`` it goes by, the ``module`` that owns it
    (``module_name`` in ``model.named_modules()``) and the attribute ``attr`` holding it.

    For a Linear/Conv layer ``name == module_name`` and ``attr == "weight"``; for an
    attention in-projection ``module`` is the ``nn.MultiheadAttention``, ``attr`` is
    ``"in_proj_weight"`` (or ``"q_proj_weight"``, …) and ``name`` is
    ``module_name + ".in_proj"`` (or ``".q_proj"``, …). The tensor is masked with a
    :class:`WeightMask` parametrization on ``module.<attr>`` either way, so the forward
    pass reads ``W ⊙ M`` through the attribute.
    """

    name: str
    module: nn.Module
    attr: str = "weight"
    module_name: str = ""

    @property
    def has_units(self) -> bool:
        """Whether the tensor is a Linear/Conv weight, whose rows (output units) neuron and
        channel granularity can remove."""
        return self.attr == "weight"

    @property
    def state_key(self) -> str:
        """The tensor's key in the unmasked model's ``state_dict()`` (``"fc.weight"``,
        ``"attn.in_proj_weight"``)."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def weight(self) -> torch.Tensor:
        """The tensor the forward pass uses, ``W ⊙ M`` when masked (with its autograd graph)."""
        return getattr(self.module, self.attr)

    @property
    def original(self) -> torch.Tensor:
        """The dense parameter ``W`` behind the (possibly) masked tensor."""
        return original_weight(self.module, self.attr)

    @property
    def mask(self) -> WeightMask | None:
        """The :class:`WeightMask` on the tensor, or ``None``."""
        return get_mask(self.module, self.attr)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias that goes with the tensor: the layer's ``bias``; for an in-projection the
        rows of ``in_proj_bias`` it feeds (all of them for ``in_proj``, E each for
        ``q_proj``/``k_proj``/``v_proj``)."""
        if self.has_units:
            return getattr(self.module, "bias", None)
        b = getattr(self.module, "in_proj_bias", None)
        if b is None or self.attr == "in_proj_weight":
            return b
        e = self.module.embed_dim
        i = ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(self.attr)
        return b[i * e : (i + 1) * e]


def prunable_tensors(model: nn.Module) -> Iterator[PrunableTensor]:
    """Every prunable tensor of ``model`` in model order (see the module docstring)."""
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield PrunableTensor(module_name, module, "weight", module_name)
        elif isinstance(module, nn.MultiheadAttention):
            attrs = (
                ("in_proj_weight",)
                if module._qkv_same_embed_dim
                else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            )
            for attr in attrs:
                suffix = _IN_PROJECTIONS[attr]
                name = f"{module_name}.{suffix}" if module_name else suffix
                yield PrunableTensor(name, module, attr, module_name)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every Linear/Conv layer with a weight, in model order.

    These are the prunable tensors whose tensor is ``module.weight`` (and which have
    output units); :func:`prunable_tensors` also lists attention in-projections.
    """
    for t in prunable_tensors(model):
        if t.has_units:
            yield t.name, t.module
