"""One trial: sample a policy and its thresholds, cross-validate it on the training
split, record it in Optuna and MLflow, and return its objectives."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig

from dtp_search import storage as storages
from dtp_search.data import ImageDataset
from dtp_search.errors import StorageUnavailable, disk_full
from dtp_search.models import start_model
from dtp_search.pruning import LayerCollapse
from dtp_search.search import provenance
from dtp_search.search import space as search_space
from dtp_search.search.config import (
    ConfigError,
    build_pruner,
    check_policy,
    config_yaml,
    make_cost_probe,
    make_fidelity,
    make_sampler,
    make_warm_start,
    settings_of,
)
from dtp_search.search.early_stop import ParetoFoldStop
from dtp_search.search.fidelity import POINT_ATTR, RUNG_ATTR, FidelityRung
from dtp_search.search.params import run_params
from dtp_search.search.trial_record import record
from dtp_search.settings import COST_OBJECTIVES, Settings, front_axis
from dtp_search.tracking import StudyTracker, TrialRun, records
from dtp_search.tracking.console import Console
from dtp_search.training import (
    CVResult,
    EpochRecord,
    FoldHooks,
    FoldResult,
    cross_validate,
    fold_value,
)
from dtp_search.training.checkpoint import TrialCheckpoint, describe

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """What every trial of one run shares. ``cfg`` is the composed config that the
    search space samples into; ``settings`` is its typed form."""

    cfg: DictConfig
    settings: Settings
    dataset: ImageDataset
    space: search_space.SearchSpace
    tracker: StudyTracker
    console: Console
    device: torch.device
    study: optuna.Study
    admission: storages.StudyLock


@dataclass
class _Trial:
    """One running trial: its Optuna trial and MLflow run, its resolved config and the
    checkpoint a retry resumes from."""

    trial: optuna.Trial
    run: Any
    tcfg: DictConfig
    policy: str
    lineage: int
    checkpoint: TrialCheckpoint | None
    resume: dict[str, Any] | None

    def clear_checkpoint(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.clear()


def objective(trial: optuna.Trial, ctx: SearchContext) -> tuple[float, ...]:
    """One trial: sample, cross-validate on the training split, log, return the objectives."""
    t = _start(trial, ctx)
    try:
        try:
            # The trial's config, sampled values in, through the run's own checker: a
            # sampled value out of its key's range gets the same message as a typed one.
            # From here on the trial reads only these typed settings.
            typed = settings_of(t.tcfg)
        except ConfigError as exc:
            raise _pruned(trial, t.run, f"invalid sampled config: {exc}") from exc
        try:
            check_policy(typed.policy, typed)  # sampled combinations can still be invalid
        except (ValueError, TypeError) as exc:
            raise _pruned(trial, t.run, f"invalid sampled policy: {exc}") from exc
        result, fronts = _cross_validate(t, ctx, typed)
        record(t.trial, t.run, t.policy, typed, result, fronts)
        t.run.finish("COMPLETE")
        t.clear_checkpoint()
        return tuple(result.value(o) for o in ctx.settings.search.objectives)
    except optuna.TrialPruned:
        t.run.finish("PRUNED")
        t.clear_checkpoint()
        raise
    except StorageUnavailable as exc:
        _left_to_heartbeat(t.run, exc)
        raise
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr(records.FAIL_REASON, "interrupted")
        t.run.set_tags({records.FAIL_REASON: "interrupted"})
        t.run.finish("FAIL", status="KILLED")
        # Queue the same parameters again, so that rerunning the command continues this
        # trial from its checkpoint rather than sampling a new one.
        ctx.study.enqueue_trial(
            trial.params, user_attrs={records.LINEAGE: t.lineage, records.TRIAL: trial.number}
        )
        raise
    except BaseException as exc:
        full = disk_full(exc)  # one line naming the file, not torch's or SQLite's words
        reason = str(full) if full is not None else f"{type(exc).__name__}: {exc}"
        trial.set_user_attr(records.FAIL_REASON, reason[:500])
        t.run.set_tags({records.FAIL_REASON: reason[:500]})
        t.run.finish("FAIL")
        t.clear_checkpoint()
        raise


def _left_to_heartbeat(run: TrialRun, exc: StorageUnavailable) -> None:
    """End the MLflow run of a trial whose storage went away. Nothing is written to that
    storage: the trial stays RUNNING there, its heartbeat stops, and once the server is
    back a worker fails it and runs its retry from the checkpoint, which is kept. The run
    ends now, unless the tracking store is what went away (the next run closes it then:
    :meth:`~dtp_search.tracking.StudyTracker.close_orphans`)."""
    with contextlib.suppress(Exception, StorageUnavailable):
        run.set_tags({records.FAIL_REASON: str(exc)[:500]})
        run.finish("FAIL")


def _start(trial: optuna.Trial, ctx: SearchContext) -> _Trial:
    """Sample the trial, release the admission lock, and open its checkpoint and run."""
    s = ctx.settings
    if (s.search.sampler or {}).get("seed") is not None:
        # A set seed is offset by the trial number: reproducible for one worker, and
        # distinct for workers that start together (no duplicated random start-up
        # points) and for resumed runs (no replayed samples).
        ctx.study.sampler = make_sampler(s, offset=trial.number)
    policy_name, sampled = search_space.sample(trial, ctx.space)
    # The trial exists (RUNNING) and holds its parameters: other workers may now count
    # it and sample around it (constant liar).
    ctx.admission.release()
    tcfg = search_space.apply(ctx.cfg, sampled, policy_name)
    provenance.record_trial(trial, tcfg)
    # A retry (RetryHeartbeatStaleTrialCallback, or a trial re-queued after an
    # interrupt) inherits the user attributes of the trial it repeats, "lineage" among
    # them: the number of the first trial of the chain, which names its checkpoint.
    inherited = dict(trial.user_attrs)
    lineage = int(inherited.get(records.LINEAGE, trial.number))
    trial.set_user_attr(records.LINEAGE, lineage)
    trial.set_user_attr(records.WORKER, storages.worker_id())
    checkpoint = (
        TrialCheckpoint(
            Path(s.paths.checkpoints) / s.study.name,
            lineage,
            provenance.trial_key(tcfg, ctx.dataset.content_digest()),
        )
        if s.search.checkpoint
        else None
    )
    resume = checkpoint.load(ctx.device) if checkpoint is not None else None

    run = ctx.tracker.start_trial(
        trial.number, run_params(tcfg, sampled), sampled, config_yaml(tcfg)
    )
    try:
        _describe(trial, run, policy_name, lineage, inherited, resume)
    except StorageUnavailable as exc:
        _left_to_heartbeat(run, exc)
        raise
    return _Trial(trial, run, tcfg, policy_name, lineage, checkpoint, resume)


def _describe(
    trial: optuna.Trial,
    run: TrialRun,
    policy_name: str,
    lineage: int,
    inherited: dict[str, Any],
    resume: dict[str, Any] | None,
) -> None:
    """Tag the new trial's run and attributes: its policy, worker, lineage and resume point."""
    run.set_tags({records.POLICY: policy_name, records.tag(records.WORKER): storages.worker_id()})
    if records.LINEAGE in inherited:
        run.set_tags({records.tag(records.RETRY_OF): inherited.get(records.TRIAL, lineage)})
    trial.set_user_attr(records.TRIAL, trial.number)
    if resume is not None:
        where = f"checkpoint of trial {lineage} at {describe(resume)}"
        trial.set_user_attr(records.RESUMED_FROM, where)
        run.set_tags({records.tag(records.RESUMED_FROM): where})
        log.warning("trial %d resumes from the %s", trial.number, where)
    trial.set_user_attr(records.MLFLOW_RUN_ID, run.run_id)
    trial.set_user_attr(records.POLICY, policy_name)


def _cross_validate(
    t: _Trial, ctx: SearchContext, typed: Settings
) -> tuple[CVResult, dict[int, list]]:
    """The trial's k folds, each epoch logged. After each fold the study's early stopping
    may end it (:func:`dtp_search.search.config.make_early_stop`): Optuna's pruner for one
    objective, :class:`~dtp_search.search.early_stop.ParetoFoldStop` for several."""
    trial, run = t.trial, t.run
    settings = typed.train
    example = torch.zeros(1, *ctx.dataset.input_shape, device=ctx.device)
    objectives = list(typed.search.objectives)
    axis = front_axis(objectives)
    folds = typed.cv.folds * typed.cv.repeats  # fold results of a trial (k · repeats)
    fronts: dict[int, list] = {}
    done: list[FoldResult] = []  # in fold order (replayed folds of a resume too)
    pareto = ctx.study.pruner if isinstance(ctx.study.pruner, ParetoFoldStop) else None
    warm_start = make_warm_start(typed, ctx.dataset.content_digest())
    rung = make_fidelity(ctx.settings)
    rung_epoch = None if rung is None else rung.rung_epoch(settings.epochs)
    cost = make_cost_probe(
        ctx.settings, typed.policy, ctx.dataset.input_shape, ctx.device, rung_epoch
    )
    with ctx.console.folds(
        folds, settings.epochs + settings.finetune_epochs, trial.number
    ) as progress:

        def on_epoch(fold: int, rec: EpochRecord) -> None:
            run.log_metrics(
                {f"fold_{fold}/{k}": getattr(rec, k) for k in records.EPOCH_METRICS}, step=rec.epoch
            )
            progress(fold, rec)
            if fold == 0 and rec.epoch == rung_epoch:
                _judge_rung(t, ctx, rung, rec, objectives)

        def on_fold_end(fold: int, result: FoldResult) -> None:
            # (fold_<k>/val_accuracy and fold_<k>/sparsity already end on this fold's result)
            fronts[fold] = result.front
            done.append(result)
            if pareto is not None:
                # Read from the storage, so the front is every worker's (PostgreSQL).
                decision = pareto.check(
                    ctx.study,
                    trial.number,
                    folds,
                    [f.accuracy for f in done],
                    [f.sparsity for f in done],
                    objectives,
                    costs={
                        o: [fold_value(f, o) for f in done]
                        for o in objectives
                        if o in COST_OBJECTIVES
                    },
                )
                if decision is not None:
                    trial.set_user_attr(records.DOMINATED_BY, decision.dominated_by)
                    run.set_tags({records.tag(records.DOMINATED_BY): decision.dominated_by})
                    run.log_front(
                        fronts,
                        f"{ctx.settings.study.name} · trial {trial.number} · "
                        f"{t.policy}\nstopped early after {len(fronts)} of {folds} "
                        f"folds: a partial front",
                        axis=axis,
                    )
                    raise _pruned(trial, run, decision.reason)
            elif len(objectives) == 1:
                value = fold_value(result, objectives[0])
                trial.report(value, step=fold)
                if fold + 1 < folds and trial.should_prune():
                    raise _pruned(
                        trial,
                        run,
                        f"stopped by {type(ctx.study.pruner).__name__} "
                        f"after fold {fold} ({objectives[0]} {value:.4f})",
                    )

        try:
            result = cross_validate(
                ctx.dataset,
                folds=typed.cv.folds,
                repeats=typed.cv.repeats,
                seed=typed.seed,
                make_model=lambda: start_model(
                    typed.model, ctx.dataset.input_shape, ctx.dataset.num_classes
                ),
                make_pruner=lambda m: build_pruner(m, typed.policy, example),
                settings=settings,
                device=ctx.device,
                front=typed.front,
                hooks=FoldHooks(
                    on_epoch=on_epoch,
                    on_fold_end=on_fold_end,
                    on_checkpoint=None if t.checkpoint is None else t.checkpoint.save,
                ),
                resume=t.resume,
                warm_start=warm_start,
                cost=cost,
            )
        except LayerCollapse as exc:
            # The sampled policy asked a layer for fewer units than min_keep allows and
            # policy.on_collapse=prune (or min_keep=0 and it emptied the layer); every
            # finished fold has its front, so the failing fold is the next one.
            raise _pruned(trial, run, f"layer collapse in fold {len(fronts)}: {exc}") from exc
    return result, fronts


def _judge_rung(
    t: _Trial, ctx: SearchContext, rung: FidelityRung, rec: EpochRecord, objectives: list[str]
) -> None:
    """Fold 0 has reached the reduced budget: store its rung point (read by the other
    trials' rung, :class:`~dtp_search.search.fidelity.FidelityRung`) and stop the trial there
    unless the rung promotes it."""
    trial, run = t.trial, t.run
    # The costs among the objectives, measured at this epoch (CostProbe.epochs). A record
    # without them at sparsity 0 is a dense epoch replayed from the warm start: its
    # compacted network is the dense one.
    missing = 1.0 if rec.sparsity == 0 else float("nan")
    costs = {o: rec.costs.get(o, missing) for o in objectives if o in COST_OBJECTIVES}
    point = {"epoch": rec.epoch, "accuracy": rec.val_accuracy, "sparsity": rec.sparsity, **costs}
    # Stored before the decision: a trial judged concurrently by another worker sees it.
    trial.set_user_attr(POINT_ATTR, point)
    decision = rung.check(
        ctx.study,
        trial.number,
        rec.epoch,
        rec.val_accuracy,
        rec.sparsity,
        objectives,
        costs=costs,
    )
    log.info("trial %d: %s", trial.number, decision.reason)
    trial.set_user_attr(RUNG_ATTR, 1 if decision.promoted else 0)
    run.set_tags(
        {
            records.tag(records.RUNG): str(1 if decision.promoted else 0),
            records.tag(records.RUNG_REASON): decision.reason,
        }
    )
    if not decision.promoted:
        if decision.dominated_by is not None:
            trial.set_user_attr(records.DOMINATED_BY, decision.dominated_by)
            run.set_tags({records.tag(records.DOMINATED_BY): decision.dominated_by})
        raise _pruned(trial, run, decision.reason)


def _pruned(trial: optuna.Trial, run: Any, reason: str) -> optuna.TrialPruned:
    """Record why ``trial`` stops early (Optuna user attribute and MLflow tag
    ``prune_reason``) and return the exception that ends it as PRUNED."""
    trial.set_user_attr(records.PRUNE_REASON, reason)
    run.set_tags({records.PRUNE_REASON: reason})
    return optuna.TrialPruned(reason)
