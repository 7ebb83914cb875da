"""Storage URLs, the study lock and dead-worker detection (no server needed; the PostgreSQL
side of the lock is tested in test_distributed.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import optuna
import pytest
from inprocess import run_here
from optuna.trial import TrialState

from dtp_search.search.config import ConfigError
from dtp_search.storage import (
    StudyLock,
    check_storage,
    fail_dead_trials,
    local_path,
    make_storage,
    mask_url,
    scheme,
)


def test_mask_url_hides_only_the_password():
    assert (
        mask_url("postgresql+psycopg://dtp:s3cret@db:5432/optuna")
        == "postgresql+psycopg://dtp:***@db:5432/optuna"
    )
    assert mask_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    assert mask_url("http://tracking:5000") == "http://tracking:5000"


def test_scheme_and_local_path():
    assert scheme("postgresql+psycopg://u@h/db") == "postgresql"
    assert local_path("sqlite:////abs/optuna.db").as_posix() == "/abs/optuna.db"
    assert local_path("journal:///abs/optuna.log").as_posix() == "/abs/optuna.log"
    assert local_path("journal:////abs/optuna.log").as_posix() == "/abs/optuna.log"
    assert local_path("postgresql://u@h/db") is None


def test_sqlite_with_several_workers_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError) as err:
        check_storage("sqlite:////runs/optuna.db", workers=3)
    msg = str(err.value)
    assert "study.workers=3" in msg and "journal:///runs/optuna.log" in msg
    assert "postgresql://" in msg
    check_storage("sqlite:////runs/optuna.db", workers=1)
    check_storage("journal:////runs/optuna.log", workers=3)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"allowed schemes: \['sqlite', 'postgresql'"):
        check_storage("redis://localhost/0", workers=1)


def test_file_lock_excludes_a_second_holder_until_released(tmp_path):
    url = f"journal://{tmp_path}/optuna.log"
    first, second = StudyLock(url, "s", "admit"), StudyLock(url, "s", "admit")
    other = StudyLock(url, "s", "refit")
    assert first.acquire()
    assert not second.acquire(blocking=False)
    assert not second.acquire(timeout=0.2)
    assert other.acquire(blocking=False)  # another purpose is another lock
    first.release()
    assert second.acquire(blocking=False)
    second.release()
    other.release()


def test_file_lock_is_released_when_its_process_dies(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    code = (
        "import os, sys; from dtp_search.storage import StudyLock; "
        f"StudyLock({url!r}, 's', 'admit').acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    lock = StudyLock(url, "s", "admit")
    assert lock.acquire(blocking=False)
    lock.release()


def test_trial_of_a_dead_worker_is_failed_and_requeued_with_its_parameters(tmp_path):
    storage = make_storage(f"journal://{tmp_path}/optuna.log")
    study = optuna.create_study(study_name="s", storage=storage)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    dead.set_user_attr("lineage", dead.number)
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", f"{socket.gethostname()}:{__import__('os').getpid()}")
    elsewhere = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    elsewhere.set_user_attr("worker", "another-host:1")

    assert fail_dead_trials(study, max_retry=2) == [dead.number]
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING
    assert trials[elsewhere.number].state == TrialState.RUNNING  # unknown: left to heartbeats
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == trials[dead.number].params
    assert retry.user_attrs["lineage"] == dead.number
    assert fail_dead_trials(study, max_retry=2) == []  # once only


def test_cli_refuses_sqlite_workers_before_any_work(tmp_path):
    # The command line's path, in this process, into a folder left as it is.
    proc = run_here(tmp_path, "study.workers=2", cwd=tmp_path, premade_store=False)
    assert proc.returncode == 2
    assert "study.workers=2" in proc.stderr and "journal://" in proc.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
