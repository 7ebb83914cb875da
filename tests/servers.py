"""Real servers for the distributed tests: a throwaway PostgreSQL cluster and an MLflow
tracking server, both on free loopback ports, removed afterwards.

PostgreSQL refuses to run as root, so when the tests run as root (CI containers) the
cluster is created and started as the unprivileged ``postgres`` user that Debian's
package creates. Without the server binaries the tests skip, except under CI=true,
where a missing server is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "pw-s3cret-7d1f"  # the tests check it never reaches MLflow params or the console


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI (.ci/run installs Debian's postgresql)")
    pytest.skip(f"{what} not installed")


@dataclass
class PostgresServer:
    """A running throwaway cluster: its URL (``postgresql://dtp:<password>@127.0.0.1:<port>``)
    and :meth:`stop`/:meth:`start`, for tests of a server that restarts under a run."""

    url: str
    _pg_ctl: list[str]
    _run: Callable[..., None]

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl -m <mode> stop``: ``fast`` ends every session ("terminating connection
        due to administrator command") as a restart or a failover does."""
        self._run(*self._pg_ctl, "-m", mode, "-w", "stop")

    def start(self) -> None:
        """Start it again on the same port and data (returns once it accepts connections)."""
        self._run(*self._pg_ctl, "-w", "-t", "60", "start")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on a free loopback port, removed afterwards; its
    databases ``optuna`` and ``mlflow`` exist."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        _missing("PostgreSQL (initdb, pg_ctl)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="dtp-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing("the unprivileged 'postgres' user")
        as_user = ["runuser", "-u", "postgres", "--"]
        root.chmod(0o755)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", free_port()
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    # The server's options live in the start command, so a restart keeps port and socket.
    control = [
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(root / "server.log"),
        "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
    ]
    try:
        run(
            initdb,
            "-D",
            str(data),
            "-U",
            "dtp",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        server = PostgresServer(f"postgresql://dtp:{PASSWORD}@127.0.0.1:{port}", control, run)
        server.start()
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"{server.url}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for db in ("optuna", "mlflow"):
                conn.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
        engine.dispose()
        yield server
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yields ``postgresql://dtp:<password>@127.0.0.1:<port>``; databases ``optuna`` and
    ``mlflow`` exist (:func:`postgres_server` for a test that stops and starts it)."""
    with postgres_server() as server:
        yield server.url


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts; yields its http URL."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(artifacts.parent / "mlflow-server.log", "wb")  # noqa: SIM115
    # No job runner: it serves GenAI evaluation jobs (a huey consumer per job kind, each
    # importing MLflow), which these tests never submit; tracking is unaffected.
    env = dict(
        os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
    )
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (artifacts.parent / "mlflow-server.log").read_text(errors="replace")
                raise RuntimeError(f"mlflow server did not start:\n{text[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()
