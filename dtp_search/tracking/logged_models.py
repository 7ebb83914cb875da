"""The refits' networks as MLflow logged models, and the Model Registry.

``model/pruned.pt`` (:func:`dtp_search.models.export.save_pruned`) is each refit's own export;
the logged model is MLflow's view of the same network, so that the UI's Models tab and
``mlflow.pytorch.load_model`` find it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from dtp_search.pruning import strip_masks
from dtp_search.tracking import notes, records
from dtp_search.tracking.study_run import StudyTracker
from dtp_search.tracking.trial_run import TrialRun

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

log = logging.getLogger(__name__)

MODEL_URI_TAG = records.tag(records.MODEL_URI)  # on the refit run: its logged model's URI


def model_name(study_name: str, trial: int) -> str:
    """The logged model of the refit of trial ``trial``: ``<study>-refit-<trial>``, as its run."""
    return f"{study_name}-refit-{trial}"


def log_model(
    tracking_uri: str, run_id: str, model: torch.nn.Module, name: str
) -> ModelInfo | None:
    """Also log the (mask-free) model with ``mlflow.pytorch.log_model``, where that works.

    MLflow's default ``pt2`` format fixes the batch size of the traced example, so the
    pickle format is used: it needs dtp_search importable to load, and unpickling runs
    code — the sparse ``model/pruned.pt`` read with ``weights_only=True`` stays the safe
    export. Failures are logged, not raised: the refit's own record is what matters.
    The model is named ``name`` (:func:`model_name`); returns MLflow's ``ModelInfo``
    (``model_uri``, ``model_id``), ``None`` where logging failed.
    """
    import mlflow
    import mlflow.pytorch

    mlflow_log = logging.getLogger("mlflow.pytorch")
    level = mlflow_log.level
    try:
        mlflow_log.setLevel(logging.ERROR)  # the pickle-format caution, said once above
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(
                strip_masks(model).cpu().eval(),
                name=name,
                serialization_format="pickle",
                pip_requirements=["torch"],
            )
    except Exception as exc:
        log.warning("mlflow.pytorch.log_model failed for run %s: %s", run_id, exc)
        return None
    finally:
        mlflow_log.setLevel(level)


def log_refit_model(
    tracker: StudyTracker,
    run: TrialRun,
    model: torch.nn.Module,
    trial: int,
    figures: dict[str, float],
) -> str | None:
    """Log refit run ``run``'s network as the MLflow model ``<study>-refit-<trial>`` and its
    ``figures`` (``test_accuracy``, ``sparsity``, the measures) as metrics of the run
    *linked to the model* (MLflow 3's logged-model metrics: the Models tab shows and
    sorts by them); write the run's description (:func:`notes.refit_note`: how to load
    it). Returns the model's URI, ``None`` where MLflow could not log the model (the
    figures are then the run's alone)."""
    info = log_model(tracker.tracking_uri, run.run_id, model, model_name(tracker.study_name, trial))
    if info is None:
        run.log_metrics(figures)
    else:
        run.log_metrics(figures, model_id=info.model_id, dataset=tracker.dataset)
    uri = None if info is None else info.model_uri
    if uri:
        run.set_tags({MODEL_URI_TAG: uri})
    note = notes.refit_note(
        run.run_id,
        tracker.tracking_uri,
        trial=trial,
        test_accuracy=figures["test_accuracy"],
        sparsity=figures["sparsity"],
        model_uri=uri,
    )
    run.set_tags({notes.NOTE_TAG: note})
    return uri


def register(tracker: StudyTracker, run_id: str, name: str, tags: dict[str, str]) -> str | None:
    """Register the model that refit run ``run_id`` logged in the MLflow Model Registry
    as ``name`` with ``tags`` (a new version each time a different run is registered;
    none for a run already registered); returns its model URI, ``None`` without one."""
    import mlflow

    uri = tracker.client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if not uri:
        log.warning("refit.register: the refit run %s logged no MLflow model", run_id)
        return None
    versions = tracker.client.search_model_versions(f"name = '{name}'")
    if any(v.run_id == run_id for v in versions):
        return uri
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mv = mlflow.register_model(uri, name, tags=tags)
    log.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return uri
