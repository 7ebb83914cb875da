"""Ctrl-C or SIGTERM mid-trial: the trial ends FAILED (its MLflow run KILLED), the process
exits non-zero, and the same command again completes the study from the trial's checkpoint."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import forkserver
import optuna
import pytest
import torch
from inprocess import run_here
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

ARGS = [
    "study.name=intr",
    "search.n_trials=2",
    "cv.folds=2",
    "train.epochs=8",
    "train.finetune_epochs=2",
    "front.points=2",
    "policy.update_every=5",
    "console.progress=false",
    "threads=1",
    "refit.enabled=false",
]


def _start(root: Path) -> forkserver.Process:
    return forkserver.popen(
        [f"paths.root={root}", *ARGS],
        cwd=root.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(folder: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob("trial-*.pt") if folder.exists() else []:
            try:
                state = torch.load(path, weights_only=True)["state"]
            except Exception:  # being replaced
                continue
            if state["fold"] > 0 or state["train"]["epoch"] >= 2:
                return
        time.sleep(0.2)
    raise AssertionError("no trial checkpointed in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_trial_fails_cleanly_and_the_rerun_resumes_it(tmp_path, sig):
    root = tmp_path / "runs"
    proc = _start(root)
    _wait_for_checkpoint(root / "checkpoints" / "intr")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted:" in stderr and "Traceback" not in stderr
    # The study's Pareto figure, drawn with no trial complete, has nothing to label.
    assert "No artists with labels" not in stderr, stderr[-3000:]

    storage = f"sqlite:///{root}/optuna.db"
    study = optuna.load_study(study_name="intr", storage=storage)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "interrupted"
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == failed[0].params
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"

    rerun = run_here(root, *ARGS)  # the same command again, in this process
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="intr", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states
    assert TrialState.WAITING not in states
    retry = next(
        t for t in study.trials if t.state == TrialState.COMPLETE and t.params == failed[0].params
    )
    assert retry.user_attrs["resumed_from"].startswith(f"checkpoint of trial {failed[0].number}")
