"""A storage or tracking server that goes away under a run: transient errors told from real
ones, retried with backoff for ``study.storage_patience`` seconds, writes not doubled by a
retry; and, against a real PostgreSQL server stopped mid-study, a run that carries on
(a short outage) or ends with one line, leaving its trial to the heartbeat (a long one)."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import forkserver
import optuna
import psycopg
import pytest
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from servers import PASSWORD, free_port, postgres_server

from dtp_search.errors import StorageUnavailable
from dtp_search.storage import RetryingStorage, StudyLock, make_storage, outage
from dtp_search.storage.outage import Patience, is_transient


def _sa(exc: Exception) -> sqlalchemy.exc.DBAPIError:
    """``exc`` as SQLAlchemy raises a driver's error (the driver's in ``orig``)."""
    return sqlalchemy.exc.DBAPIError.instance("SELECT 1", {}, exc, psycopg.Error)


def _raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


REFUSED = 'connection failed: connection to server at "db", port 5432 failed: Connection refused'


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_sa(psycopg.OperationalError(REFUSED)), True),
        (_sa(psycopg.errors.AdminShutdown("terminating connection due to administrator")), True),
        (_sa(psycopg.errors.CannotConnectNow("the database system is starting up")), True),
        # Optuna wraps what SQLAlchemy raised in its own StorageInternalError
        (
            _raised_from(
                optuna.exceptions.StorageInternalError("during the commit"),
                _sa(psycopg.OperationalError(REFUSED)),
            ),
            True,
        ),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (requests.exceptions.ConnectionError("Max retries exceeded"), True),
        # real errors: never retried
        (_sa(psycopg.errors.UniqueViolation("duplicate key value")), False),
        (_sa(psycopg.errors.SyntaxError("syntax error at or near")), False),
        (
            _sa(
                psycopg.OperationalError(
                    'connection failed: FATAL:  password authentication failed for user "dtp"'
                )
            ),
            False,
        ),
        (ValueError("bad value"), False),
        # MLflow's SQL store raises its own exception (with a "sqlstate" of its own) from
        # SQLAlchemy's
        (
            _raised_from(
                MlflowException("connection failed"),
                _sa(psycopg.OperationalError(REFUSED)),
            ),
            True,
        ),
    ],
)
def test_only_connection_level_errors_are_transient(exc, transient):
    assert is_transient(exc) is transient


@pytest.fixture
def no_wait(monkeypatch):
    """Backoff in hundredths of a second (the policy is the same)."""
    monkeypatch.setattr(outage, "FIRST_DELAY", 0.01)
    monkeypatch.setattr(outage, "MAX_DELAY", 0.02)


def _server() -> str:
    """A server URL of its own (outage clocks are shared per server)."""
    return f"postgresql://dtp:{PASSWORD}@db-{uuid.uuid4().hex[:8]}:5432/optuna"


def _flaky(failures: int, error: Exception):
    calls = []

    def fn():
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return "answer"

    return fn, calls


def test_patience_retries_a_transient_error_with_growing_waits(no_wait):
    fn, calls = _flaky(3, ConnectionRefusedError(111, "Connection refused"))
    assert Patience("the study storage", _server(), 30).call(fn) == "answer"
    assert len(calls) == 4
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert waits[0] >= 0.005 and waits[-1] >= 0.01  # 0.01 s (x0.5..1 jitter), then doubled


def test_patience_raises_a_real_error_at_once(no_wait):
    fn, calls = _flaky(5, ValueError("bad value"))
    with pytest.raises(ValueError):
        Patience("the study storage", _server(), 30).call(fn)
    assert len(calls) == 1


def test_patience_gives_up_with_one_line_naming_the_server_without_its_password(no_wait):
    url = _server()
    masked = url.replace(PASSWORD, "***")
    fn, _ = _flaky(10**6, _sa(psycopg.OperationalError(REFUSED)))
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        Patience("the study storage", masked, 0.3).call(fn)
    assert 0.3 <= time.monotonic() - start < 5
    text = str(info.value)
    assert "\n" not in text and PASSWORD not in text
    assert text.startswith(
        f"the study storage {masked} did not answer for 0.3 s (connection refused)"
    )
    # A later call on the same server does not wait again: the run is ending.
    fn2, calls2 = _flaky(10**6, ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(StorageUnavailable):
        Patience("the tracking store", masked, 60).call(fn2)
    assert len(calls2) == 1
    # ... until the server answers again.
    fn3, _ = _flaky(0, ValueError())
    assert Patience("the study storage", masked, 60).call(fn3) == "answer"
    assert not Patience("the study storage", masked, 60).gave_up


def test_a_tracking_server_that_does_not_answer_is_retried_then_named(monkeypatch, no_wait):
    from dtp_search.tracking import StudyTracker

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)  # (restored after the test)
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        StudyTracker(url, "e", "s", patience=1)
    assert 1 <= time.monotonic() - start < 30
    assert str(info.value).startswith(
        f"the tracking store {url} did not answer for 1 s (connection refused)"
    )
    # MLflow's own retries of a request are kept within the patience (a blip's worth)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


class _LostAnswers:
    """A storage whose next write of each named method reaches the database, and whose
    answer is then lost (the connection dropped after the commit)."""

    def __init__(self, storage, *methods: str) -> None:
        self._storage, self._lose = storage, set(methods)

    def __getattr__(self, name: str):
        real = getattr(self._storage, name)
        if name not in self._lose:
            return real

        def write(*args, **kwargs):
            real(*args, **kwargs)
            self._lose.discard(name)
            raise _sa(psycopg.OperationalError("server closed the connection unexpectedly"))

        return write


def test_a_write_whose_answer_was_lost_is_not_made_twice(tmp_path, no_wait):
    storage = make_storage(f"sqlite:///{tmp_path}/optuna.db", patience=30)
    assert isinstance(storage, RetryingStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    storage._storage = _LostAnswers(storage._storage, "create_new_trial", "set_trial_state_values")
    trial = study.ask()
    study.tell(trial, 0.5)  # the repeated state change is not refused as a finished trial's
    trials = study.get_trials()
    assert [(t.number, t.state, t.value) for t in trials] == [(0, TrialState.COMPLETE, 0.5)]


def test_a_file_lock_is_never_lost(tmp_path):
    lock = StudyLock(f"sqlite:///{tmp_path}/optuna.db", "s", "admit")
    assert not lock.still_held()
    with lock:
        assert lock.still_held()


# ------------------------------------------------------------- a real server restarts

TINY = [
    "search.n_trials=3",
    "cv.folds=2",
    "train.epochs=1",
    "train.finetune_epochs=0",
    "front.points=2",
    "early_stop=none",
    "refit.enabled=false",
    "console.progress=false",
    "threads=1",
    # the heartbeat thread beats through the outage, and a beat lost to it is no stale trial
    "search.heartbeat_interval=1",
    "search.grace_period=60",
]


@pytest.fixture
def pg():
    with postgres_server() as server:
        yield server


def _start_run(root: Path, storage: str, *overrides: str) -> forkserver.Process:
    return forkserver.popen(
        [
            f"paths.root={root}",
            f"study.storage={storage}",
            "study.name=outage",
            *TINY,
            *overrides,
        ],
        cwd=root.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    # RDBStorage creates Optuna's tables where they are missing: polled while the run
    # starts, it would race the run's own creation (a unique violation that ends the
    # run), so it waits on the lock the run's workers take for that (make_storage).
    with StudyLock(url, "", "schema"):
        storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name="outage", storage=storage).get_trials()
    except KeyError:  # not created yet
        return []
    finally:
        storage.engine.dispose()  # (polled: no idle connections piling up on the server)


def _when_trials_complete(storage: str, n: int, proc: forkserver.Process) -> None:
    deadline = time.monotonic() + 180
    while sum(t.state == TrialState.COMPLETE for t in _trials(storage)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial completed in time"
        time.sleep(0.5)


def _trial_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("dtp_search.role") == "trial"]


@pytest.mark.slow
def test_mlflow_on_postgres_and_a_held_lock_survive_a_restart(pg, tmp_path, caplog):
    from dtp_search.tracking import StudyTracker

    url = pg.url.replace("postgresql://", "postgresql+psycopg://")
    tracker = StudyTracker(f"{url}/mlflow", "e", "s", tmp_path / "artifacts", patience=60)
    lock = StudyLock(f"{url}/optuna", "s", "admit", patience=60)
    assert lock.acquire() and lock.still_held()
    pg.stop()
    restart = threading.Timer(3, pg.start)
    restart.start()
    try:
        tracker.client.set_tag(tracker.parent_run_id, "after", "restart")  # waits for it
    finally:
        restart.join()
    assert tracker.client.get_run(tracker.parent_run_id).data.tags["after"] == "restart"
    # The advisory lock died with its session; its holder learns it and takes it again.
    assert not lock.still_held()
    assert lock.acquire() and lock.still_held()
    other = StudyLock(f"{url}/optuna", "s", "admit")
    assert not other.acquire(blocking=False)
    lock.release()
    assert other.acquire(blocking=False)
    other.release()
    # MLflow's own traceback of each failed attempt is not shown while the outage lasts.
    assert not [r for r in caplog.records if r.name == "mlflow.store.db.utils" and r.exc_info]


@pytest.mark.slow
def test_a_study_carries_on_through_a_postgres_restart(pg, tmp_path):
    root = tmp_path / "runs"
    storage = f"{pg.url.replace('postgresql://', 'postgresql+psycopg://')}/optuna"
    proc = _start_run(root, storage)
    _when_trials_complete(storage, 1, proc)
    pg.stop()  # every session ended: "terminating connection due to administrator command"
    time.sleep(10)
    pg.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in out + err, err[-4000:]
    assert PASSWORD not in out + err
    # the run met the outage, and said so in two lines (Hydra's log goes to stdout)
    assert "does not answer" in out and "answers again" in out, out[-4000:]
    states = [t.state for t in _trials(storage)]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states
    assert not [r for r in _trial_runs(root) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_longer_outage_ends_the_run_with_one_line_and_leaves_its_trial_to_the_heartbeat(
    pg, tmp_path
):
    root = tmp_path / "runs"
    storage = f"{pg.url.replace('postgresql://', 'postgresql+psycopg://')}/optuna"
    proc = _start_run(root, storage, "study.storage_patience=5", "search.n_trials=50")
    _when_trials_complete(storage, 1, proc)
    pg.stop()
    out, err = proc.communicate(timeout=120)
    pg.start()
    assert proc.returncode not in (0, 1, 2), err[-4000:]
    assert "Traceback" not in out + err, err[-4000:]
    assert PASSWORD not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-4000:]
    assert "the study storage postgresql+psycopg://dtp:***@127.0.0.1:" in errors[0]
    assert "did not answer for 5 s" in errors[0]
    # No trial was failed by a write to a server that was away: the one running is left
    # to the heartbeat's retry; its MLflow run is closed.
    states = [t.state for t in _trials(storage)]
    assert TrialState.FAIL not in states
    assert not [r for r in _trial_runs(root) if r.info.status == "RUNNING"]


def test_no_stale_trial_check_right_after_an_outage(monkeypatch):
    """Every heartbeat is old when a server comes back: the stale-trial check waits until
    live workers have beaten again (two heartbeat intervals), or it would fail and
    re-queue trials that are still running."""
    from types import SimpleNamespace

    from dtp_search.search import study as study_module
    from dtp_search.storage.outage import Patience, seconds_since_recovery

    url = "postgresql://u:pw@db-recovery-test:5432/optuna"
    assert seconds_since_recovery(url) is None
    attempts = iter([ConnectionRefusedError("refused"), None])

    def flaky():
        exc = next(attempts)
        if exc is not None:
            raise exc
        return "ok"

    monkeypatch.setattr("dtp_search.storage.outage.time.sleep", lambda s: None)
    assert Patience("the study storage", url, 60).call(flaky) == "ok"
    assert 0 <= seconds_since_recovery(url) < 5

    checks = []
    monkeypatch.setattr(study_module.optuna.storages, "fail_stale_trials", checks.append)
    monkeypatch.setattr(study_module.storages, "has_heartbeat", lambda storage: True)
    s = SimpleNamespace(
        study=SimpleNamespace(storage=url),
        search=SimpleNamespace(heartbeat_interval=30, max_retry=2),
    )
    fake = SimpleNamespace(_storage=None)
    study_module._fail_dead(fake, s)
    assert checks == []  # just recovered: not yet
    s.search.heartbeat_interval = 0
    study_module._fail_dead(fake, s)
    assert checks == [fake]
