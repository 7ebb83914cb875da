"""Search efficiency: hypervolume of the (sparsity, accuracy) Pareto front after 10, 20
and 40 trials, the default sampler (multi-objective TPE) versus Optuna's RandomSampler,
over several seeds on digits, side by side in one run.

Each (sampler, seed) is one study run through the CLI with the default policy (AGP and its
search space) on a small training budget. The hypervolume is the area the front dominates
above (sparsity 0, accuracy 0), from the trials' cross-validated values, counting trials in
the order they were run.

    python scripts/bench_search.py --seeds 3 --n-trials 40
    python scripts/bench_search.py --smoke     # checks the script: 1 seed, 2 one-epoch trials
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
from _cli import dtp_search

from dtp_search.tracking.results import hypervolume_2d

BUDGET = [
    "cv.folds=2",
    "train.epochs=6",
    "train.finetune_epochs=1",
    "front.points=2",
    "refit.enabled=false",
    "console.progress=false",
    "search.warm_start=false",
]


# --smoke: the budget of the tests' tiny studies (tests/inprocess.py TINY).
SMOKE = ("train.epochs=1", "train.finetune_epochs=0")


def hv_curve(
    root: Path, sampler: str, seed: int, n_trials: int, extra: tuple[str, ...] = ()
) -> list[float]:
    """Hypervolume after 1..n_trials trials of one fresh study."""
    proc = dtp_search(
        [
            f"paths.root={root}",
            "study.name=bench",
            f"search={sampler}",
            f"seed={seed}",
            f"search.n_trials={n_trials}",
            *BUDGET,
            *extra,
        ],
        cwd=root.parent,
    )
    if proc.returncode != 0:
        sys.exit(f"{sampler} seed {seed} failed:\n{proc.output[-3000:]}")
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{root}/optuna.db")
    points, curve = [], []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE:
            accuracy, sparsity = t.values
            points.append((sparsity, accuracy))
        curve.append(hypervolume_2d(points))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-trials", type=int, default=40)
    ap.add_argument(
        "--smoke", action="store_true", help="check the script: 1 seed, 2 one-epoch trials"
    )
    a = ap.parse_args()
    if a.smoke:
        a.seeds, a.n_trials = 1, 2
    checkpoints = [n for n in (10, 20, 40) if n <= a.n_trials] or [a.n_trials]
    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    with tempfile.TemporaryDirectory(prefix="dtp-bench-search-") as tmp:
        for seed in range(a.seeds):
            for sampler in curves:
                root = Path(tmp) / f"{sampler}-{seed}"
                curves[sampler].append(
                    hv_curve(root, sampler, seed, a.n_trials, SMOKE if a.smoke else ())
                )
                print(
                    f"{sampler} seed {seed}: HV after {a.n_trials} trials "
                    f"{curves[sampler][-1][-1]:.4f}",
                    flush=True,
                )

    def mean_std(sampler: str, n: int) -> str:
        values = [c[n - 1] for c in curves[sampler]]
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.4f} ± {std:.4f}"

    print(
        f"\ndigits, lenet300, agp; {a.seeds} seeds; hypervolume of (sparsity, accuracy) "
        "above (0, 0), mean ± std over seeds"
    )
    print("| sampler | " + " | ".join(f"after {n} trials" for n in checkpoints) + " |")
    print("| --- |" + " ---: |" * len(checkpoints))
    for sampler in curves:
        print(f"| {sampler} | " + " | ".join(mean_std(sampler, n) for n in checkpoints) + " |")
    # Trials the default sampler needs to reach random's final hypervolume (mean curves).
    target = statistics.fmean(c[-1] for c in curves["random"])
    mean_tpe = [statistics.fmean(c[i] for c in curves["tpe"]) for i in range(a.n_trials)]
    reached = next((i + 1 for i, v in enumerate(mean_tpe) if v >= target), None)
    shown = reached if reached is not None else f"> {a.n_trials}"
    print(f"trials_to_random_{a.n_trials}_hv: {shown} (target <= {a.n_trials // 2})")


if __name__ == "__main__":
    main()
