"""The search: an Optuna study whose trials are cross-validated prune-and-train jobs.

``run_study(cfg)`` opens (or resumes) the study named ``study.name`` in
``study.storage``, tops it up to ``search.n_trials`` complete trials, tracks every
trial in MLflow, and returns the study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from dtp_search import space as search_space
from dtp_search import storage as storages
from dtp_search.checkpoint import TrialCheckpoint, describe
from dtp_search.config import (
    ConfigError,
    build_pruner,
    check_numbers,
    config_yaml,
    floor_settings,
    policy_params,
    run_params,
    setting,
)
from dtp_search.console import Console
from dtp_search.data import ImageDataset, load_dataset
from dtp_search.models import build_model
from dtp_search.pruning import LayerCollapse, build_criterion, build_policy, pareto_mask
from dtp_search.pruning.pruner import check_floor
from dtp_search.refit import refit_study
from dtp_search.report import log_report
from dtp_search.tracking import StudyTracker, check_tracking_uri, describe_dataset
from dtp_search.training import (
    DivergedError,
    TrainSettings,
    cross_validate,
    resolve_device,
    stop_requested,
)
from dtp_search.warmstart import WarmStartCache

log = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "sparsity")
MODES = ("search", "refit", "compare")
DIRECTIONS = ("maximize", "minimize")
# Set in the processes that ``study.workers=N`` starts: they search only; the launching
# process refits and reports once they are done.
WORKER_ENV = "DTP_SEARCH_WORKER"


@dataclass
class SearchContext:
    cfg: DictConfig
    dataset: ImageDataset
    space: search_space.SearchSpace
    tracker: StudyTracker
    console: Console
    device: torch.device
    study: optuna.Study
    admission: storages.StudyLock


def check_config(cfg: DictConfig) -> search_space.SearchSpace:
    """Checks that need no data: raise :class:`ConfigError` before any work starts."""
    name = cfg.study.name
    if not isinstance(name, str) or not name.strip():
        # `study.name=nan` or `=123` reach here as numbers (YAML typing).
        raise ConfigError(f"study.name={name!r} is not allowed; allowed: a non-empty text, "
                          f"quoted when it looks like a number: study.name='\"{name}\"'")
    check_numbers(cfg)
    objectives = list(cfg.search.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"search.objectives={objectives} is not allowed; "
                          f"allowed: a non-empty list of {list(OBJECTIVES)}")
    directions = list(cfg.search.directions)
    if len(directions) != len(objectives) or any(d not in DIRECTIONS for d in directions):
        raise ConfigError(f"search.directions={directions} must give one of {list(DIRECTIONS)} "
                          f"per objective {objectives}")
    min_sparsity = cfg.search.get("min_sparsity")
    if min_sparsity is not None and (isinstance(min_sparsity, bool)
                                     or not isinstance(min_sparsity, (int, float))
                                     or not 0 <= min_sparsity < 1):
        raise ConfigError(f"search.min_sparsity={min_sparsity!r} is not allowed; allowed: null "
                          "or a number in [0, 1)")
    make_pruner(cfg)
    if str(cfg.get("mode", "search")) not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not allowed; allowed: {list(MODES)}")
    for key in ("enabled", "register"):
        if not isinstance(cfg.refit.get(key, False), bool):
            raise ConfigError(f"refit.{key}={cfg.refit[key]!r} is not allowed; allowed: true, false")
    max_sparsity = cfg.front.get("max_sparsity")
    if (isinstance(max_sparsity, bool) or not isinstance(max_sparsity, (int, float))
            or not 0 < max_sparsity < 1):
        raise ConfigError(f"front.max_sparsity={max_sparsity!r} is not allowed; "
                          "allowed: a number in (0, 1)")
    storages.check_storage(str(cfg.study.storage), setting(cfg, "study.workers"))
    try:
        TrainSettings.from_config(cfg.train).validate()
    except TypeError as exc:
        raise ConfigError(f"train: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    space = search_space.parse_space(cfg)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            build_policy(str(node.name), policy_params(node))
            build_criterion(str(node.get("criterion", "magnitude")))
            check_floor(*floor_settings(node))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{_policy_key(cfg, name)}: {exc}") from exc
    # Servers last: each probe may wait a few seconds for an answer.
    storages.check_reachable(str(cfg.study.storage))
    check_tracking_uri(str(cfg.tracking.uri))
    return space


def _policy_key(cfg: DictConfig, name: str) -> str:
    """Where a policy's settings live: ``policy`` or ``policy.options.<name>``."""
    return f"policy.options.{name}" if cfg.policy.get("name") == search_space.CHOICE else "policy"


def make_storage(cfg: DictConfig) -> BaseStorage:
    """The study's Optuna storage, with heartbeats and retries where Optuna has them."""
    return storages.make_storage(
        str(cfg.study.storage), heartbeat_interval=setting(cfg, "search.heartbeat_interval"),
        grace_period=setting(cfg, "search.grace_period"),
        max_retry=setting(cfg, "search.max_retry"))


# Trials that count toward ``search.n_trials``: finished with a result. FAIL does not
# count — failed trials are retried (heartbeat) or replaced by new ones.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``pruner=median|wilcoxon|none``) for a single-objective study.

    Steps are folds: a trial reports each fold's value and may stop after it. Optuna's
    ``report``/``should_prune`` do not exist for multi-objective studies — a trial's
    partial result is a point, and no point is "worse than the median" of a Pareto front —
    so two-objective studies always run every fold (``NopPruner``).
    """
    node = cfg.search.get("pruner")
    if len(cfg.search.objectives) > 1 or node is None:
        return optuna.pruners.NopPruner()
    try:
        return hydra.utils.instantiate(node)
    except Exception as exc:
        raise ConfigError(f"search.pruner could not be built ({exc}); allowed: pruner=median, "
                          "pruner=wilcoxon, pruner=none or any optuna.pruners class") from exc


def make_sampler(cfg: DictConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; a set seed is offset by ``offset`` (the trial number, see
    :func:`objective`)."""
    sampler_cfg = OmegaConf.to_container(cfg.search.sampler, resolve=True)
    if sampler_cfg.get("seed") is not None:
        sampler_cfg["seed"] = setting(cfg, "search.sampler.seed") + offset
    try:
        return hydra.utils.instantiate(sampler_cfg)
    except Exception as exc:
        raise ConfigError(f"search.sampler could not be built ({exc})") from exc


def run_study(cfg: DictConfig) -> optuna.Study:
    """Create or resume the study and run it until it holds ``search.n_trials`` finished
    trials, then refit the chosen trials and write the report.

    Any number of processes may run this on one study (``study.storage`` on a server,
    or ``study.workers=N`` here): they admit trials one at a time under a lock on the
    study (:func:`_search`), so together they stop at exactly ``search.n_trials``.
    """
    if str(cfg.get("mode", "search")) == "compare":
        return compare(cfg)
    space = check_config(cfg)
    console = Console(enabled=bool(cfg.console.progress))
    is_worker = os.environ.get(WORKER_ENV) is not None
    if cfg.get("threads"):
        torch.set_num_threads(setting(cfg, "threads"))
    device = resolve_device(str(cfg.device))

    dataset = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    smallest_class = int(torch.bincount(dataset.train.labels).min())
    if int(cfg.cv.folds) > smallest_class:
        raise ConfigError(f"cv.folds={cfg.cv.folds} exceeds the smallest class of the training "
                          f"split ({smallest_class} samples); allowed: 2..{smallest_class}")
    # Build the model and every pruner once now, so that a model/dataset or
    # granularity/model mismatch fails before the study starts.
    try:
        build_model(cfg.model, dataset.input_shape, dataset.num_classes)
    except ValueError as exc:
        raise ConfigError(f"model={cfg.model.name}: {exc}") from exc
    example = torch.zeros(1, *dataset.input_shape)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            build_pruner(build_model(cfg.model, dataset.input_shape, dataset.num_classes),
                        node, example)
        except ValueError as exc:
            raise ConfigError(f"{_policy_key(cfg, name)} with model={cfg.model.name}: "
                              f"{exc}") from exc

    directions = list(cfg.search.directions)
    refit_only = str(cfg.mode) == "refit"
    url = str(cfg.study.storage)
    storage = make_storage(cfg)
    if refit_only:
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        if cfg.study.name not in names:
            raise ConfigError(f"mode=refit: study.name={cfg.study.name!r} does not exist in "
                              f"{storages.mask_url(url)}; allowed: {sorted(names)}")
    # An existing study keeps its stored directions; a mismatch is caught before any write.
    # (create_study with load_if_exists is safe for concurrent workers: the unique study
    # name is the database's guard.)
    study = optuna.create_study(study_name=cfg.study.name, storage=storage,
                                directions=directions, load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(f"study.name={cfg.study.name!r} already exists with directions "
                          f"{stored}, not {directions}; pick another study.name")
    study.sampler = make_sampler(cfg)
    study.pruner = make_pruner(cfg)
    if not is_worker:
        study.set_metric_names(list(cfg.search.objectives))
        study.set_user_attr("objectives", list(cfg.search.objectives))

    # One parent run per study, however many workers start at once: find-or-create runs
    # under the study's lock.
    with storages.StudyLock(url, cfg.study.name, "mlflow-parent"):
        tracker = StudyTracker(str(cfg.tracking.uri), str(cfg.tracking.experiment),
                               cfg.study.name, artifact_location=cfg.tracking.get("artifact_location"))
    tracker.set_dataset(describe_dataset(dataset, str(cfg.dataset.get("path") or cfg.dataset.kind)))
    if not is_worker:
        tracker.share_view(dict.fromkeys(d.key for d in space.dimensions))
    _fail_dead(study, cfg)
    tracker.close_orphans({t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    admission = storages.StudyLock(url, cfg.study.name, "admit")
    ctx = SearchContext(cfg, dataset, space, tracker, console, device, study, admission)

    done = _n_finished(study)
    target = done if refit_only else int(cfg.search.n_trials)
    if not is_worker:
        console.header(cfg, study, done, target, device)
    status = "FINISHED"
    try:
        workers = int(cfg.study.get("workers", 1))
        if refit_only or done >= target:
            complete = True
        elif workers > 1 and not is_worker:
            from dtp_search.workers import run_workers

            complete = run_workers(cfg, study, target, console)
        else:
            complete = _search(ctx, target)
        if not complete or is_worker:
            return study
        _finish(cfg, study, space, dataset, tracker, device, console, refit_only)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        refresh_pareto(study, tracker)
        if status == "KILLED" or _is_complete(study, target):
            tracker.finish(status)
    if not is_worker:
        console.summary(study, cfg, tracker.ui_command())
    return study


def _is_complete(study: optuna.Study, target: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return (sum(t.state in FINISHED for t in trials) >= target
            and not any(t.state == TrialState.RUNNING for t in trials))


def _fail_dead(study: optuna.Study, cfg: DictConfig) -> None:
    """Fail (and re-queue) trials whose worker died: Optuna's heartbeat check on RDB
    storages; and on the file storages (SQLite, journal), whose workers all run on this
    machine, process liveness — at once, without waiting for the grace period (the
    journal has no heartbeat at all). Liveness is not used for servers: workers in
    containers can share a host name without sharing process ids."""
    if storages.has_heartbeat(study._storage):
        optuna.storages.fail_stale_trials(study)
    if storages.local_path(str(cfg.study.storage)) is not None:
        storages.fail_dead_trials(study, int(cfg.search.max_retry))


def _search(ctx: SearchContext, target: int) -> bool:
    """Run trials until the study holds ``target`` finished ones; True when it does.

    Admission: under the study's lock a worker counts finished and running trials and
    starts one only while finished + running < target, so that several workers never
    overshoot. When the remaining slots are all held by running trials, it waits: one of
    them may belong to a dead worker, and once the heartbeat declares it stale this
    worker runs its retry (same parameters, resumed from its checkpoint).
    """
    cfg, study, console, tracker = ctx.cfg, ctx.study, ctx.console, ctx.tracker
    poll = max(1.0, min(5.0, float(cfg.search.heartbeat_interval)))
    failures, waiting_since = 0, None
    with console.trials(target, _n_finished(study)) as advance:
        def after_trial(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
            nonlocal failures
            failures += t.state == TrialState.FAIL
            trials = s.get_trials(deepcopy=False)
            advance(t, sum(ft.state in FINISHED for ft in trials))
            # A trial that the heartbeat failed while this process ran (its worker
            # died) must not stay RUNNING in MLflow.
            tracker.close_orphans({ft.number: ft.state.name for ft in trials})

        while failures < int(cfg.search.max_failures):
            if stop_requested() is not None:  # a signal arrived between trials
                raise KeyboardInterrupt(stop_requested())
            _fail_dead(study, cfg)
            ctx.admission.acquire()
            try:
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state in FINISHED for t in trials)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if finished >= target:
                    break
                if finished + len(running) >= target:
                    ctx.admission.release()
                    if waiting_since is None:
                        waiting_since = time.monotonic()
                        log.info("waiting for running trial(s) %s of other workers (a dead "
                                 "worker's trial is retried after search.grace_period=%ss)",
                                 [t.number for t in running], cfg.search.grace_period)
                    tracker.close_orphans({t.number: t.state.name for t in trials})
                    time.sleep(poll)
                    continue
                waiting_since = None
                # objective() releases the lock once its trial exists and is sampled.
                study.optimize(lambda trial: objective(trial, ctx), n_trials=1,
                               catch=(DivergedError,), callbacks=[after_trial],
                               gc_after_trial=False)
            finally:
                ctx.admission.release()
    done = _n_finished(study)
    if done < target:
        log.warning("stopped after %d failed trials with %d/%d finished", failures, done, target)
        return False
    return True


def _finish(cfg: DictConfig, study: optuna.Study, space: search_space.SearchSpace,
            dataset: ImageDataset, tracker: StudyTracker, device: torch.device,
            console: Console, refit_only: bool) -> None:
    """Refit and report, once per study: the first worker to get here with no trial left
    running does it; the others see the lock taken (or the refits done) and skip."""
    lock = storages.StudyLock(str(cfg.study.storage), cfg.study.name, "refit")
    if not lock.acquire(blocking=False):
        log.info("another worker is refitting study %s", cfg.study.name)
        return
    try:
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            log.info("trials are still running in other workers; the last one to finish refits")
            return
        if refit_only or bool(cfg.refit.enabled):
            refit_study(cfg, study, space, dataset, tracker, device, console)
        log_report(study, tracker)
    finally:
        lock.release()


def compare(cfg: DictConfig) -> None:
    """``mode=compare study.names=[a,b]``: overlay the studies' Pareto fronts in one figure."""
    from dtp_search.report import compare_studies

    names = list(cfg.study.get("names") or [])
    storages.check_reachable(str(cfg.study.storage))
    storage = make_storage(cfg)
    known = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    missing = [n for n in names if n not in known]
    if not names or missing:
        raise ConfigError(f"mode=compare: study.names={names} must list existing studies of "
                          f"{cfg.study.storage}; allowed: {known}")
    path = compare_studies(storage, names, str(cfg.paths.root))
    Console(enabled=False).out.print(f"Pareto fronts of {', '.join(names)} overlaid in {path}",
                                     soft_wrap=True)


def objective(trial: optuna.Trial, ctx: SearchContext) -> tuple[float, ...]:
    """One trial: sample, cross-validate on the training split, log, return the objectives."""
    cfg = ctx.cfg
    if cfg.search.sampler.get("seed") is not None:
        # A set seed is offset by the trial number: reproducible for one worker, and
        # distinct for workers that start together (no duplicated random start-up
        # points) and for resumed runs (no replayed samples).
        ctx.study.sampler = make_sampler(cfg, offset=trial.number)
    policy_name, sampled = search_space.sample(trial, ctx.space)
    # The trial exists (RUNNING) and holds its parameters: other workers may now count
    # it and sample around it (constant liar).
    ctx.admission.release()
    tcfg = search_space.apply(cfg, sampled, policy_name)
    params = policy_params(tcfg.policy)
    settings = TrainSettings.from_config(tcfg.train)
    example = torch.zeros(1, *ctx.dataset.input_shape, device=ctx.device)

    # A retry (RetryHeartbeatStaleTrialCallback, or a trial re-queued after an
    # interrupt) inherits the user attributes of the trial it repeats, "lineage" among
    # them: the number of the first trial of the chain, which names its checkpoint.
    inherited = dict(trial.user_attrs)
    lineage = int(inherited.get("lineage", trial.number))
    trial.set_user_attr("lineage", lineage)
    trial.set_user_attr("worker", storages.worker_id())
    checkpoint = TrialCheckpoint(Path(cfg.paths.checkpoints) / cfg.study.name, lineage,
                                 _config_key(tcfg)) if cfg.search.checkpoint else None
    resume = checkpoint.load(ctx.device) if checkpoint is not None else None
    warm_start = (WarmStartCache(cfg.paths.warm_start)
                  if cfg.search.get("warm_start", True) else None)

    run = ctx.tracker.start_trial(trial.number, run_params(tcfg), sampled, config_yaml(tcfg))
    run.set_tags({"policy": policy_name, "dtp_search.worker": storages.worker_id()})
    if "lineage" in inherited:
        run.set_tags({"dtp_search.retry_of": inherited.get("trial", lineage)})
    trial.set_user_attr("trial", trial.number)
    if resume is not None:
        where = f"checkpoint of trial {lineage} at {describe(resume)}"
        trial.set_user_attr("resumed_from", where)
        run.set_tags({"dtp_search.resumed_from": where})
        log.warning("trial %d resumes from the %s", trial.number, where)
    trial.set_user_attr("mlflow_run_id", run.run_id)
    trial.set_user_attr("policy", policy_name)
    fronts: dict[int, list] = {}
    objectives = list(cfg.search.objectives)
    n_epochs = settings.epochs + settings.finetune_epochs
    try:
        try:
            build_policy(policy_name, params)  # sampled combinations can still be invalid
        except ValueError as exc:
            raise _pruned(trial, run, f"invalid sampled policy: {exc}") from exc
        with ctx.console.folds(int(tcfg.cv.folds), n_epochs, trial.number) as progress:
            def on_epoch(fold: int, rec) -> None:
                run.log_metrics({f"fold_{fold}/loss": rec.loss,
                                 f"fold_{fold}/val_accuracy": rec.val_accuracy,
                                 f"fold_{fold}/sparsity": rec.sparsity,
                                 f"fold_{fold}/threshold": rec.threshold,
                                 f"fold_{fold}/lr": rec.lr,
                                 f"fold_{fold}/recovered": rec.recovered}, step=rec.epoch)
                progress(fold, rec)

            def on_fold_end(fold: int, result) -> None:
                # (fold_<k>/val_accuracy and fold_<k>/sparsity already end on this fold's result)
                fronts[fold] = result.front
                if len(objectives) == 1:  # see make_pruner
                    value = {"accuracy": result.accuracy, "sparsity": result.sparsity}[objectives[0]]
                    trial.report(value, step=fold)
                    if fold + 1 < int(tcfg.cv.folds) and trial.should_prune():
                        raise _pruned(trial, run, f"stopped by {type(ctx.study.pruner).__name__} "
                                      f"after fold {fold} ({objectives[0]} {value:.4f})")

            try:
                result = cross_validate(
                    ctx.dataset, folds=int(tcfg.cv.folds), seed=int(tcfg.seed),
                    make_model=lambda: build_model(tcfg.model, ctx.dataset.input_shape,
                                                   ctx.dataset.num_classes),
                    make_pruner=lambda m: build_pruner(m, tcfg.policy, example),
                    settings=settings, device=ctx.device, front_points=int(tcfg.front.points),
                    front_max_sparsity=float(tcfg.front.max_sparsity),
                    front_update_samples=tcfg.front.get("update_samples"),
                    on_epoch=on_epoch, on_fold_end=on_fold_end,
                    on_checkpoint=None if checkpoint is None else checkpoint.save, resume=resume,
                    warm_start=warm_start,
                    warm_start_context=OmegaConf.to_container(tcfg.dataset, resolve=True))
            except LayerCollapse as exc:
                # The sampled policy asked a layer for fewer units than min_keep allows and
                # policy.on_collapse=prune (or min_keep=0 and it emptied the layer); every
                # finished fold has its front, so the failing fold is the next one.
                raise _pruned(trial, run, f"layer collapse in fold {len(fronts)}: {exc}") from exc
        # Mean curves across folds, same integer steps as the per-fold ones.
        for i in range(n_epochs):
            recs = [f.history[i] for f in result.folds if i < len(f.history)]
            run.log_metrics({k: sum(getattr(r, k) for r in recs) / len(recs)
                             for k in ("loss", "val_accuracy", "sparsity", "threshold",
                                       "recovered")},
                            step=recs[0].epoch)
        summary = {"cv_accuracy": result.accuracy, "cv_accuracy_std": result.accuracy_std,
                   "cv_sparsity": result.sparsity, "cv_sparsity_std": result.sparsity_std,
                   # dense epochs this trial took from the warm-start cache, over all folds
                   "warm_start_epochs": sum(f.warm_start_epochs for f in result.folds)}
        run.log_metrics(summary)
        restored = dict(sum((Counter(f.min_keep_restored) for f in result.folds), Counter()))
        if restored:
            # The min_keep floor overrode the policy (policy.on_collapse=restore): say so
            # where the trial is inspected, since its sparsity is then the floor's too.
            trial.set_user_attr("min_keep_restored", restored)
            run.set_tags({"dtp_search.min_keep_restored": json.dumps(restored, sort_keys=True)})
        # Layers that *end* the run at the floor: the trial's point is the floor's result,
        # not the policy's. Marked in its front and in the Pareto plot; with
        # policy.on_collapse=penalize it is also infeasible (an Optuna constraint), so it
        # stays out of the Pareto table and the samplers steer away from it.
        floored = sorted({name for f in result.folds for name in f.floored_layers})
        if floored:
            trial.set_user_attr("floored_layers", floored)
            run.set_tags({"dtp_search.floored_layers": ",".join(floored)})
        if floor_settings(tcfg.policy)[1] == "penalize":
            trial.set_constraint("min_keep_floor", float(len(floored)))
        title = f"{cfg.study.name} · trial {trial.number} · {policy_name}"
        if floored:
            title += f"\nends with {', '.join(floored)} at the min_keep floor"
        run.log_front(fronts, title)
        for k, v in summary.items():
            trial.set_user_attr(k, v)
        # Fold 0's final model and one-shot sweep, for the study report's faint per-trial fronts.
        trial.set_user_attr("front", [[round(p.sparsity, 5), round(p.accuracy, 5)]
                                      for p in sorted(fronts.get(0, []), key=lambda p: p.sparsity)
                                      if p.source in ("final", "sweep")])
        if cfg.search.get("min_sparsity") is not None:
            # Feasible when <= 0; Optuna's samplers read it (Trial.set_constraint).
            trial.set_constraint("min_sparsity", float(cfg.search.min_sparsity) - result.sparsity)
        values = {"accuracy": result.accuracy, "sparsity": result.sparsity}
        run.finish("COMPLETE")
        if checkpoint is not None:
            checkpoint.clear()
        return tuple(values[o] for o in cfg.search.objectives)
    except optuna.TrialPruned:
        run.finish("PRUNED")
        if checkpoint is not None:
            checkpoint.clear()
        raise
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr("fail_reason", "interrupted")
        run.set_tags({"fail_reason": "interrupted"})
        run.finish("FAIL", status="KILLED")
        # Queue the same parameters again, so that rerunning the command continues this
        # trial from its checkpoint rather than sampling a new one.
        ctx.study.enqueue_trial(trial.params, user_attrs={"lineage": lineage,
                                                          "trial": trial.number})
        raise
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("fail_reason", reason[:500])
        run.set_tags({"fail_reason": reason[:500]})
        run.finish("FAIL")
        if checkpoint is not None:
            checkpoint.clear()
        raise


def _pruned(trial: optuna.Trial, run: Any, reason: str) -> optuna.TrialPruned:
    """Record why ``trial`` stops early (Optuna user attribute and MLflow tag
    ``prune_reason``) and return the exception that ends it as PRUNED."""
    trial.set_user_attr("prune_reason", reason)
    run.set_tags({"prune_reason": reason})
    return optuna.TrialPruned(reason)


def _config_key(tcfg: DictConfig) -> str:
    """Hash of what a trial's training depends on (not paths, tracking or console)."""
    relevant = {k: OmegaConf.to_container(tcfg[k], resolve=True) if isinstance(tcfg[k], DictConfig)
                else tcfg[k] for k in ("dataset", "model", "policy", "train", "cv", "front", "seed")}
    relevant["policy"].pop("space", None)
    relevant["policy"].pop("options", None)
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def pareto_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Pareto-optimal complete trials as table rows (non-domination per the study's directions)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # A trial penalised for ending at the min_keep floor (policy.on_collapse=penalize)
    # never counts. Under search.min_sparsity only feasible trials are candidates, as for
    # Optuna's own best_trial(s); with none feasible yet, all are shown.
    trials = [t for t in trials if t.constraints.get("min_keep_floor", 0.0) <= 0]
    feasible = [t for t in trials if all(c <= 0 for c in t.constraints.values())]
    trials = feasible or trials
    if not trials:
        return []
    names = study.user_attrs.get("objectives") or [f"value_{i}" for i in range(len(study.directions))]
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    import numpy as np

    vals = np.array([[s * v for s, v in zip(signs, t.values, strict=True)] for t in trials])
    keep = pareto_mask(vals)
    refits = study.user_attrs.get("refit", {})
    rows = []
    for t, k in zip(trials, keep, strict=True):
        if not k:
            continue
        ua = t.user_attrs
        refit = refits.get(str(t.number), {})
        rows.append({
            "trial": t.number, "policy": ua.get("policy", ""),
            "params": ", ".join(f"{key.split('.')[-1]}={_fmt(v)}" for key, v in t.params.items()),
            "accuracy": ua.get("cv_accuracy", dict(zip(names, t.values, strict=True)).get("accuracy", math.nan)),
            "accuracy_std": ua.get("cv_accuracy_std", 0.0),
            "sparsity": ua.get("cv_sparsity", dict(zip(names, t.values, strict=True)).get("sparsity", math.nan)),
            "sparsity_std": ua.get("cv_sparsity_std", 0.0),
            "mlflow_run_id": ua.get("mlflow_run_id", ""),
            "test_accuracy": refit.get("test_accuracy", math.nan),
            "refit_run_id": refit.get("run_id", ""),
        })
    return sorted(rows, key=lambda r: (r["sparsity"], r["accuracy"]))


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by (sparsity, accuracy) points above ``ref`` (both maximised)."""
    pts = sorted({(s, a) for s, a in points if s > ref[0] and a > ref[1]}, reverse=True)
    area, best_a = 0.0, ref[1]
    for s, a in pts:  # sweep from high sparsity to low
        if a > best_a:
            area += (s - ref[0]) * (a - best_a)
            best_a = a
    return area


def refresh_pareto(study: optuna.Study, tracker: StudyTracker) -> list[dict[str, Any]]:
    rows = pareto_rows(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    all_points = {t.number: [(t.user_attrs.get("cv_sparsity", math.nan),
                              t.user_attrs.get("cv_accuracy", math.nan))] for t in complete}
    policies = {t.number: t.user_attrs.get("policy", "") for t in complete}
    floored = [t.number for t in complete if t.user_attrs.get("floored_layers")]
    hv = hypervolume_2d([(r["sparsity"], r["accuracy"]) for r in rows])
    try:
        tracker.log_pareto(rows, len(complete), hv, all_points, policies, floored)
    except Exception as exc:  # tracking must not lose the study's own record
        log.warning("could not refresh the Pareto front in MLflow: %s", exc)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
