"""How the benchmarks run a study: ``python -m dtp_search <args>`` in a process of its own,
as a user runs it (its start-up, its exit status and its output included).

:data:`runner` is what runs the command. The suite's smoke runs of the scripts
(tests/test_scripts.py) set it to one that runs the same command line inside the test's
own process (``tests/inprocess.py``): a smoke run checks every step of a script, not the
seconds each new interpreter spends importing torch, MLflow and Optuna, which on the
2-core machine cost more than the tiny studies themselves. Benchmarks that measure or
signal processes (several workers, a study stopped at a wall-time budget) start theirs
with :data:`start`; the one that measures a process's memory starts its own with
:mod:`subprocess`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

COMMAND = [sys.executable, "-m", "dtp_search"]


@dataclass(frozen=True)
class Finished:
    """A finished ``python -m dtp_search``: its exit status and its output (stdout and
    stderr, interleaved as printed)."""

    returncode: int
    output: str


def _in_a_subprocess(args: list[str], cwd: Path) -> Finished:
    proc = subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Finished(proc.returncode, proc.stdout)


runner: Callable[[list[str], Path], Finished] = _in_a_subprocess


def _new_process(args: list[str], cwd: Path, stdout: IO[Any]) -> subprocess.Popen:
    return subprocess.Popen(
        [*COMMAND, *args],
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )


# What starts ``python -m dtp_search <args>`` in a process of its own, its output (stdout
# and stderr) to ``stdout``, for a benchmark that measures or signals the process; it
# returns a handle with Popen's poll, wait and send_signal. The suite's smoke runs set it
# to a fork of a process that has already imported what the command imports
# (tests/forkserver.py): still a process of its own, without the seconds of imports.
start: Callable[[list[str], Path, IO[Any]], subprocess.Popen] = _new_process


def dtp_search(args: Sequence[str], cwd: Path, log: Path | None = None) -> Finished:
    """``python -m dtp_search <args>`` from ``cwd``; with ``log``, the command line and its
    output are appended to that file."""
    done = runner(list(args), Path(cwd))
    if log is not None:
        with open(log, "a") as fh:
            fh.write("$ python -m dtp_search " + " ".join(args) + "\n" + done.output)
    return done
