"""A refit's model in MLflow: logged as ``<study>-refit-<n>`` with its figures linked to it
(the Models tab lists and sorts by them), and a run description whose snippet loads it.

A tiny pruned MLP in a fresh SQLite store stands in for a refit (no training)."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from inprocess import isolated
from omegaconf import OmegaConf

from dtp_search.models import build_model
from dtp_search.models.export import save_pruned
from dtp_search.pruning import AGPThreshold, DynamicPruner, sparsity
from dtp_search.tracking import DatasetInfo, StudyTracker
from dtp_search.tracking.logged_models import MODEL_URI_TAG, log_refit_model
from dtp_search.tracking.notes import NOTE_TAG, study_note

MODEL = {"arch": "mlp", "hidden": [32, 16]}


def _refit(tracker: StudyTracker, trial: int, target: float, test_accuracy: float):
    """A refit run of ``trial`` holding a network pruned to ``target`` (its export and its
    logged model); returns (run id, the network's sparsity)."""
    torch.manual_seed(trial)
    model = build_model(OmegaConf.create(MODEL), (1, 8, 8), 10)
    DynamicPruner(model, AGPThreshold(target, end_epoch=0)).update(1.0)
    run = tracker.start_refit(trial, {"policy.name": "agp"}, "agp", "policy: agp\n")
    config = {"model": MODEL, "input_shape": [1, 8, 8], "num_classes": 10}
    with tempfile.TemporaryDirectory() as tmp:
        run.log_artifact(save_pruned(model, config, Path(tmp) / "pruned.pt"), "model")
    s = sparsity(model)
    figures = {"test_accuracy": test_accuracy, "sparsity": s, "nonzero_params": 123.0}
    with isolated():  # log_model sets the global tracking URI
        log_refit_model(tracker, run, model, trial, figures)
    run.log_metrics({"cv_accuracy": 0.9})  # the trial's figure, after: the run's alone
    run.finish("COMPLETE")
    return run.run_id, s


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = StudyTracker(uri, "exp", "s")
    tracker.set_dataset(DatasetInfo("digits", "d1g35t", "builtin:digits", {"test": 360}))
    refits = {
        3: _refit(tracker, 3, 0.9, 0.91),
        5: _refit(tracker, 5, 0.5, 0.95),
    }
    return tracker, refits


def test_the_models_tab_lists_refit_models_with_their_figures_most_accurate_first(store):
    tracker, refits = store
    models = tracker.client.search_logged_models(
        [tracker.experiment_id],
        order_by=[{"field_name": "metrics.test_accuracy", "ascending": False}],
    )
    assert [m.name for m in models] == ["s-refit-5", "s-refit-3"]
    for m, trial in zip(models, (5, 3), strict=True):
        figures = {x.key: x.value for x in m.metrics}
        assert set(figures) == {"test_accuracy", "sparsity", "nonzero_params"}
        assert {(x.dataset_name, x.dataset_digest) for x in m.metrics} == {("digits", "d1g35t")}
        assert figures["test_accuracy"] == (0.95 if trial == 5 else 0.91)
        assert figures["sparsity"] == pytest.approx(refits[trial][1])
        assert figures["nonzero_params"] == 123.0
        assert m.source_run_id == refits[trial][0]
        run = tracker.client.get_run(m.source_run_id)
        assert run.data.tags[MODEL_URI_TAG] == m.model_uri
        # the linked figures are the run's metrics too (the runs table's columns)
        assert run.data.metrics["test_accuracy"] == figures["test_accuracy"]


def test_a_refit_description_holds_the_snippet_that_loads_its_model(store):
    tracker, refits = store
    run_id, expected = refits[3]
    note = tracker.client.get_run(run_id).data.tags[NOTE_TAG]
    assert "test accuracy **0.9100**" in note and tracker.tracking_uri in note
    snippet = re.search(r"```python\n(.*?)\n```", note, re.S).group(1)
    assert len(snippet.splitlines()) == 2 and run_id in snippet
    # Run as a user would paste it, in a fresh interpreter.
    check = (
        "\nimport torch\nfrom dtp_search.pruning import sparsity\n"
        "assert isinstance(model, torch.nn.Module) and not model.training\n"
        "print(sparsity(model))"
    )
    out = subprocess.run(
        [sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected)


def test_the_study_description_links_its_refits_most_accurate_first(store):
    tracker, refits = store
    record = {
        str(n): {"run_id": rid, "test_accuracy": acc, "sparsity": s}
        for (n, (rid, s)), acc in zip(refits.items(), (0.91, 0.95), strict=True)
    }
    note = study_note(tracker.experiment_id, record, tracker.tracking_uri)
    lines = [ln for ln in note.splitlines() if ln.startswith("| [")]
    assert len(lines) == 2 and refits[5][0] in lines[0] and "| 0.9500 |" in lines[0]
    link = f"(#/experiments/{tracker.experiment_id}/runs/{refits[3][0]}?workflowType="
    assert link in lines[1] and f"| {refits[3][1]:.4f} |" in lines[1]
    assert f"load_pruned({refits[5][0]!r}" in note
