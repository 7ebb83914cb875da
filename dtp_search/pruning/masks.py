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

from collections.abc import Iterator

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


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every Linear/Conv layer with a weight, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield name, module


def attach_masks(model: nn.Module, *, straight_through: bool = False) -> dict[str, WeightMask]:
    """Register a :class:`WeightMask` on the weight of every prunable layer.

    Idempotent: layers that already carry a mask keep it (its ``straight_through``
    flag is updated). Returns ``{layer name: mask parametrization}``.
    """
    masks: dict[str, WeightMask] = {}
    for name, module in prunable_layers(model):
        existing = get_mask(module)
        if existing is not None:
            existing.straight_through = straight_through
            masks[name] = existing
            continue
        weight = module.weight
        mask = WeightMask(weight.shape, straight_through=straight_through,
                          device=weight.device, dtype=weight.dtype)
        # unsafe=True skips a consistency check that would run a forward pass per layer.
        parametrize.register_parametrization(module, "weight", mask, unsafe=True)
        masks[name] = mask
    return masks


def get_mask(module: nn.Module) -> WeightMask | None:
    """The :class:`WeightMask` on ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightMask):
            return p
    return None


def masked_layers(model: nn.Module) -> dict[str, tuple[nn.Module, WeightMask]]:
    """``{name: (module, mask)}`` for every layer that carries a mask."""
    out = {}
    for name, module in prunable_layers(model):
        mask = get_mask(module)
        if mask is not None:
            out[name] = (module, mask)
    return out


def original_weight(module: nn.Module) -> torch.Tensor:
    """The dense parameter behind a (possibly) masked weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W ⊙ M`` without building an autograd graph."""
    mask = get_mask(module)
    w = original_weight(module)
    return w * mask.mask if mask is not None else w


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights (Linear/Conv weights; biases and norms excluded) that are zero.

    Counts zeros of the *effective* weight, so weights that are exactly zero
    for another reason count too — they cost nothing at inference either way.
    """
    zeros, total = 0, 0
    for _, module in prunable_layers(model):
        w = effective_weight(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Per-layer fraction of zero effective weights."""
    return {name: float((effective_weight(m) == 0).float().mean())
            for name, m in prunable_layers(model)}


@torch.no_grad()
def snapshot_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every mask, to be restored with :func:`restore_masks`."""
    return {name: mask.mask.clone() for name, (_, mask) in masked_layers(model).items()}


@torch.no_grad()
def restore_masks(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, (_, mask) in masked_layers(model).items():
        mask.mask.copy_(saved[name])
