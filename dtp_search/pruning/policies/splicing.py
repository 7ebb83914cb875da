"""Splicing: Dynamic Network Surgery's two thresholds per layer, between which a pruned
weight can come back (``splicing``)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from dtp_search.pruning.policies import _validate
from dtp_search.pruning.policies.base import Keeps, LayerView, ThresholdPolicy, Thresholds


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
        _validate.at_least("gamma and power", gamma, power)
        _validate.at_least_or_null("iter_stop", iter_stop, 1)
        _validate.one_of("stats", stats, list(self.STATS))
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
