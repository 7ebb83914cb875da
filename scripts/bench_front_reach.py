"""Reach of the default search spaces: does each policy's default two-objective study put
Pareto points above 95 % sparsity, and what accuracy do they keep there?

Each policy runs one fresh study through the CLI with its own default space and the
default budget (digits, LeNet-300-100, 3 folds, 15 + 3 epochs). From the trials' CV values
it prints the Pareto points above 95 %, the most accurate of them and of those at 98 % or
more, the highest Pareto sparsity, and how many trials ended with a layer at the ``min_keep`` floor (those are
kept off the Pareto table under ``policy.on_collapse=penalize``, and marked otherwise).

    python scripts/bench_front_reach.py                      # every threshold policy, 20 trials
    python scripts/bench_front_reach.py --policies splicing --n-trials 12 --args train.epochs=60
    python scripts/bench_front_reach.py --smoke    # checks the script: agp, 1 one-epoch trial
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna
from _cli import dtp_search

from dtp_search.tracking.results import pareto_rows

POLICIES = (
    "agp",
    "constant",
    "std_scaled",
    "scheduled",
    "feedback",
    "splicing",
    "soft_threshold",
    "oneshot_global",
    "random",
)


def reach(root: Path, policy: str, n_trials: int, extra: list[str]) -> dict[str, object]:
    t0 = time.time()
    proc = dtp_search(
        [
            f"paths.root={root}",
            "study.name=reach",
            f"policy={policy}",
            f"search.n_trials={n_trials}",
            "refit.enabled=false",
            "console.progress=false",
            *extra,
        ],
        cwd=root.parent,
    )
    if proc.returncode != 0:
        sys.exit(f"{policy} failed:\n{proc.output[-3000:]}")
    study = optuna.load_study(study_name="reach", storage=f"sqlite:///{root}/optuna.db")
    rows = pareto_rows(study)
    high = [r for r in rows if r["sparsity"] >= 0.95]
    best = max(high, key=lambda r: r["accuracy"], default=None)
    best98 = max(
        (r for r in rows if r["sparsity"] >= 0.98), key=lambda r: r["accuracy"], default=None
    )
    floored_trials = {t.number for t in study.trials if t.user_attrs.get("floored_layers")}
    floored = len(floored_trials)
    for row in rows:
        row["floored"] = row["trial"] in floored_trials
    return {
        "policy": policy,
        "pareto": len(rows),
        "above_95": len(high),
        "best_above_95": best,
        "best_above_98": best98,
        "max_sparsity": max((r["sparsity"] for r in rows), default=0.0),
        "floored": floored,
        "trials": len(study.trials),
        "minutes": (time.time() - t0) / 60,
    }


def _point(row: dict[str, object] | None) -> str:
    if row is None:
        return "—"
    floored = ", floored" if row["floored"] else ""
    return f"{row['accuracy']:.4f} at {row['sparsity']:.4f} ({row['params']}{floored})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--n-trials", type=int, default=20)
    ap.add_argument("--args", nargs="*", default=[], help="extra overrides for every study")
    ap.add_argument(
        "--smoke", action="store_true", help="check the script: agp, 1 one-epoch trial, 2 folds"
    )
    a = ap.parse_args()
    if a.smoke:
        a.policies, a.n_trials = "agp", 1
        a.args = [
            "train.epochs=1",
            "train.finetune_epochs=0",
            "cv.folds=2",
            "front.points=2",
            *a.args,
        ]
    print(
        "| policy | Pareto points | of them ≥ 95 % | best ≥ 95 % (CV accuracy at sparsity) "
        "| best ≥ 98 % | highest Pareto sparsity | floored trials | minutes |"
    )
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for policy in a.policies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            r = reach(Path(tmp) / "runs", policy, a.n_trials, a.args)
        print(
            f"| {policy} | {r['pareto']} | {r['above_95']} | {_point(r['best_above_95'])} "
            f"| {_point(r['best_above_98'])} | {r['max_sparsity']:.4f} "
            f"| {r['floored']}/{r['trials']} | {r['minutes']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
