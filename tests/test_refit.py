"""The final refit, its exports, and the study report.

The study runs take the command line's path in this process (``inprocess.run_here``); the
export is reloaded in a fresh interpreter."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from inprocess import isolated, run_here
from omegaconf import OmegaConf
from test_cli import TINY, _runs

from dtp_search.models import build_model
from dtp_search.models.export import load_pruned, save_pruned
from dtp_search.pruning import AGPThreshold, DynamicPruner


def test_sparse_export_round_trips_and_is_smaller():
    torch.manual_seed(0)
    mcfg = {"arch": "mlp", "hidden": [64, 32]}
    model = build_model(OmegaConf.create(mcfg), (1, 8, 8), 10)
    DynamicPruner(model, AGPThreshold(0.9, end_epoch=0)).update(1.0)
    x = torch.randn(5, 1, 8, 8)
    path = save_pruned(
        model,
        {"model": mcfg, "input_shape": [1, 8, 8], "num_classes": 10},
        tempfile.mkdtemp() + "/m.pt",
    )
    blob = torch.load(path, weights_only=True)  # plain containers only
    assert set(blob["sparse"]) == {"net.1.weight", "net.3.weight", "net.5.weight"}
    loaded = load_pruned(path)
    assert torch.equal(loaded(x), model.eval()(x))
    dense_bytes = sum(p.numel() * 4 for p in loaded.parameters())
    assert path.stat().st_size < 0.3 * dense_bytes


@pytest.mark.slow
def test_refit_runs_once_per_chosen_trial_and_its_export_reproduces_test_accuracy(tmp_path):
    root = tmp_path / "runs"
    first = run_here(root, "study.name=r", "search.n_trials=3", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "accuracy" in first.stdout and "refit of trial" in first.stdout
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{root}/optuna.db")
    refits = study.user_attrs["refit"]
    client, (parent,), _ = _runs(root, "r")
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`dtp_search.role` = 'refit'"
    )
    chosen = sorted(int(n) for n in refits)
    assert sorted(int(r.data.tags["dtp_search.refit_of"]) for r in runs) == chosen  # one each
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "optuna.trial_state" not in run.data.tags  # its role is its own tag
        m = run.data.metrics
        trial = study.trials[int(run.data.tags["dtp_search.refit_of"])]
        for key in ("cv_accuracy", "cv_sparsity", "cv_accuracy_std", "cv_sparsity_std"):
            assert m[key] == pytest.approx(trial.user_attrs[key])  # same names as the trial
        assert client.get_metric_history(run.info.run_id, "front/test_accuracy")
        assert run.data.tags["dtp_search.model_uri"].startswith("models:/")
        assert 0 < m["test_accuracy"] <= 1 and m["nonzero_params"] < m["params"]
        assert m["flops_effective"] < m["flops_dense"]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "model",
            "front.json",
            "front.png",
            "layer_sparsity.png",
        }

    # The export reloads in a fresh process with weights_only=True and reproduces the
    # logged test accuracy.
    run = runs[0]
    code = (
        "import numpy as np, sys\n"
        "from omegaconf import OmegaConf\n"
        "from dtp_search import load_pruned\n"
        "from dtp_search.data import TensorBatches, load_dataset\n"
        "from dtp_search.training import evaluate\n"
        f"m = load_pruned({run.info.run_id!r}, tracking_uri='sqlite:///{root}/mlflow.db')\n"
        "ds = load_dataset(OmegaConf.create({'kind': 'digits', 'name': 'digits'}))\n"
        "t = TensorBatches(ds.test, np.arange(len(ds.test.labels)), batch_size=4096,\n"
        "                  mean=m.dtp_config['mean'], std=m.dtp_config['std'])\n"
        "print(evaluate(m, t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-9)

    # A second refit adds nothing.
    again = run_here(root, "study.name=r", "mode=refit", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "refit of trial" not in again.stdout
    assert len(
        client.search_runs(
            [parent.info.experiment_id], filter_string="tags.`dtp_search.role` = 'refit'"
        )
    ) == len(runs)

    # The report exists and names every Pareto trial.
    report = Path(
        client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))
    ).read_text()
    for n in chosen:
        assert f"<tr><td>{n}</td>" in report
    for run in runs:  # each refit's run id, and how to load one
        assert run.info.run_id in report
    assert "load_pruned(" in report
    assert report.count("<img") >= 2 and "test accuracy" in report

    # Each refit also logged an MLflow model, linked to its run.
    import mlflow

    with isolated():  # the global tracking URI (and MLFLOW_TRACKING_URI) set back after
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        models = mlflow.search_logged_models(
            experiment_ids=[parent.info.experiment_id], output_format="list"
        )
    assert {m.source_run_id for m in models} == {r.info.run_id for r in runs}
    assert {m.name for m in models} == {
        f"r-refit-{r.data.tags['dtp_search.refit_of']}" for r in runs
    }

    # refit.register=true: the most accurate refit's model becomes version 1 of "r", once.
    for _ in range(2):
        reg = run_here(root, "study.name=r", "mode=refit", "refit.register=true", *TINY)
        assert reg.returncode == 0, reg.stderr[-3000:]
    best = max(runs, key=lambda r: r.data.metrics["test_accuracy"])
    (version,) = client.search_model_versions("name = 'r'")
    assert version.run_id == best.info.run_id and int(version.version) == 1

    # Pareto fronts of studies overlaid in one figure.
    cmp = run_here(root, "mode=compare", "study.names=[r]", *TINY)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert (root / "compare-r.png").stat().st_size > 0


@pytest.mark.slow
def test_refit_of_a_missing_study_is_a_clear_error(tmp_path):
    root = tmp_path / "runs"
    res = run_here(root, "study.name=nothing-here", "mode=refit", *TINY)
    assert res.returncode == 2 and "mode=refit" in res.stderr and "does not exist" in res.stderr


def test_structured_export_is_compact():
    torch.manual_seed(0)
    mcfg = {"arch": "mlp", "hidden": [64, 32]}
    model = build_model(OmegaConf.create(mcfg), (1, 8, 8), 10)
    x = torch.randn(3, 1, 8, 8)
    DynamicPruner(
        model,
        AGPThreshold(0.5, end_epoch=0, scope="layer"),
        granularity="neuron",
        example_input=x[:1],
    ).update(1.0)
    path = save_pruned(
        model,
        {"model": mcfg, "input_shape": [1, 8, 8], "num_classes": 10},
        tempfile.mkdtemp() + "/c.pt",
        compact_input=x[:1],
    )
    loaded = load_pruned(path)
    assert loaded.net[1].out_features == 32 and loaded.net[3].in_features == 32
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    assert np.isclose(
        sum(p.numel() for p in loaded.parameters()), 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    )
