"""Validation feedback: the target rises while held-out accuracy holds and backs off when
it drops (``feedback``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies._schedule import window_end
from dtp_search.pruning.policies.base import Keeps, LayerView, ThresholdPolicy, Thresholds
from dtp_search.pruning.policies.quantile import global_threshold, quantile_threshold
from dtp_search.pruning.policies.target import AGPThreshold


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
        _validate.fraction("step", step, open_low=True)
        _validate.at_least("tolerance", tolerance)
        _validate.fraction("backoff", backoff, open_low=True)
        _validate.one_of("target", target, self.TARGETS)
        _validate.one_of("scope", scope, AGPThreshold.SCOPES)
        _validate.at_least("theta_start", theta_start, strict=True)
        _validate.fraction("holdout", holdout, open_low=True)
        self.step, self.tolerance, self.backoff = float(step), float(tolerance), float(backoff)
        self.min_step, self.restore, self.target = float(min_step), bool(restore), target
        self.theta_start, self.scope = float(theta_start), scope
        self.end_epoch, self.holdout = window_end(end_epoch, self.start_epoch), float(holdout)
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
