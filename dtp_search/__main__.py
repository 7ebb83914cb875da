"""``python -m dtp_search [overrides]`` — run (or resume) a pruning-policy search.

Exit statuses (docs/troubleshooting.md lists the messages):

====  ==========================================================================
0     the study holds ``search.n_trials`` finished trials (and, when enabled, the
      refit and report are done)
1     an unexpected error (its traceback on stderr, passwords masked), or a full disk
2     bad input: a configuration or data error, before any work (``error:`` line)
3     the study is short: trials kept failing (``search.max_failures``)
4     the study storage or tracking store did not answer for ``study.storage_patience``
130   interrupted (Ctrl-C, SIGTERM); the same command resumes
====  ==========================================================================
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# MLflow 3 reports usage telemetry by default; a tool that runs on clusters and offline
# machines should not phone home unless the user asks (set it to "false" to allow).
# Set before anything below imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import hydra
import optuna
from omegaconf import DictConfig

from dtp_search.errors import (
    ConfigError,
    DatasetError,
    RefitInterrupted,
    StorageUnavailable,
    StudyIncomplete,
    disk_full,
)
from dtp_search.interrupts import request_stop, stop_now, stop_requested, stopping
from dtp_search.redaction import (
    hide_passwords,
    known_passwords,
    redact,
    redact_logging,
    scrub_files,
)
from dtp_search.search.config import register_resolvers
from dtp_search.search.study import run_study
from dtp_search.settings import allowed, field_owner, text_fields

register_resolvers()
log = logging.getLogger("dtp_search")
# An absolute path: a relative one would be read as a package path when this module is
# imported (the `dtp-search` console script) rather than run with `python -m`.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

_INTERRUPTED_SEARCH = (
    "interrupted: the running trial is marked FAILED (its MLflow run KILLED) and "
    "queued again; run the same command to resume the study"
)
_INTERRUPTED_REFIT = (
    "interrupted during the refit: the refit in progress stopped (its MLflow run and the "
    "study's run KILLED); the search is complete, and running the same command refits the "
    "trials still without a finished refit, then writes the report"
)


def main() -> None:
    """The ``dtp-search`` console script and ``python -m dtp_search``."""
    status = run(sys.argv[1:])
    if stopping():
        # Python gives the default handlers back while it shuts down: one more Ctrl-C
        # landing then would kill the process by the signal instead of exiting 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


def run(argv: Sequence[str], launch: Callable[[list[str]], int] | None = None) -> int:
    """The command line ``argv``, start to end; returns its exit status.

    Deprecated keys are renamed, passwords in URLs moved into the environment
    (:func:`~dtp_search.redaction.hide_passwords`: Hydra's run folder and the workers'
    command lines see a reference), and the overrides checked; then ``launch(argv)``
    runs the study. By default that is Hydra's app, which writes its run folder and
    calls :func:`execute`; the tests compose the config in their own process instead
    (``tests/inprocess.py``) and call :func:`execute` as well, so they see the same
    statuses and messages.
    """
    argv = hide_passwords(rewrite_aliases(list(argv)))
    problem = check_overrides(argv)
    if problem is not None:
        print(f"error: {redact(problem, known_passwords())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return (launch or _launch_hydra)(argv)


def _launch_hydra(argv: list[str]) -> int:
    sys.argv[1:] = argv  # hydra.main reads its overrides from sys.argv
    try:
        _app()
    except SystemExit as exc:  # _app's status, or Hydra's own (1) for its errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return EXIT_OK


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    passwords = known_passwords(cfg)
    _scrub_run_folder(passwords)
    redact_logging(passwords)
    # Ctrl-C and SIGTERM (a scheduler's pre-emption, `kill`) stop the run at the next
    # training step (see _interrupt); the trial ends FAIL, its run KILLED, and it is
    # queued again so that rerunning the command resumes it from its checkpoint.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    # Optuna logs an interrupted trial with the KeyboardInterrupt's traceback: noise.
    logging.getLogger("optuna.study._optimize").addFilter(_drop_interrupt_traceback)
    status = execute(cfg)
    # Every outcome is handled by execute: Hydra's own report of a failed job ("Error
    # executing job with overrides: [...]", the command line as typed) never prints.
    if status != EXIT_OK:
        sys.exit(status)


def _scrub_run_folder(passwords: set[str]) -> None:
    """Hydra has written the run's config files and opened its log before the app
    starts; mask what :func:`hide_passwords` could not keep out, owner-only access."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir)
    files = [folder / f"{hc.job.name}.log"]
    if hc.output_subdir is not None:
        files += sorted((folder / hc.output_subdir).glob("*.yaml"))
    scrub_files(files, passwords)


def execute(cfg: DictConfig, overrides: Sequence[str] | None = None) -> int:
    """Run the study ``cfg`` describes (``overrides``: the command line's, see
    :func:`~dtp_search.search.study.run_study`) and return the exit status (the module's
    table), having printed why on stderr in one line where it is not 0: the error, what
    to do next, or for an unexpected error its traceback, passwords masked throughout.
    ``DTP_SEARCH_DEBUG=1`` raises instead."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials
    # MLflow prints INFO lines on its own stderr handler when it opens a SQLite store
    # ("Creating initial MLflow database tables...", "Updating database tables"), between
    # the progress bar's redraws; alembic's migrations log the same way (MLflow sets it to
    # WARNING, a version may not). At least WARNING: warnings and errors still print, and a
    # quieter MLFLOW_LOGGING_LEVEL stays as set.
    for name in ("mlflow.store.db.utils", "alembic"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        run_study(cfg, overrides=overrides)
    except BaseException as exc:
        outcome = _outcome(exc)
        if outcome is None or os.environ.get("DTP_SEARCH_DEBUG"):
            raise
        print(redact(outcome[1], known_passwords(cfg)), file=sys.stderr)
        return outcome[0]
    return EXIT_OK


def _outcome(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and message of a run that raised ``exc`` (called while it is
    being handled); ``None`` for what is not a run's outcome (SystemExit)."""
    if isinstance(exc, (ConfigError, DatasetError)):
        return EXIT_BAD_INPUT, f"error: {exc}"
    if isinstance(exc, StudyIncomplete):
        return EXIT_INCOMPLETE, f"incomplete: {exc}"
    if isinstance(exc, StorageUnavailable):
        return EXIT_UNAVAILABLE, f"error: {exc}"
    full = disk_full(exc)  # also one met inside a library (MLflow's artifacts, SQLite)
    if full is not None:
        return EXIT_ERROR, f"error: {full}"
    if isinstance(exc, RefitInterrupted):
        return EXIT_INTERRUPTED, _INTERRUPTED_REFIT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, _INTERRUPTED_SEARCH
    if isinstance(exc, Exception):
        return EXIT_ERROR, traceback.format_exc().rstrip()
    return None


def _interrupt(signum: int, frame: object) -> None:
    """First signal: ask training to stop at its next step (a safe point). Second signal:
    stop at once, wherever the program is. A signal that arrives once the stop is under
    way (runs being closed, the message being printed) is not acted on, so that the run
    still ends as it says: it and any later one are ignored (the stop is under way)."""
    name = signal.Signals(signum).name
    if stopping():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    if stop_requested() is not None:
        stop_now()
    request_stop(name)


def _drop_interrupt_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a failed trial with its traceback; an interrupt and a full disk end the
    run with their own one line instead (:func:`_outcome`)."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and (isinstance(exc, KeyboardInterrupt) or disk_full(exc) is not None):
        record.exc_info, record.exc_text = None, None
    return True


# Flags after which Hydra does something else than one run of the default config.
_OWN_FLAGS = (
    "-m",
    "--multirun",
    "-h",
    "--help",
    "--hydra-help",
    "-i",
    "--info",
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "--shell-completion",
    "-sc",
)


def check_overrides(argv: list[str]) -> str | None:
    """Compose the config with the command line's overrides the way Hydra will, and return
    a one-line message naming the key, the bad value and what is allowed if that fails.

    Hydra reports these itself, over several lines and with exit status 1; a typo should
    read like every other configuration error here (status 2, one line).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    if any(a.split("=", 1)[0] in _OWN_FLAGS for a in argv):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if a.startswith("~") or ("=" in a and not a.startswith("-"))]
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException as exc:
            reason = str(exc).splitlines()[0]
            return (
                f"cannot read the override {override!r} ({reason}); write key=value, "
                "e.g. train.epochs=5 or 'search.objectives=[accuracy]'"
            )
    numbers = _numbers_in_text_fields(parser.parse_overrides(overrides))
    if numbers is not None:
        return numbers
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except MissingConfigException as exc:
        missing = (exc.missing_cfg_file or "").strip("/")
        group, _, name = missing.rpartition("/")
        if group and exc.options:
            return f"{group}={name!r} is not a known {group}; allowed: {sorted(exc.options)}"
        return " ".join(str(exc).split("Config search path")[0].split())
    except HydraException as exc:
        typed = _type_error(exc.__cause__)
        if typed is not None:
            return typed
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = " ".join(lines[:2])
        if "Could not override" in text:
            text += " (no such key; `python -m dtp_search --cfg job` lists every key)"
        return text
    return _check_writable(cfg)


def _type_error(cause: BaseException | None) -> str | None:
    """OmegaConf's refusal of a value for a typed field (``seed=abc``), in this tool's
    one-line form with what the field allows."""
    from omegaconf.errors import ValidationError

    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    owner = field_owner(str(cause.full_key))
    if owner is None:
        return None
    return f"{cause.full_key}={cause.value!r} is not allowed; allowed: {allowed(*owner)}"


def _numbers_in_text_fields(overrides: list) -> str | None:
    """``study.name=nan`` or ``=123``: the command line reads a number, and a text field
    would silently take its spelling as Python writes it (``1e3`` → ``'1000.0'``)."""
    texts = set(text_fields())
    for o in overrides:
        key = o.key_or_group
        if key in texts and not o.is_delete() and isinstance(o.value(), (int, float, bool)):
            value = (o.input_line or "").partition("=")[2] or o.get_value_element_as_str()
            return (
                f"{key}={value} is not allowed; allowed: a text, quoted when it looks "
                f"like a number: {key}='\"{value}\"'"
            )
    return None


def _check_writable(cfg: DictConfig) -> str | None:
    """Hydra writes its run folder under ``paths.root`` before the app starts: a folder that
    cannot be written must be reported here, not as Hydra's traceback."""
    import tempfile

    try:
        root = Path(str(cfg.paths.root))
    except Exception:  # an interpolation that fails is reported by the run itself
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        return (
            f"paths.root={str(root)!r} cannot be written ({exc.strerror or exc}); "
            "allowed: a folder you can create and write to"
        )
    return None


# Deprecated spellings of overrides, kept for one release: ``pruner=`` named Optuna's
# early stopping, which clashed with weight pruning (``DynamicPruner``).
_ALIASES = {"pruner": "early_stop", "search.pruner": "search.early_stop"}


def rewrite_aliases(argv: list[str]) -> list[str]:
    """``argv`` with deprecated keys renamed (each warned about once on stderr)."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, eq, value = arg[len(prefix) :].partition("=")
        for old, new in _ALIASES.items():
            if key == old or key.startswith(old + "."):
                renamed = new + key[len(old) :]
                print(f"warning: {key}= is deprecated; use {renamed}=", file=sys.stderr)
                key = renamed
                break
        out.append(prefix + key + eq + value)
    return out


if __name__ == "__main__":
    main()
