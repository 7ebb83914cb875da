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

The family: baselines (``dense``, ``oneshot_global``, ``random``), fixed and scheduled
thresholds (``constant``, ``std_scaled``, ``scheduled``), sparsity targets (``agp``),
accuracy feedback (``feedback``), recovery (``splicing``) and learned thresholds
(``soft_threshold``). docs/policies.md has every rule with its parameters and sources.

Time is measured in (fractional) epochs so that the same config means the same
schedule whatever the batch size. No policy updates masks until ``start_epoch`` has
passed: the first ``start_epoch`` epochs train the dense network (and can be shared
between trials, see :meth:`ThresholdPolicy.dense_epochs`).
"""

from __future__ import annotations

import functools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import prune

from dtp_search.pruning.masks import SoftThresholdMask, WeightMask


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
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if not isinstance(recover, bool):
            raise ValueError(f"recover must be true or false, got {recover!r}")
        if recover and not self.supports_recovery:
            able = [n for n, c in POLICIES.items() if c.supports_recovery]
            raise ValueError(
                f"recover=true is not supported by policy {self.name}; allowed with: {able}"
            )
        if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0.0 <= band < 1.0:
            raise ValueError(f"band must be in [0, 1), got {band!r}")
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


class ConstantThreshold(ThresholdPolicy):
    """One fixed threshold for every layer: a weight is pruned when |w| < θ.

    θ_l(t) = θ   for all l, t ≥ start_epoch.
    """

    name = "constant"
    supports_recovery = True

    def __init__(self, theta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if theta < 0:
            raise ValueError(f"theta must be >= 0, got {theta}")
        self.theta = float(theta)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return {layer.name: self.theta for layer in layers}


class StdScaledThreshold(ThresholdPolicy):
    """Per-layer threshold proportional to the spread of the layer's weights (Han et al., 2015).

        θ_l = q · std(W_l ⊙ M_l)

    The standard deviation is taken over the whole effective weight tensor, zeros of
    pruned weights included (as in Han et al.'s Caffe code, where pruned weights are
    zeroed). Taking it over the surviving weights only would make θ grow at every
    update (survivors are the large weights), a runaway; over the full tensor the
    iteration θ ← q·sqrt(E[w² 1(|w| ≥ θ)]) decreases to a fixed point.
    """

    name = "std_scaled"
    supports_recovery = True

    def __init__(self, q: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if q < 0:
            raise ValueError(f"q must be >= 0, got {q}")
        self.q = float(q)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        return {
            layer.name: self.q * float(layer.weight.float().std(unbiased=False)) for layer in layers
        }


def _window_end(end_epoch: float, start_epoch: float) -> float:
    """The end of a pruning window [t_s, t_e]. An end at or before the start makes the
    window one step at t_s: the policy prunes to its target at once there. Searched
    windows sample t_s and t_e independently, and this keeps every such pair a valid
    (if abrupt) schedule instead of a wasted trial."""
    return max(float(end_epoch), float(start_epoch))


def _ramp(epoch: float, start: float, end: float) -> float:
    """Progress r ∈ [0, 1] of ``epoch`` through [start, end] (a step at ``start`` if end ≤ start)."""
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / (end - start), 0.0), 1.0)


class ScheduledThreshold(ThresholdPolicy):
    """A global threshold that rises from θ₀ to θ₁ between ``start_epoch`` and ``end_epoch``.

        r(t) = clip((t − t_s) / (t_e − t_s), 0, 1)
        θ(t) = θ₀ + (θ₁ − θ₀) · g(r),   g(r) = r (linear)  or  1 − (1 − r)³ (cubic)

    The cubic ramp raises θ fast while the network has many redundant weights and
    slowly near the end, like AGP's sparsity schedule.
    """

    name = "scheduled"
    supports_recovery = True
    SHAPES: ClassVar[tuple[str, ...]] = ("linear", "cubic")

    def __init__(
        self,
        theta_start: float,
        theta_end: float,
        *,
        end_epoch: float,
        shape: str = "linear",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if theta_start < 0 or theta_end < 0:
            raise ValueError(f"thresholds must be >= 0, got {theta_start}, {theta_end}")
        if shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}, got {shape!r}")
        self.theta_start = float(theta_start)
        self.theta_end = float(theta_end)
        self.end_epoch = _window_end(end_epoch, self.start_epoch)
        self.shape = shape

    def theta(self, epoch: float) -> float:
        r = _ramp(epoch, self.start_epoch, self.end_epoch)
        g = r if self.shape == "linear" else 1.0 - (1.0 - r) ** 3
        return self.theta_start + (self.theta_end - self.theta_start) * g

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        theta = self.theta(epoch)
        return {layer.name: theta for layer in layers}

    def final_epoch(self) -> float:
        return self.end_epoch


_EXACT_QUANTILE_LIMIT = 1 << 25  # entries; beyond, thresholds come from a sample
_QUANTILE_SAMPLE = 1 << 22


def quantile_threshold(
    scores: torch.Tensor, sparsity: float, weights: torch.Tensor | None = None
) -> float:
    """The smallest threshold θ such that ``keep = scores ≥ θ`` prunes a fraction ``sparsity``.

    Unweighted: θ is the (k+1)-th smallest score, k = ⌊sparsity · n⌋, so exactly k entries
    are pruned when scores are distinct; ``torch.kthvalue`` finds it in O(n), no sort.
    Above 2²⁵ scores, θ is estimated from a uniform sample of 2²² of them.

    Weighted (one weight per entry, e.g. the number of weights in a neuron): the longest
    prefix of the ascending scores whose total weight stays within ``sparsity · Σw`` is
    pruned, and θ is the first score after it.

    Ties: when the scores on both sides of the cut are equal, θ is the next float32 above
    them, so every tied entry is pruned and the pruned fraction is at least ``sparsity``.
    """
    flat = scores.reshape(-1).float()
    n = flat.numel()
    if weights is None and n > _EXACT_QUANTILE_LIMIT and 0 < sparsity < 1:
        # Very large models: the quantile of a fixed-size uniform sample (its error is
        # about 1/sqrt(sample) in sparsity, ~0.05 % here) instead of a selection over
        # every weight at each mask update.
        gen = torch.Generator(device=flat.device).manual_seed(n)
        flat = flat[torch.randint(n, (_QUANTILE_SAMPLE,), generator=gen, device=flat.device)]
        n = flat.numel()
    if weights is None:
        k = min(max(math.floor(sparsity * n + 1e-9), 0), n)
    else:
        order = torch.argsort(flat)
        flat = flat[order]
        cum = torch.cumsum(weights.reshape(-1).double()[order], 0)
        k = int((cum <= sparsity * float(cum[-1]) * (1 + 1e-12)).sum()) if n else 0
    if k == 0:
        return 0.0
    if k == n:
        return math.inf
    if weights is None:
        theta = float(torch.kthvalue(flat, k + 1).values)
        # the k-th smallest equals θ exactly when fewer than k scores lie below θ
        tie = int((flat < theta).sum()) < k
    else:
        theta = float(flat[k])
        tie = float(flat[k - 1]) == theta
    if tie:
        # A tie across the cut: no θ prunes exactly k. Keeping the tie (θ at it) can undo
        # the pruning altogether — per-step gradient scores of a sparse network are 0 for
        # the pruned weights and many live ones, and θ = 0 keeps every weight — so θ moves
        # just past it and the whole tie is pruned: the target is a lower bound.
        # (the next float32: scores are compared as float32, where the next float64
        # would round back onto the tie)
        t = torch.tensor(theta, dtype=torch.float32)
        theta = float(torch.nextafter(t, torch.tensor(math.inf)))
    return theta


def global_threshold(layers: Sequence[LayerView], sparsity: float) -> float:
    """One θ over the units of all layers that prunes a fraction ``sparsity`` of their weights."""
    scores = torch.cat([layer.score.reshape(-1) for layer in layers])
    if all(layer.unit_size == 1 for layer in layers):
        return quantile_threshold(scores, sparsity)
    weights = torch.cat(
        [
            torch.full((layer.score.numel(),), float(layer.unit_size), device=scores.device)
            for layer in layers
        ]
    )
    return quantile_threshold(scores, sparsity, weights)


class AGPThreshold(ThresholdPolicy):
    """Automated gradual pruning (Zhu & Gupta, 2017): θ follows a sparsity target.

        s(t) = s_f + (s_i − s_f) · (1 − (t − t₀)/(t₁ − t₀))³   for t₀ ≤ t ≤ t₁,
        s(t) = s_f                                             for t > t₁.

    At each update θ is the magnitude quantile that prunes a fraction s(t): one θ over
    the scores of all layers together (``scope="global"``) or one θ_l per layer
    (``scope="layer"``, every layer at sparsity s(t)).
    """

    name = "agp"
    supports_recovery = True
    SCOPES: ClassVar[tuple[str, ...]] = ("global", "layer")

    def __init__(
        self,
        final_sparsity: float,
        *,
        end_epoch: float,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for key, s in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {s}")
        if initial_sparsity > final_sparsity:
            raise ValueError(
                f"initial_sparsity ({initial_sparsity}) must be <= "
                f"final_sparsity ({final_sparsity})"
            )
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}")
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.end_epoch = _window_end(end_epoch, self.start_epoch)
        self.scope = scope

    def target_sparsity(self, epoch: float) -> float:
        r = _ramp(epoch, self.start_epoch, self.end_epoch)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - r) ** 3

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> dict[str, float]:
        s = self.target_sparsity(epoch)
        if self.scope == "layer":
            return {layer.name: quantile_threshold(layer.score, s) for layer in layers}
        theta = global_threshold(layers, s)
        return {layer.name: theta for layer in layers}

    def final_epoch(self) -> float:
        return self.end_epoch


class FeedbackThreshold(ThresholdPolicy):
    """The target rises while accuracy holds and backs off when it drops.

    At every update the policy reads a_k, the accuracy on a slice held out of the
    fold's *training* part (never the validation part), and compares it with the best
    accuracy seen so far a*:

    * a_k ≥ a* − tolerance — accept: remember the masks, then raise the target by the
      current step δ: density 1 − s ← (1 − s)(1 − δ) (``target=sparsity``, θ is the
      quantile that meets s, one global θ or one per layer), or θ ← θ(1 + δ)
      (``target=theta``);
    * otherwise — back off: δ ← δ · backoff, the target returns to its last accepted
      value and, with ``restore``, the masks of the last accepted update come back.

    Raising stops once δ < ``min_step`` or after ``end_epoch``.
    """

    name = "feedback"
    supports_recovery = True
    needs_feedback = True
    _state_attrs = ("value", "best", "backoffs", "step", "_accepted_value", "_accepted", "_theta")
    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "theta")

    def __init__(
        self,
        *,
        step: float = 0.2,
        tolerance: float = 0.01,
        backoff: float = 0.5,
        min_step: float = 0.01,
        restore: bool = True,
        target: str = "sparsity",
        theta_start: float = 1e-3,
        scope: str = "global",
        end_epoch: float = math.inf,
        holdout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < step < 1.0:
            raise ValueError(f"step must be in (0, 1), got {step}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if not 0.0 < backoff < 1.0:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}")
        if scope not in AGPThreshold.SCOPES:
            raise ValueError(f"scope must be one of {AGPThreshold.SCOPES}, got {scope!r}")
        if theta_start <= 0:
            raise ValueError(f"theta_start must be > 0, got {theta_start}")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {holdout}")
        self.step, self.tolerance, self.backoff = float(step), float(tolerance), float(backoff)
        self.min_step, self.restore, self.target = float(min_step), bool(restore), target
        self.theta_start, self.scope = float(theta_start), scope
        self.end_epoch, self.holdout = _window_end(end_epoch, self.start_epoch), float(holdout)
        # state
        self.value = 0.0 if target == "sparsity" else self.theta_start  # current target
        self.best: float | None = None
        self.backoffs = 0
        self._accepted_value = self.value
        self._accepted: Keeps = {}
        self._theta: Thresholds = {}

    def _raise(self, value: float) -> float:
        if self.target == "sparsity":
            return 1.0 - (1.0 - value) * (1.0 - self.step)
        return value * (1.0 + self.step)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        if self.target == "theta":
            return {layer.name: self.value for layer in layers}
        if self.scope == "layer":
            return {layer.name: quantile_threshold(layer.score, self.value) for layer in layers}
        theta = global_threshold(layers, self.value)
        return {layer.name: theta for layer in layers}

    def judge(self, accuracy: float, layers: Sequence[LayerView]) -> bool:
        """Accept or back off after reading ``accuracy``; True when accepted."""
        if self.best is None or accuracy >= self.best - self.tolerance:
            self.best = accuracy if self.best is None else max(self.best, accuracy)
            self._accepted = {layer.name: layer.keep.clone() for layer in layers}
            self._accepted_value = self.value
            return True
        self.backoffs += 1
        self.step *= self.backoff
        self.value = self._accepted_value
        return False

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        if self.feedback is None:
            raise RuntimeError("feedback policy needs .feedback (held-out accuracy) to be set")
        if epoch > self.end_epoch:
            return {}, self._theta
        if not self.judge(self.feedback(), layers):
            return (dict(self._accepted) if self.restore else {}), self._theta
        if self.step >= self.min_step:
            self.value = self._raise(self.value)
        self._theta = self.thresholds(layers, epoch)
        return {
            layer.name: self.keep(layer, self._theta[layer.name]) for layer in layers
        }, self._theta

    def final_masks(self, layers: Sequence[LayerView]) -> tuple[Keeps, Thresholds]:
        """One last check: with ``restore``, masks that cost too much accuracy are undone."""
        if self.feedback is None or self.best is None:
            return {}, self._theta
        accepted = self.judge(self.feedback(), layers)
        if accepted or not self.restore:
            return {}, self._theta
        return dict(self._accepted), self._theta

    def final_epoch(self) -> float:
        return self.end_epoch


class SplicingThreshold(ThresholdPolicy):
    """Dynamic Network Surgery (Guo et al. 2016): pruning with splicing (recovery).

    Per layer, from the scores of the *dense* weights (|W_l| for magnitude):

        t_l = max(μ_l + c · σ_l, 0),   a_l = (1 − β) · t_l,   b_l = (1 + β) · t_l,
        M ← 0 where S < a_l,   M ← 1 where S ≥ b_l,   M unchanged in between

    (β = ``band`` = 0.1 gives DNS's a = 0.9 t, b = 1.1 t). The forward pass uses W ⊙ M
    but the backward pass is straight-through, so every weight keeps learning and a
    pruned one whose magnitude grows past b_l is spliced back. At step k
    (k < ``iter_stop``) masks are re-evaluated with probability (1 + γ · k)^(−power);
    afterwards they stay fixed.

    Statistics (``stats``):

    * ``"frozen"`` (default, as DNS defines it: its Caffe layer computes μ and σ once, at
      its first iteration) — μ_l and σ_l are taken once, at the first mask update after
      ``start_epoch``, and t_l stays fixed for the rest of the run;
    * ``"running"`` — μ_l and σ_l are recomputed from the current dense weights at every
      update. Unstable: the surviving weights grow while the pruned ones decay, so σ_l
      and t_l grow with them; over a long run the threshold runs away and empties the
      layer (only the ``min_keep`` floor is left).
    """

    name = "splicing"
    supports_recovery = True
    STATS: ClassVar[tuple[str, ...]] = ("frozen", "running")

    def __init__(
        self,
        c: float = 1.0,
        *,
        gamma: float = 1e-2,
        power: float = 1.0,
        iter_stop: int | None = None,
        seed: int = 0,
        stats: str = "frozen",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("update_every", 1)
        if kwargs.setdefault("recover", True) is not True:
            raise ValueError(
                f"recover must be true for splicing (it always recovers), got {kwargs['recover']!r}"
            )
        super().__init__(**kwargs)
        if gamma < 0 or power < 0:
            raise ValueError(f"gamma and power must be >= 0, got {gamma}, {power}")
        if iter_stop is not None and iter_stop < 1:
            raise ValueError(f"iter_stop must be >= 1 or null, got {iter_stop}")
        if stats not in self.STATS:
            raise ValueError(f"stats must be one of {list(self.STATS)}, got {stats!r}")
        self.c, self.gamma, self.power = float(c), float(gamma), float(power)
        self.iter_stop = None if iter_stop is None else int(iter_stop)
        self.stats = stats
        self._rng = random.Random(seed)
        self._frozen: Thresholds = {}  # stats="frozen": t_l, set at the first update

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate(), "frozen": dict(self._frozen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._frozen = dict(state.get("frozen", {}))  # absent in older checkpoints

    def update_probability(self, step: int) -> float:
        if self.iter_stop is not None and step >= self.iter_stop:
            return 0.0
        return (1.0 + self.gamma * step) ** (-self.power)

    def should_update(self, step: int, epoch: float) -> bool:
        return super().should_update(step, epoch) and self._rng.random() < self.update_probability(
            step
        )

    def _statistic(self, layer: LayerView) -> float:
        s = layer.score.float()
        return max(float(s.mean() + self.c * s.std(unbiased=False)), 0.0)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        if self.stats == "running":
            return {layer.name: self._statistic(layer) for layer in layers}
        for layer in layers:
            if layer.name not in self._frozen:
                self._frozen[layer.name] = self._statistic(layer)
        return {layer.name: self._frozen[layer.name] for layer in layers}

    def final_masks(self, layers: Sequence[LayerView]) -> tuple[Keeps, Thresholds]:
        """The masks as they stand: DNS's state after its last splicing step. A layer never
        updated (pruning phase shorter than the first update) is thresholded once."""
        return self.masks(layers, max(self.final_epoch(), self.start_epoch))


class SoftThreshold(ThresholdPolicy):
    """Soft threshold reparameterization (STR, Kusupati et al. 2020): learned θ_l.

        W_eff = sign(W) · relu(|W| − g(s_l)),   g = sigmoid,   s_l trainable, s_l(0) = s_init,

    with weight decay ``threshold_decay`` on s_l; sparsity is whatever training settles
    on. At the end of the pruning phase the shrunk weights are baked in and their zeros
    become a binary mask, which the post-pruning phase keeps fixed.
    """

    name = "soft_threshold"
    granularities = ("weight",)

    def __init__(
        self, s_init: float = -5.0, *, threshold_decay: float = 5e-4, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if threshold_decay < 0:
            raise ValueError(f"threshold_decay must be >= 0, got {threshold_decay}")
        self.s_init = float(s_init)
        self.threshold_decay = float(threshold_decay)

    def mask_factory(self) -> Callable[..., WeightMask]:
        return functools.partial(SoftThresholdMask, s_init=self.s_init)

    def dense_epochs(self, epochs: int) -> int:
        return 0  # the learned threshold shrinks weights from the first step

    def param_groups(self, masks: Mapping[str, WeightMask]) -> list[dict[str, Any]]:
        params = [m.s for m in masks.values() if isinstance(m, SoftThresholdMask)]
        return [{"params": params, "weight_decay": self.threshold_decay}] if params else []

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {
            layer.name: layer.mask.threshold()
            for layer in layers
            if isinstance(layer.mask, SoftThresholdMask)
        }

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        return {}, self.thresholds(layers, epoch)  # the soft threshold acts in the forward pass

    def final_masks(self, layers: Sequence[LayerView]) -> tuple[Keeps, Thresholds]:
        """Keep what the learned thresholds let through; :meth:`finalized` then bakes it in."""
        theta = self.thresholds(layers, self.start_epoch)
        return {
            layer.name: layer.mask.soft_keep(layer.original)
            for layer in layers
            if isinstance(layer.mask, SoftThresholdMask)
        }, theta

    def finalized(self, layers: Sequence[LayerView]) -> None:
        for layer in layers:
            if isinstance(layer.mask, SoftThresholdMask):
                layer.mask.harden(layer.original)


class DenseBaseline(ThresholdPolicy):
    """No pruning: the accuracy every pruned network is compared against (sparsity 0)."""

    name = "dense"

    def should_update(self, step: int, epoch: float) -> bool:
        return False

    def dense_epochs(self, epochs: int) -> int:
        return int(epochs)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {}

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        return {}, {}


class OneShotGlobal(ThresholdPolicy):
    """What most users do today: train dense, prune once, fine-tune.

    At the end of the pruning phase (which here trains dense) the masks come from
    ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=amount)`` on
    the layers' scores — the fraction ``amount`` of smallest scores across all layers —
    and the post-pruning phase fine-tunes the survivors.
    """

    name = "oneshot_global"
    granularities = ("weight",)

    def __init__(self, amount: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")
        self.amount = float(amount)

    def should_update(self, step: int, epoch: float) -> bool:
        return False

    def dense_epochs(self, epochs: int) -> int:
        return int(epochs)  # the whole pruning phase trains dense

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        theta = global_threshold(layers, self.amount)
        return {layer.name: theta for layer in layers}

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        holders = [_ScoreHolder(layer.score) for layer in layers]
        prune.global_unstructured(
            [(h, "weight") for h in holders],
            pruning_method=prune.L1Unstructured,
            amount=self.amount,
        )
        keeps = {layer.name: h.weight_mask.bool() for layer, h in zip(layers, holders, strict=True)}
        kept = [layer.score[keeps[layer.name]] for layer in layers]
        theta = min((float(k.min()) for k in kept if k.numel()), default=math.inf)
        return keeps, {layer.name: theta for layer in layers}


class _ScoreHolder(nn.Module):
    """A stand-in module whose ``weight`` is a score tensor, so that ``torch.nn.utils.prune``
    can compute masks without touching (or re-parametrizing) the real layer."""

    def __init__(self, score: torch.Tensor) -> None:
        super().__init__()
        # Contiguous: torch.nn.utils.prune flattens with view(-1), which channels-last
        # (NHWC) conv scores do not allow.
        self.weight = nn.Parameter(
            score.detach().clone(memory_format=torch.contiguous_format), requires_grad=False
        )


class RandomBaseline(ThresholdPolicy):
    """Random masks: at the first update after ``start_epoch`` every layer loses a random
    fraction ``sparsity`` of its units (``torch.nn.utils.prune.RandomUnstructured``, driven
    by the fold's torch seed); the masks then stay fixed. Tells how much of a policy's
    result is owed to *which* weights it picks rather than to how many."""

    name = "random"
    _state_attrs = ("_done",)

    def __init__(self, sparsity: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        self._done = False

    def should_update(self, step: int, epoch: float) -> bool:
        return not self._done and super().should_update(step, epoch)

    def thresholds(self, layers: Sequence[LayerView], epoch: float) -> Thresholds:
        return {}

    def masks(self, layers: Sequence[LayerView], epoch: float) -> tuple[Keeps, Thresholds]:
        if self._done:
            return {}, {}
        self._done = True
        method = prune.RandomUnstructured(amount=self.sparsity)
        # torch.nn.utils.prune flattens with view(-1): give it contiguous (NCHW) tensors.
        keeps = {}
        for layer in layers:
            score = layer.score.contiguous()
            keeps[layer.name] = method.compute_mask(score, torch.ones_like(score)).bool()
        return keeps, {}


POLICIES: dict[str, type[ThresholdPolicy]] = {
    cls.name: cls
    for cls in (
        DenseBaseline,
        OneShotGlobal,
        RandomBaseline,
        ConstantThreshold,
        StdScaledThreshold,
        ScheduledThreshold,
        AGPThreshold,
        FeedbackThreshold,
        SplicingThreshold,
        SoftThreshold,
    )
}


def build_policy(name: str, params: Mapping[str, Any]) -> ThresholdPolicy:
    """Instantiate the policy registered as ``name`` with keyword ``params``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"policy.name={name!r} is not supported; allowed: {list(POLICIES)}"
        ) from None
    return cls(**params)
