"""``python -m dtp_search`` run inside the test process: the command line's own steps
(``dtp_search.__main__.run``: deprecated aliases renamed, passwords moved off the command
line, the override check; then Hydra's compose and ``__main__.execute``, with the same
messages and exit statuses), without the seconds each new process spends importing
torch, MLflow and Optuna.

What only a process of its own shows (signals, SIGKILL, several workers on one study, a
store created from nothing, a second run resuming the first) runs in one, forked from
tests/forkserver.py: test_cli's resume and killed runs, test_interrupt, test_distributed,
test_outage, test_exit_status's double Ctrl-C and test_reproducible's first study. What
only a new interpreter shows (the exit status and stderr of ``python`` itself, a fresh
import) starts ``sys.executable``: test_bad_input's real-process cases.

A run into a folder without an MLflow store starts, by default, from a copy of an empty
store made once per process (``premade_store``): MLflow's schema migrations take over two
seconds for every new SQLite store, a copy a few milliseconds. The study, its experiment
and its runs are created by the run itself, as always.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig

# The smallest study that runs every step (two 1-epoch trials on digits, two folds, no
# refit), for tests of what surrounds the training rather than of the training.
TINY = [
    "train.epochs=1",
    "train.finetune_epochs=0",
    "cv.folds=2",
    "search.n_trials=2",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
]


@dataclass
class Result:
    """What a finished ``subprocess.run(..., capture_output=True, text=True)`` holds."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def isolated():
    """Undo what a run changes in this process: environment, MLflow's global tracking
    URI, torch's thread count, Optuna's log level."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_utils

    environ = dict(os.environ)
    tracking_uri = mlflow_utils._tracking_uri
    threads = torch.get_num_threads()
    verbosity = optuna.logging.get_verbosity()
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(tracking_uri)  # (which also sets MLFLOW_TRACKING_URI)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _chdir(path: Path):
    # contextlib.chdir is Python 3.11+; the project supports 3.10.
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store with MLflow's tables and nothing else, made once."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="dtp-empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "mlflow.db"
    with isolated(), _chdir(folder):  # (the Default experiment's ./mlruns: in there)
        MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


def premake_store(root: Path) -> None:
    """Put an empty MLflow store at ``<root>/mlflow.db`` unless one is there (for a test
    that calls ``run_study`` itself; see the module's docstring)."""
    store = Path(root) / "mlflow.db"
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), store)


def study_here(argv: list[str]) -> tuple[DictConfig, optuna.Study]:
    """conf/config.yaml composed with ``argv`` and its study run in this process (an empty
    MLflow store premade at ``paths.root``, the process's state set back after, as
    :func:`isolated` says): the config and the study."""
    from hydra import compose, initialize_config_dir

    from dtp_search.__main__ import CONFIG_DIR
    from dtp_search.search.study import run_study

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv)
    premake_store(Path(cfg.paths.root))
    with isolated():
        return cfg, run_study(cfg)


def run_here(
    root: Path, *overrides: str, cwd: Path | None = None, premade_store: bool = True
) -> Result:
    """``python -m dtp_search paths.root=<root> <overrides>`` in this process, from ``cwd``
    (``root``'s parent, as the subprocess runs do): ``dtp_search.__main__.run``, the
    command's own steps and exit statuses. Returns its exit status and output (an
    unexpected error: status 1, its traceback in ``stderr``).

    ``premade_store``: where the run would create ``<root>/mlflow.db`` (the default
    ``tracking.uri``), an empty store is put there first (see the module's docstring);
    ``False`` for a test that checks what a run leaves in a folder.

    Not for runs whose environment matters at import or first use: urllib, for one, keeps
    the proxies it saw first (a download test needs a process of its own)."""
    return run_command([f"paths.root={root}", *overrides], cwd or Path(root).parent, premade_store)


def run_command(argv: list[str], cwd: Path, premade_store: bool = True) -> Result:
    """``python -m dtp_search <argv>`` in this process, from ``cwd``: :func:`run_here` for
    a whole command line (``paths.root``, where given, is where the store is premade)."""
    from dtp_search.__main__ import run

    root = next((a.split("=", 1)[1] for a in argv if a.startswith("paths.root=")), None)
    if (
        premade_store
        and root is not None
        and not any(a.lstrip("+").startswith(("tracking.uri=", "tracking=")) for a in argv)
    ):
        premake_store(Path(cwd, root))
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            isolated(),
            _chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),  # (execute sets its filters, as for a run)
        ):
            code = run(list(argv), launch=_compose_and_execute)
    except BaseException:
        # Shown in the failing test's captured output, like a process's stderr.
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise
    return Result(code, out.getvalue(), err.getvalue())


def _compose_and_execute(argv: list[str]) -> int:
    """What Hydra's app does for ``argv`` short of its run folder, logging set-up and
    signal handlers: compose the config, then ``dtp_search.__main__.execute``."""
    from hydra import compose, initialize_config_dir

    from dtp_search.__main__ import CONFIG_DIR, execute

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv)
    return execute(cfg, overrides=argv)
