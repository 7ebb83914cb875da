"""Where a study lives, and the cross-process locks that let many workers share it.

Storages (``study.storage``):

* ``sqlite:////abs/path.db`` — Optuna's :class:`~optuna.storages.RDBStorage` on SQLite,
  the single-user default. SQLite serialises writers on one file lock, so it is refused
  for ``study.workers > 1`` (see :func:`check_storage`).
* ``postgresql://user:pass@host:port/db`` (or ``mysql://``) — the same RDBStorage on a
  server: any number of workers on any number of machines.
* ``journal:///abs/path.log`` — Optuna's :class:`~optuna.storages.JournalStorage` with
  its file backend: several workers on *one* machine without a server. Optuna's
  journal has no heartbeat, so a dead worker's trial is detected here by process
  liveness instead (same host only; see :func:`fail_dead_trials`).

RDB storages get Optuna's heartbeat (``search.heartbeat_interval``/``grace_period``) with
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`: a trial whose worker stopped
beating is failed by whichever worker looks next and re-queued with the same parameters.

:class:`StudyLock` is a mutex shared by every worker of a study, held only for the few
milliseconds of a decision that must not race (admit a trial, create the MLflow parent
run, claim the refit). Optuna has no such primitive, so it is built on what the storage
already offers: a PostgreSQL advisory lock (or MySQL ``GET_LOCK``) on the study's own
database, or ``flock`` on a file beside a SQLite/journal file. All of them are released
by the operating system or the server when the holder dies, so a SIGKILLed worker never
leaves a lock behind.

Servers restart. Every call to an RDB storage goes through :class:`RetryingStorage`, and
every lock operation through the same :class:`~dtp_search.outage.Patience`: a refused or
dropped connection is retried for up to ``study.storage_patience`` seconds. A lock held
on a server dies with its connection when the server restarts; :meth:`StudyLock.still_held`
tells its holder, who takes it again and redoes the decision it guarded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Container, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
    _CachedStorage,
)
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from dtp_search.errors import ConfigError
from dtp_search.outage import Patience, is_transient

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
DEFAULT_PATIENCE = 300.0  # seconds (study.storage_patience's default)
STORAGE_ROLE = "the study storage"
SCHEMES = (*RDB_SCHEMES, "journal")
_log = logging.getLogger(__name__)


def scheme(url: str) -> str:
    """``postgresql+psycopg2://…`` → ``postgresql``."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, MLflow params, consoles)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    # Host and port as written (``parts.port`` raises on a port that is not a number).
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def local_path(url: str) -> Path | None:
    """The file behind a ``sqlite:`` or ``journal:`` URL (``None`` for servers and :memory:)."""
    kind = scheme(url)
    if kind == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        return None if not path or path == ":memory:" else Path(path)
    if kind == "journal":
        path = url.split("://", 1)[1] if "://" in url else url.split(":", 1)[1]
        # journal:///abs/x.log, like file:// URLs; journal:////abs/x.log, like sqlite:.
        return Path("/" + path.lstrip("/")) if path.startswith("/") else Path(path)
    return None


def check_storage(url: str, workers: int) -> None:
    """Refuse storages that cannot serve the requested workers, before anything is written."""
    kind = scheme(url)
    if kind not in SCHEMES:
        raise ConfigError(
            f"study.storage={mask_url(url)!r} is not a storage URL dtp_search can "
            f"open; allowed schemes: {list(SCHEMES)} (e.g. sqlite:////abs/optuna.db, "
            "postgresql://user:pass@host/db, journal:///abs/optuna.log)"
        )
    if kind in ("sqlite", "journal") and local_path(url) is None:
        raise ConfigError(
            f"study.storage={mask_url(url)!r} needs an absolute file path, "
            "e.g. sqlite:////abs/optuna.db"
        )
    if kind == "sqlite" and workers > 1:
        path = local_path(url)
        raise ConfigError(
            f"study.workers={workers} with study.storage={mask_url(url)!r}: SQLite takes one "
            "writer at a time and its workers would meet 'database is locked'. Allowed: "
            f"study.storage=journal://{path.with_suffix('.log')} (Optuna's JournalStorage, "
            "one machine, no server) or study.storage=postgresql://user:pass@host/db "
            "(many machines; see docs/distributed.md)"
        )


# Seconds a probe waits for a database server. Without a limit, a connection to a port
# nobody listens on behind a firewall that drops packets, or to a host that is down, waits
# for the operating system's TCP timeout (about two minutes on Linux) before failing.
PROBE_TIMEOUT = 5
# Drivers that take libpq's/MySQL's ``connect_timeout`` keyword (others get no limit).
_TIMEOUT_DRIVERS = ("psycopg", "psycopg2", "pymysql", "mysqldb")


def check_reachable(url: str, timeout: int = PROBE_TIMEOUT) -> None:
    """Refuse a database server (PostgreSQL, MySQL) that cannot be opened within ``timeout``
    seconds: one connection, opened and closed, before any data is loaded or written."""
    if scheme(url) not in ("postgresql", "mysql"):
        return
    import sqlalchemy

    where = f"study.storage={mask_url(url)!r}"
    try:
        driver = sqlalchemy.engine.make_url(url).get_dialect().driver
        connect_args = {"connect_timeout": timeout} if driver in _TIMEOUT_DRIVERS else {}
        engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args
        )
    except ImportError as exc:  # the URL names a driver that is not installed
        raise ConfigError(
            f"{where} needs a database driver that is not installed ({exc}); "
            "allowed: a URL whose driver is installed, e.g. postgresql+psycopg://"
            "user:pass@host/db (pip install 'psycopg[binary]')"
        ) from exc
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{where} is not a database URL SQLAlchemy can read ({exc}); "
            "allowed: e.g. postgresql://user:pass@host:5432/db"
        ) from exc
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise ConfigError(
            f"{where} cannot be opened ({_reason(exc, url)}); start the database "
            "server and check the URL's host, port, user, password and database, "
            "or use a file: study.storage=sqlite:////abs/optuna.db (one worker) "
            "or journal:///abs/optuna.log (workers on one machine)"
        ) from exc
    finally:
        engine.dispose()


def _reason(exc: Exception, url: str) -> str:
    """The first line of the driver's own message (SQLAlchemy adds the SQL and a link),
    without the URL's password should a driver repeat it."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    password = urlsplit(url).password
    if not password:
        return line
    return re.sub(rf"(?<!\w){re.escape(password)}(?!\w)", "***", line)


def make_storage(
    url: str,
    *,
    heartbeat_interval: int = 30,
    grace_period: int = 120,
    max_retry: int | None = 2,
    patience: float = DEFAULT_PATIENCE,
) -> BaseStorage:
    """Optuna's storage for ``url``; RDB storages beat a heartbeat, retry stale trials, and
    ride out a server that is away for up to ``patience`` seconds (:class:`RetryingStorage`)."""
    if scheme(url) == "journal":
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL)-based lock works on every file system, NFS included.
        return JournalStorage(JournalFileBackend(str(path), JournalFileOpenLock(str(path))))
    path = local_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Optuna's default pool keeps connections open between calls; several workers on one
    # PostgreSQL server are better served with a ping before reuse (a restarted server
    # or a proxy that drops idle connections does not fail a trial). A connection attempt
    # is bounded, so that a host that went away (packets dropped, not refused) costs one
    # retry's wait rather than the operating system's two-minute TCP timeout.
    engine_kwargs: dict[str, Any] = {}
    if scheme(url) != "sqlite":
        engine_kwargs["pool_pre_ping"] = True
        engine_kwargs["connect_args"] = _connect_timeout(url, 2 * PROBE_TIMEOUT)
    patient = Patience(STORAGE_ROLE, mask_url(url), patience)

    def open_rdb() -> RDBStorage:
        # Heartbeats and their retry callback are marked experimental in Optuna, and are
        # its only way to find and retry the trials of a dead worker: chosen on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url=url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry
                ),
            )

    # RDBStorage creates its tables on first use; workers that start together on an empty
    # database would race in CREATE TYPE/TABLE (a unique-violation error), so the first
    # creates them while the others wait on the lock.
    with StudyLock(url, "", "schema", patience=patience):
        rdb = patient.call(open_rdb)
    return RetryingStorage(_CachedStorage(rdb), patient)


def _connect_timeout(url: str, seconds: int) -> dict[str, Any]:
    """``connect_args`` that bound a connection attempt, for drivers that take libpq's or
    MySQL's ``connect_timeout`` (others get none)."""
    import sqlalchemy

    try:
        driver = sqlalchemy.engine.make_url(url).get_dialect().driver
    except Exception:  # a URL SQLAlchemy cannot read fails, with its message, on first use
        return {}
    return {"connect_timeout": seconds} if driver in _TIMEOUT_DRIVERS else {}


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether ``storage`` beats Optuna's heartbeat (RDB storages; not the journal)."""
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


# Marks the trial a create_new_trial call writes, so that a retry after a lost answer finds
# it rather than creating a second one (which nobody would run or ever fail).
_CREATION_ATTR = "dtp_search:creation"


def _retried(name: str) -> Callable[..., Any]:
    """A method that calls the wrapped storage's ``name`` through the patience."""

    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patience.call(getattr(self._storage, name), *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The wrapped storage's ``{name}``, retried while its server is away."
    return method


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's storage (``_CachedStorage`` over ``RDBStorage``, as ``optuna.create_study``
    would wrap it) with every call retried while the server cannot be reached
    (:class:`~dtp_search.outage.Patience`), so that Optuna's own trial loop, its heartbeat
    thread and dtp_search's calls all survive a database restart.

    A write that may have reached the server although its answer did not is made safe to
    repeat: a new trial carries a unique mark and a retry looks for it first; a state
    change is not repeated once the trial holds it. The other writes (attributes, params,
    intermediate values, heartbeats) are upserts and may simply be repeated.

    Wraps the cache rather than subclassing RDBStorage: only Optuna's public storage
    interface is overridden, and no retry sleeps while the cache holds its lock.
    """

    def __init__(self, storage: BaseStorage, patience: Patience) -> None:
        self._storage = storage
        self.patience = patience

    create_new_study = _retried("create_new_study")
    delete_study = _retried("delete_study")
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_all_studies = _retried("get_all_studies")
    set_trial_param = _retried("set_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_best_trial = _retried("get_best_trial")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    get_trial = _retried("get_trial")
    _get_stale_trial_ids = _retried("_get_stale_trial_ids")

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return self.patience.call(self._storage.get_all_trials, study_id, deepcopy, states)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """A new trial, created once however often the call must be repeated."""
        mark = uuid.uuid4().hex
        if template_trial is None:  # what RDBStorage creates without a template
            template = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        else:
            template = copy.deepcopy(template_trial)
        template.system_attrs[_CREATION_ATTR] = mark

        def created() -> tuple[bool, int | None]:
            for t in self._storage.get_all_trials(study_id, deepcopy=False):
                if t.system_attrs.get(_CREATION_ATTR) == mark:
                    return True, t._trial_id
            return False, None

        return self.patience.call(
            self._storage.create_new_trial, study_id, template, applied=created
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's state change; a repeat after a lost answer reports the change made
        (the trial already holds ``state`` and ``values``) rather than refusing to update
        a finished trial."""

        def made() -> tuple[bool, bool]:
            t = self._storage.get_trial(trial_id)
            if t.state != state:
                return False, False
            # A WAITING trial this call set RUNNING: taken for ours (another worker taking
            # the same trial in the same instant is far rarer than a lost answer, and a
            # RUNNING trial nobody runs would have no heartbeat to ever fail it).
            return values is None or list(t.values or []) == list(values), True

        return self.patience.call(
            self._storage.set_trial_state_values, trial_id, state, values, applied=made
        )

    def record_heartbeat(self, trial_id: int) -> None:
        """One beat, not retried: Optuna's heartbeat thread beats again after
        ``heartbeat_interval``, and a beat that waited for the server would hold up the
        end of the trial (the thread is joined). A beat lost to an outage is what the
        grace period is for."""
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            _log.debug("heartbeat of trial %d skipped: the storage does not answer", trial_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._storage.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._storage.get_heartbeat_stale_trial_callback()

    def remove_session(self) -> None:
        self._storage.remove_session()


# --------------------------------------------------------------------------- workers


def worker_id() -> str:
    """``host:pid`` — stored on every trial so a dead worker's trial can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(worker: str) -> bool | None:
    """True/False for a worker on this host, ``None`` when it ran elsewhere (unknown)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, max_retry: int | None) -> list[int]:
    """Storages without Optuna's heartbeat (the journal): fail RUNNING trials whose worker
    process on this host no longer exists and re-queue them as the heartbeat would.

    Returns the numbers of the trials it failed.
    """
    storage = study._storage  # the study's own storage object; Optuna exposes no getter
    failed = []
    with warnings.catch_warnings():  # experimental in Optuna; its retry is the one we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None or _alive_here(worker) is not False:
            continue
        # set_trial_state_values returns False when another worker changed it first.
        # (No reason attribute: the retry inherits every user attribute of the trial.)
        if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            _log.warning(
                "trial %d failed: its worker %s died; re-queued with the same parameters",
                t.number,
                worker,
            )
            retry(study, storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


# --------------------------------------------------------------------------- locks


# Where the file locks of a SQLite or journal store live, beside the store.
LOCK_DIR = ".locks"


class StudyLock:
    """A mutex named ``purpose`` shared by every worker of ``study_name`` in ``url``.

    Use as a context manager (blocking), or :meth:`acquire` with ``blocking=False`` to try.
    On a database server, taking the lock is retried for up to ``patience`` seconds while
    the server is away; a lock held there is lost when the server restarts (it belongs to
    the connection), which :meth:`still_held` tells.
    """

    def __init__(
        self, url: str, study_name: str, purpose: str, *, patience: float = DEFAULT_PATIENCE
    ) -> None:
        self.url, self.key = url, f"dtp_search:{study_name}:{purpose}"
        self._kind = scheme(url)
        self._conn = None
        self._fd: int | None = None
        self._patience = (
            Patience(STORAGE_ROLE, mask_url(url), patience)
            if self._kind in ("postgresql", "mysql")
            else None
        )

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fd is not None

    def _pg_key(self) -> int:
        # Advisory locks take one signed 64-bit key.
        return int.from_bytes(
            hashlib.blake2b(self.key.encode(), digest_size=8).digest(), "big", signed=True
        )

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self.held:
            return True
        if self._patience is not None:
            return self._patience.call(self._acquire_server, blocking, timeout)
        return self._acquire_file(blocking, timeout)

    def still_held(self) -> bool:
        """Whether this holder still has the lock. A server's lock lives as long as the
        connection that took it: a restart ends both, and another worker may have taken the
        lock since, so the decision it guarded must be taken again (after :meth:`acquire`).
        A file lock cannot be lost."""
        if self._conn is None:
            return self._fd is not None
        import sqlalchemy

        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
            self._conn.rollback()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._drop_connection()
            return False
        return True

    def _acquire_server(self, blocking: bool, timeout: float | None) -> bool:
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            self.url,
            poolclass=sqlalchemy.pool.NullPool,
            connect_args=_connect_timeout(self.url, 2 * PROBE_TIMEOUT),
        )
        try:
            conn = engine.connect()
        except BaseException:
            engine.dispose()
            raise
        if self._kind == "postgresql":
            sql = (
                "SELECT pg_advisory_lock(:k)"
                if blocking and timeout is None
                else "SELECT pg_try_advisory_lock(:k)"
            )
            args = {"k": self._pg_key()}
        else:
            sql, args = (
                "SELECT GET_LOCK(:k, :t)",
                {"k": self.key[:64], "t": -1 if blocking and timeout is None else (timeout or 0)},
            )
        waits = blocking and timeout is None  # the server blocks until it is ours
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                got = conn.execute(sqlalchemy.text(sql), args).scalar()
                conn.commit()
                # pg_advisory_lock returns void, which drivers read as None or "".
                if (waits and self._kind == "postgresql") or got:
                    self._conn = conn
                    return True
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    conn.close()
                    engine.dispose()
                    return False
                time.sleep(0.1)
        except BaseException:
            # (a retry opens a connection of its own)
            with contextlib.suppress(Exception):
                conn.close()
            engine.dispose()
            raise

    def _lock_file(self) -> Path:
        """``<store folder>/.locks/<store file>.<digest of study and purpose>.lock``: one file
        per lock, out of the way of the stores, reused by every later run.

        The files are never removed, on purpose: a flock lives on the open file, so
        unlinking a file that another process has opened (and may be blocked on) would let
        a third process create a new file of that name and lock it too, and both would
        hold "the" lock. A file that persists is the race-free pattern; the folder holds
        one empty file per study and purpose."""
        path = local_path(self.url)
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return path.parent / LOCK_DIR / f"{path.name}.{digest}.lock"

    def _acquire_file(self, blocking: bool, timeout: float | None) -> bool:
        path = self._lock_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(
                    fd, fcntl.LOCK_EX | (0 if blocking and timeout is None else fcntl.LOCK_NB)
                )
                self._fd = fd
                return True
            except BlockingIOError:
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(0.1)

    def release(self) -> None:
        if self._conn is not None:
            import sqlalchemy

            conn = self._conn
            try:
                if self._kind == "postgresql":
                    conn.execute(
                        sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._pg_key()}
                    )
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": self.key[:64]})
                conn.commit()
            except Exception as exc:
                # A connection the server dropped took the lock with it: released all the same.
                if not is_transient(exc):
                    raise
            finally:
                self._drop_connection()  # closing the session releases the lock in any case
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close
                conn.close()
            conn.engine.dispose()

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
