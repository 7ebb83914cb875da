"""Many workers on one study, against real servers: PostgreSQL for Optuna, ``mlflow
server`` (on the same PostgreSQL) for tracking; and workers killed with SIGKILL mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import forkserver
import optuna
import pytest
from inprocess import run_here
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from servers import PASSWORD, mlflow_server, postgres_cluster

from dtp_search.storage import StudyLock

pytestmark = pytest.mark.slow

TINY = [
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=1",
    "front.points=4",
    "policy.update_every=5",
    "console.progress=false",
    "threads=1",
]
# Long enough per trial (2 folds x 10 epochs) that a kill lands mid-trial.
SLOW = [
    "cv.folds=2",
    "train.epochs=8",
    "train.finetune_epochs=2",
    "front.points=4",
    "policy.update_every=5",
    "console.progress=false",
    "threads=1",
    "refit.enabled=false",
    "search.heartbeat_interval=1",
    "search.grace_period=4",
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    (root / "artifacts").mkdir()
    with postgres_cluster() as pg:
        pg = pg.replace("postgresql://", "postgresql+psycopg://")
        with mlflow_server(f"{pg}/mlflow", root / "artifacts") as mlflow_url:
            yield f"{pg}/optuna", mlflow_url


def start_worker(root: Path, log: Path, *overrides: str) -> forkserver.Process:
    with open(log, "ab") as f:
        return forkserver.popen(
            [f"paths.root={root}", *overrides],
            cwd=root.parent,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def wait_all(procs: list[forkserver.Process], logs: list[Path], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for p, log in zip(procs, logs, strict=True):
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert rc == 0, log.read_text()[-4000:]


def runs_of(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    role = lambda r: r.data.tags.get("dtp_search.role")  # noqa: E731
    return (
        client,
        [r for r in runs if role(r) == "study"],
        [r for r in runs if role(r) == "trial"],
        [r for r in runs if role(r) == "refit"],
    )


def kill_mid_trial(storage: str, study_name: str, checkpoints: Path, timeout: float = 300) -> int:
    """SIGKILL the worker of a running trial once that trial has checkpointed >= 2 epochs;
    returns the killed trial's number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(checkpoints.glob("trial-*.pt")) if checkpoints.exists() else []:
            lineage = int(path.stem.split("-")[1])
            try:
                import torch

                state = torch.load(path, weights_only=True)["state"]
            except Exception:  # replaced while reading
                continue
            if state["fold"] == 0 and state["train"]["epoch"] < 2:
                continue
            study = optuna.load_study(study_name=study_name, storage=storage)
            trial = next((t for t in study.trials if t.number == lineage), None)
            if trial is None or trial.state != TrialState.RUNNING:
                continue
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            return lineage
        time.sleep(0.2)
    raise AssertionError("no trial checkpointed in time")


def test_postgres_study_lock_excludes_other_sessions_and_blocks_until_free(servers):
    storage, _ = servers
    first, second = StudyLock(storage, "s", "admit"), StudyLock(storage, "s", "admit")
    assert first.acquire()  # blocking, free: returns at once
    assert not second.acquire(blocking=False)
    assert not second.acquire(timeout=0.3)
    other = StudyLock(storage, "s", "refit")
    assert other.acquire(blocking=False)  # another purpose is another lock
    other.release()
    got = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire()))
    waiter.start()
    time.sleep(0.5)
    assert not got  # still waiting on the server
    first.release()
    waiter.join(timeout=10)
    assert got == [True] and second.held
    second.release()


def test_three_workers_share_one_postgres_study_and_one_mlflow_server(servers, tmp_path):
    storage, tracking = servers
    root = tmp_path / "runs"
    root.mkdir()
    args = [
        f"study.storage={storage}",
        f"tracking.uri={tracking}",
        "study.name=shared",
        "search.n_trials=9",
        "refit.top_k=1",
        *TINY,
    ]
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [start_worker(root, log, *args) for log in logs]
    wait_all(procs, logs)

    study = optuna.load_study(study_name="shared", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 9  # no overshoot
    assert sorted(t.number for t in study.trials) == list(range(9))
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) >= 2  # the trials really were shared
    client, parents, children, refits = runs_of(tracking, "shared")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(9))
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len(refits) == 1  # one worker refit the study, the others skipped
    # Artifacts went through the server (proxied), not to a worker's local folder.
    assert {"front.json", "front.png"} <= {
        a.path for a in client.list_artifacts(children[0].info.run_id)
    }
    assert not (root / "mlartifacts").exists()
    # The database password is masked everywhere it is shown.
    for run in [*parents, *children]:
        assert all(PASSWORD not in str(v) for v in run.data.params.values())
    assert "study.storage" not in children[0].data.params  # stores are no trial param ...
    config = Path(client.download_artifacts(children[0].info.run_id, "config.yaml", str(tmp_path)))
    assert "postgresql+psycopg://dtp:***@" in config.read_text()  # ... but in config.yaml, masked
    assert PASSWORD not in config.read_text()
    assert all(PASSWORD not in log.read_text() for log in logs)


def test_killed_worker_trial_is_retried_from_its_checkpoint_by_another_worker(servers, tmp_path):
    storage, tracking = servers
    root = tmp_path / "runs"
    root.mkdir()
    args = [
        f"study.storage={storage}",
        f"tracking.uri={tracking}",
        "study.name=killed",
        "search.n_trials=4",
        *SLOW,
    ]
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [start_worker(root, log, *args) for log in logs]
    killed = kill_mid_trial(storage, "killed", root / "checkpoints" / "killed")
    deadline = time.monotonic() + 600
    for p, log in zip(procs, logs, strict=True):
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert rc in (0, -signal.SIGKILL), log.read_text()[-4000:]
    assert sum(p.returncode == -signal.SIGKILL for p in procs) == 1
    _assert_retried(storage, tracking, "killed", killed, n_trials=4)


def test_killed_single_worker_on_sqlite_resumes_on_rerun(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    # A grace period far beyond the test's timeout: the rerun must see at once that the
    # killed trial's process is gone instead of waiting for its heartbeat to go stale.
    args = [
        "study.name=solo",
        "search.n_trials=2",
        *[a for a in SLOW if not a.startswith("search.grace_period")],
        "search.grace_period=3600",
    ]
    storage, tracking = f"sqlite:///{root}/optuna.db", f"sqlite:///{root}/mlflow.db"
    log = tmp_path / "solo.log"
    first = start_worker(root, log, *args)
    killed = kill_mid_trial(storage, "solo", root / "checkpoints" / "solo")
    assert first.wait(timeout=60) == -signal.SIGKILL
    # The same command again (the command line's path, in this process).
    second = run_here(root, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    _assert_retried(storage, tracking, "solo", killed, n_trials=2)


def _assert_retried(storage: str, tracking: str, name: str, killed: int, n_trials: int) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == n_trials
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed]
    assert not by_state[TrialState.RUNNING]
    dead = by_state[TrialState.FAIL][0]
    retry = next(
        t
        for t in by_state[TrialState.COMPLETE]
        if t.user_attrs.get("lineage") == killed and t.number != killed
    )
    assert retry.params == dead.params  # same parameters
    assert retry.user_attrs["resumed_from"].startswith(f"checkpoint of trial {killed} at fold ")
    assert "epoch 0" not in retry.user_attrs["resumed_from"]
    _, parents, children, _ = runs_of(tracking, name)
    assert len(parents) == 1
    status = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert sorted(status) == sorted(t.number for t in study.trials)  # every trial logged once
    assert status[killed].info.status == "FAILED"
    assert (
        status[retry.number].data.tags["dtp_search.resumed_from"]
        == retry.user_attrs["resumed_from"]
    )
    assert status[retry.number].data.tags["dtp_search.retry_of"] == str(killed)
    # The retry's run holds the whole curve, replayed epochs included.
    history = MlflowClient(tracking).get_metric_history(
        status[retry.number].info.run_id, "fold_0/val_accuracy"
    )
    assert [m.step for m in history] == list(range(1, 11))
