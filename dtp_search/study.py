"""The search: an Optuna study whose trials are cross-validated prune-and-train jobs.

``run_study(cfg)`` opens (or resumes) the study named ``study.name`` in
``study.storage``, tops it up to ``search.n_trials`` complete trials, tracks every
trial in MLflow, and returns the study.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import hydra
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dtp_search import space as search_space
from dtp_search.config import ConfigError, build_pruner, flatten, loggable, policy_params
from dtp_search.console import Console
from dtp_search.data import ImageDataset, load_dataset
from dtp_search.models import build_model
from dtp_search.pruning import build_criterion, build_policy, pareto_mask
from dtp_search.refit import refit_study
from dtp_search.report import log_report
from dtp_search.tracking import StudyTracker
from dtp_search.training import DivergedError, TrainSettings, cross_validate, resolve_device

log = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "sparsity")
MODES = ("search", "refit", "compare")
DIRECTIONS = ("maximize", "minimize")
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


@dataclass
class SearchContext:
    cfg: DictConfig
    dataset: ImageDataset
    space: search_space.SearchSpace
    tracker: StudyTracker
    console: Console
    device: torch.device


def check_config(cfg: DictConfig) -> search_space.SearchSpace:
    """Checks that need no data: raise :class:`ConfigError` before any work starts."""
    objectives = list(cfg.search.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"search.objectives={objectives} is not allowed; "
                          f"allowed: a non-empty list of {list(OBJECTIVES)}")
    directions = list(cfg.search.directions)
    if len(directions) != len(objectives) or any(d not in DIRECTIONS for d in directions):
        raise ConfigError(f"search.directions={directions} must give one of {list(DIRECTIONS)} "
                          f"per objective {objectives}")
    if int(cfg.search.n_trials) < 1:
        raise ConfigError(f"search.n_trials={cfg.search.n_trials} is not allowed; need >= 1")
    if str(cfg.get("mode", "search")) not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not allowed; allowed: {list(MODES)}")
    top_k = cfg.refit.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"refit.top_k={top_k!r} is not allowed; allowed: null or an integer >= 1")
    if int(cfg.cv.folds) < 2:
        raise ConfigError(f"cv.folds={cfg.cv.folds} is not allowed; need >= 2")
    scheme = str(cfg.study.storage).split(":", 1)[0].split("+", 1)[0]
    if scheme not in _RDB_SCHEMES:
        raise ConfigError(f"study.storage={cfg.study.storage!r} is not an Optuna RDB URL; "
                          f"allowed schemes: {list(_RDB_SCHEMES)} (e.g. sqlite:////abs/path.db)")
    space = search_space.parse_space(cfg)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            build_policy(str(node.name), policy_params(node))
            build_criterion(str(node.get("criterion", "magnitude")))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{_policy_key(cfg, name)}: {exc}") from exc
    try:
        TrainSettings.from_config(cfg.train)
    except TypeError as exc:
        raise ConfigError(f"train: {exc}") from exc
    if float(cfg.train.get("l1", 0.0)) < 0:
        raise ConfigError(f"train.l1={cfg.train.l1} is not allowed; need >= 0")
    return space


def _policy_key(cfg: DictConfig, name: str) -> str:
    """Where a policy's settings live: ``policy`` or ``policy.options.<name>``."""
    return f"policy.options.{name}" if cfg.policy.get("name") == search_space.CHOICE else "policy"


def make_storage(cfg: DictConfig) -> RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose process died is failed and retried."""
    return RDBStorage(
        url=str(cfg.study.storage),
        heartbeat_interval=int(cfg.search.heartbeat_interval),
        grace_period=int(cfg.search.grace_period),
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=int(cfg.search.max_retry)),
    )


# Trials that count toward ``search.n_trials``: finished with a result. FAIL does not
# count — failed trials are retried (heartbeat) or replaced by new ones.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def make_sampler(cfg: DictConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed is offset by the trials already in the study so that
    a resumed run does not replay the random start-up points of the first run."""
    sampler_cfg = OmegaConf.to_container(cfg.search.sampler, resolve=True)
    if sampler_cfg.get("seed") is not None:
        sampler_cfg["seed"] = int(sampler_cfg["seed"]) + n_existing
    try:
        return hydra.utils.instantiate(sampler_cfg)
    except Exception as exc:
        raise ConfigError(f"search.sampler could not be built ({exc})") from exc


def run_study(cfg: DictConfig) -> optuna.Study:
    """Create or resume the study and run it until it holds ``search.n_trials`` complete trials."""
    if str(cfg.get("mode", "search")) == "compare":
        return compare(cfg)
    space = check_config(cfg)
    console = Console(enabled=bool(cfg.console.progress))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
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
    if refit_only:
        names = {s.study_name for s in optuna.get_all_study_summaries(make_storage(cfg))}
        if cfg.study.name not in names:
            raise ConfigError(f"mode=refit: study.name={cfg.study.name!r} does not exist in "
                              f"{cfg.study.storage}; allowed: {sorted(names)}")
    # An existing study keeps its stored directions; a mismatch is caught before any write.
    study = optuna.create_study(study_name=cfg.study.name, storage=make_storage(cfg),
                                directions=directions, load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(f"study.name={cfg.study.name!r} already exists with directions "
                          f"{stored}, not {directions}; pick another study.name")
    study.sampler = make_sampler(cfg, len(study.trials))
    study.set_metric_names(list(cfg.search.objectives))
    study.set_user_attr("objectives", list(cfg.search.objectives))

    tracker = StudyTracker(str(cfg.tracking.uri), str(cfg.tracking.experiment), cfg.study.name,
                           artifact_location=cfg.tracking.get("artifact_location"))
    optuna.storages.fail_stale_trials(study)
    tracker.close_orphans({t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    ctx = SearchContext(cfg, dataset, space, tracker, console, device)

    done = _n_finished(study)
    target = done if refit_only else int(cfg.search.n_trials)
    console.header(cfg, study, done, target, device)
    failures = 0
    status = "FINISHED"

    try:
        with console.trials(target, done) as advance:
            def after_trial(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
                nonlocal failures
                failures += t.state == TrialState.FAIL
                if failures >= int(cfg.search.max_failures):
                    s.stop()
                trials = s.get_trials(deepcopy=False)
                advance(t, sum(ft.state in FINISHED for ft in trials))
                # A trial that the heartbeat failed while this process ran (its worker
                # died) must not stay RUNNING in MLflow.
                tracker.close_orphans({ft.number: ft.state.name for ft in trials})
                refresh_pareto(s, tracker)

            while done < target and failures < int(cfg.search.max_failures):
                study.optimize(
                    lambda trial: objective(trial, ctx), n_trials=target - done,
                    catch=(DivergedError,),
                    callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED),
                               after_trial],
                    gc_after_trial=False)
                done = _n_finished(study)
        if done < target:
            log.warning("stopped after %d failed trials with %d/%d complete", failures, done, target)
        elif refit_only or bool(cfg.refit.enabled):
            refit_study(cfg, study, space, dataset, tracker, device, console)
        log_report(study, tracker)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        refresh_pareto(study, tracker)
        tracker.finish(status)
    console.summary(study, cfg, tracker.ui_command())
    return study


def compare(cfg: DictConfig) -> None:
    """``mode=compare study.names=[a,b]``: overlay the studies' Pareto fronts in one figure."""
    from dtp_search.report import compare_studies

    names = list(cfg.study.get("names") or [])
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
    policy_name, sampled = search_space.sample(trial, ctx.space)
    tcfg = search_space.apply(cfg, sampled, policy_name)
    params = policy_params(tcfg.policy)
    settings = TrainSettings.from_config(tcfg.train)
    example = torch.zeros(1, *ctx.dataset.input_shape, device=ctx.device)

    run = ctx.tracker.start_trial(trial.number, flatten(loggable(tcfg)), sampled)
    run.set_tags({"policy": policy_name})
    trial.set_user_attr("mlflow_run_id", run.run_id)
    trial.set_user_attr("policy", policy_name)
    fronts: dict[int, list] = {}
    n_epochs = settings.epochs + settings.finetune_epochs
    try:
        try:
            build_policy(policy_name, params)  # sampled combinations can still be invalid
        except ValueError as exc:
            reason = f"invalid sampled policy: {exc}"
            trial.set_user_attr("prune_reason", reason)
            run.set_tags({"prune_reason": reason})
            raise optuna.TrialPruned(reason) from exc
        with ctx.console.folds(int(tcfg.cv.folds), n_epochs, trial.number) as progress:
            def on_epoch(fold: int, rec) -> None:
                run.log_metrics({f"fold_{fold}/loss": rec.loss,
                                 f"fold_{fold}/val_accuracy": rec.val_accuracy,
                                 f"fold_{fold}/sparsity": rec.sparsity,
                                 f"fold_{fold}/threshold": rec.threshold,
                                 f"fold_{fold}/lr": rec.lr}, step=rec.epoch)
                progress(fold, rec)

            def on_fold_end(fold: int, result) -> None:
                fronts[fold] = result.front
                run.log_metrics({f"fold_{fold}/accuracy": result.accuracy,
                                 f"fold_{fold}/final_sparsity": result.sparsity})

            result = cross_validate(
                ctx.dataset, folds=int(tcfg.cv.folds), seed=int(tcfg.seed),
                make_model=lambda: build_model(tcfg.model, ctx.dataset.input_shape,
                                               ctx.dataset.num_classes),
                make_pruner=lambda m: build_pruner(m, tcfg.policy, example),
                settings=settings, device=ctx.device, front_points=int(tcfg.front.points),
                front_max_sparsity=float(tcfg.front.max_sparsity),
                on_epoch=on_epoch, on_fold_end=on_fold_end)
        # Mean curves across folds, same integer steps as the per-fold ones.
        for i in range(n_epochs):
            recs = [f.history[i] for f in result.folds if i < len(f.history)]
            run.log_metrics({k: sum(getattr(r, k) for r in recs) / len(recs)
                             for k in ("loss", "val_accuracy", "sparsity", "threshold")},
                            step=recs[0].epoch)
        summary = {"cv_accuracy": result.accuracy, "cv_accuracy_std": result.accuracy_std,
                   "cv_sparsity": result.sparsity, "cv_sparsity_std": result.sparsity_std}
        run.log_metrics(summary)
        run.log_front(fronts, f"{cfg.study.name} · trial {trial.number} · {policy_name}")
        for k, v in summary.items():
            trial.set_user_attr(k, v)
        # Fold 0's final model and one-shot sweep, for the study report's faint per-trial fronts.
        trial.set_user_attr("front", [[round(p.sparsity, 5), round(p.accuracy, 5)]
                                      for p in sorted(fronts.get(0, []), key=lambda p: p.sparsity)
                                      if p.source in ("final", "sweep")])
        values = {"accuracy": result.accuracy, "sparsity": result.sparsity}
        run.finish("COMPLETE")
        return tuple(values[o] for o in cfg.search.objectives)
    except optuna.TrialPruned:
        run.finish("PRUNED")
        raise
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr("fail_reason", "interrupted")
        run.set_tags({"fail_reason": "interrupted"})
        run.finish("FAIL", status="KILLED")
        raise
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("fail_reason", reason[:500])
        run.set_tags({"fail_reason": reason[:500]})
        run.finish("FAIL")
        raise


def pareto_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Pareto-optimal complete trials as table rows (non-domination per the study's directions)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
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
    hv = hypervolume_2d([(r["sparsity"], r["accuracy"]) for r in rows])
    try:
        tracker.log_pareto(rows, len(complete), hv, all_points, policies)
    except Exception as exc:  # tracking must not lose the study's own record
        log.warning("could not refresh the Pareto front in MLflow: %s", exc)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
