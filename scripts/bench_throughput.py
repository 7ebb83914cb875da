"""Trial throughput: one fold of ``simple_cnn`` on CIFAR-10, dtp_search's engine versus the
way tutorials write it, side by side in one run.

* **dtp_search**: the cifar experiment's config (Hydra compose), the split decoded once into
  the disk cache and held as one uint8 tensor, batches cut, cropped, flipped and normalised
  as whole tensors (:class:`dtp_search.data.TensorBatches`), the AGP pruning policy
  updating masks while it trains (:func:`dtp_search.training.prune_and_train`).
* **tutorial**: ``torchvision.datasets.ImageFolder`` + ``DataLoader(num_workers=2)`` + PIL
  transforms (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``), the same model, optimiser (SGD, Nesterov, cosine LR) and batch size, dense
  (no pruning at all), the same validation pass after every epoch.

Both train on the same stratified training part of the same images for the same number of
epochs and validate on the same held-out part. Images/second counts training images
(epochs x training part) over the wall time of the whole fold, data loading included (for
dtp_search: loading the cached split; the one-time decode is reported separately).

    python scripts/bench_throughput.py                       # ../shared/data/cifar10
    python scripts/bench_throughput.py --limit 50000 --epochs 2
    python scripts/bench_throughput.py --smoke     # seconds: a tiny generated tree, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def compose(data: Path, cache: Path, limit: int, epochs: int, batch_size: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dtp_search.search.config import register_resolvers

    # conf/config.yaml's ${abspath:...}: the CLI registers its resolvers on start-up, a
    # script that composes the config itself has to do the same.
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            "config",
            overrides=[
                "+experiment=cifar",
                f"dataset.path={data}",
                f"dataset.train_limit={limit}",
                f"paths.cache_dir={cache}",
                f"train.epochs={epochs}",
                "train.finetune_epochs=0",
                f"train.batch_size={batch_size}",
                "policy.start_epoch=0",
                f"policy.end_epoch={max(1, epochs)}",
            ],
        )


def fold_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first fold of the 3-fold StratifiedKFold the cifar experiment uses."""
    from sklearn.model_selection import StratifiedKFold

    return next(StratifiedKFold(3, shuffle=True, random_state=seed).split(labels, labels))


def run_dtp(cfg, device: torch.device) -> tuple[float, float, int, float]:
    """(seconds, validation accuracy, training images, seconds of the one-time decode)."""
    from dtp_search.data import load_dataset
    from dtp_search.models import build_model
    from dtp_search.search.config import build_pruner
    from dtp_search.settings import FrontSettings, TrainSettings, from_mapping
    from dtp_search.training import eval_batches, prune_and_train, train_batches

    start = time.perf_counter()
    load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)  # decode once into the cache
    decode = time.perf_counter() - start

    start = time.perf_counter()
    ds = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    tr, va = fold_indices(ds.train.labels.numpy())
    settings = from_mapping(TrainSettings, cfg.train, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes).to(device)
    pruner = build_pruner(model, cfg.policy, torch.zeros(1, *ds.input_shape, device=device))
    result = prune_and_train(
        model,
        pruner,
        train_batches(ds, tr, settings, 0, device),
        eval_batches(ds, ds.train, va, settings, device),
        settings,
        front=FrontSettings(points=0),
    )
    seconds = time.perf_counter() - start
    return seconds, result.accuracy, len(tr) // settings.batch_size * settings.batch_size, decode


def run_tutorial(cfg, device: torch.device) -> tuple[float, float, int]:
    """The same fold, written the way the PyTorch CIFAR-10 tutorial does it."""
    import torchvision
    from torchvision import transforms as T

    from dtp_search.data import stratified_subset
    from dtp_search.models import build_model

    start = time.perf_counter()
    mean, std = list(cfg.dataset.mean), list(cfg.dataset.std)
    train_tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    root = Path(cfg.dataset.path) / "train"
    full = torchvision.datasets.ImageFolder(root, transform=train_tf)
    # The same stratified subset of the same files as dtp_search's train_limit.
    idx = stratified_subset(np.asarray(full.targets), int(cfg.dataset.train_limit))
    labels = np.array([full.targets[i] for i in idx])
    tr, va = fold_indices(labels)
    train_set = torch.utils.data.Subset(full, idx[tr])
    val_set = torch.utils.data.Subset(
        torchvision.datasets.ImageFolder(root, transform=eval_tf), idx[va]
    )
    bs = int(cfg.train.batch_size)
    workers = min(2, os.cpu_count() or 1)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=bs,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=int(cfg.train.eval_batch_size),
        num_workers=workers,
        persistent_workers=True,
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, (3, 32, 32), 10).to(device)
    epochs = int(cfg.train.epochs)
    opt = torch.optim.SGD(
        model.parameters(), lr=float(cfg.train.lr), momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        accuracy = correct / len(val_set)
    seconds = time.perf_counter() - start
    return seconds, accuracy, len(train_loader) * bs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--limit", type=int, default=15000, help="training images (stratified)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script in seconds: a tiny generated ImageFolder, 1 epoch, batch 16",
    )
    a = ap.parse_args()
    smoke_dir = None
    if a.smoke:
        from _smoke import tiny_cifar

        smoke_dir = Path(tempfile.mkdtemp(prefix="dtp-bench-smoke-"))
        a.data, a.limit, a.epochs, a.batch_size = tiny_cifar(smoke_dir / "cifar"), 90, 1, 16
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    from dtp_search.training import resolve_device

    device = resolve_device(a.device)
    threads = torch.get_num_threads()
    cache = Path(tempfile.mkdtemp(prefix="dtp-bench-cache-"))
    try:
        cfg = compose(a.data.resolve(), cache, a.limit, a.epochs, a.batch_size)
        t_dtp, acc_dtp, n_dtp, decode = run_dtp(cfg, device)
        t_tut, acc_tut, n_tut = run_tutorial(cfg, device)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if smoke_dir is not None:
            shutil.rmtree(smoke_dir, ignore_errors=True)
    ips_dtp = a.epochs * n_dtp / t_dtp
    ips_tut = a.epochs * n_tut / t_tut
    print(
        f"\nsimple_cnn, CIFAR-10 ImageFolder ({a.limit} training images, fold 1 of 3), "
        f"{a.epochs} epochs, batch {a.batch_size}, device {device}, {threads} torch threads"
    )
    print("| engine | fold wall time | images/s | val accuracy |\n| --- | ---: | ---: | ---: |")
    print(
        f"| dtp_search (AGP pruning, cached tensors) | {t_dtp:.1f} s | {ips_dtp:.0f} | "
        f"{acc_dtp:.3f} |"
    )
    print(
        f"| tutorial (ImageFolder + DataLoader + PIL, dense) | {t_tut:.1f} s | {ips_tut:.0f} | "
        f"{acc_tut:.3f} |"
    )
    print(f"one-time decode into the cache: {decode:.1f} s")
    print(f"throughput_ratio: {ips_dtp / ips_tut:.2f} (target >= 5)")


if __name__ == "__main__":
    main()
