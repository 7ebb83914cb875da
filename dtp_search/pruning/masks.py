"""Binary masks on the weights of ``nn.Linear`` and ``nn.Conv*`` layers.

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

    def __init__(self, shape: torch.Size, *, straight_through: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
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
        self.s = nn.Parameter(torch.full((1,), float(s_init), device=kwargs.get("device"),
                                         dtype=dtype))
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


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every Linear/Conv layer with a weight, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield name, module


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

    ``include`` and ``exclude`` are ``fnmatch`` globs (case-sensitive) over module names as
    ``model.named_modules()`` gives them (``"features.*"``, ``"classifier.4"``; ``""`` is a
    model that is itself one layer). A layer is selected when it matches an ``include``
    glob (or ``include`` is empty: every prunable layer) and no ``exclude`` glob.
    ``exclude_classifier`` leaves out the *classifier*, defined as the last prunable layer
    of the model in ``named_modules()`` order (the output Linear of every builder in
    :mod:`dtp_search.models`), whatever the globs say.

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


def attach_masks(model: nn.Module, *, straight_through: bool = False,
                 mask_factory: Callable[..., WeightMask] = WeightMask,
                 layers: Collection[str] | None = None) -> dict[str, WeightMask]:
    """Register a mask (``mask_factory(shape, ...)``, a :class:`WeightMask` by default) on the
    weight of every prunable layer, or of the prunable layers named in ``layers``.

    Idempotent: layers that already carry a mask keep it (its ``straight_through``
    flag is updated). Returns ``{layer name: mask parametrization}``, in model order.
    """
    masks: dict[str, WeightMask] = {}
    for name, module in prunable_layers(model):
        if layers is not None and name not in layers:
            continue
        existing = get_mask(module)
        if existing is not None:
            existing.straight_through = straight_through
            masks[name] = existing
            continue
        masks[name] = attach_mask(module, "weight", straight_through=straight_through,
                                  mask_factory=mask_factory)
    return masks


def attach_mask(module: nn.Module, tensor_name: str, *, straight_through: bool = False,
                mask_factory: Callable[..., WeightMask] = WeightMask) -> WeightMask:
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


def original_weight(module: nn.Module) -> torch.Tensor:
    """The dense parameter behind a (possibly) masked weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses (``W ⊙ M``, or the soft-thresholded one), no graph."""
    return module.weight.detach()


@torch.no_grad()
def sparsity(model: nn.Module, layers: Collection[str] | None = None) -> float:
    """Fraction of prunable weights (Linear/Conv weights; biases and norms excluded) that are zero.

    Over *every* prunable layer, masked or not — the model's sparsity as inference sees
    it, so layers a pruner left out (see :class:`LayerSelection`) count as the dense
    layers they are — or over the layers named in ``layers`` only
    (:meth:`DynamicPruner.sparsity` passes its selected layers).

    Counts zeros of the *effective* weight, so weights that are exactly zero
    for another reason count too — they cost nothing at inference either way.
    """
    zeros, total = 0, 0
    for name, module in prunable_layers(model):
        if layers is not None and name not in layers:
            continue
        w = effective_weight(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def layer_sparsity(model: nn.Module, layers: Collection[str] | None = None) -> dict[str, float]:
    """Per-layer fraction of zero effective weights: of every prunable layer (unmasked ones
    included, at their natural sparsity, ~0), or of those named in ``layers``."""
    return {name: float((effective_weight(m) == 0).float().mean())
            for name, m in prunable_layers(model) if layers is None or name in layers}


@torch.no_grad()
def snapshot_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every mask in ``model`` (weights, biases, norms), for :func:`restore_masks`."""
    return {name: m.mask.clone() for name, m in model.named_modules() if isinstance(m, WeightMask)}


@torch.no_grad()
def restore_masks(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, WeightMask):
            m.mask.copy_(saved[name])
