"""Study throughput with and without the dense warm-start cache, side by side in one run.

Each case runs the same study twice through the CLI (``python -m dtp_search
+experiment=cifar`` on the local CIFAR-10 copy, small budget, same seed), once with
``search.warm_start=true`` and once with ``false``, each in a fresh folder (so the cached
run starts with an empty cache and pays for filling it). Trials per hour come from the
trials' own start/complete times; the study's wall time (process start-up included) is
printed too.

Cases: ``agp`` with its dense warm-up fixed at half of the pruning phase
(``policy.start_epoch = train.epochs / 2``, no fine-tuning: the dense phase is half of each
trial's training), and ``oneshot_global`` (dense for the whole pruning phase, then one
fine-tuning epoch).

    python scripts/bench_study.py --n-trials 8 --limit 6000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent


def run_study(root: Path, overrides: list[str]) -> tuple[float, float, int]:
    """(study wall seconds, trials per hour, warm-start epochs used) of one fresh study."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dtp_search", f"paths.root={root}",
                           "study.name=bench", *overrides], cwd=root.parent,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"study failed:\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{root}/optuna.db")
    trials = [t for t in study.trials if t.state.is_finished()]
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    warm = sum(int(t.user_attrs.get("warm_start_epochs", 0)) for t in trials)
    return wall, len(trials) / busy * 3600, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--n-trials", type=int, default=8)
    ap.add_argument("--limit", type=int, default=6000, help="training images (stratified)")
    ap.add_argument("--epochs", type=int, default=4, help="pruning-phase epochs")
    a = ap.parse_args()
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    half = a.epochs // 2
    common = ["+experiment=cifar", f"dataset.path={a.data.resolve()}",
              f"dataset.train_limit={a.limit}", "dataset.test_limit=1000", "cv.folds=2",
              f"train.epochs={a.epochs}", f"search.n_trials={a.n_trials}", "refit.enabled=false",
              "console.progress=false", "front.points=4"]
    cases = {
        f"agp, dense {half} of {a.epochs} epochs": [
            "policy=agp", f"policy.start_epoch={half}", "~policy.space.start_epoch",
            "train.finetune_epochs=0"],
        f"oneshot_global, dense {a.epochs} of {a.epochs + 1} epochs": [
            "policy=oneshot_global", "train.finetune_epochs=1"],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtp-bench-study-") as tmp:
        # One shared decoded-data cache: decoding is not what is measured here.
        data_cache = Path(tmp) / "data-cache"
        for name, extra in cases.items():
            result = {}
            for warm in (False, True):
                root = Path(tmp) / f"{len(rows)}-{warm}"
                result[warm] = run_study(root, [*common, *extra, f"search.warm_start={warm}",
                                                f"paths.cache_dir={data_cache}",
                                                f"paths.warm_start={root}/warm_start"])
            rows.append((name, result))
    print(f"\ncifar experiment, simple_cnn, {a.limit} training images, 2 folds, "
          f"{a.n_trials} trials per study, CPU")
    print("| case | warm start | study wall time | trials/hour | dense epochs from cache | "
          "speed-up |\n| --- | --- | ---: | ---: | ---: | ---: |")
    ratios = []
    for name, result in rows:
        ratio = result[True][1] / result[False][1]
        ratios.append((name, ratio))
        for warm in (False, True):
            wall, tph, used = result[warm]
            print(f"| {name} | {'on' if warm else 'off'} | {wall:.0f} s | {tph:.0f} | {used} | "
                  f"{ratio:.2f}x |" if warm else
                  f"| {name} | off | {wall:.0f} s | {tph:.0f} | {used} | 1.00x |")
    half_case = ratios[0][1]
    print(f"warm_start_speedup: {half_case:.2f} (target >= 2 when the dense phase is half a trial)")


if __name__ == "__main__":
    main()
