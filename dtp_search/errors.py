"""The errors bad input raises. Each message names the key, the value and what is
allowed; ``python -m dtp_search`` prints it as one ``error:`` line and exits 2.

And the machine's: a disk that fills up during the run (:class:`DiskFullError`), printed
as one ``error:`` line too (exit 1), and recorded as the trial's ``fail_reason``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


def reason(exc: BaseException) -> str:
    """Why a connection or download failed, in a few words: ``Connection refused``,
    ``timed out``, ``Tunnel connection failed: 403 Forbidden`` (a URLError's own reason)."""
    why = getattr(exc, "reason", None) or exc
    return getattr(why, "strerror", None) or str(why) or type(why).__name__


class ConfigError(ValueError):
    """Bad user input; the message names the key, the value and what is allowed."""


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured (message says what to do)."""


# Errnos of a write that found no room: the disk itself, or the user's quota on it.
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# SQLite's own words for SQLITE_FULL (sqlite3 gives no errno; MLflow and Optuna wrap it
# in SQLAlchemy's and their own exceptions, chained).
_SQLITE_FULL = "database or disk is full"


class DiskFullError(OSError):
    """A write that found its disk full: one line naming the file and what to do.

    Raised in place of what the write itself raised, which says it badly: ``torch.save``
    fails with ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``
    and keeps the ``OSError(ENOSPC)`` only in its chain; SQLite says ``database or disk
    is full`` without a path. An ``OSError`` (errno ENOSPC), so code that handles
    failed writes still does."""

    def __init__(self, path: str | os.PathLike | None, code: int = errno.ENOSPC) -> None:
        why = _NO_ROOM.get(code, _NO_ROOM[errno.ENOSPC])
        super().__init__(code, why, None if path is None else str(path))

    def __str__(self) -> str:
        what = (
            f"{self.filename} could not be written"
            if self.filename
            else "an SQLite store (database or disk is full) could not be written"
        )
        return (
            f"{self.strerror}: {what}; free space on that disk, or point the setting that "
            "names the folder (paths.root, paths.checkpoints, paths.cache_dir, "
            "paths.warm_start, tracking.artifact_location, study.storage, tracking.uri) at "
            "another disk, then run the same command to resume"
        )


def disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> DiskFullError | None:
    """``exc`` as a :class:`DiskFullError` when a full disk is what caused it, anywhere in
    its chain (``__cause__``, ``__context__``, SQLAlchemy's ``orig``); else ``None``.
    ``path``: the file being written, when the error itself does not name it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return e
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            # shutil's copies name the source first and the destination (the full one) second
            where = path or e.filename2 or e.filename
            return DiskFullError(where, e.errno)
        if _SQLITE_FULL in str(e).lower():
            return DiskFullError(path)
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around a write of ``path``: a full disk leaves as :class:`DiskFullError` naming
    ``path``; every other error as it was."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc, path)
        if full is None:
            raise
        raise full from exc


class StorageUnavailable(BaseException):
    """The study storage or the tracking store did not answer for ``study.storage_patience``
    seconds (:class:`dtp_search.storage.outage.Patience`). ``python -m dtp_search`` prints it as one
    ``error:`` line with its own exit status.

    A BaseException, like KeyboardInterrupt, on purpose: Optuna's trial loop catches every
    ``Exception`` of an objective and then writes the trial's FAIL state to the storage,
    the very server that is away. Passing through it, the trial stays RUNNING, its heartbeat
    stops, and once the server is back a worker fails and retries it (same parameters,
    resumed from its checkpoint) after ``search.grace_period``.
    """

    def __init__(self, role: str, url: str, seconds: float, why: str) -> None:
        self.role, self.url, self.seconds, self.why = role, url, seconds, why
        super().__init__(
            f"{role} {url} did not answer for {seconds:g} s ({why}); start it again and "
            "rerun the same command: the trial that was running is retried (same "
            "parameters, from its checkpoint) once search.grace_period has passed"
        )


class StudyIncomplete(RuntimeError):
    """The run stopped before the study held ``search.n_trials`` finished trials (its
    trials kept failing); ``python -m dtp_search`` exits with a status of its own."""


class RefitInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the refit (after the search): a rerun refits what is left."""
