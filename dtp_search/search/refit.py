"""The final refit: the chosen trials retrained on the whole training split, scored once on test.

Cross-validation chose the policies; the test split has not been read. For each chosen
trial (every Pareto-optimal one, or the ``refit.top_k`` most accurate of them; every
complete one with ``refit.trials=all``) a fresh model is trained on the *whole* training
split with the trial's sampled values, then evaluated once on the test split: its
accuracy, and the accuracy-versus-sparsity front of one-shot sweeps from the final masks,
measured on test. During training the per-epoch accuracy is measured on a stratified
slice of the *training* split.

Each refit is an MLflow child run ``refit-<n>`` (tags ``dtp_search.role=refit``,
``dtp_search.refit_of=<n>``) holding the test metrics, the measures of
:func:`dtp_search.models.export.measure`, the sparse export ``model/pruned.pt`` (and
``model/compact.pt`` for neuron/channel pruning), the test front and the per-layer
sparsity. A trial that already has a finished refit run is not refitted again.

With ``model.checkpoint`` every refit starts from the trained weights, and the trained
network *not pruned* is scored on the test split once (:func:`checkpoint_baseline`): the
baseline drawn on every refit's test front and logged on the study run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from omegaconf import DictConfig

from dtp_search.data import ImageDataset, stratified_subset
from dtp_search.interrupts import stop_if_requested
from dtp_search.models import start_model
from dtp_search.models.export import MEASURE_KEYS, measure, save_pruned
from dtp_search.pruning import FrontPoint, LayerCollapse, sparsity
from dtp_search.search import provenance
from dtp_search.search import space as search_space
from dtp_search.search.config import (
    build_pruner,
    config_yaml,
    make_cost_meter,
    make_warm_start,
    settings_of,
)
from dtp_search.search.params import run_params
from dtp_search.settings import (
    COST_OBJECTIVES,
    FrontSettings,
    PrunerSettings,
    Settings,
    front_axis,
)
from dtp_search.tracking import StudyTracker, plot_layer_sparsity, records
from dtp_search.tracking.logged_models import log_refit_model, register
from dtp_search.tracking.results import chosen_trials
from dtp_search.training import (
    CostProbe,
    WarmStart,
    attach_feedback,
    eval_batches,
    evaluate,
    measured_sweep,
    prune_and_train,
    train_batches,
)

log = logging.getLogger(__name__)

MONITOR_SAMPLES = 2048  # training-split slice for per-epoch accuracy during a refit
CV_METRICS = (
    records.CV_ACCURACY,
    records.CV_ACCURACY_STD,
    records.CV_SPARSITY,
    records.CV_SPARSITY_STD,
    *(name(c) for c in COST_OBJECTIVES for name in (records.cv, records.cv_std)),
)


@dataclass
class RefitResult:
    trial: int
    run_id: str
    test_accuracy: float
    sparsity: float
    measures: dict[str, float]
    layer_sparsity: dict[str, float]
    reused: bool = False  # an earlier run's result


def trial_config(
    cfg: DictConfig, space: search_space.SearchSpace, trial: optuna.trial.FrozenTrial
) -> DictConfig:
    """The config a trial ran with: its own stored config (:mod:`dtp_search.search.provenance`),
    or for a trial older than those, its policy and sampled values written into ``cfg``."""
    stored = provenance.stored_trial_config(cfg, trial)
    if stored is not None:
        return stored
    policy = trial.params.get("policy") if space.choices else next(iter(space.policies))
    dims = space.common + space.policies[policy]
    params = {d.key: trial.params[d.param] for d in dims if d.param in trial.params}
    return search_space.apply(cfg, params, policy)


def export_config(ts: Settings, dataset: ImageDataset) -> dict[str, Any]:
    """What :func:`dtp_search.load_pruned` needs (the trial's model settings, the input's
    shape and normalisation), plus its policy and data set."""
    return {
        "model": dataclasses.asdict(ts.model),
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "policy": dict(ts.policy),
        "dataset": ts.dataset.name,
    }


def refit_trial(
    ts: Settings,
    dataset: ImageDataset,
    device: torch.device,
    on_epoch=None,
    warm_start: WarmStart | None = None,
    cost: CostProbe | None = None,
):
    """Train the trial of settings ``ts`` on the whole training split; return (model,
    pruner, history result, test acc, front).

    With ``warm_start``, refits that share their dense epochs (a post-pruning study's
    thresholds, all trained dense to the end) train them once. With ``cost`` the test
    front's points carry the costs ``cost.sweep`` (the study's axis, when it is a cost).
    """
    settings = ts.train
    seed = ts.seed
    torch.manual_seed(seed)
    model = start_model(ts.model, dataset.input_shape, dataset.num_classes).to(device)
    example = torch.zeros(1, *dataset.input_shape, device=device)
    pruner = build_pruner(model, ts.policy, example)
    labels = dataset.train.labels.numpy()
    idx = attach_feedback(
        pruner, model, dataset, np.arange(len(labels)), labels, seed, settings, device
    )
    monitor_idx = stratified_subset(labels, MONITOR_SAMPLES, seed)
    train = train_batches(dataset, idx, settings, seed, device)
    monitor = eval_batches(dataset, dataset.train, monitor_idx, settings, device)
    result = prune_and_train(
        model,
        pruner,
        train,
        monitor,
        settings,
        front=FrontSettings(points=0),
        on_epoch=on_epoch,
        warm_start=warm_start,
    )
    # The one read of the test split: final accuracy and the sweep from the final masks.
    test = eval_batches(
        dataset, dataset.test, np.arange(len(dataset.test.labels)), settings, device
    )
    test_accuracy = evaluate(model, test)
    epochs = float(settings.epochs + settings.finetune_epochs)
    costs = cost.meter.measure(model, remeasure_dense=True, only=cost.sweep) if cost else {}
    front = [
        FrontPoint(
            pruner.sparsity(), test_accuracy, pruner.mean_threshold(), epochs, "final", costs
        )
    ]
    front += measured_sweep(
        pruner,
        lambda m: evaluate(m, test),
        cost,
        n_points=ts.front.points,
        max_sparsity=ts.front.max_sparsity,
        epoch=epochs,
    )
    return model, pruner, result, test_accuracy, front


BASELINE_METRIC = "checkpoint_test_accuracy"


def checkpoint_baseline(
    s: Settings,
    study: optuna.Study,
    dataset: ImageDataset,
    tracker: StudyTracker,
    device: torch.device,
) -> FrontPoint | None:
    """With ``model.checkpoint``: the trained network *not pruned*, scored on the test split
    once per study (kept in the study's ``checkpoint_baseline`` attribute and logged as
    ``checkpoint_test_accuracy`` on the study run), as a point of every refit's test front.
    ``None`` without a checkpoint."""
    if not s.model.checkpoint:
        return None
    stored = study.user_attrs.get(records.CHECKPOINT_BASELINE)
    if stored is None:
        model = start_model(s.model, dataset.input_shape, dataset.num_classes).to(device)
        test = eval_batches(
            dataset, dataset.test, np.arange(len(dataset.test.labels)), s.train, device
        )
        stored = {"test_accuracy": evaluate(model, test), "sparsity": sparsity(model)}
        study.set_user_attr(records.CHECKPOINT_BASELINE, stored)
        tracker.client.log_metric(tracker.parent_run_id, BASELINE_METRIC, stored["test_accuracy"])
        log.info("the checkpoint, not pruned: test accuracy %.4f", stored["test_accuracy"])
    return FrontPoint(
        float(stored["sparsity"]), float(stored["test_accuracy"]), 0.0, 0.0, "checkpoint"
    )


def refit_study(
    cfg: DictConfig,
    s: Settings,
    study: optuna.Study,
    space: search_space.SearchSpace,
    dataset: ImageDataset,
    tracker: StudyTracker,
    device: torch.device,
    console=None,
) -> list[RefitResult]:
    """Refit every chosen trial that has no finished refit run yet; returns all results.
    ``s`` is the run's typed settings; ``cfg``, the composed config they came from, is
    what an old trial's sampled values are written into (:func:`trial_config`)."""
    results = []
    baseline = checkpoint_baseline(s, study, dataset, tracker, device)
    # The test fronts lie on the study's axis, as its trials' fronts do.
    axis = front_axis(s.search.objectives)
    batch_size = s.export.batch_size
    if baseline is not None and axis in COST_OBJECTIVES:
        baseline = dataclasses.replace(baseline, costs={axis: 1.0})  # the dense network
    folds = s.cv.folds * s.cv.repeats
    for trial in chosen_trials(study, s.refit.top_k, s.refit.trials, s.refit.select, folds):
        stop_if_requested()  # a signal that came after the last refit's training
        existing = tracker.find_refit(trial.number)
        if existing is not None:
            results.append(_from_run(trial.number, existing))
            continue
        tcfg = trial_config(cfg, space, trial)
        ts = settings_of(tcfg)
        policy = str(ts.policy["name"])
        run = tracker.start_refit(
            trial.number, run_params(tcfg, trial.params), policy, config_yaml(tcfg)
        )
        try:
            if console is not None:
                console.out.print(
                    f"refit of trial {trial.number} ({policy}) on the whole training split …"
                )
            meter = make_cost_meter(
                [axis] if axis in COST_OBJECTIVES else [],
                ts.policy,
                dataset.input_shape,
                device,
                batch_size,
            )
            model, pruner, result, test_acc, front = refit_trial(
                ts,
                dataset,
                device,
                warm_start=make_warm_start(ts, dataset.content_digest()),
                cost=None if meter is None else CostProbe(meter, sweep=(axis,)),
                on_epoch=lambda r, run=run: run.log_metrics(
                    {
                        "loss": r.loss,
                        "train_accuracy": r.val_accuracy,
                        "sparsity": r.sparsity,
                        "threshold": r.threshold,
                        "lr": r.lr,
                        "recovered": r.recovered,
                    },
                    step=r.epoch,
                ),
            )
            stop_if_requested()  # one that came after this refit's last training step
            structured = PrunerSettings.split(ts.policy)[0].granularity != "weight"
            example = torch.zeros(1, *dataset.input_shape, device=device)
            with tempfile.TemporaryDirectory() as tmp:
                config = export_config(ts, dataset)
                pruned = save_pruned(model, config, Path(tmp) / "pruned.pt")
                measures = measure(
                    model, example, pruned, structured=structured, batch_size=batch_size
                )
                run.log_artifact(pruned, "model")
                if structured:
                    run.log_artifact(
                        save_pruned(model, config, Path(tmp) / "compact.pt", compact_input=example),
                        "model",
                    )
            # The test figures are the logged model's too (log_refit_model); the rest
            # after it (MLflow links a run's earlier metrics to a model logged later).
            figures = {"test_accuracy": test_acc, "sparsity": pruner.sparsity(), **measures}
            log_refit_model(tracker, run, model, trial.number, figures)
            # The trial's own CV figures under the names the trial runs use.
            cv = {k: trial.user_attrs[k] for k in CV_METRICS if k in trial.user_attrs}
            # dense epochs taken from the warm-start cache (another refit's)
            metrics = {**cv, "warm_start_epochs": result.warm_start_epochs}
            if baseline is not None:
                metrics[BASELINE_METRIC] = baseline.accuracy
                front = [*front, baseline]
            run.log_metrics(metrics)
            run.log_front(
                {0: front},
                f"{s.study.name} · refit of trial {trial.number} · {policy}",
                split="test",
                axis=axis,
            )
            run.log_dict(result.layer_sparsity, "layer_sparsity.json")
            run.log_figure(
                plot_layer_sparsity(
                    {trial.number: result.layer_sparsity},
                    f"refit of trial {trial.number} ({policy})",
                ),
                "layer_sparsity.png",
            )
            run.finish("COMPLETE")
        except LayerCollapse as exc:
            # The whole training split can move a threshold past what the folds saw; with
            # policy.on_collapse=prune that ends this refit, not the others.
            run.set_tags({records.FAIL_REASON: f"layer collapse: {exc}"})
            run.finish("FAIL")
            log.warning("refit of trial %d failed: layer collapse: %s", trial.number, exc)
            continue
        except (KeyboardInterrupt, SystemExit):
            run.finish("FAIL", status="KILLED")  # stopped, as an interrupted trial's run
            raise
        except BaseException:
            run.finish("FAIL")
            raise
        results.append(
            RefitResult(
                trial.number,
                run.run_id,
                test_acc,
                pruner.sparsity(),
                measures,
                result.layer_sparsity,
            )
        )
    prior = study.user_attrs.get(records.REFIT, {})
    record = {}
    for r in results:
        old = prior.get(str(r.trial), {})
        record[str(r.trial)] = {
            "run_id": r.run_id,
            "test_accuracy": r.test_accuracy,
            "sparsity": r.sparsity,
            "measures": r.measures or old.get("measures", {}),
            "layer_sparsity": r.layer_sparsity or old.get("layer_sparsity", {}),
        }
    study.set_user_attr(records.REFIT, record)
    if s.refit.register and results:
        best = max(results, key=lambda r: r.test_accuracy)
        register(
            tracker,
            best.run_id,
            s.study.name,
            {
                "trial": str(best.trial),
                "test_accuracy": f"{best.test_accuracy:.4f}",
                "sparsity": f"{best.sparsity:.4f}",
            },
        )
    return results


def _from_run(trial: int, run) -> RefitResult:
    m = run.data.metrics
    measures = {k: v for k, v in m.items() if k in MEASURE_KEYS}
    return RefitResult(
        trial,
        run.info.run_id,
        m.get("test_accuracy", float("nan")),
        m.get("sparsity", float("nan")),
        measures,
        {},
        reused=True,
    )
