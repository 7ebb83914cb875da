"""Faults inside a trial end that trial alone, with its reason on the Optuna trial and on
its MLflow run; the study goes on with the next trial. The studies take the command
line's path in this process (``inprocess.run_here``)."""

from __future__ import annotations

import json

import optuna
import pytest
from inprocess import run_here
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from dtp_search.tracking import STATE_TAG


def _run(root, args):
    proc = run_here(root, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_and_the_study_completes(tmp_path):
    root = tmp_path / "runs"
    # Half the learning rates are absurd: those trials' loss overflows to NaN.
    args = [
        "study.name=diverge",
        "search=random",
        "search.n_trials=3",
        "search.max_failures=10",
        "+search.space={train.lr: {type: categorical, choices: [0.05, 1.0e+12]}}",
        "cv.folds=2",
        "train.epochs=2",
        "train.finetune_epochs=0",
        "front.points=2",
        "console.progress=false",
        "refit.enabled=false",
    ]
    _run(root, args)
    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{root}/optuna.db")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 3 and failed, [t.state for t in study.trials]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for t in failed:
        assert t.params["train.lr"] == 1.0e12
        assert "DivergedError" in t.user_attrs["fail_reason"]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and "DivergedError" in run.data.tags["fail_reason"]
    assert all(t.params["train.lr"] == 0.05 for t in done)


COLLAPSE = [
    "search=random",
    "search.n_trials=4",
    "search.max_failures=10",
    "policy=constant",
    # theta=10 takes every layer of LeNet-300-100 under its min_keep floor.
    "~policy.space",
    "+policy.space={theta: {type: categorical, choices: [0.001, 10.0]}}",
    "policy.start_epoch=0",
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
]


@pytest.mark.slow
def test_a_collapsing_trial_is_pruned_with_its_reason_and_the_study_completes(tmp_path):
    root = tmp_path / "runs"
    _run(root, ["study.name=collapse", "policy.on_collapse=prune", *COLLAPSE])
    study = optuna.load_study(study_name="collapse", storage=f"sqlite:///{root}/optuna.db")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 4 and pruned and complete, [t.state for t in study.trials]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for t in pruned:
        assert t.params["policy.theta"] == 10.0
        reason = t.user_attrs["prune_reason"]
        assert reason.startswith("layer collapse in fold 0: the policy would leave layer "), reason
        assert "min_keep allows no fewer than" in reason
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["prune_reason"] == reason
        assert run.data.tags[STATE_TAG] == "PRUNED"
    assert all(
        t.params["policy.theta"] == 0.001 and "min_keep_restored" not in t.user_attrs
        for t in complete
    )


@pytest.mark.slow
def test_the_min_keep_floor_restores_by_default_and_says_so(tmp_path):
    root = tmp_path / "runs"
    _run(root, ["study.name=floor", *COLLAPSE])
    study = optuna.load_study(study_name="floor", storage=f"sqlite:///{root}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    floored = [t for t in study.trials if t.params["policy.theta"] == 10.0]
    assert floored
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for t in floored:
        restored = t.user_attrs["min_keep_restored"]
        assert set(restored) >= {"net.1", "net.3"} and all(n > 0 for n in restored.values())
        tag = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags
        assert json.loads(tag["dtp_search.min_keep_restored"]) == restored
        # The floor keeps 1 % of every layer: the trial's sparsity is the floor's.
        assert t.values[1] == pytest.approx(0.99, abs=0.005)
        # ... and it ends there: the trial says which layers its result is the floor's.
        assert t.user_attrs["floored_layers"] == ["net.1", "net.3", "net.5"]
        assert tag["dtp_search.floored_layers"] == "net.1,net.3,net.5"
    assert all("floored_layers" not in t.user_attrs for t in study.trials if t not in floored)


@pytest.mark.slow
def test_penalize_keeps_floored_trials_off_the_pareto_front(tmp_path):
    from dtp_search.tracking.results import pareto_rows

    root = tmp_path / "runs"
    _run(root, ["study.name=penalize", "policy.on_collapse=penalize", *COLLAPSE])
    study = optuna.load_study(study_name="penalize", storage=f"sqlite:///{root}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    floored = {t.number for t in study.trials if t.params["policy.theta"] == 10.0}
    assert floored and len(floored) < 4
    for t in study.trials:  # recorded with the floored result, infeasible for the samplers
        assert t.constraints == {"min_keep_floor": 3.0 if t.number in floored else 0.0}
    # At 99 % sparsity a floored trial would dominate on sparsity; it is left out.
    rows = pareto_rows(study)
    assert rows and not floored & {r["trial"] for r in rows}
