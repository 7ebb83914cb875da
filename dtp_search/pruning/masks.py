"""Binary masks on the prunable weights of a network.

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
attribute that holds the tensor.

A mask is state on the module and the masked weight is derived, as in
``torch.nn.utils.prune``: the layer keeps its original (dense) parameter and every
forward pass sees

    W_eff = W ⊙ M,      M ∈ {0, 1}^shape(W).

We attach the mask with ``torch.nn.utils.parametrize`` rather than with
``torch.nn.utils.prune`` for two reasons:

* ``prune`` masks can only be *tightened* (``compute_mask`` multiplies the new mask
  with the old one), while dynamic threshold policies also relax masks so that
  pruned weights can recover (splicing); with a parametrization the mask is a
  plain buffer that a policy may overwrite in either direction.
* ``torch.ao.pruning`` uses the same mechanism (``FakeSparsity``), so
  ``parametrize.remove_parametrizations`` and ``state_dict`` behave as users
  of PyTorch expect.

Why pruned weights stay exactly zero through SGD with momentum and weight
decay: the optimizer updates the original ``W`` (``parametrizations.weight.original``),
whose pruned entries receive zero loss gradient but still decay and carry
momentum; the *effective* weight is recomputed as ``W ⊙ M`` on every forward
pass, so its pruned entries are ``0 · w = 0`` whatever the optimizer did.
When a mask entry is relaxed back to 1, the weight recovers from its
(decayed) original value.

With ``straight_through=True`` the backward pass treats the mask as identity
(∂L/∂W = ∂L/∂W_eff), so pruned weights keep learning and can come back;
Dynamic Network Surgery (Guo et al., 2016) needs exactly that.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _StraightThroughMask(torch.autograd.Function):
    """``W ⊙ M`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


class WeightMask(nn.Module):
    """Parametrization ``W ↦ W ⊙ M`` with the mask ``M`` held as a buffer.

    The mask is stored in the weight's dtype (0.0 / 1.0) so that applying it is one
    fused multiply; :attr:`bool_mask` gives the boolean view.
    """

    def __init__(
        self,
        shape: torch.Size,
        *,
        straight_through: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.straight_through = straight_through
        self.register_buffer("mask", torch.ones(shape, device=device, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.straight_through and torch.is_grad_enabled():
            return _StraightThroughMask.apply(weight, self.mask)
        return weight * self.mask

    @property
    def bool_mask(self) -> torch.Tensor:
        return self.mask != 0

    @torch.no_grad()
    def set_(self, keep: torch.Tensor) -> None:
        """Overwrite the mask in place with a boolean ``keep`` tensor (True = kept)."""
        self.mask.copy_(keep)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, straight_through={self.straight_through}"


class SoftThresholdMask(WeightMask):
    """Learned soft threshold (STR, Kusupati et al. 2020) in front of the binary mask.

        W_eff = sign(W) · relu(|W| − g(s)) ⊙ M,      g = sigmoid,

    with one trainable scalar ``s`` per layer. Weights with |W| ≤ g(s) are exactly zero
    and receive no loss gradient, so sparsity emerges from training (weight decay on
    ``s`` pushes g(s) up). :meth:`harden` ends learning: the shrinkage is baked into the
    original weight and the zeros become a plain binary mask, so that fine-tuning,
    sweeps and export treat the layer like any other masked one.
    """

    def __init__(self, shape: torch.Size, *, s_init: float = -5.0, **kwargs) -> None:
        super().__init__(shape, **kwargs)
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        self.s = nn.Parameter(
            torch.full((1,), float(s_init), device=kwargs.get("device"), dtype=dtype)
        )
        self.learning = True

    def threshold(self) -> float:
        return float(torch.sigmoid(self.s.detach()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.learning:
            weight = torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(self.s))
        return weight * self.mask

    @torch.no_grad()
    def harden(self, original: torch.Tensor) -> None:
        """End learning: bake ``sign(W)·relu(|W| − g(s))`` into ``original`` where the mask
        keeps a weight, and zero the rest.

        A weight the mask keeps although |W| ≤ g(s) (restored by a ``min_keep`` floor)
        keeps its raw value instead of becoming an exact zero.
        """
        if not self.learning:
            return
        g = torch.sigmoid(self.s)
        above = original.abs() > g
        shrunk = torch.where(above, torch.sign(original) * (original.abs() - g), original)
        original.copy_(shrunk * self.mask)
        self.learning = False
        self.s.requires_grad_(False)

    @torch.no_grad()
    def soft_keep(self, original: torch.Tensor) -> torch.Tensor:
        """Which weights the soft threshold currently lets through: |W| > g(s), within the mask."""
        return (original.abs() > torch.sigmoid(self.s)) & self.bool_mask


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


def _patterns(value: str | Iterable[str] | None, key: str) -> tuple[str, ...]:
    if value is None:  # an unset (null) config entry: no globs
        return ()
    if isinstance(value, str):  # one glob, not a sequence of one-letter globs
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"layers.{key} must be a list of globs, got {value!r}") from None
    for p in out:
        if not isinstance(p, str) or not p:
            raise ValueError(f"layers.{key} must be a list of non-empty globs, got {p!r}")
    return out


@dataclass(frozen=True)
class LayerSelection:
    """Which prunable layers a pruner masks; the others stay dense and untouched.

    ``include`` and ``exclude`` are ``fnmatch`` globs (case-sensitive) over the layer names
    of :func:`prunable_tensors`: module names as ``model.named_modules()`` gives them
    (``"features.*"``, ``"classifier.4"``; ``""`` is a model that is itself one layer), and
    ``"<attention>.in_proj"`` (or ``.q_proj``/``.k_proj``/``.v_proj``) for the input
    projection of an ``nn.MultiheadAttention`` (``"*.in_proj"`` selects them all, and
    ``"encoder.*"`` both projections of every attention under ``encoder``). A layer is selected when it matches an ``include``
    glob (or ``include`` is empty: every prunable layer) and no ``exclude`` glob.
    ``exclude_classifier`` leaves out the *classifier*, defined as the last prunable layer
    of the model in :func:`prunable_tensors` order (the output Linear of every builder in
    :mod:`dtp_search.models`, and of most user networks), whatever the globs say.

    A glob that matches no prunable layer is a mistake (a typo, or a container's name
    such as ``"features"`` instead of ``"features.*"``), as is a selection of no layer:
    :meth:`select` raises ``ValueError`` listing the prunable layers.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_classifier: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and Hydra ListConfigs) but store tuples: the dataclass is frozen
        # and hashable.
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if not isinstance(self.exclude_classifier, bool):
            raise ValueError(
                f"exclude_classifier must be true or false, got {self.exclude_classifier!r}"
            )

    def select(self, names: Iterable[str]) -> list[str]:
        """The selected ones of the prunable layer ``names`` (in model order), in their order."""
        names = list(names)
        listing = f"prunable layers: {names}"
        for key, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs:
                if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                    raise ValueError(
                        f"layers.{key} glob {glob!r} matches no prunable layer; {listing}"
                    )
        chosen = [
            n
            for n in names
            if (not self.include or any(fnmatch.fnmatchcase(n, g) for g in self.include))
            and not any(fnmatch.fnmatchcase(n, g) for g in self.exclude)
        ]
        if self.exclude_classifier and names:
            chosen = [n for n in chosen if n != names[-1]]
        if not chosen:
            raise ValueError(
                f"the layer selection (include={list(self.include)}, "
                f"exclude={list(self.exclude)}, exclude_classifier="
                f"{self.exclude_classifier}) selects no layer; {listing}"
            )
        return chosen


def attach_masks(
    model: nn.Module,
    *,
    straight_through: bool = False,
    mask_factory: Callable[..., WeightMask] = WeightMask,
    layers: Collection[str] | None = None,
) -> dict[str, WeightMask]:
    """Register a mask (``mask_factory(shape, ...)``, a :class:`WeightMask` by default) on
    every prunable tensor (:func:`prunable_tensors`), or on those whose layer names are in
    ``layers``.

    Idempotent: layers that already carry a mask keep it (its ``straight_through``
    flag is updated). Returns ``{layer name: mask parametrization}``, in model order.
    """
    masks: dict[str, WeightMask] = {}
    for t in prunable_tensors(model):
        if layers is not None and t.name not in layers:
            continue
        existing = t.mask
        if existing is not None:
            existing.straight_through = straight_through
            masks[t.name] = existing
            continue
        masks[t.name] = attach_mask(
            t.module, t.attr, straight_through=straight_through, mask_factory=mask_factory
        )
    return masks


def attach_mask(
    module: nn.Module,
    tensor_name: str,
    *,
    straight_through: bool = False,
    mask_factory: Callable[..., WeightMask] = WeightMask,
) -> WeightMask:
    """Register a mask on ``module.<tensor_name>`` (a weight, a bias, a norm's scale or shift)."""
    existing = get_mask(module, tensor_name)
    if existing is not None:
        return existing
    t = getattr(module, tensor_name)
    mask = mask_factory(t.shape, straight_through=straight_through, device=t.device, dtype=t.dtype)
    # unsafe=True skips a consistency check that would run a forward pass per layer.
    parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)
    return mask


def get_mask(module: nn.Module, tensor_name: str = "weight") -> WeightMask | None:
    """The :class:`WeightMask` on ``module.<tensor_name>``, or ``None``."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in getattr(module.parametrizations, tensor_name):
        if isinstance(p, WeightMask):
            return p
    return None


def original_weight(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor:
    """The dense parameter behind a (possibly) masked ``module.<tensor_name>``."""
    if parametrize.is_parametrized(module, tensor_name):
        return getattr(module.parametrizations, tensor_name).original
    return getattr(module, tensor_name)


@torch.no_grad()
def effective_weight(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor:
    """The tensor the forward pass uses (``W ⊙ M``, or the soft-thresholded one), no graph."""
    return getattr(module, tensor_name).detach()


@torch.no_grad()
def sparsity(model: nn.Module, layers: Collection[str] | None = None) -> float:
    """Fraction of prunable weights (the tensors of :func:`prunable_tensors`: Linear/Conv
    weights and attention in-projections; biases and norms excluded) that are zero,
    s = Σ_l #{w ∈ W_l ⊙ M_l : w = 0} / Σ_l numel(W_l).

    Over *every* prunable layer, masked or not — the model's sparsity as inference sees
    it, so layers a pruner left out (see :class:`LayerSelection`) count as the dense
    layers they are — or over the layers named in ``layers`` only
    (:meth:`DynamicPruner.sparsity` passes its selected layers).

    Counts zeros of the *effective* weight, so weights that are exactly zero
    for another reason count too — they cost nothing at inference either way.
    """
    zeros, total = 0, 0
    for t in prunable_tensors(model):
        if layers is not None and t.name not in layers:
            continue
        w = t.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def layer_sparsity(model: nn.Module, layers: Collection[str] | None = None) -> dict[str, float]:
    """Per-layer fraction of zero effective weights: of every prunable layer (unmasked ones
    included, at their natural sparsity, ~0), or of those named in ``layers``."""
    return {
        t.name: float((t.weight.detach() == 0).float().mean())
        for t in prunable_tensors(model)
        if layers is None or t.name in layers
    }


@torch.no_grad()
def snapshot_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every mask in ``model`` (weights, biases, norms), for :func:`restore_masks`."""
    return {name: m.mask.clone() for name, m in model.named_modules() if isinstance(m, WeightMask)}


@torch.no_grad()
def restore_masks(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, WeightMask):
            m.mask.copy_(saved[name])
