"""A mutex shared by every worker of a study (:class:`StudyLock`), held only for a
decision that must not race: a PostgreSQL advisory lock, MySQL ``GET_LOCK``, or ``flock``
on a file beside a SQLite/journal store, all released when the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from types import TracebackType

from dtp_search.storage.outage import Patience, is_transient
from dtp_search.storage.urls import (
    DEFAULT_PATIENCE,
    PROBE_TIMEOUT,
    STORAGE_ROLE,
    connect_timeout,
    local_path,
    mask_url,
    scheme,
)

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
            connect_args=connect_timeout(self.url, 2 * PROBE_TIMEOUT),
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
