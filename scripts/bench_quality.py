"""Quality at equal compute: the policy a search finds versus one-shot global magnitude
pruning (``torch.nn.utils.prune``, then fine-tuning), at 90 % and 95 % sparsity, on CIFAR-10
with ``simple_cnn``, side by side in one run.

1. *Search* (per target sparsity): a single-objective study through the CLI — accuracy
   under ``search.min_sparsity = target`` — over AGP with its final sparsity fixed at the
   target and its schedule searched (global or per-layer θ, start and end of pruning,
   magnitude or Taylor scores), judged by 2-fold cross-validation on the training split.
2. *Refit* on the whole training subset and *test once*, for 3 seeds: the best trial's
   policy, ``oneshot_global`` with ``amount = target``, and the dense network — all with
   the same optimiser and the same total epochs (pruning phase + fine-tuning).

    python scripts/bench_quality.py                       # ~10 min on 2 CPU cores
    python scripts/bench_quality.py --limit 50000 --epochs 20 --finetune 5 --trials 20
    python scripts/bench_quality.py --smoke   # checks the script: a tiny generated tree, 1 trial
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
import torch
from _cli import dtp_search

ROOT = Path(__file__).resolve().parent.parent
SPACE = (
    "+search.space={policy.scope: {type: categorical, choices: [global, layer]}, "
    "policy.start_epoch: {type: int, low: 0, high: %d}, "
    "policy.end_epoch: {type: int, low: %d, high: %d}, "
    "policy.criterion: {type: categorical, choices: [magnitude, taylor]}}"
)


def common(a: argparse.Namespace, cache: Path) -> list[str]:
    return [
        "+experiment=cifar",
        f"dataset.path={a.data.resolve()}",
        f"dataset.train_limit={a.limit}",
        f"paths.cache_dir={cache}",
        f"train.epochs={a.epochs}",
        f"train.finetune_epochs={a.finetune}",
        "front.points=2",
        "console.progress=false",
        *(["train.batch_size=16"] if a.smoke else []),
    ]


def search(a: argparse.Namespace, root: Path, cache: Path, target: float) -> dict[str, object]:
    """The best trial's sampled values (full keys: the cifar experiment samples the training
    recipe, ``train.lr`` and the rest, along with the policy) of a fresh study."""
    overrides = [
        *common(a, cache),
        "policy=agp",
        f"policy.final_sparsity={target}",
        # AGP's own space without final_sparsity; this one instead.
        "~policy.space.final_sparsity",
        "~policy.space.scope",
        "~policy.space.start_epoch",
        SPACE % (a.epochs // 2, a.epochs // 2, a.epochs),
        "search.objectives=[accuracy]",
        "search.directions=[maximize]",
        # (--smoke: the few AGP steps of a tiny fold land further under the target)
        f"search.min_sparsity={target - (0.02 if a.smoke else 0.005)}",
        f"search.n_trials={a.trials}",
        "cv.folds=2",
        "refit.enabled=false",
        f"paths.warm_start={root}/warm_start",
        "study.name=quality",
        # --smoke: a fold of the tiny tree is a few steps, under AGP's update_every of 10
        *(["policy.update_every=1"] if a.smoke else []),
    ]
    proc = dtp_search([f"paths.root={root}", *overrides], cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"search at {target} failed:\n{proc.output[-3000:]}")
    study = optuna.load_study(study_name="quality", storage=f"sqlite:///{root}/optuna.db")
    best = study.best_trial
    return dict(best.params)


def refit(
    a: argparse.Namespace, cache: Path, policy: str, params: dict[str, object], seed: int
) -> tuple[float, float]:
    """(test accuracy, sparsity) of one policy trained on the whole training subset;
    ``params``: overrides by full key (``policy.amount``, ``train.lr``)."""
    from hydra import compose, initialize_config_dir

    from dtp_search.data import load_dataset
    from dtp_search.search.config import register_resolvers, settings_of
    from dtp_search.search.refit import refit_trial

    register_resolvers()  # conf/config.yaml's ${abspath:...}, as the CLI does on start-up
    extra = [f"{k}={v}" for k, v in params.items()]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*common(a, cache), f"policy={policy}", *extra, f"seed={seed}"]
        )
    dataset = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    _, pruner, _, accuracy, _ = refit_trial(settings_of(cfg), dataset, torch.device("cpu"))
    return accuracy, pruner.sparsity()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--limit", type=int, default=10000, help="training images (stratified)")
    ap.add_argument("--epochs", type=int, default=8, help="pruning phase (dense for oneshot)")
    ap.add_argument("--finetune", type=int, default=2)
    ap.add_argument("--trials", type=int, default=6, help="search trials per target")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: a tiny generated ImageFolder, 1 trial of 2 epochs, 1 seed",
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtp-bench-quality-") as tmp:
        if a.smoke:
            from _smoke import tiny_cifar

            a.data, a.limit, a.epochs, a.finetune = tiny_cifar(Path(tmp) / "cifar"), 120, 2, 0
            a.trials, a.seeds = 1, 1
        bench(a, Path(tmp))


def bench(a: argparse.Namespace, tmp: Path) -> None:
    """Search, refit and test (the module's docstring), every store under ``tmp``."""
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    targets = (0.9, 0.95)
    results: dict[str, list[tuple[float, float]]] = {}
    cache = tmp / "cache"
    smoke_agp = {"policy.update_every": 1} if a.smoke else {}
    found = {t: search(a, tmp / f"search-{t}", cache, t) for t in targets}
    for t in targets:
        print(f"search at {t:.0%}: best {found[t]}", flush=True)
    for seed in range(a.seeds):
        results.setdefault("dense", []).append(refit(a, cache, "dense", {}, seed))
        for t in targets:
            results.setdefault(f"oneshot_global {t:.0%}", []).append(
                refit(a, cache, "oneshot_global", {"policy.amount": t}, seed)
            )
            results.setdefault(f"searched {t:.0%}", []).append(
                refit(a, cache, "agp", {"policy.final_sparsity": t, **found[t], **smoke_agp}, seed)
            )
        print(f"seed {seed} done", flush=True)

    def stat(name: str, i: int) -> tuple[float, float]:
        values = [r[i] for r in results[name]]
        return statistics.fmean(values), statistics.pstdev(values)

    print(
        f"\nsimple_cnn, CIFAR-10 ImageFolder ({a.limit} training images, full test split), "
        f"{a.epochs}+{a.finetune} epochs for every policy, {a.seeds} seeds, search "
        f"{a.trials} trials per target"
    )
    print("| policy | test accuracy | sparsity |\n| --- | ---: | ---: |")
    for name in results:
        (acc, acc_sd), (sp, _) = stat(name, 0), stat(name, 1)
        print(f"| {name} | {acc:.4f} ± {acc_sd:.4f} | {sp:.4f} |")
    dense = stat("dense", 0)[0]
    gain90 = stat("searched 90%", 0)[0] - stat("oneshot_global 90%", 0)[0]
    gap90 = dense - stat("searched 90%", 0)[0]
    gain95 = stat("searched 95%", 0)[0] - stat("oneshot_global 95%", 0)[0]
    print(
        f"at 90%: searched - oneshot = {100 * gain90:+.1f} points; dense - searched = "
        f"{100 * gap90:+.1f} points (target <= 2)"
    )
    print(f"quality_gain_at_95: {100 * gain95:+.1f} points (target >= 8)")


if __name__ == "__main__":
    main()
