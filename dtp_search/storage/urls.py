"""Storage URLs (``study.storage``): their scheme, file and masked form, the check that a
storage can serve the requested workers, and the probe that its server answers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dtp_search.errors import ConfigError

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
DEFAULT_PATIENCE = 300.0  # seconds (study.storage_patience's default)
STORAGE_ROLE = "the study storage"
SCHEMES = (*RDB_SCHEMES, "journal")


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


def connect_timeout(url: str, seconds: int) -> dict[str, Any]:
    """``connect_args`` that bound a connection attempt, for drivers that take libpq's or
    MySQL's ``connect_timeout`` (others get none)."""
    import sqlalchemy

    try:
        driver = sqlalchemy.engine.make_url(url).get_dialect().driver
    except Exception:  # a URL SQLAlchemy cannot read fails, with its message, on first use
        return {}
    return {"connect_timeout": seconds} if driver in _TIMEOUT_DRIVERS else {}
