"""The search: an Optuna study whose trials are cross-validated prune-and-train jobs.

``run_study(cfg)`` opens (or resumes) the study named ``study.name`` in
``study.storage``, tops it up to ``search.n_trials`` complete trials, tracks every
trial in MLflow, and returns the study. One trial is :func:`dtp_search.search.trial.objective`;
what a finished study says is :mod:`dtp_search.tracking.results`.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence

import optuna
import torch
from omegaconf import DictConfig
from optuna.trial import TrialState

from dtp_search import storage as storages
from dtp_search.data import load_dataset
from dtp_search.errors import RefitInterrupted, StorageUnavailable, StudyIncomplete
from dtp_search.interrupts import stop_if_requested
from dtp_search.search import preflight, provenance
from dtp_search.search import space as search_space
from dtp_search.search.config import (
    ConfigError,
    check_config,
    make_early_stop,
    make_sampler,
    make_storage,
    settings_of,
)
from dtp_search.search.refit import refit_study
from dtp_search.search.trial import SearchContext, objective
from dtp_search.search.workers import WORKER_ENV, run_workers
from dtp_search.settings import Settings, front_axis
from dtp_search.storage import mask_url
from dtp_search.storage.outage import seconds_since_recovery
from dtp_search.tracking import StudyTracker, describe_dataset, records
from dtp_search.tracking.console import Console
from dtp_search.tracking.report import compare_studies, log_report
from dtp_search.tracking.results import FINISHED, n_finished, refresh_pareto
from dtp_search.training import DivergedError, resolve_device

log = logging.getLogger(__name__)


def run_study(cfg: DictConfig, overrides: Sequence[str] | None = None) -> optuna.Study:
    """Create or resume the study and run it until it holds ``search.n_trials`` finished
    trials, then refit the chosen trials and write the report.

    ``overrides``: the command line's ``key=value`` overrides (default: those of the
    running Hydra app); a searched key among them is fixed (:func:`space.fix_set_keys`).

    Any number of processes may run this on one study (``study.storage`` on a server,
    or ``study.workers=N`` here): they admit trials one at a time under a lock on the
    study (:func:`_search`), so together they stop at exactly ``search.n_trials``.

    Raises :class:`StudyIncomplete` when too many trials failed to reach that count, and
    :class:`RefitInterrupted` for an interrupt during the refit. The study's MLflow
    parent run ends FINISHED, FAILED (a short study, an error) or KILLED (an interrupt),
    never left RUNNING by the process that started it (:func:`_end_parent`).
    """
    typed = settings_of(cfg)
    if typed.mode == "compare":
        return compare(typed)
    fixed = search_space.fix_set_keys(cfg, _command_line(overrides))
    # (the typed settings hold the search spaces: taken again when keys were fixed)
    s, space = check_config(cfg, None if fixed else typed)
    preflight.check_machine(s)  # stores readable, folders writable: before either opens
    console = Console(enabled=s.console.progress)
    is_worker = os.environ.get(WORKER_ENV) is not None
    for line in () if is_worker else fixed:  # (the parent process has said it)
        console.out.print(line, soft_wrap=True, markup=False)
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)

    dataset = load_dataset(s.dataset, cache_dir=s.paths.cache_dir)
    preflight.check_against_data(cfg, s, dataset)
    preflight.check_free_space(s, dataset)  # a warning when checkpoints may not fit
    refit_only = s.mode == "refit"
    url = s.study.storage
    info = describe_dataset(dataset, s.dataset.path or s.dataset._target_ or s.dataset.kind)
    study = _open_study(cfg, s, info.digest, is_worker)
    # Bounds taken from other keys (high: ${train.epochs}) stay those the study began with.
    space = search_space.pin_derived(study, space, record=not is_worker)

    # One parent run per study, however many workers start at once: find-or-create runs
    # under the study's lock.
    patience = s.study.storage_patience
    with storages.StudyLock(url, s.study.name, "mlflow-parent", patience=patience):
        tracker = StudyTracker(
            s.tracking.uri,
            s.tracking.experiment,
            s.study.name,
            artifact_location=s.tracking.artifact_location,
            patience=patience,
        )
    tracker.set_dataset(info)
    if not is_worker:
        tracker.share_view(
            dict.fromkeys(d.key for d in space.dimensions), axis=front_axis(s.search.objectives)
        )
    _fail_dead(study, s)
    tracker.close_orphans({t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    admission = storages.StudyLock(url, s.study.name, "admit", patience=patience)
    ctx = SearchContext(cfg, s, dataset, space, tracker, console, device, study, admission)

    done = n_finished(study)
    target = done if refit_only else s.search.n_trials
    if not is_worker:
        console.header(s, study, done, target, device)
    outcome = "KILLED"  # the parent run's end should this process be stopped
    try:
        if refit_only or done >= target:
            pass
        elif s.study.workers > 1 and not is_worker:
            if not run_workers(s, study, target, console):
                raise StudyIncomplete(
                    f"the workers stopped with {n_finished(study)}/{target} finished trials "
                    f"(their logs: {s.paths.root}/workers/); {_NEXT_STEP}"
                )
        else:
            _search(ctx, target)
        if not is_worker:
            try:
                _finish(ctx, refit_only)
            except KeyboardInterrupt as exc:
                raise RefitInterrupted(*exc.args) from None
        outcome = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        outcome = "FAILED"
        raise
    finally:
        # A worker of study.workers=N leaves the parent run to the process that started
        # it: the other workers still log to it.
        _end_parent(study, tracker, outcome, target if not is_worker else None)
    if not is_worker:
        console.summary(study, s, tracker.ui_command())
    return study


# What a short study's message tells the user to do.
_NEXT_STEP = (
    "the failed trials' fail_reason (Optuna user attribute and MLflow tag) says why; fix "
    "the cause and run the same command again to top the study up (a changed setting "
    "needs a new study.name or study.allow_changes=[key]), or raise search.max_failures"
)


def _end_parent(
    study: optuna.Study, tracker: StudyTracker, outcome: str, target: int | None
) -> None:
    """Refresh the study's Pareto front and end its parent run as ``outcome`` says:
    FINISHED once the study is complete with no trial running (another process still
    running trials ends it later), FAILED or KILLED at once. ``target=None`` (a worker
    of ``study.workers=N``): the front only. A second Ctrl-C during the refresh still
    ends the run (KILLED); a store that fails here must not hide why the run stopped."""
    failing = outcome != "FINISHED"
    try:
        refresh_pareto(study, tracker)
    except (Exception, StorageUnavailable) as exc:
        if not failing:
            outcome = "FAILED"
            raise
        log.warning("the study's Pareto front was not refreshed in MLflow (%s)", exc)
    except BaseException:  # KeyboardInterrupt: a second signal
        outcome = "KILLED"
        raise
    finally:
        if target is not None and (outcome != "FINISHED" or _is_complete(study, target)):
            try:
                tracker.finish(outcome)
            except (Exception, StorageUnavailable) as exc:
                if not failing:
                    raise
                log.warning("the study's MLflow run was not marked %s (%s)", outcome, exc)


def _command_line(overrides: Sequence[str] | None) -> list[str]:
    if overrides is not None:
        return list(overrides)
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _open_study(cfg: DictConfig, s: Settings, dataset_digest: str, is_worker: bool) -> optuna.Study:
    """Create the study, or open it and refuse a configuration that differs from the one
    that defined it (:mod:`dtp_search.search.provenance`), before writing anything to it."""
    directions = list(s.search.directions)
    name, url = s.study.name, s.study.storage
    storage = make_storage(s)
    if s.mode == "refit":
        names = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
        if name not in names:
            raise ConfigError(
                f"mode=refit: study.name={name!r} does not exist in "
                f"{storages.mask_url(url)}; allowed: {sorted(names)}"
            )
    # An existing study keeps its stored directions; a mismatch is caught before any write.
    # (create_study with load_if_exists is safe for concurrent workers: the unique study
    # name is the database's guard.)
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions, load_if_exists=True
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(
            f"study.name={name!r} already exists with directions "
            f"{stored}, not {directions}; pick another study.name"
        )
    defining = provenance.defining_config(cfg, dataset_digest)
    allowed = provenance.check_unchanged(study, defining, list(s.study.allow_changes))
    study.sampler = make_sampler(s)
    study.pruner = make_early_stop(s)
    if not is_worker:
        provenance.record_study(study, defining, allowed)
        with warnings.catch_warnings():  # experimental in Optuna; labels the objectives
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(s.search.objectives))
        study.set_user_attr(records.OBJECTIVES, list(s.search.objectives))
    return study


def _is_complete(study: optuna.Study, target: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return sum(t.state in FINISHED for t in trials) >= target and not any(
        t.state == TrialState.RUNNING for t in trials
    )


def _fail_dead(study: optuna.Study, s: Settings) -> None:
    """Fail (and re-queue) trials whose worker died: Optuna's heartbeat check on RDB
    storages; and on the file storages (SQLite, journal), whose workers all run on this
    machine, process liveness — at once, without waiting for the grace period (the
    journal has no heartbeat at all). Liveness is not used for servers: workers in
    containers can share a host name without sharing process ids."""
    back = seconds_since_recovery(s.study.storage)
    # Right after an outage every heartbeat is old: live workers beat again within one
    # interval, and only then does a silent trial mean a dead worker.
    settled = back is None or back > 2 * s.search.heartbeat_interval
    if storages.has_heartbeat(study._storage) and settled:
        with warnings.catch_warnings():  # experimental in Optuna; the heartbeat's own check
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    if storages.local_path(s.study.storage) is not None:
        storages.fail_dead_trials(study, s.search.max_retry)


def _search(ctx: SearchContext, target: int) -> None:
    """Run trials until the study holds ``target`` finished ones; raise
    :class:`StudyIncomplete` when ``search.max_failures`` trials failed first.

    Admission: under the study's lock a worker counts finished and running trials and
    starts one only while finished + running < target, so that several workers never
    overshoot. When the remaining slots are all held by running trials, it waits: one of
    them may belong to a dead worker, and once the heartbeat declares it stale this
    worker runs its retry (same parameters, resumed from its checkpoint).
    """
    s, study, console, tracker = ctx.settings, ctx.study, ctx.console, ctx.tracker
    poll = max(1.0, min(5.0, float(s.search.heartbeat_interval)))
    failures, waiting_since = 0, None
    with console.trials(target, n_finished(study)) as advance:

        def after_trial(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
            nonlocal failures
            failures += t.state == TrialState.FAIL
            trials = s.get_trials(deepcopy=False)
            advance(t, sum(ft.state in FINISHED for ft in trials))
            # A trial that the heartbeat failed while this process ran (its worker
            # died) must not stay RUNNING in MLflow.
            tracker.close_orphans({ft.number: ft.state.name for ft in trials})

        while failures < s.search.max_failures:
            stop_if_requested()  # a signal arrived between trials
            _fail_dead(study, s)
            ctx.admission.acquire()
            try:
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state in FINISHED for t in trials)
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if finished >= target:
                    break
                if not ctx.admission.still_held():
                    # The server restarted while the lock was held (it died with its
                    # connection): another worker may have counted meanwhile. Count again.
                    continue
                if finished + len(running) >= target:
                    ctx.admission.release()
                    if waiting_since is None:
                        waiting_since = time.monotonic()
                        log.info(
                            "waiting for running trial(s) %s of other workers (a dead "
                            "worker's trial is retried after search.grace_period=%ss)",
                            [t.number for t in running],
                            s.search.grace_period,
                        )
                    tracker.close_orphans({t.number: t.state.name for t in trials})
                    time.sleep(poll)
                    continue
                waiting_since = None
                # objective() releases the lock once its trial exists and is sampled.
                try:
                    study.optimize(
                        lambda trial: objective(trial, ctx),
                        n_trials=1,
                        catch=(DivergedError,),
                        callbacks=[after_trial],
                        gc_after_trial=False,
                    )
                except UnboundLocalError as exc:
                    # Optuna 5's _run_trial reads the told state in a `finally` that a
                    # failed tell left unset; the storage outage is what happened.
                    if isinstance(exc.__context__, StorageUnavailable):
                        raise exc.__context__ from None
                    raise
            finally:
                ctx.admission.release()
    done = n_finished(study)
    if done < target:
        raise StudyIncomplete(
            f"stopped after {failures} failed trials with {done}/{target} finished; {_NEXT_STEP}"
        )


def _finish(ctx: SearchContext, refit_only: bool) -> None:
    """Refit and report, once per study: the first worker to get here with no trial left
    running does it; the others see the lock taken (or the refits done) and skip."""
    s, study, tracker = ctx.settings, ctx.study, ctx.tracker
    lock = storages.StudyLock(
        s.study.storage, s.study.name, "refit", patience=s.study.storage_patience
    )
    if not lock.acquire(blocking=False):
        log.info("another worker is refitting study %s", s.study.name)
        return
    try:
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            log.info("trials are still running in other workers; the last one to finish refits")
            return
        if refit_only or s.refit.enabled:
            refit_study(
                ctx.cfg,
                ctx.settings,
                study,
                ctx.space,
                ctx.dataset,
                tracker,
                ctx.device,
                ctx.console,
            )
        stop_if_requested()  # a signal during the refits' last steps
        log_report(study, tracker)
    finally:
        lock.release()


def compare(s: Settings) -> None:
    """``mode=compare study.names=[a,b]``: overlay the studies' Pareto fronts in one figure."""
    names = list(s.study.names or [])
    storages.check_reachable(s.study.storage)
    storage = make_storage(s)
    known = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    missing = [n for n in names if n not in known]
    if not names or missing:
        raise ConfigError(
            f"mode=compare: study.names={names} must list existing studies of "
            f"{mask_url(s.study.storage)}; allowed: {known}"
        )
    try:
        path = compare_studies(storage, names, s.paths.root)
    except ValueError as exc:
        raise ConfigError(f"mode=compare: study.names={names}: {exc}") from exc
    Console(enabled=False).out.print(
        f"Pareto fronts of {', '.join(names)} overlaid in {path}", soft_wrap=True
    )
