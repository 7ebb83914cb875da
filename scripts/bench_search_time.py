"""Hypervolume per CPU-hour: four search configurations at one wall-clock budget each.

For each data set and seed, four studies run one after another, each for the same
wall-clock budget (the CLI is stopped with Ctrl-C at the deadline; what it finished
stays in the study), on one torch thread:

* ``tpe``              multi-objective TPE, every trial runs all folds (``early_stop=none``)
* ``tpe+pareto``       the default configuration: TPE with Pareto-aware fold stopping
* ``tpe+pareto+fid``   the same plus the reduced-budget rung on fold 0 (``search.fidelity``)
* ``random``           Optuna's RandomSampler, every trial runs all folds

The hypervolume is the area the front of the COMPLETE trials' cross-validated (sparsity,
accuracy) dominates above (0, 0), as a function of the time each trial completed,
counted from the study's first trial start. Reported, mean ± std over seeds: the
hypervolume at 1/4, 1/2 and the whole budget, and the time each configuration takes to
reach plain TPE's final hypervolume as a fraction of the budget (a seed that never
reaches it counts as 1.0+, shown as ">1"). A plot of the mean curves goes to --plot.

    python scripts/bench_search_time.py --seeds 3 --budget-digits 60 --budget-cifar 150 \\
        --cifar ../shared/data/cifar10
    python scripts/bench_search_time.py --smoke --plot /tmp/hv.png   # checks the script
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli
import optuna

from dtp_search.tracking.results import hypervolume_2d

CONFIGS = {
    "tpe": ["search=tpe", "early_stop=none"],
    "tpe+pareto": ["search=tpe"],  # the default: early_stop resolves to pareto for two objectives
    "tpe+pareto+fid": ["search=tpe", "search.fidelity.enabled=true"],
    "random": ["search=random", "early_stop=none"],
}
COMMON = [
    "cv.folds=3",
    "front.points=2",
    "refit.enabled=false",
    "console.progress=false",
    "threads=1",
    "search.n_trials=1000",
]
DATASETS = {
    "digits": ["train.epochs=6", "train.finetune_epochs=1"],
    # benchmark 3's CIFAR-10 recipe and model (the cifar experiment), scaled down to fit
    # the CPU: 1,000 stratified training images, 3 + 1 epochs.
    "cifar": [
        "+experiment=cifar",
        "dataset.train_limit=1000",
        "dataset.test_limit=500",
        "train.epochs=3",
        "train.finetune_epochs=1",
    ],
}


def smoke() -> None:
    """--smoke: tpe and random only, one seed, one 1-epoch trial of 2 folds per study (each
    study ends by itself, well inside its budget), digits only."""
    for key in ("tpe+pareto", "tpe+pareto+fid"):
        del CONFIGS[key]
    COMMON[COMMON.index("cv.folds=3")] = "cv.folds=2"
    COMMON[COMMON.index("search.n_trials=1000")] = "search.n_trials=1"
    DATASETS["digits"] = ["train.epochs=1", "train.finetune_epochs=0"]


def run_study(
    root: Path, dataset: str, config: str, seed: int, budget: float, extra: list[str]
) -> list[tuple[float, float]]:
    """Run one study for ``budget`` seconds; return (seconds, hypervolume) per complete trial."""
    argv = [
        f"paths.root={root}",
        "study.name=bench",
        f"seed={seed}",
        *COMMON,
        *DATASETS[dataset],
        *CONFIGS[config],
        *extra,
    ]
    with open(root.parent / f"{root.name}.log", "w") as log:
        proc = _cli.start(argv, root.parent, log)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{root}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    if not trials:
        sys.exit(f"{dataset} {config} seed {seed}: no trial ran; see {root.parent / root.name}.log")
    t0 = min(t.datetime_start for t in trials if t.datetime_start is not None)
    done = sorted(
        (t for t in trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.datetime_complete,
    )
    points, curve = [], []
    for t in done:
        seconds = (t.datetime_complete - t0).total_seconds()
        if seconds > budget:
            break
        accuracy, sparsity = t.values
        points.append((sparsity, accuracy))
        curve.append((seconds, hypervolume_2d(points)))
    states = [t.state.name for t in trials]
    print(
        f"  {dataset} {config:<15} seed {seed}: {len(curve)} complete, "
        f"{states.count('PRUNED')} stopped early, HV {curve[-1][1] if curve else 0:.4f}",
        flush=True,
    )
    return curve


def hv_at(curve: list[tuple[float, float]], seconds: float) -> float:
    return max([hv for t, hv in curve if t <= seconds], default=0.0)


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, hv in curve if hv >= target - 1e-12), None)


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"
    )


def report(dataset: str, budget: float, curves: dict[str, list[list[tuple[float, float]]]]) -> str:
    lines = [
        f"{dataset}: {budget:.0f} s per study, {len(curves['tpe'])} seeds; hypervolume "
        "of (sparsity, accuracy) above (0, 0), mean ± std over seeds",
        "| configuration | HV at 1/4 budget | HV at 1/2 | HV at budget | complete trials "
        "| time to plain TPE's final HV (fraction of budget) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    targets = [hv_at(c, budget) for c in curves["tpe"]]
    for config, per_seed in curves.items():
        reach = []
        for curve, target in zip(per_seed, targets, strict=True):
            t = time_to(curve, target)
            reach.append(">1" if t is None else f"{t / budget:.2f}")
        lines.append(
            f"| {config} | {_ms([hv_at(c, budget / 4) for c in per_seed])} "
            f"| {_ms([hv_at(c, budget / 2) for c in per_seed])} "
            f"| {_ms([hv_at(c, budget) for c in per_seed])} "
            f"| {statistics.mean(len(c) for c in per_seed):.1f} | {', '.join(reach)} |"
        )
    return "\n".join(lines)


def plot(path: Path, budgets: dict[str, float], results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (dataset, curves) in zip(axes[0], results.items(), strict=True):
        grid = np.linspace(0, budgets[dataset], 200)
        for config, per_seed in curves.items():
            mean = np.mean([[hv_at(c, s) for s in grid] for c in per_seed], axis=0)
            ax.plot(grid / 60, mean, label=config)
        ax.set(
            title=f"{dataset}: hypervolume against wall time (mean over seeds)",
            xlabel="minutes (one torch thread)",
            ylabel="hypervolume",
        )
        low = min(
            min(hv for c in per_seed for _, hv in c[:1] or [(0, 0)]) for per_seed in curves.values()
        )
        ax.set_ylim(bottom=low)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget-digits", type=float, default=60.0, help="seconds per study")
    ap.add_argument("--budget-cifar", type=float, default=150.0, help="seconds per study")
    ap.add_argument(
        "--cifar",
        type=Path,
        default=None,
        help="CIFAR-10 ImageFolder tree (../shared/data/cifar10); omitted: digits only",
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="docs/img/bench_search_time.png; with --smoke, one in the temporary folder",
    )
    ap.add_argument("--smoke", action="store_true", help=smoke.__doc__.split(":")[1].strip())
    a = ap.parse_args()
    if a.smoke:
        smoke()
        a.seeds, a.budget_digits, a.cifar = 1, 300.0, None
    if a.plot is None:  # (a smoke run's plot never replaces the documentation's)
        default = Path("docs/img/bench_search_time.png")
        a.plot = Path(tempfile.gettempdir()) / "bench_search_time-smoke.png" if a.smoke else default
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    datasets = {"digits": ([], a.budget_digits)}
    if a.cifar is not None:
        datasets["cifar"] = ([f"dataset.path={a.cifar.resolve()}"], a.budget_cifar)
    started = time.time()
    results, budgets, tables = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="dtp-bench-search-time-") as tmp:
        cache = Path(tmp) / "cache"  # decoded images shared by every study (not timed twice)
        for dataset, (extra, budget) in datasets.items():
            curves: dict[str, list] = {c: [] for c in CONFIGS}
            for seed in range(a.seeds):
                for config in CONFIGS:
                    root = Path(tmp) / f"{dataset}-{config}-{seed}"
                    root.mkdir()
                    curves[config].append(
                        run_study(
                            root,
                            dataset,
                            config,
                            seed,
                            budget,
                            # decoded images shared; dense warm-up states per study, since
                            # another study's would hand a later configuration free epochs
                            [*extra, f"paths.cache_dir={cache}", f"paths.warm_start={root}/warm"],
                        )
                    )
            results[dataset], budgets[dataset] = curves, budget
            tables.append(report(dataset, budget, curves))
            print(tables[-1], flush=True)
    plot(a.plot, budgets, results)
    print(f"\nplot: {a.plot}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
