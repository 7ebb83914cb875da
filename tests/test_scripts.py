"""Every benchmark in scripts/ runs: ``python scripts/<x>.py --smoke`` (a tiny budget on
digits or a tiny generated ImageFolder) exits 0 and prints its table and headline line.
bench_torch_pruning.py and bench_stream_memory.py have their smoke runs in
test_bench_torch_pruning.py and test_user_data.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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
            "| searched3 | 90% |",
            "searched_at_95: ",
            "searched3 - agp_distill at 95: ",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_benchmark_runs_in_smoke_mode(script, tmp_path):
    args, expected = SMOKE[script]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--smoke"]
        + [arg.format(tmp=tmp_path) for arg in args],
        capture_output=True,
        text=True,
        timeout=600,
        # From the test's folder, with every temporary folder in it: nothing is written
        # into the repository.
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for line in expected:
        assert line in proc.stdout, proc.stdout[-3000:]
    if script == "bench_search_time.py":
        assert (tmp_path / "hv.png").stat().st_size > 0
    if script == "bench_full_recipe.py":
        assert (tmp_path / "work" / "results.json").is_file()


def test_every_benchmark_has_a_smoke_run_in_the_suite():
    # A new scripts/bench_*.py joins SMOKE (or has its own test, like these two).
    elsewhere = {"bench_torch_pruning.py", "bench_stream_memory.py"}
    scripts = {p.name for p in (REPO / "scripts").glob("bench_*.py")}
    assert scripts == set(SMOKE) | elsewhere
