"""What a finished trial leaves behind: its mean curves, CV summary, floor events and
front in its MLflow run, and its Optuna attributes and constraints (the names are
:mod:`dtp_search.tracking.records`)."""

from __future__ import annotations

import json
from collections import Counter

import optuna

from dtp_search.search.config import floor_settings
from dtp_search.search.fidelity import RUNG_ATTR
from dtp_search.settings import COST_OBJECTIVES, Settings, front_axis
from dtp_search.tracking import TrialRun, front_x, records
from dtp_search.training import CVResult


def record(
    trial: optuna.Trial,
    run: TrialRun,
    policy: str,
    typed: Settings,
    result: CVResult,
    fronts: dict[int, list],
) -> None:
    """Log the trial's mean curves, CV summary (costs too: ``cv_flops``, ...), floor
    events and front (against the study's second objective); set its Optuna attributes
    and constraints."""
    # Mean curves across folds, same integer steps as the per-fold ones.
    for i in range(max(len(f.history) for f in result.folds)):
        recs = [f.history[i] for f in result.folds if i < len(f.history)]
        run.log_metrics(
            {k: sum(getattr(r, k) for r in recs) / len(recs) for k in records.MEAN_EPOCH_METRICS},
            step=recs[0].epoch,
        )
    summary = {
        records.CV_ACCURACY: result.accuracy,
        records.CV_ACCURACY_STD: result.accuracy_std,
        records.CV_SPARSITY: result.sparsity,
        records.CV_SPARSITY_STD: result.sparsity_std,
        records.CV_FOLDS: len(result.folds),  # n of the standard error σ/√n
        # FLOPs, parameters, latency of the compacted networks, fractions of the dense ones
        **{
            k: v
            for c in COST_OBJECTIVES
            if all(c in f.costs for f in result.folds)
            for k, v in ((records.cv(c), result.cost(c)), (records.cv_std(c), result.cost_std(c)))
        },
        # dense epochs this trial took from the warm-start cache, over all folds
        "warm_start_epochs": sum(f.warm_start_epochs for f in result.folds),
    }
    teachers = [f.teacher_accuracy for f in result.folds if f.teacher_accuracy is not None]
    if teachers:  # the trained distillation teachers' mean validation accuracy
        summary["cv_teacher_accuracy"] = sum(teachers) / len(teachers)
    run.log_metrics(summary)
    restored = dict(sum((Counter(f.min_keep_restored) for f in result.folds), Counter()))
    if restored:
        # The min_keep floor overrode the policy (policy.on_collapse=restore): say so
        # where the trial is inspected, since its sparsity is then the floor's too.
        trial.set_user_attr(records.MIN_KEEP_RESTORED, restored)
        run.set_tags({records.tag(records.MIN_KEEP_RESTORED): json.dumps(restored, sort_keys=True)})
    # Layers that *end* the run at the floor: the trial's point is the floor's result,
    # not the policy's. Marked in its front and in the Pareto plot; with
    # policy.on_collapse=penalize it is also infeasible (an Optuna constraint), so it
    # stays out of the Pareto table and the samplers steer away from it.
    floored = sorted({name for f in result.folds for name in f.floored_layers})
    if floored:
        trial.set_user_attr(records.FLOORED_LAYERS, floored)
        run.set_tags({records.tag(records.FLOORED_LAYERS): ",".join(floored)})
    if floor_settings(typed.policy)[1] == "penalize":
        trial.set_constraint("min_keep_floor", float(len(floored)))
    title = f"{typed.study.name} · trial {trial.number} · {policy}"
    if floored:
        title += f"\nends with {', '.join(floored)} at the min_keep floor"
    axis = front_axis(typed.search.objectives)
    run.log_front(fronts, title, axis=axis)
    for k, v in summary.items():
        trial.set_user_attr(k, v)
    if typed.search.fidelity.enabled and RUNG_ATTR not in trial.user_attrs:
        # Never judged (a retry resumed past the rung, or a budget that ends before it):
        # it ran the full budget all the same.
        trial.set_user_attr(RUNG_ATTR, 1)
    # Fold 0's final model and one-shot sweep, for the study report's faint per-trial
    # fronts: [x, accuracy] with x the front's axis (sparsity, or the cost objective).
    points = [
        [front_x(p, axis), p.accuracy]
        for p in fronts.get(0, [])
        if p.source in ("final", "sweep") and front_x(p, axis) is not None
    ]
    trial.set_user_attr(records.FRONT, sorted([round(x, 5), round(a, 5)] for x, a in points))
    # Constraints: feasible when <= 0; Optuna's samplers read them (Trial.set_constraint).
    search = typed.search
    if search.min_sparsity is not None:
        trial.set_constraint("min_sparsity", search.min_sparsity - result.sparsity)
    if search.max_flops is not None:
        trial.set_constraint("max_flops", result.cost("flops") - search.max_flops)
