"""Every benchmark in scripts/ runs: ``python scripts/<x>.py --smoke`` (a tiny budget on
digits or a tiny generated ImageFolder) finishes and prints its table and headline line.

The scripts run inside the test's process (``runpy``, as ``python scripts/<x>.py`` would
run them), and so do the ``python -m dtp_search`` studies they run through
``scripts/_cli.py``'s runner (tests/inprocess.py): a smoke run checks each step of a
script, and a new interpreter for the script and for each of its studies would spend
more time importing torch, MLflow and Optuna than the tiny studies take. The processes a
benchmark measures or signals (bench_workers' workers, bench_search_time's studies
stopped at a wall-time budget), started through ``_cli.start``, are forked from
tests/forkserver.py; bench_stream_memory's, whose memory it measures, are new
interpreters.
"""

from __future__ import annotations

import contextlib
import io
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import forkserver
import inprocess
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# script -> (extra arguments, with {tmp} for the test's folder; lines its output must hold)
SMOKE = {
    "bench_throughput.py": (
        [],
        ["| dtp_search (AGP pruning, cached tensors) |", "throughput_ratio: "],
    ),
    "bench_gpu.py": (
        [],
        ["not a GPU measurement", "resnet20, CIFAR-10 fold 1 of 3", "gpu_images_per_second: "],
    ),
    "bench_front_reach.py": ([], ["| agp | ", "| policy | Pareto points |"]),
    "bench_search.py": (
        [],
        ["tpe seed 0: HV after 2 trials", "| random | ", "trials_to_random_2_hv: "],
    ),
    "bench_search_time.py": (
        ["--plot", "{tmp}/hv.png"],
        ["digits tpe ", "| random | ", "plot: "],
    ),
    "bench_study.py": (
        [],
        ["| agp, dense 1 of 2 epochs | on |", "warm_start_speedup: "],
    ),
    "bench_quality.py": (
        [],
        ["| searched 95% | ", "at 90%: searched - oneshot = ", "quality_gain_at_95: "],
    ),
    "bench_workers.py": (
        [],
        ["postgres set-up is left out", "| sqlite, 1 process |", "| journal, study.workers=2 |"],
    ),
    "bench_full_recipe.py": (
        ["--work", "{tmp}/work"],
        [
            "| dense | — |",
            "| agp | 90% |",
            "| agp_distill | 90% |",
            "| agp_distill_warm | 90% |",
            "| agp_erk | 90% |",
            "| agp_lamp | 90% |",
            "ingredients: agp_distill - agp at 90%: ",
            "| searched5 | 90% |",
            "searched_at_95: ",
            "searched5 - agp_distill at 95: ",
        ],
    ),
    "bench_torch_pruning.py": (
        [],
        [
            *(f"| {arm} |" for arm in ("dense", "tp_oneshot", "tp_iterative", "dtp")),
            "bench_torch_pruning: dtp - best TP at 0.5",
        ],
    ),
    "bench_stream_memory.py": (
        [],
        ["| true |", "| false |", "streamed peak PSS over decoded size"],
    ),
}


def _dtp_search_here(args: list[str], cwd: Path):
    """scripts/_cli.py's runner: the study in this process."""
    import _cli

    done = inprocess.run_command(args, cwd)
    return _cli.Finished(done.returncode, done.stdout + done.stderr)


def _dtp_search_forked(args: list[str], cwd: Path, stdout) -> forkserver.Process:
    """scripts/_cli.py's start: a process of its own, forked from tests/forkserver.py."""
    return forkserver.popen(args, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT)


def run_script(script: str, args: list[str], folder: Path, monkeypatch) -> str:
    """``python scripts/<script> <args>`` from ``folder``, every temporary folder in it
    (nothing is written into the repository), inside this process; returns its stdout."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # (where python scripts/x.py finds _cli)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), *args])
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    import _cli

    monkeypatch.setattr(_cli, "runner", _dtp_search_here)
    monkeypatch.setattr(_cli, "start", _dtp_search_forked)
    out = io.StringIO()
    try:
        with inprocess.isolated(), contextlib.redirect_stdout(out):
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    except SystemExit as exc:  # sys.exit(<message>) is how a script reports a failure
        if exc.code not in (None, 0):
            pytest.fail(f"{script} exited with {exc.code!r}\n{out.getvalue()[-3000:]}")
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_benchmark_runs_in_smoke_mode(script, tmp_path, monkeypatch):
    args, expected = SMOKE[script]
    stdout = run_script(
        script, ["--smoke", *(arg.format(tmp=tmp_path) for arg in args)], tmp_path, monkeypatch
    )
    for line in expected:
        assert line in stdout, stdout[-3000:]
    if script == "bench_search_time.py":
        assert (tmp_path / "hv.png").stat().st_size > 0
    if script == "bench_full_recipe.py":
        assert (tmp_path / "work" / "results.json").is_file()


def test_every_benchmark_has_a_smoke_run_in_the_suite():
    scripts = {p.name for p in SCRIPTS.glob("bench_*.py")}
    assert scripts == set(SMOKE)
