"""Pareto-aware early stopping of a trial between its cross-validation folds.

Optuna's ``trial.report``/``trial.should_prune`` exist for single-objective studies only:
a multi-objective trial's partial result is a point, and no point is "below the median".
:class:`ParetoFoldStop` asks instead whether the point the trial could still reach is
already dominated by a finished trial, and works for one objective as well (there
"dominated" means "worse than a finished trial's value").

It is configured like the other ``early_stop`` choices (``conf/early_stop/pareto.yaml``,
built by ``hydra.utils.instantiate``) and installed as the study's Optuna pruner, where it
does nothing (:meth:`ParetoFoldStop.prune` is always False). The trial calls
:meth:`ParetoFoldStop.check` after each fold instead.

This module needs Optuna only (no MLflow, no torch; the objective names come from
:mod:`dtp_search.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from dtp_search.settings import OBJECTIVES

__all__ = ["ParetoFoldStop", "StopDecision", "dominates", "most_dominating", "objective_signs"]

# The default objectives of check() (search.objectives' default).
_DEFAULT = ("accuracy", "sparsity")


@dataclass(frozen=True)
class StopDecision:
    """Why a trial should stop: ``reason`` (for ``prune_reason``) and the number of the
    finished trial whose point dominates the trial's optimistic point."""

    reason: str
    dominated_by: int


class ParetoFoldStop(optuna.pruners.BasePruner):
    r"""Stop a trial after fold :math:`k` of :math:`K` when even an optimistic guess of its
    final cross-validated point is dominated by a finished trial.

    **Optimistic point.** For each objective with per-fold values :math:`x_1..x_k`
    (running mean :math:`\bar x_k`), the optimistic value is :math:`\bar x_k` moved by a
    margin :math:`m_k` in the objective's better direction (up when maximised, down when
    minimised):

    .. math::

        m_k = z \, s \, \sqrt{\frac{K - k}{K\,k}}, \qquad
        s = \max(s_k, \sigma_0)

    *Rationale.* The trial's final value is the mean over all :math:`K` folds,
    :math:`\bar x_K = (k \bar x_k + (K-k) \bar y)/K` with :math:`\bar y` the mean of the
    folds still to come. If folds are independent draws with standard deviation
    :math:`\sigma`, then :math:`\bar x_K - \bar x_k = \frac{K-k}{K}(\bar y - \bar x_k)` has
    variance :math:`\sigma^2 \frac{K-k}{K k}` (the unknown true mean enters through both
    :math:`\bar x_k` and :math:`\bar y`). So :math:`m_k` is a one-sided :math:`z`-sigma
    prediction bound on the final mean: with ``z=2`` a trial whose final point would just
    reach the front is stopped about 2 % of the time (less, since the front's own values
    are noisy the other way too). It shrinks as folds are seen and is 0 at :math:`k=K` —
    where nothing is stopped anyway (no folds left to save).

    *Standard deviation.* :math:`s_k` is the sample standard deviation of the folds seen
    (ddof=1). With one fold there is none, so the prior :math:`\sigma_0` is used
    (``accuracy_std``/``sparsity_std``); with a few folds :math:`s_k` is itself very noisy
    (two equal folds give 0), so the prior is also a lower bound: :math:`s` never claims
    more certainty than the prior allows, which keeps the rule optimistic.

    *Accuracy.* ``min_margin`` is a floor on the accuracy margin: CV folds share most of
    their training data, so their values are correlated and the independence behind
    :math:`m_k` understates what the remaining folds can change.

    *Sparsity.* It is set mostly by the sampled thresholds, not by the fold's data, so it
    varies little between folds; it gets the same formula with a small prior
    (``sparsity_std``) and no floor. ``sparsity_std=0`` (and a constant sparsity) gives
    no margin there at all.

    *Costs* (``flops``, ``params``, ``latency``: fractions of the dense network's, minimised,
    :mod:`dtp_search.pruning.cost`). FLOPs and parameters follow the masks as sparsity
    does: prior ``cost_std``, no floor. Latency is a timing and varies with the load of the
    machine between folds: prior ``latency_std``, larger.

    **Dominance.** A finished trial's point :math:`p` dominates the optimistic point
    :math:`o` when it is at least as good in every objective and strictly better in one,
    per the study's directions. Candidates are COMPLETE trials with all values set and
    finite that are *feasible*: every Optuna constraint (``trial.set_constraint``, stored
    as system attrs ``constraints:<name>``) is ``<= 0``. An infeasible trial — ended at
    the ``min_keep`` floor under ``on_collapse=penalize``, or below
    ``search.min_sparsity`` — is not a point the search wants, so it must not stop others.
    When several dominate, the one that dominates *by the most* is named: the largest sum
    of its improvements over :math:`o` (every objective is a fraction, so the sum is on
    one scale), ties to the lowest trial number.

    **Start-up.** No trial stops before ``n_startup_trials`` trials are COMPLETE (feasible
    or not): a front of a handful of points is mostly luck.

    **Shared studies.** The front is read from the study's storage on every call
    (``study.get_trials(deepcopy=False, states=(COMPLETE,))``) and nothing is kept between
    calls, so workers sharing a study (PostgreSQL, journal file) see each other's trials.
    """

    def __init__(
        self,
        n_startup_trials: int = 5,
        z: float = 2.0,
        accuracy_std: float = 0.02,
        sparsity_std: float = 0.005,
        min_margin: float = 0.005,
        cost_std: float = 0.005,
        latency_std: float = 0.05,
    ) -> None:
        if int(n_startup_trials) != n_startup_trials or n_startup_trials < 0:
            raise ValueError(f"n_startup_trials must be an integer >= 0, not {n_startup_trials!r}")
        for name, value in (
            ("z", z),
            ("accuracy_std", accuracy_std),
            ("sparsity_std", sparsity_std),
            ("min_margin", min_margin),
            ("cost_std", cost_std),
            ("latency_std", latency_std),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        self.n_startup_trials = int(n_startup_trials)
        self.z = float(z)
        self._prior_std = {
            "accuracy": float(accuracy_std),
            "sparsity": float(sparsity_std),
            "flops": float(cost_std),
            "params": float(cost_std),
            "latency": float(latency_std),
        }
        self._floor = {"accuracy": float(min_margin)}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Never: as the study's Optuna pruner this class is inert; see :meth:`check`."""
        return False

    def check(
        self,
        study: optuna.Study,
        trial_number: int,
        folds_total: int,
        accuracies: Sequence[float],
        sparsities: Sequence[float],
        objectives: Sequence[str] = _DEFAULT,
        costs: Mapping[str, Sequence[float]] | None = None,
    ) -> StopDecision | None:
        """Whether trial ``trial_number`` should stop, given its per-fold ``accuracies``
        and ``sparsities`` so far (one entry per fold seen, in fold order) out of
        ``folds_total`` folds, and per fold the ``costs`` among its objectives
        (``{"flops": [...]}``).

        ``objectives`` are the study's objectives in the order of its values
        (``search.objectives``); directions are the study's own. Returns ``None`` to
        continue: always after the last fold, before ``n_startup_trials`` trials are
        complete, and when the running means are not finite (a diverged fold is not this
        rule's business).
        """
        seen = len(accuracies)
        per_fold = {"accuracy": list(accuracies), "sparsity": list(sparsities)}
        per_fold.update({k: list(v) for k, v in (costs or {}).items()})
        objectives = list(objectives)
        signs = objective_signs(study, objectives)
        for name in objectives:
            if len(per_fold.get(name, ())) != seen:
                raise ValueError(
                    f"{seen} accuracies but {len(per_fold.get(name, ()))} values of {name}"
                )
        # No folds seen: nothing to judge. Last fold: the trial is done, stopping saves nothing.
        if seen == 0 or seen >= folds_total:
            return None

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < self.n_startup_trials:
            return None

        means, margins = {}, {}
        for name in objectives:
            means[name] = sum(per_fold[name]) / seen
            margins[name] = self._margin(name, per_fold[name], folds_total)
        if not all(math.isfinite(means[name]) for name in objectives):
            return None
        # In "larger is better" coordinates for every objective (sign-flipped when minimised).
        optimistic = [s * means[n] + margins[n] for s, n in zip(signs, objectives, strict=True)]

        candidates = {
            t.number: t
            for t in complete
            if t.number != trial_number and _can_dominate(t, len(objectives))
        }
        number = most_dominating(
            (
                (n, [s * v for s, v in zip(signs, t.values, strict=True)])
                for n, t in candidates.items()
            ),
            optimistic,
        )
        if number is None:
            return None
        winner = candidates[number]
        theirs = ", ".join(f"{n} {v:.4f}" for n, v in zip(objectives, winner.values, strict=True))
        # "mean+margin" (or "mean-margin" when minimised): the optimistic value and how
        # much of it is optimism.
        ours = ", ".join(
            f"{n} {means[n]:.4f}{'+' if s > 0 else '-'}{margins[n]:.4f}"
            for n, s in zip(objectives, signs, strict=True)
        )
        return StopDecision(
            reason=(
                f"dominated after {seen} of {folds_total} folds by trial {winner.number}: "
                f"{theirs} vs optimistic {ours}"
            ),
            dominated_by=winner.number,
        )

    def _margin(self, objective: str, values: Sequence[float], folds_total: int) -> float:
        """:math:`m_k` of the class docstring for one objective (>= 0)."""
        k, big_k = len(values), folds_total
        std = self._prior_std[objective]
        if k >= 2:
            mean = sum(values) / k
            std = max(std, math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)))
        margin = self.z * std * math.sqrt((big_k - k) / (big_k * k))
        return max(margin, self._floor.get(objective, 0.0))


def _can_dominate(t: FrozenTrial, n_objectives: int) -> bool:
    """A COMPLETE trial with all values finite and every constraint satisfied (<= 0)."""
    values = t.values
    if values is None or len(values) != n_objectives:
        return False
    if not all(math.isfinite(v) for v in values):
        return False
    return all(c <= 0 for c in t.constraints.values())


def objective_signs(study: optuna.Study, objectives: Sequence[str]) -> list[float]:
    """+1 per maximised, -1 per minimised objective of ``study``, after checking that
    ``objectives`` (``search.objectives``) name one known objective per direction."""
    objectives, directions = list(objectives), list(study.directions)
    if len(objectives) != len(directions) or any(o not in OBJECTIVES for o in objectives):
        raise ValueError(
            f"objectives {objectives} do not match the study's {len(directions)} "
            f"direction(s); each must be one of {list(OBJECTIVES)}"
        )
    return [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions]


def most_dominating(
    points: Iterable[tuple[int, Sequence[float]]], target: Sequence[float]
) -> int | None:
    """The number of the point that dominates ``target`` by the most — the largest sum of
    its improvements over it (the objectives are fractions, on one scale) — ties to the
    lowest number; ``None`` when none dominates it. Every coordinate is maximised."""
    best: tuple[float, int] | None = None
    for number, point in points:
        if dominates(point, target):
            by = sum(p - t for p, t in zip(point, target, strict=True))
            if best is None or (by, -number) > (best[0], -best[1]):
                best = (by, number)
    return None if best is None else best[1]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Pareto dominance with every coordinate maximised: a >= b everywhere, > somewhere."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )
