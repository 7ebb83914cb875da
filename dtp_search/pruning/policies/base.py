"""Threshold policies: how the pruning threshold θ moves while the network trains.

A policy sees, for every participating layer l, the importance scores S_l of its units
(weights, neurons or channels; see :mod:`dtp_search.pruning.pruner`), their current
keep state and the time t in epochs, and returns new keep vectors and the per-layer
thresholds θ_l(t) it used. The default rule is

    keep_l ← 1[S_l ≥ θ_l(t)]        (a unit is pruned when its score is below θ).

Because a pruned unit scores 0, masks only tighten as long as θ > 0.

Recovery. A policy built with ``recover=True`` (splicing always is) disables units
only temporarily: it scores the *dense* weights W, the mask's backward pass is
straight-through (∂L/∂W = ∂L/∂(W ⊙ M)), so pruned weights keep learning, and the mask
rule gets a hysteresis band of relative width β (``band``) around θ:

    keep ← 1[S ≥ (1 + β)·θ]  ∨  (keep ∧ 1[S ≥ (1 − β)·θ]),

so a pruned unit comes back once its score clears the upper edge, and a unit near θ
does not flip at every update. The final masks (end of the pruning phase) use the
plain rule ``1[S ≥ θ]`` on the dense scores, so a sparsity target is met exactly.

The family, one module per kind: baselines (``dense``, ``oneshot_global``, ``random``),
fixed and scheduled thresholds (``constant``, ``std_scaled``, ``scheduled``), sparsity
targets (``agp``), accuracy feedback (``feedback``), recovery (``splicing``) and learned
thresholds (``soft_threshold``); this module has what they share. docs/policies.md has
every rule with its parameters and sources.

Time is measured in (fractional) epochs so that the same config means the same
schedule whatever the batch size. No policy updates masks until ``start_epoch`` has
passed: the first ``start_epoch`` epochs train the dense network (and can be shared
between trials, see :meth:`ThresholdPolicy.dense_epochs`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dtp_search.pruning.masks import WeightMask
from dtp_search.pruning.policies import _validate


@dataclass
class LayerView:
    """What a policy may look at for one layer (tensors carry no autograd graph).

    A *unit* is what a mask entry removes: one weight (``granularity=weight``), one
    neuron or one channel. ``score`` and ``keep`` hold one entry per unit.
    """

    name: str
    weight: torch.Tensor  # effective weight W ⊙ M
    score: torch.Tensor  # importance per unit
    keep: torch.Tensor  # current mask per unit (bool)
    mask: WeightMask  # the layer's weight mask (learned-threshold policies read it)
    unit_size: int = 1  # weights per unit
    original: torch.Tensor | None = None  # the dense stored weight W


Keeps = dict[str, torch.Tensor]
Thresholds = dict[str, float]


class ThresholdPolicy(ABC):
    """Maps importance scores and training time to per-layer thresholds θ_l(t) and masks.

    The default mask rule is ``keep_l = 1[S_l ≥ θ_l(t)]`` (see the module docstring).
    Subclasses may override :meth:`masks` for other rules (hysteresis, feedback).

    Args:
        start_epoch: no mask update happens before this time (dense warm-up).
        update_every: masks are recomputed every this many optimizer steps.

    Args (continued):
        recover: disable units temporarily (see the module docstring); only for policies
            whose ``supports_recovery`` is set.
        band: relative half-width β of the recovery hysteresis band, 0 ≤ β < 1.

    The instance attribute ``recovers`` tells the pruner to score dense weights and to
    make the masks' backward pass straight-through. Class attributes tell it what a
    policy can do and needs:

    * ``supports_recovery`` — ``recover=True`` is allowed;
    * ``needs_feedback`` — :attr:`feedback` must be set to a callable returning accuracy
      on data held out of the training part;
    * ``granularities`` — the unit kinds the policy supports.
    """

    name: ClassVar[str]
    supports_recovery: ClassVar[bool] = False
    needs_feedback: ClassVar[bool] = False
    granularities: ClassVar[tuple[str, ...]] = ("weight", "neuron", "channel")
    # Attributes that change while training; :meth:`state_dict` saves exactly these so a
    # checkpointed fold resumes where it stopped (constructor arguments are not state).
    _state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        start_epoch: float = 0.0,
        update_every: int = 50,
        recover: bool = False,
        band: float = 0.1,
    ) -> None:
        _validate.at_least("start_epoch", start_epoch)
        _validate.at_least("update_every", update_every, low=1)
        _validate.boolean("recover", recover)
        if recover and not self.supports_recovery:
            able = [c.name for c in _policy_classes() if c.supports_recovery]
            raise ValueError(
                f"recover=true is not supported by policy {self.name}; allowed with: {able}"
            )
        _validate.fraction("band", band, typed=True)
        self.start_epoch = float(start_epoch)
        self.update_every = int(update_every)
        self.recovers = recover
        self.band = float(band)
        self.feedback: Callable[[], float] | None = None

    def is_active(self, epoch: float) -> bool:
        """Whether masks may change at time ``epoch`` (strictly after ``start_epoch``, so that
        the first ``start_epoch`` epochs are wholly dense)."""
        return epoch > self.start_epoch

    def dense_epochs(self, epochs: int) -> int:
        """Whole epochs at the start of an ``epochs``-long pruning phase during which this
        policy leaves the network exactly dense (all masks 1, ``W ⊙ M = W``).

        Training in those epochs does not depend on the policy's parameters, so trials
        that share everything else can share its result (the dense warm-start cache).
        Policies whose masks act from the first step (learned thresholds) return 0.
        """
        return max(0, min(math.floor(self.start_epoch), int(epochs)))

    def should_update(self, step: int, epoch: float) -> bool:
        """Whether to recompute masks after optimizer step ``step`` (1-based) at time ``epoch``."""
        return step % self.update_every == 0 and self.is_active(epoch)

    @abstractmethod
    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        """θ_l(t) for every layer."""

    def keep(self, layer: LayerView, theta: float, *, hysteresis: bool = True) -> torch.Tensor:
        """The mask rule for one layer at threshold θ: ``S ≥ θ``, or with recovery (and
        ``hysteresis``) the band rule of the module docstring."""
        if not (self.recovers and hysteresis and self.band > 0):
            return layer.score >= theta
        return (layer.score >= (1.0 + self.band) * theta) | (
            layer.keep & (layer.score >= (1.0 - self.band) * theta)
        )

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        """New keep vectors (layers left out stay as they are) and the thresholds used."""
        theta = self.thresholds(layers, epoch)
        return {layer.name: self.keep(layer, theta[layer.name]) for layer in layers}, theta

    def final_masks(self, layers: Sequence[LayerView]) -> tuple[Keeps, Thresholds]:
        """Masks for the post-pruning phase, which starts when the pruning phase ends:
        :meth:`masks` at the final time, or with recovery the plain rule ``S ≥ θ`` (no
        hysteresis band)."""
        epoch = max(self.final_epoch(), self.start_epoch)
        if not self.recovers:
            return self.masks(layers, epoch)
        theta = self.thresholds(layers, epoch)
        return {
            layer.name: self.keep(layer, theta[layer.name], hysteresis=False) for layer in layers
        }, theta

    @torch.no_grad()
    def update_masks(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        """Apply :meth:`masks` to unstructured views in place (tests and scripts)."""
        keeps, theta = self.masks(layers, epoch)
        for layer in layers:
            if layer.name in keeps:
                layer.mask.set_(keeps[layer.name])
                layer.keep = keeps[layer.name]
        return theta

    def final_epoch(self) -> float:
        """Time after which θ no longer changes; the post-pruning phase evaluates θ here."""
        return self.start_epoch

    def finalized(self, layers: Sequence[LayerView]) -> None:
        """Called once the final masks are written (``min_keep`` applied); no-op by default."""
        return None

    def mask_factory(self) -> Callable[..., WeightMask]:
        """The mask parametrization to attach to every weight."""
        return WeightMask

    def param_groups(self, masks: Mapping[str, WeightMask]) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (learned thresholds)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The policy's mutable state, as plain containers and tensors (``weights_only``-safe)."""
        return {k: _copy_state(getattr(self, k)) for k in self._state_attrs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self._state_attrs:
            setattr(self, k, _copy_state(state[k]))


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    return value


def _policy_classes() -> list[type[ThresholdPolicy]]:
    """The named policies defined in this package, in definition order (the order in
    which the package's ``__init__`` imports their modules, which is the registry's)."""
    out: list[type[ThresholdPolicy]] = []
    todo = list(ThresholdPolicy.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if "name" in vars(cls) and cls.__module__.startswith(__name__.rpartition(".")[0]):
            out.append(cls)
        todo += cls.__subclasses__()
    return out
