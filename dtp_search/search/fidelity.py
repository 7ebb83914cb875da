"""A reduced-budget rung inside a trial: successive halving on the front (``search.fidelity``).

Before a trial spends its full budget (every epoch of every fold), fold 0 is judged at a
reduced epoch budget :math:`r`: its point after epoch :math:`r` — the fold's validation
accuracy and the network's sparsity at that epoch, or the cost of the network at that
epoch (its compacted FLOPs, parameters or latency) when that is an objective — is
compared with the points the
study's other trials had at the same epoch of their fold 0. Only trials whose rung point
ranks in the top :math:`1/\\eta` of that rung go on (*promotion*); the others end PRUNED
there. This is one asynchronous successive-halving rung (ASHA, Li et al. 2020) with the
multi-objective ranking of MO-ASHA (Schmucker et al. 2021): non-dominated sorting instead
of a scalar order.

Promotion continues the same run: the rung is the state of fold 0 after :math:`r`
epochs of its *full* schedule, not a separate short run, so a promoted trial wastes
nothing. The price is a bias: a policy that prunes late (a late ``start_epoch``, a slow
ramp) has little sparsity at epoch :math:`r` and ranks below one that pruned early to
the same final sparsity. Choose :math:`r` past the point where the policies of the space
have started pruning; the default, a third of the pruning phase, suits AGP-like ramps
that start in the first epochs.

:class:`FidelityRung` keeps no state: the rung points are trial user attributes
(``rung_point``) read from the study's storage on every call, so workers sharing a study
(PostgreSQL, journal file) see each other's points, and a study resumed later continues
the same rung. This module needs Optuna only (no MLflow, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna

from dtp_search.search.early_stop import dominates, most_dominating, objective_signs
from dtp_search.tracking import records

__all__ = ["POINT_ATTR", "RUNG_ATTR", "FidelityRung", "RungDecision"]

# trial user attr: {"epoch": r, "accuracy": a, "sparsity": s} and the costs among the
# study's objectives, e.g. "flops": f (dtp_search.pruning.cost)
POINT_ATTR = "rung_point"
RUNG_ATTR = records.RUNG  # trial user attr: 0 = stopped at the reduced budget, 1 = full budget

_OBJECTIVES = ("accuracy", "sparsity")  # the default order of search.objectives


@dataclass(frozen=True)
class RungDecision:
    """The rung's verdict on one trial.

    ``position`` counts the rung points in strictly better non-domination layers than the
    trial's, out of ``size`` points (the trial's included); the trial is promoted when
    ``position < quota``. ``dominated_by`` names the trial whose rung point dominates the
    trial's by the most (``None`` when none dominates it).
    """

    promoted: bool
    position: int
    size: int
    quota: int
    dominated_by: int | None
    reason: str


class FidelityRung:
    r"""Promote a trial past the reduced budget when its rung point is in the top
    :math:`1/\eta` of the rung.

    **Ranking.** The rung holds the points :math:`P` of every trial that reached it (any
    state: a trial stopped there, one still running, one complete) plus the trial's own
    point :math:`p`. Non-dominated sorting splits :math:`P` into layers :math:`L_0` (the
    rung's front), :math:`L_1` (the front once :math:`L_0` is removed), and so on. With
    :math:`p \in L_j`, its position is :math:`|L_0| + \dots + |L_{j-1}|` and it is
    promoted when

    .. math::

        \text{position} < q = \max\bigl(1, \lceil |P| / \eta \rceil\bigr).

    A point on the rung's front (position 0) is always promoted: whatever :math:`\eta`,
    a trial no other trial beats at this budget goes on. Ties between layers are not
    split (a layer straddling :math:`q` is promoted whole when it starts below it), so
    more than :math:`1/\eta` may go on, never a non-dominated one too few.

    *Dominance* is per the study's directions, as for the final objectives: at least as
    good in every objective, strictly better in one.

    **Start-up.** While fewer than ``n_startup_trials`` other trials have a rung point,
    every trial is promoted: a rung of a handful of points is mostly luck, and the first
    trials also seed the rung for the later ones.

    :param epoch: the rung's epoch :math:`r` (1-based, counted as ``EpochRecord.epoch``:
        from the pruning phase's first epoch through fine-tuning); ``None``: a third of
        the pruning phase, rounded up (:meth:`rung_epoch`).
    :param eta: the reduction factor :math:`\eta > 1`.
    :param n_startup_trials: rung points needed before the rung stops anyone.
    """

    def __init__(
        self, epoch: int | None = None, eta: float = 3.0, n_startup_trials: int = 5
    ) -> None:
        if epoch is not None and (isinstance(epoch, bool) or int(epoch) != epoch or epoch < 1):
            raise ValueError(f"epoch must be null or an integer >= 1, not {epoch!r}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 1):
            raise ValueError(f"eta must be a finite number > 1, not {eta!r}")
        if int(n_startup_trials) != n_startup_trials or n_startup_trials < 0:
            raise ValueError(f"n_startup_trials must be an integer >= 0, not {n_startup_trials!r}")
        self.epoch = None if epoch is None else int(epoch)
        self.eta = float(eta)
        self.n_startup_trials = int(n_startup_trials)

    def rung_epoch(self, epochs: int) -> int:
        """The rung's epoch for a pruning phase of ``epochs`` epochs."""
        return self.epoch if self.epoch is not None else max(1, math.ceil(epochs / 3))

    def check(
        self,
        study: optuna.Study,
        trial_number: int,
        epoch: int,
        accuracy: float,
        sparsity: float,
        objectives: Sequence[str] = _OBJECTIVES,
        costs: Mapping[str, float] | None = None,
    ) -> RungDecision:
        """Rank trial ``trial_number``'s rung point (``accuracy``, ``sparsity`` and the
        ``costs`` among its objectives, e.g. ``{"flops": 0.4}``, after ``epoch``) against
        the other trials' ``rung_point`` attributes in ``study`` at the same epoch (points
        of another epoch, from a study resumed with another ``search.fidelity.epoch``, are
        not comparable and are left out).

        ``objectives`` are ``search.objectives`` in the order of the study's directions. A
        point that is not finite is never promoted (a diverged run at the rung is as bad
        as it gets); the others are ranked as in the class docstring.
        """
        objectives = list(objectives)
        signs = objective_signs(study, objectives)
        mine = {"accuracy": float(accuracy), "sparsity": float(sparsity)}
        mine.update({k: float(v) for k, v in (costs or {}).items()})
        missing = [n for n in objectives if n not in mine]
        if missing:
            raise ValueError(f"the rung point has no value of {missing} (pass costs=...)")
        ours = [s * mine[n] for s, n in zip(signs, objectives, strict=True)]
        label = ", ".join(f"{n} {mine[n]:.4f}" for n in objectives)

        others: list[tuple[int, list[float]]] = []
        for t in study.get_trials(deepcopy=False):
            point = t.user_attrs.get(POINT_ATTR)
            if t.number == trial_number or not isinstance(point, dict):
                continue
            values = [point.get(n) for n in objectives]
            if point.get("epoch") != epoch or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values
            ):
                continue
            others.append((t.number, [s * float(v) for s, v in zip(signs, values, strict=True)]))

        size = len(others) + 1
        quota = max(1, math.ceil(size / self.eta))
        if not all(math.isfinite(v) for v in ours):
            return RungDecision(
                False, size - 1, size, quota, None, f"rung point not finite ({label})"
            )
        if len(others) < self.n_startup_trials:
            return RungDecision(
                True,
                0,
                size,
                quota,
                None,
                f"promoted: start-up ({len(others)} of {self.n_startup_trials} rung points)",
            )
        points = [p for _, p in others] + [ours]
        position = _position(points, len(points) - 1)
        dominated_by = most_dominating(others, ours)
        promoted = position < quota
        verdict = "promoted" if promoted else "stopped"
        reason = (
            f"{verdict} at the fidelity rung: {label}; position {position} of {size} "
            f"rung points, top {quota} go on"
        )
        if dominated_by is not None:
            reason += f"; dominated most by trial {dominated_by}"
        return RungDecision(promoted, position, size, quota, dominated_by, reason)


def _position(points: list[list[float]], i: int) -> int:
    """How many of ``points`` lie in strictly better non-domination layers than point ``i``."""
    remaining = list(range(len(points)))
    better = 0
    while remaining:
        layer = [
            j
            for j in remaining
            if not any(dominates(points[k], points[j]) for k in remaining if k != j)
        ]
        if i in layer:
            return better
        better += len(layer)
        remaining = [j for j in remaining if j not in layer]
    raise AssertionError("unreachable: every point lies in some layer")
