"""Importance criteria: the score S that a threshold θ is compared against.

A criterion scores every weight of a layer (:meth:`Criterion.scores`) and every output
unit — a neuron (row of a Linear) or a channel (filter of a Conv) — for structured
pruning (:meth:`Criterion.unit_scores`). Larger means more important. A layer is a
:class:`~dtp_search.pruning.masks.PrunableTensor` (a Linear/Conv weight, or an attention
in-projection, which is scored weight by weight only); weight scores read the tensor and
the gradient of its dense parameter, activation scores hook the layer's module.

Scores are taken on the *effective* weight W ⊙ M by default, so a pruned weight scores
0 and stays pruned under the rule ``keep = S ≥ θ``; policies that let weights recover
ask for scores of the dense weight W instead (``dense=True``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from dtp_search.pruning.masks import PrunableTensor

GRANULARITIES: tuple[str, ...] = ("weight", "neuron", "channel")


def _weight(t: PrunableTensor, dense: bool) -> torch.Tensor:
    w = t.original.detach()
    mask = t.mask
    return w if dense or mask is None else w * mask.mask


def as_tensors(layers: Mapping[str, nn.Module | PrunableTensor]) -> dict[str, PrunableTensor]:
    """``{name: PrunableTensor}`` from ``{name: layer}``: a module stands for its ``weight``."""
    return {
        name: t if isinstance(t, PrunableTensor) else PrunableTensor(name, t, "weight", name)
        for name, t in layers.items()
    }


def _unit_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of a layer's output that indexes its units: the last one for a Linear
    (``[..., out_features]``), dimension 1 for a Conv (``[N, C, ...]``)."""
    return output.ndim - 1 if isinstance(module, nn.Linear) else 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _check_beta(criterion: str, beta: Any) -> float:
    """β of a moving average, checked: a number in [0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"criterion {criterion}: beta must be a number in [0, 1), got {beta!r}")
    return float(beta)


@torch.no_grad()
def _ema(avg: dict[str, torch.Tensor], name: str, s: torch.Tensor, beta: float) -> None:
    """``avg[name] ← β·avg[name] + (1 − β)·s``, or ``s`` on the first observation.

    β = 0 *replaces* the average instead of computing 0·avg + s, so the score is exactly
    the last observation (0·inf would be nan after an overflowing step).
    """
    old = avg.get(name)
    if old is None or beta == 0.0:
        avg[name] = s
    else:
        old.mul_(beta).add_(s, alpha=1.0 - beta)


def _unit_rms(t: PrunableTensor, dense: bool) -> torch.Tensor:
    """RMS of each output unit's live weights, ‖W_j ⊙ M_j‖₂ / √‖M_j‖₀."""
    w = _rows(_weight(t, dense))
    mask = t.mask
    live = w.shape[1] if mask is None else _rows(mask.mask).sum(dim=1).clamp_min(1)
    return (w.pow(2).sum(dim=1) / live).sqrt()


class Criterion(ABC):
    """Scores weights and output units of the layers it was attached to."""

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]] = GRANULARITIES
    needs_observation: ClassVar[bool] = False  # call observe() after every optimizer step

    def attach(self, layers: Mapping[str, nn.Module | PrunableTensor]) -> None:
        """Start tracking ``{name: layer}`` (hooks, running statistics); a layer is a
        :class:`PrunableTensor` or a module, which stands for its ``weight``."""
        self.layers = as_tensors(layers)

    def detach(self) -> None:
        """Remove hooks; scores of the last state stay available."""
        return None

    def observe(self) -> None:
        """Accumulate statistics after an optimizer step (gradients are still in ``.grad``)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Running statistics (moving averages), for checkpoints."""
        avg = getattr(self, "_avg", None)
        return {} if avg is None else {"avg": {k: v.clone() for k, v in avg.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "avg" in state:
            self._avg = {k: v.clone() for k, v in state["avg"].items()}

    @abstractmethod
    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        """One score per weight of layer ``name`` (shape of its weight, no autograd graph)."""

    def unit_scores(self, name: str, dense: bool = False) -> torch.Tensor:
        """One score per output unit: the mean of the unit's weight scores."""
        return _rows(self.scores(name, dense)).mean(dim=1)


class Magnitude(Criterion):
    """S(w) = |w|; a unit scores the RMS of its live weights, ‖W_j ⊙ M_j‖₂ / √‖M_j‖₀.

    Dividing the L2 norm by the square root of the unit's unmasked fan-in keeps unit
    scores on the scale of single weights, so one threshold means the same for layers
    of different fan-in, and inputs removed with a pruned producer do not count
    (the score is the unit's RMS in the compacted network).
    """

    name = "magnitude"

    @torch.no_grad()
    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        return _weight(self.layers[name], dense).abs()

    @torch.no_grad()
    def unit_scores(self, name: str, dense: bool = False) -> torch.Tensor:
        return _unit_rms(self.layers[name], dense)


class _StepAverage(Criterion):
    """A per-weight statistic of each step's gradient, averaged over steps with β."""

    needs_observation = True

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = _check_beta(self.name, beta)
        self._avg: dict[str, torch.Tensor] = {}

    @abstractmethod
    def _statistic(self, w: torch.Tensor) -> torch.Tensor:
        """This step's statistic of the stored weight ``w`` (its ``.grad`` is set)."""

    @torch.no_grad()
    def observe(self) -> None:
        for name, t in self.layers.items():
            w = t.original
            if w.grad is not None:
                _ema(self._avg, name, self._statistic(w), self.beta)


class Taylor(_StepAverage):
    """First-order Taylor sensitivity (Molchanov et al. 2017/2019): the loss change when a
    weight is removed, |∂L/∂w · w|, as an exponential moving average over steps:

        S_t(w) = β · S_{t−1}(w) + (1 − β) · |g_t(w) · w_t|.

    g is the gradient reaching the stored weight, so a pruned weight (masked gradient
    0) scores 0 unless the mask is straight-through. Before the first step the score
    falls back to |w|. A unit scores the mean over its weights.

    β = 0 is the per-step sensitivity α_t(w) = |g_t(w) · w_t| of AGSP: the score is
    exactly the one of the last step that produced a gradient, with no memory.
    """

    name = "taylor"

    def _statistic(self, w: torch.Tensor) -> torch.Tensor:
        return (w.grad * w).abs_()

    @torch.no_grad()
    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        avg = self._avg.get(name)
        w = _weight(self.layers[name], dense)
        if avg is None:
            return w.abs()
        return avg if dense else avg * (w != 0)


class Activation(Criterion):
    """Mean absolute output of each unit on training batches (structured pruning only):

        S_j = E_batches[ mean over batch (and positions) of |y_j| ],

    an exponential moving average (β) of the layer's output, recorded by a forward hook
    while the model is in training mode. A pruned unit outputs 0 and scores 0.
    """

    name = "activation"
    granularities = ("neuron", "channel")

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = _check_beta(self.name, beta)
        self._avg: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layers: Mapping[str, nn.Module]) -> None:
        super().attach(layers)
        for name, t in self.layers.items():
            if t.has_units:  # an attention in-projection has no units to score
                self._hooks.append(t.module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not module.training:
                return
            with torch.no_grad():
                unit = _unit_dim(module, output)
                dims = [d for d in range(output.ndim) if d != unit]
                _ema(self._avg, name, output.detach().abs().mean(dim=dims), self.beta)

        return record

    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        raise ValueError("criterion=activation scores units; use granularity=neuron or channel")

    @torch.no_grad()
    def unit_scores(self, name: str, dense: bool = False) -> torch.Tensor:
        avg = self._avg.get(name)
        if avg is None:  # no training batch seen yet: fall back to the weight magnitude
            return _unit_rms(self.layers[name], dense)
        return avg.clone()


class Gradient(_StepAverage):
    """Gradient sensitivity (GSP): the size of the loss gradient reaching a weight, as an
    exponential moving average over steps:

        S_t(w) = β · S_{t−1}(w) + (1 − β) · |g_t(w)|,      g_t = ∂J/∂w at step t;

    β = 0 scores the last step's gradient alone. A unit (neuron, channel) scores the mean
    over all of its weights, S_j = (1/n_j) Σ_i S(w_ji) with n_j its fan-in, as for
    ``taylor``.

    Unlike |g·w| the score of a weight does not vanish with the weight, so the pruned
    ones are zeroed explicitly: on the effective weights (``dense=False``) a weight whose
    mask entry is 0 scores 0, and a pruned weight stays pruned under ``S ≥ θ``. Recovering
    policies score the dense weights, whose straight-through gradients keep moving. Before
    the first step the score falls back to |w|.
    """

    name = "gradient"

    def _statistic(self, w: torch.Tensor) -> torch.Tensor:
        return w.grad.abs()

    @torch.no_grad()
    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        t = self.layers[name]
        avg = self._avg.get(name)
        if avg is None:
            return _weight(t, dense).abs()
        mask = t.mask
        return avg if dense or mask is None else avg * mask.mask


class ActivationGradient(Criterion):
    """Gradient sensitivity of activations (GSAP), structured pruning only: a unit j whose
    output z_j the loss J barely reacts to goes first,

        a_t(j) = mean over batch (and positions) of |∂J/∂z_j|   at step t,
        S_t(j) = β · S_{t−1}(j) + (1 − β) · a_t(j),

    z being the layer's own output (before its norm and activation). A forward hook
    registers a tensor hook on z in training mode, which records |∂J/∂z| when the
    backward pass reaches it; :meth:`observe` (after the optimizer step) folds the
    batches seen since the last step into the average, so several backward passes per
    step (gradient accumulation) count as one mean. A tensor hook rather than a full
    backward hook: the latter breaks on the in-place activations that follow the
    layers (``ReLU(inplace=True)``), while a tensor hook still sees ∂J/∂z before them.

    On the effective weights (``dense=False``) a pruned unit — whose weight row is
    masked entirely — scores 0: its output is 0, but ∂J/∂z_j need not be (a tanh or an
    unmasked consumer passes gradient at 0). Before the first step the score falls back
    to the RMS of the unit's live weights.
    """

    name = "activation_gradient"
    granularities = ("neuron", "channel")
    needs_observation = True

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = _check_beta(self.name, beta)
        self._avg: dict[str, torch.Tensor] = {}
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}  # sum of a_t, batches
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layers: Mapping[str, nn.Module]) -> None:
        self.detach()  # attaching twice must not record every batch twice
        super().attach(layers)
        for name, t in self.layers.items():
            if t.has_units:  # an attention in-projection has no units to score
                self._hooks.append(t.module.register_forward_hook(self._forward_hook(name)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pending.clear()

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def on_forward(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if module.training and torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(self._grad_hook(name, _unit_dim(module, output)))

        return on_forward

    def _grad_hook(self, name: str, unit: int = 1) -> Callable[[torch.Tensor], None]:
        def on_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                dims = [d for d in range(grad.ndim) if d != unit]
                # float32: bf16 autocast gradients would lose the small entries
                a = grad.detach().float().abs().mean(dim=dims)
                total, n = self._pending.get(name, (None, 0))
                self._pending[name] = (a if total is None else total + a, n + 1)

        return on_grad

    @torch.no_grad()
    def observe(self) -> None:
        for name, (total, n) in self._pending.items():
            _ema(self._avg, name, total / n, self.beta)
        self._pending.clear()

    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        raise ValueError(
            "criterion=activation_gradient scores units; use granularity=neuron or channel"
        )

    @torch.no_grad()
    def unit_scores(self, name: str, dense: bool = False) -> torch.Tensor:
        t = self.layers[name]
        avg = self._avg.get(name)
        if avg is None:  # no training step seen yet: fall back to the weight magnitude
            return _unit_rms(t, dense)
        mask = t.mask
        if dense or mask is None:
            return avg.clone()
        return avg * _rows(mask.mask).any(dim=1).to(avg.dtype)


CRITERIA: dict[str, type[Criterion]] = {
    cls.name: cls for cls in (Magnitude, Taylor, Gradient, Activation, ActivationGradient)
}


def _criterion_args(name: str) -> tuple[str, ...]:
    """The keyword arguments criterion ``name`` accepts (its constructor's parameters)."""
    params = inspect.signature(CRITERIA[name].__init__).parameters.values()
    return tuple(
        p.name
        for p in params
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def build_criterion(name: str, args: Mapping[str, Any] | None = None) -> Criterion:
    """Instantiate the criterion registered as ``name`` with keyword ``args`` (``{"beta": 0.0}``).

    Raises ``ValueError`` naming the criterion and the allowed values when ``name`` or a
    key of ``args`` is unknown, or when a value is out of range.
    """
    if name not in CRITERIA:
        raise ValueError(f"policy.criterion={name!r} is not supported; allowed: {sorted(CRITERIA)}")
    args = dict(args or {})
    allowed = _criterion_args(name)
    for key in args:
        if key not in allowed:
            raise ValueError(
                f"criterion {name} has no argument {key!r}; allowed: {list(allowed) or 'none'}"
            )
    return CRITERIA[name](**args)
