"""Study throughput with and without the dense warm-start cache, side by side in one run.

Each case runs the same study twice through the CLI (``python -m dtp_search
+experiment=cifar`` on the local CIFAR-10 copy, small budget, same seed), once with
``search.warm_start=true`` and once with ``false``, each in a fresh folder (so the cached
run starts with an empty cache and pays for filling it). Trials per hour come from the
trials' own start/complete times (each study runs ``--repeats`` times, cache off and on
alternating, and each trial's fastest time counts); the study's wall time (process start-up
included) is printed too.

Cases: ``agp`` with its dense warm-up fixed at half of the pruning phase
(``policy.start_epoch = train.epochs / 2``, no fine-tuning: the dense phase is half of each
trial's training), and ``oneshot_global`` (dense for the whole pruning phase, then one
fine-tuning epoch).

    python scripts/bench_study.py --n-trials 8 --limit 6000 --repeats 2
    python scripts/bench_study.py --smoke     # checks the script: agp only, a tiny generated tree
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna
from _cli import dtp_search

ROOT = Path(__file__).resolve().parent.parent


def run_study(root: Path, overrides: list[str]) -> tuple[float, float, int, list[float]]:
    """(study wall seconds, trials per hour, warm-start epochs used, each trial's seconds in
    trial order) of one fresh study."""
    start = time.perf_counter()
    proc = dtp_search([f"paths.root={root}", "study.name=bench", *overrides], cwd=root.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"study failed:\n{proc.output[-3000:]}")
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{root}/optuna.db")
    trials = [t for t in study.trials if t.state.is_finished()]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    warm = sum(int(t.user_attrs.get("warm_start_epochs", 0)) for t in trials)
    return wall, len(trials) / sum(seconds) * 3600, warm, seconds


def _fastest(results: list[tuple[float, float, int, list[float]]]) -> tuple:
    """Repeats of one study (same seed, same trials) folded timeit-style: each trial's
    fastest time, the fastest wall time (noise on a shared VM only ever adds time)."""
    seconds = [min(ts) for ts in zip(*(r[3] for r in results), strict=True)]
    return (min(r[0] for r in results), len(seconds) / sum(seconds) * 3600, results[0][2], seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--n-trials", type=int, default=8)
    ap.add_argument("--limit", type=int, default=6000, help="training images (stratified)")
    ap.add_argument("--epochs", type=int, default=4, help="pruning-phase epochs")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each study; each trial's fastest time counts",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: the agp case only, 2 trials of 2 epochs, one run each, "
        "on a tiny generated ImageFolder",
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtp-bench-study-") as tmp:
        if a.smoke:
            from _smoke import tiny_cifar

            a.data, a.limit, a.n_trials = tiny_cifar(Path(tmp) / "cifar"), 120, 2
            a.epochs, a.repeats = 2, 1
        bench(a, Path(tmp))


def bench(a: argparse.Namespace, tmp: Path) -> None:
    """The cases of the module's docstring, each study in a fresh folder under ``tmp``."""
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    half = a.epochs // 2
    common = [
        "+experiment=cifar",
        f"dataset.path={a.data.resolve()}",
        f"dataset.train_limit={a.limit}",
        "dataset.test_limit=1000",
        "cv.folds=2",
        f"train.epochs={a.epochs}",
        f"search.n_trials={a.n_trials}",
        "refit.enabled=false",
        "console.progress=false",
        "front.points=4",
        # --smoke: a fold of the tiny tree is a few batches of 16, AGP updating every step
        *(["train.batch_size=16"] if a.smoke else []),
    ]
    cases = {
        f"agp, dense {half} of {a.epochs} epochs": [
            "policy=agp",
            f"policy.start_epoch={half}",
            "~policy.space.start_epoch",
            "train.finetune_epochs=0",
            *(["policy.update_every=1"] if a.smoke else []),
        ],
        f"oneshot_global, dense {a.epochs} of {a.epochs + 1} epochs": [
            "policy=oneshot_global",
            "train.finetune_epochs=1",
        ],
    }
    if a.smoke:  # (two studies, not four)
        cases = dict(list(cases.items())[:1])
    rows = []
    # One shared decoded-data cache: decoding is not what is measured here.
    data_cache = tmp / "data-cache"
    for name, extra in cases.items():
        runs: dict[bool, list] = {False: [], True: []}
        for r in range(a.repeats):  # off and on alternate, so that drift hits both
            for warm in (False, True):
                root = tmp / f"{len(rows)}-{warm}-{r}"
                runs[warm].append(
                    run_study(
                        root,
                        [
                            *common,
                            *extra,
                            f"search.warm_start={warm}",
                            f"paths.cache_dir={data_cache}",
                            f"paths.warm_start={root}/warm_start",
                        ],
                    )
                )
        rows.append((name, {warm: _fastest(results) for warm, results in runs.items()}))
    print(
        f"\ncifar experiment, simple_cnn, {a.limit} training images, 2 folds, "
        f"{a.n_trials} trials per study, CPU"
    )
    print(
        "| case | warm start | study wall time | trials/hour | dense epochs from cache | "
        "dense share of a trial's time | speed-up |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    headline = []
    for name, result in rows:
        ratio = result[True][1] / result[False][1]
        # The first trial fills the cache; the others skip the dense phase. What they save
        # against the mean trial without the cache is the dense phase's share of a trial.
        cold = sum(result[False][3]) / len(result[False][3])
        warm_trials = result[True][3][1:]
        share = 1 - sum(warm_trials) / len(warm_trials) / cold
        headline.append(f"{ratio:.2f} at a dense share of {share:.0%} ({name.split(',')[0]})")
        for warm in (False, True):
            wall, tph, used, _ = result[warm]
            print(
                f"| {name} | {'on' if warm else 'off'} | {wall:.0f} s | {tph:.0f} | {used} | "
                + (f"{share:.0%} | {ratio:.2f}x |" if warm else "| 1.00x |")
            )
    n = a.n_trials
    print(
        f"ceiling at a dense share of exactly 1/2 with the first trial filling the cache: "
        f"{n / (1 + (n - 1) / 2):.2f}x for {n} trials (2x only as the trials grow without end)"
    )
    print(
        f"warm_start_speedup: {'; '.join(headline)} "
        "(target >= 2 when the dense phase is at least half of a trial)"
    )


if __name__ == "__main__":
    main()
