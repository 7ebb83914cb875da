"""Importance criteria: the score S that a threshold θ is compared against.

A criterion scores every weight of a layer (:meth:`Criterion.scores`) and every output
unit — a neuron (row of a Linear) or a channel (filter of a Conv) — for structured
pruning (:meth:`Criterion.unit_scores`). Larger means more important.

Scores are taken on the *effective* weight W ⊙ M by default, so a pruned weight scores
0 and stays pruned under the rule ``keep = S ≥ θ``; policies that let weights recover
ask for scores of the dense weight W instead (``dense=True``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from dtp_search.pruning.masks import get_mask, original_weight

GRANULARITIES: tuple[str, ...] = ("weight", "neuron", "channel")


def _weight(module: nn.Module, dense: bool) -> torch.Tensor:
    w = original_weight(module).detach()
    mask = get_mask(module)
    return w if dense or mask is None else w * mask.mask


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _unit_rms(module: nn.Module, dense: bool) -> torch.Tensor:
    """RMS of each output unit's live weights, ‖W_j ⊙ M_j‖₂ / √‖M_j‖₀."""
    w = _rows(_weight(module, dense))
    mask = get_mask(module)
    live = w.shape[1] if mask is None else _rows(mask.mask).sum(dim=1).clamp_min(1)
    return (w.pow(2).sum(dim=1) / live).sqrt()


class Criterion(ABC):
    """Scores weights and output units of the layers it was attached to."""

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]] = GRANULARITIES
    needs_observation: ClassVar[bool] = False  # call observe() after every optimizer step

    def attach(self, layers: Mapping[str, nn.Module]) -> None:
        """Start tracking ``{name: layer}`` (hooks, running statistics)."""
        self.layers = dict(layers)

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


class Taylor(Criterion):
    """First-order Taylor sensitivity (Molchanov et al. 2017/2019): the loss change when a
    weight is removed, |∂L/∂w · w|, as an exponential moving average over steps:

        S_t(w) = β · S_{t−1}(w) + (1 − β) · |g_t(w) · w_t|.

    g is the gradient reaching the stored weight, so a pruned weight (masked gradient
    0) scores 0 unless the mask is straight-through. Before the first step the score
    falls back to |w|. A unit scores the mean over its weights.
    """

    name = "taylor"
    needs_observation = True

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"taylor beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._avg: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self) -> None:
        for name, module in self.layers.items():
            w = original_weight(module)
            if w.grad is None:
                continue
            s = (w.grad * w).abs_()
            avg = self._avg.get(name)
            if avg is None:
                self._avg[name] = s
            else:
                avg.mul_(self.beta).add_(s, alpha=1.0 - self.beta)

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
        self.beta = beta
        self._avg: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, layers: Mapping[str, nn.Module]) -> None:
        super().attach(layers)
        for name, module in self.layers.items():
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not module.training:
                return
            with torch.no_grad():
                dims = [d for d in range(output.ndim) if d != 1]
                s = output.detach().abs().mean(dim=dims)
                avg = self._avg.get(name)
                if avg is None:
                    self._avg[name] = s
                else:
                    avg.mul_(self.beta).add_(s, alpha=1.0 - self.beta)
        return record

    def scores(self, name: str, dense: bool = False) -> torch.Tensor:
        raise ValueError("criterion=activation scores units; use granularity=neuron or channel")

    @torch.no_grad()
    def unit_scores(self, name: str, dense: bool = False) -> torch.Tensor:
        avg = self._avg.get(name)
        if avg is None:  # no training batch seen yet: fall back to the weight magnitude
            return _unit_rms(self.layers[name], dense)
        return avg.clone()


CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (Magnitude, Taylor, Activation)}


def build_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]()
    except KeyError:
        raise ValueError(f"policy.criterion={name!r} is not supported; "
                         f"allowed: {sorted(CRITERIA)}") from None
