"""What a finished study says: which trials count, its Pareto rows and their hypervolume.

Read by the search loop, the console, refit, the report, the worker launcher and the
benchmarks; it reads the Optuna study only (and, for :func:`refresh_pareto`, writes to
the tracker), so none of them needs the search module.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from dtp_search.pruning import pareto_mask
from dtp_search.settings import COST_OBJECTIVES, front_axis
from dtp_search.tracking import records
from dtp_search.tracking.front_axis import row_key
from dtp_search.tracking.selection import add_margins, one_se
from dtp_search.tracking.study_run import StudyTracker

log = logging.getLogger(__name__)

# Trials that count toward ``search.n_trials``: finished with a result. FAIL does not
# count: failed trials are retried (heartbeat) or replaced by new ones.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def n_finished(study: optuna.Study) -> int:
    """Trials of ``study`` that count toward ``search.n_trials``."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def objective_names(study: optuna.Study) -> list[str]:
    """The study's ``search.objectives`` (``value_<i>`` for a study that did not store them)."""
    return study.user_attrs.get(records.OBJECTIVES) or [
        f"value_{i}" for i in range(len(study.directions))
    ]


def study_axis(study: optuna.Study) -> str:
    """The x of the study's fronts and Pareto plots (:func:`~dtp_search.settings.front_axis`):
    its second objective when that is a cost (``flops``, ``params``, ``latency``), else
    ``sparsity``."""
    axis = front_axis(objective_names(study))
    return axis if axis in COST_OBJECTIVES else "sparsity"


def pareto_rows(study: optuna.Study, front_only: bool = True) -> list[dict[str, Any]]:
    """Pareto-optimal complete trials as table rows (non-domination per the study's
    directions), sorted by the study's axis (:func:`study_axis`: sparsity, or the cost
    that is its second objective); with ``front_only=False``, every candidate trial.
    A row has the CV ``accuracy`` and ``sparsity`` with their ``_std``, and each cost the
    trial measured under its metric's name (``cv_flops``, ``cv_flops_std``, ...: ``params``
    is the row's sampled values), ``folds`` (the fold results behind the means) and
    ``margin_se`` (:func:`~dtp_search.tracking.selection.add_margins`: the accuracy over
    the next less accurate row, in units of this one's standard error)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # A trial penalised for ending at the min_keep floor (policy.on_collapse=penalize)
    # never counts. Under search.min_sparsity or search.max_flops only feasible trials are
    # candidates, as for
    # Optuna's own best_trial(s); with none feasible yet, all are shown.
    trials = [t for t in trials if t.constraints.get("min_keep_floor", 0.0) <= 0]
    feasible = [t for t in trials if all(c <= 0 for c in t.constraints.values())]
    trials = feasible or trials
    if not trials:
        return []
    names = objective_names(study)
    axis = study_axis(study)
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    vals = np.array([[s * v for s, v in zip(signs, t.values, strict=True)] for t in trials])
    keep = pareto_mask(vals)
    refits = study.user_attrs.get(records.REFIT, {})
    rows = []
    for t, k in zip(trials, keep, strict=True):
        if front_only and not k:
            continue
        ua = t.user_attrs
        values = dict(zip(names, t.values, strict=True))
        refit = refits.get(str(t.number), {})
        rows.append(
            {
                "trial": t.number,
                "policy": ua.get(records.POLICY, ""),
                "params": ", ".join(
                    f"{key.split('.')[-1]}={_fmt(v)}" for key, v in t.params.items()
                ),
                "accuracy": ua.get(records.CV_ACCURACY, values.get("accuracy", math.nan)),
                "accuracy_std": ua.get(records.CV_ACCURACY_STD, 0.0),
                "sparsity": ua.get(records.CV_SPARSITY, values.get("sparsity", math.nan)),
                "sparsity_std": ua.get(records.CV_SPARSITY_STD, 0.0),
                "folds": ua.get(records.CV_FOLDS),
                **{
                    key: v
                    for c in COST_OBJECTIVES
                    if records.cv(c) in ua or c in values
                    for key, v in (
                        (records.cv(c), ua.get(records.cv(c), values.get(c, math.nan))),
                        (records.cv_std(c), ua.get(records.cv_std(c), 0.0)),
                    )
                },
                "mlflow_run_id": ua.get(records.MLFLOW_RUN_ID, ""),
                "test_accuracy": refit.get("test_accuracy", math.nan),
                "refit_run_id": refit.get("run_id", ""),
            }
        )
    add_margins(rows)
    return sorted(rows, key=lambda r: (r.get(row_key(axis), math.nan), r["accuracy"]))


def chosen_trials(
    study: optuna.Study,
    top_k: int | None,
    trials: str = "pareto",
    select: str = "best",
    folds: int | None = None,
) -> list[optuna.trial.FrozenTrial]:
    """Pareto-optimal complete trials (``trials="all"``: every complete one, as a
    comparison study wants each of its cells tested), most accurate first, at most
    ``top_k`` of them. ``select="one_se"`` (with ``trials="pareto"``): the
    one-standard-error picks instead (:func:`~dtp_search.tracking.selection.one_se`):
    one among every feasible trial of a single-objective study, one per bin of the
    front otherwise; ``folds``: n of σ/√n for trials that did not record it."""
    if select == "one_se" and trials == "pareto":
        single = len(study.directions) == 1
        rows = one_se(
            pareto_rows(study, front_only=not single), study_axis(study), single=single, folds=folds
        )
    else:
        rows = pareto_rows(study, front_only=trials == "pareto")
    rows = sorted(rows, key=lambda r: -r["accuracy"])
    if top_k:
        rows = rows[: int(top_k)]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[r["trial"]] for r in rows]


def hypervolume_2d(
    points: list[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)
) -> float:
    """Area dominated by (sparsity, accuracy) points above ``ref`` (both maximised). For
    a cost axis pass (1 − cost, accuracy): the area then lies between the points and the
    dense network's cost 1 (:func:`gain`)."""
    pts = sorted({(s, a) for s, a in points if s > ref[0] and a > ref[1]}, reverse=True)
    area, best_a = 0.0, ref[1]
    for s, a in pts:  # sweep from high sparsity to low
        if a > best_a:
            area += (s - ref[0]) * (a - best_a)
            best_a = a
    return area


def gain(axis: str, x: float) -> float:
    """An axis value in "larger is better" units from 0: sparsity itself, or 1 − cost (the
    fraction of the dense network's FLOPs, parameters or latency saved)."""
    return x if axis == "sparsity" else 1.0 - x


def trial_points(
    study: optuna.Study, axis: str
) -> tuple[list[optuna.trial.FrozenTrial], dict[int, list], dict[int, str], list[int]]:
    """The study's complete trials and, for its Pareto plot, each one's CV point
    ``(axis, accuracy)``, its policy, and the trials that ended at the min_keep floor."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    points = {
        t.number: [
            (
                t.user_attrs.get(records.cv(axis), math.nan),
                t.user_attrs.get(records.CV_ACCURACY, math.nan),
            )
        ]
        for t in complete
    }
    policies = {t.number: t.user_attrs.get(records.POLICY, "") for t in complete}
    floored = [t.number for t in complete if t.user_attrs.get(records.FLOORED_LAYERS)]
    return complete, points, policies, floored


def refresh_pareto(study: optuna.Study, tracker: StudyTracker) -> list[dict[str, Any]]:
    """Log the study's current Pareto front to its parent run; return its rows. The plot
    and ``pareto_hypervolume`` are over (CV axis, CV accuracy), :func:`study_axis`."""
    rows = pareto_rows(study)
    axis = study_axis(study)
    complete, all_points, policies, floored = trial_points(study, axis)
    x = row_key(axis)
    hv = hypervolume_2d([(gain(axis, r[x]), r["accuracy"]) for r in rows if x in r])
    try:
        tracker.log_pareto(rows, len(complete), hv, all_points, policies, floored, axis)
    except Exception as exc:  # tracking must not lose the study's own record
        log.warning("could not refresh the Pareto front in MLflow: %s", exc)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
