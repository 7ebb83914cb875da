"""Riding out a database or tracking server that stops answering for a while.

A multi-day study lives through server restarts, failovers and upgrades. Every call a
run makes to its study storage (:mod:`dtp_search.storage`) or its MLflow tracking store
(:mod:`dtp_search.tracking`) goes through a :class:`Patience`: a call that fails because
the server cannot be reached (:func:`is_transient`) is retried with exponential backoff
(1 s, 2 s, ... capped at 30 s) for up to ``study.storage_patience`` seconds; a real error
(a constraint, a bad statement, a wrong password) is raised at once. When the server
stays away longer, the call raises :class:`~dtp_search.errors.StorageUnavailable`: one
line for the user, and the running trial is left RUNNING for Optuna's heartbeat to retry.

Neither SQLAlchemy (``pool_pre_ping`` only replaces a stale pooled connection), Optuna
(its RDBStorage retries deadlocks in trial creation only) nor MLflow's SQL store retry an
outage, and the project has no retry library; the loop here is short, and what it needs
beyond a generic one is the shared outage clock of one server (see :class:`Patience`).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dtp_search.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY, MAX_DELAY = 1.0, 30.0  # seconds between attempts: doubled each time, capped

# PostgreSQL SQLSTATEs of a server that is going away or not there yet: class 08
# (connection exception), admin/crash shutdown, "the database system is starting up", too
# many connections (every worker reconnecting at once after a restart).
_PG_TRANSIENT = {"57P01", "57P02", "57P03", "53300"}
# MySQL's client and server error numbers for the same: too many connections, server
# shutdown, can't connect (socket, TCP), server has gone away, lost connection.
_MYSQL_TRANSIENT = {1040, 1053, 2002, 2003, 2006, 2013, 2055}
# A driver's connection failure carries no SQLSTATE (psycopg: "connection failed: ...
# Connection refused"), nor does every disconnect; these phrases mark the transient ones
# (a wrong password or database name reads otherwise, and is not retried).
_TRANSIENT_TEXT = (
    "connection refused",
    "connection reset",
    "connection timed out",
    "timeout expired",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection is closed",
    "connection is lost",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "eof detected",
    "no route to host",
    "network is unreachable",
    "temporary failure in name resolution",
    "server has gone away",
    "lost connection",
    "can't connect to",
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (Optuna wraps a
    SQLAlchemy error in StorageInternalError, MLflow wraps both its SQL and HTTP errors)."""
    seen: list[BaseException] = []
    while exc is not None and len(seen) < 12 and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _transient_one(exc: BaseException) -> bool | None:
    """True/False when ``exc`` itself decides; ``None`` to look further down the chain."""
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True  # SQLAlchemy's dialect recognised a dropped connection
    if isinstance(exc, sqlalchemy.exc.DisconnectionError):
        return True
    driver = type(exc).__module__.split(".")[0]
    # (a driver's own: MLflow's exceptions carry a "sqlstate" of their own, XXM00)
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)  # psycopg 3 / 2
    if driver in ("psycopg", "psycopg2") and isinstance(code, str) and code:
        return code.startswith("08") or code in _PG_TRANSIENT
    if driver in ("pymysql", "MySQLdb") and exc.args:
        return exc.args[0] in _MYSQL_TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, broken pipe
        return True
    if _is_http_outage(exc):
        return True
    return None


def _is_http_outage(exc: BaseException) -> bool:
    """A tracking server that cannot be reached, or whose gateway answers 5xx until the
    retries MLflow's client makes of its own are spent (requests' RetryError)."""
    try:
        import requests
        import urllib3.exceptions
    except ImportError:  # pragma: no cover - MLflow depends on both
        return False
    return isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.RetryError,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.ProtocolError,
        ),
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the server could not be reached (refused, reset, restarting,
    "terminating connection due to administrator command", a dropped connection) rather
    than that the request was wrong: only those are worth retrying. An error with a
    SQLSTATE of its own (a unique violation, a syntax error) is never transient."""
    for link in _chain(exc):
        verdict = _transient_one(link)
        if verdict is not None:
            return verdict
    text = " ".join(str(link) for link in _chain(exc)).lower()
    return any(phrase in text for phrase in _TRANSIENT_TEXT)


def why(exc: BaseException) -> str:
    """The reason a transient error gives, in a few words (``connection refused``,
    ``terminating connection due to administrator command``), for the user's line."""
    text = " ".join(str(link) for link in _chain(exc)).lower()
    for phrase in _TRANSIENT_TEXT:
        if phrase in text:
            # ("terminating connection due to administrator command": the server's own words)
            return re.search(re.escape(phrase) + r"[\w ]*", text).group(0).strip()
    last = _chain(exc)[-1]
    first_line = (str(last).strip().splitlines() or [type(last).__name__])[0]
    return first_line[:120]


class _Outage:
    """What every caller of one server shares: since when it has not answered, and
    whether a caller already gave up on it (later calls then try once, without waiting
    another ``patience``: a run that is ending must not wait twice)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.gave_up = False
        self.recovered: float | None = None  # when the server last answered again


_OUTAGES: dict[str, _Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def _server_key(url: str) -> str:
    """One key per server (host and port), so that an Optuna storage and an MLflow store
    on the same PostgreSQL share one outage clock."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return url
    return host or url


class Patience:
    """Retry one server's transient errors for up to ``seconds``.

    ``role`` and ``url`` name the server in messages (``the study storage
    postgresql://dtp:***@db:5432/optuna``); the password is masked by the caller. The
    outage clock is per server and shared by threads (the trial's and the heartbeat's) and
    by every Patience on that server: ``seconds`` is counted from the first failed call,
    not per call, so a run gives up ``seconds`` after the server went away.
    """

    def __init__(self, role: str, url: str, seconds: float) -> None:
        self.role, self.url, self.seconds = role, url, float(seconds)
        key = _server_key(url)
        with _OUTAGES_LOCK:
            self._outage = _OUTAGES.setdefault(key, _Outage())

    @property
    def gave_up(self) -> bool:
        """Whether a call gave up on this server and none has succeeded since."""
        return self._outage.gave_up

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        applied: Callable[[], tuple[bool, Any]] | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)``, retried while it fails transiently.

        ``applied``: for a write whose retry would not be idempotent, called before each
        retry; ``(True, value)`` when the failed attempt had taken effect after all (its
        commit reached the server, the answer did not), and ``value`` is returned.
        """
        delay = FIRST_DELAY
        retrying = False
        while True:
            if retrying and applied is not None:
                try:
                    done, value = applied()
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    done = False
                else:
                    if done:
                        self._answered()
                        return value
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self._wait(exc, delay)
                retrying = True
                continue
            self._answered()
            return result

    def _wait(self, exc: BaseException, delay: float) -> float:
        """Sleep before the next attempt, or raise StorageUnavailable when the server has
        been away for ``seconds``; returns the next delay."""
        outage = self._outage
        now = time.monotonic()
        with outage.lock:
            first = outage.since is None
            if first:
                outage.since = now
            since, gave_up = outage.since, outage.gave_up
        if gave_up or now - since >= self.seconds:
            with outage.lock:
                outage.gave_up = True
            raise StorageUnavailable(self.role, self.url, self.seconds, why(exc)) from exc
        if first:
            log.warning(
                "%s %s does not answer (%s); retrying for up to %.0f s (study.storage_patience)",
                self.role,
                self.url,
                why(exc),
                self.seconds,
            )
        # Jitter: workers that lost the server together do not all come back at once.
        pause = min(delay * random.uniform(0.5, 1.0), since + self.seconds - now)
        time.sleep(max(0.0, pause))
        return min(MAX_DELAY, delay * 2)

    def _answered(self) -> None:
        outage = self._outage
        if outage.since is None and not outage.gave_up:
            return
        with outage.lock:
            since, outage.since, outage.gave_up = outage.since, None, False
            outage.recovered = time.monotonic()
        if since is not None:
            log.warning(
                "%s %s answers again after %.0f s", self.role, self.url, time.monotonic() - since
            )


def seconds_since_recovery(url: str) -> float | None:
    """Seconds since the server of ``url`` answered again after an outage this process
    saw; ``None`` when it saw none.

    After an outage no worker's heartbeat has beaten for its whole length: a stale-trial
    check made before the live workers have beaten again would fail their trials (and
    queue retries of trials that are still running)."""
    with _OUTAGES_LOCK:
        outage = _OUTAGES.get(_server_key(url))
    if outage is None or outage.recovered is None:
        return None
    return time.monotonic() - outage.recovered
