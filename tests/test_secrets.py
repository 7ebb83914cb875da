"""No database password at rest or on screen: not in Hydra's run folder, the stores, the
artifacts, the console or the workers' command lines; and PostgreSQL's own ways to keep
it off the command line (PGPASSWORD, a .pgpass file, a service file) work on every path
that opens the database (the reachability probe, the study lock, Optuna's storage, the
MLflow tracking store)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import forkserver
import optuna
import pytest
from inprocess import TINY, run_here
from mlflow.tracking import MlflowClient
from servers import PASSWORD, postgres_cluster

from dtp_search.__main__ import run
from dtp_search.redaction import PASSWORD_ENV, hide_passwords, known_passwords, mask_urls, redact


def test_urls_in_any_text_have_their_password_masked():
    text = "a postgresql+psycopg://dtp:s3c@r:et@db:5432/optuna and http://u:p@h/x, sqlite:////a/b"
    assert mask_urls(text) == (
        "a postgresql+psycopg://dtp:***@db:5432/optuna and http://u:***@h/x, sqlite:////a/b"
    )
    assert redact("password s3cret-x refused", {"s3cret-x"}) == "password *** refused"


def test_no_url_in_a_run_config_keeps_its_password_in_mlflow():
    from omegaconf import OmegaConf

    from dtp_search.search.config import config_yaml
    from dtp_search.search.params import run_params

    cfg = OmegaConf.create(
        {
            "study": {"storage": "postgresql://dtp:pw-3@db/optuna"},
            "tracking": {"uri": "http://u:pw-4@h:5000", "artifact_location": "s3://k:pw-5@b/a"},
            "policy": {"name": "agp", "note": "mysql://u:pw-6@h/x"},
            "model": {"name": "mlp", "urls": ["http://u:pw-7@h/w"]},
        }
    )
    written = config_yaml(cfg) + repr(run_params(cfg))
    assert not any(f"pw-{i}" in written for i in range(3, 8)), written
    assert "postgresql://dtp:***@db/optuna" in written


def test_passwords_leave_the_command_line_for_the_environment(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV + "STUDY_STORAGE", raising=False)
    argv = hide_passwords(
        ["study.storage=postgresql+psycopg://dtp:pw-1@db/optuna", "seed=3", "--cfg", "job"]
    )
    assert argv == [
        "study.storage=postgresql+psycopg://dtp:${oc.env:DTP_SEARCH_PASSWORD_STUDY_STORAGE}@db/optuna",
        "seed=3",
        "--cfg",
        "job",
    ]
    assert os.environ[PASSWORD_ENV + "STUDY_STORAGE"] == "pw-1"
    assert hide_passwords(argv) == argv  # a worker's command line, already hidden
    assert "pw-1" in known_passwords()


def test_the_config_the_run_gets_still_connects_with_the_password(monkeypatch, tmp_path):
    """``run`` hands Hydra (and, through it, the workers) a command line without the
    password; the composed config resolves to the URL as typed."""
    from hydra import compose, initialize_config_dir

    from dtp_search.__main__ import CONFIG_DIR

    url = f"postgresql+psycopg://dtp:{PASSWORD}@127.0.0.1:1/optuna"
    seen: list[str] = []

    def launch(argv: list[str]) -> int:
        seen.extend(argv)
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=argv)
        assert cfg.study.storage == url and cfg.tracking.uri == "http://u:pw-2@h:5000"
        return 0

    for key in ("STUDY_STORAGE", "TRACKING_URI"):
        monkeypatch.delenv(PASSWORD_ENV + key, raising=False)
    argv = [f"paths.root={tmp_path}", f"study.storage={url}", "tracking.uri=http://u:pw-2@h:5000"]
    assert run(argv, launch=launch) == 0
    assert seen and not any(PASSWORD in a or "pw-2" in a for a in seen), seen


@pytest.fixture(scope="module")
def pg():
    with postgres_cluster() as url:
        yield url


FAILING_NET = '''
import os
from torch import nn


class FailsInTraining(nn.Module):
    """Evaluates; fails in training with a message that repeats a database URL, as a
    driver's error can."""

    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        if self.training:
            raise RuntimeError("lost the connection to " + os.environ["FAILING_URL"])
        return self.net(x)
'''


def _files_holding(root: Path, secret: bytes) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and secret in p.read_bytes()
    ]


@pytest.mark.slow
def test_a_password_on_the_command_line_is_nowhere_in_the_run_folder_or_its_output(pg, tmp_path):
    root = tmp_path / "runs"
    (tmp_path / "failing_net.py").write_text(FAILING_NET)
    optuna_url = f"{pg.replace('postgresql://', 'postgresql+psycopg://')}/optuna"
    mlflow_url = f"{pg.replace('postgresql://', 'postgresql+psycopg://')}/mlflow"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), FAILING_URL=optuna_url)
    env.pop("PGPASSWORD", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return forkserver.run(
            [f"paths.root={root}", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok = cli("study.name=secret", f"study.storage={optuna_url}", *TINY, "refit.enabled=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    # A run that fails unexpectedly, with both stores' passwords on its command line.
    failed = cli(
        "study.name=secret-fail",
        f"study.storage={optuna_url}",
        f"tracking.uri={mlflow_url}",
        "model=custom",
        "model._target_=failing_net.FailsInTraining",
        *TINY,
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" in failed.stderr and "lost the connection to" in failed.stderr
    assert "Error executing job" not in failed.stderr
    assert "dtp:***@127.0.0.1" in failed.stderr

    for proc in (ok, failed):
        assert PASSWORD not in proc.stdout + proc.stderr
    assert _files_holding(root, PASSWORD.encode()) == []
    hydra_files = list((root / "hydra").rglob(".hydra/*.yaml"))
    assert len(hydra_files) == 6 and (root / "mlflow.db").exists()
    assert all(p.stat().st_mode & 0o077 == 0 for p in hydra_files)
    # What was stored is intact: the study ran on the server with the password.
    study = optuna.load_study(study_name="secret", storage=optuna_url)
    assert len(study.trials) == 2


def _without_password(monkeypatch) -> None:
    """No password where libpq would look for one (environment, ~/.pgpass)."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    monkeypatch.delenv("PGSERVICEFILE", raising=False)


@pytest.mark.slow
@pytest.mark.parametrize("way", ["PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE"])
def test_postgresql_finds_the_password_itself(pg, tmp_path, monkeypatch, way):
    """Password-less URLs on both stores; libpq reads the password from where ``way``
    says. (Each way has its own URLs: MLflow caches one store per tracking URI, whose
    connections are already open.)"""
    port = pg.rsplit(":", 1)[1]
    base = f"postgresql+psycopg://dtp@127.0.0.1:{port}"
    optuna_url, mlflow_url = f"{base}/optuna", f"{base}/mlflow?application_name={way}"
    _without_password(monkeypatch)
    if way == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
    else:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{port}:*:dtp:{PASSWORD}\n")
        passfile.chmod(0o600)  # libpq ignores a password file others can read
        monkeypatch.setenv("PGPASSFILE", str(passfile))
    if way == "PGSERVICEFILE":
        services = tmp_path / "pg_service.conf"
        services.write_text(
            "".join(
                f"[dtp_{db}]\nhost=127.0.0.1\nport={port}\nuser=dtp\ndbname={db}\n"
                for db in ("optuna", "mlflow")
            )
        )
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        optuna_url = "postgresql+psycopg:///?service=dtp_optuna"
        mlflow_url = "postgresql+psycopg:///?service=dtp_mlflow"
    proc = run_here(
        tmp_path / "runs",
        f"study.name=libpq-{way}",
        # (Hydra reads an unquoted "=" in a value as a second override: quoted.)
        f'study.storage="{optuna_url}"',
        f'tracking.uri="{mlflow_url}"',
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=f"libpq-{way}", storage=optuna_url)
    assert len(study.trials) == 2
    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(f"libpq-{way}")
    parent = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dtp_search.role` = 'study'"
    )
    assert [r.info.status for r in parent] == ["FINISHED"]


@pytest.mark.slow
def test_without_any_password_the_server_refuses_in_one_line(pg, tmp_path, monkeypatch):
    port = pg.rsplit(":", 1)[1]
    _without_password(monkeypatch)
    proc = run_here(
        tmp_path / "runs",
        f"study.storage=postgresql+psycopg://dtp@127.0.0.1:{port}/optuna",
        *TINY,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: study.storage=") and "cannot be opened" in proc.stderr
