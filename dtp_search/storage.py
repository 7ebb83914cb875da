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
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from dtp_search.errors import ConfigError

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
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
    url: str, *, heartbeat_interval: int = 30, grace_period: int = 120, max_retry: int | None = 2
) -> BaseStorage:
    """Optuna's storage for ``url``; RDB storages beat a heartbeat and retry stale trials."""
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
    # or a proxy that drops idle connections does not fail a trial).
    engine_kwargs = {} if scheme(url) == "sqlite" else {"pool_pre_ping": True}
    # RDBStorage creates its tables on first use; workers that start together on an empty
    # database would race in CREATE TYPE/TABLE (a unique-violation error), so the first
    # creates them while the others wait on the lock.
    with StudyLock(url, "", "schema"):
        return RDBStorage(
            url=url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        )


def has_heartbeat(storage: BaseStorage) -> bool:
    # A study wraps its RDBStorage in Optuna's private _CachedStorage.
    backend = getattr(storage, "_backend", storage)
    return isinstance(backend, RDBStorage) and backend.heartbeat_interval is not None


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


class StudyLock:
    """A mutex named ``purpose`` shared by every worker of ``study_name`` in ``url``.

    Use as a context manager (blocking), or :meth:`acquire` with ``blocking=False`` to try.
    """

    def __init__(self, url: str, study_name: str, purpose: str) -> None:
        self.url, self.key = url, f"dtp_search:{study_name}:{purpose}"
        self._kind = scheme(url)
        self._conn = None
        self._fd: int | None = None

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
        if self._kind in ("postgresql", "mysql"):
            return self._acquire_server(blocking, timeout)
        return self._acquire_file(blocking, timeout)

    def _acquire_server(self, blocking: bool, timeout: float | None) -> bool:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        conn = engine.connect()
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

    def _lock_file(self) -> Path:
        path = local_path(self.url)
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return path.with_name(f"{path.name}.{digest}.lock")

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

            conn, self._conn = self._conn, None
            try:
                if self._kind == "postgresql":
                    conn.execute(
                        sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._pg_key()}
                    )
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": self.key[:64]})
                conn.commit()
            finally:
                conn.close()  # closing the session releases the lock in any case
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
