"""Binary masks on the prunable weights of a network: the mask parametrizations, and
attaching and reading one on a module's tensor.

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

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize


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
