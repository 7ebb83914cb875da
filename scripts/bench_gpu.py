"""GPU throughput: images/second of one resnet20 fold on CIFAR-10 through dtp_search's engine
(tensors on the GPU, batch-level augmentation, bf16 autocast, channels-last, AGP pruning),
and the share of the GPU's peak bf16 throughput that reaches.

Without a CUDA device it says so and exits 0. Training FLOPs per image are taken as 3x the
forward FLOPs counted by ``torch.utils.flop_counter`` (forward + two backward matmuls).

    python scripts/bench_gpu.py --epochs 3
    python scripts/bench_gpu.py --epochs 3 --compile
    python scripts/bench_gpu.py --smoke   # on the CPU, a tiny generated tree: checks the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script in seconds: on the CPU (even with a GPU), a tiny generated "
        "ImageFolder, 1 epoch, batch 16; its figures say nothing about a GPU",
    )
    a = ap.parse_args()
    if a.smoke:
        with tempfile.TemporaryDirectory(prefix="dtp-bench-smoke-") as tmp:
            from _smoke import tiny_cifar

            a.data, a.epochs, a.batch_size = tiny_cifar(Path(tmp) / "cifar", 6, 2), 1, 16
            print("smoke run: CPU, a tiny generated ImageFolder; not a GPU measurement")
            measure(a, torch.device("cpu"))
        return
    if not torch.cuda.is_available():
        print(
            "gpu_images_per_second: skipped (no CUDA device) (target: report images/s and "
            "share of peak)"
        )
        return
    if not (a.data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {a.data} (expected train/<class>/*.jpg)")
    measure(a, torch.device("cuda"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(a: argparse.Namespace, device: torch.device) -> None:
    """One resnet20 fold through dtp_search's engine on ``device``; prints its figures."""
    from hydra import compose, initialize_config_dir
    from torch.utils.flop_counter import FlopCounterMode

    from dtp_search.data import load_dataset
    from dtp_search.models import build_model
    from dtp_search.search.config import build_pruner, register_resolvers
    from dtp_search.settings import FrontSettings, TrainSettings, from_mapping
    from dtp_search.training import eval_batches, prune_and_train, train_batches

    register_resolvers()  # conf/config.yaml's ${abspath:...}, as the CLI does on start-up
    with (
        tempfile.TemporaryDirectory() as cache,
        initialize_config_dir(str(ROOT / "conf"), version_base="1.3"),
    ):
        cfg = compose(
            "config",
            overrides=[
                "+experiment=cifar",
                "model=resnet20",
                f"dataset.path={a.data.resolve()}",
                f"paths.cache_dir={cache}",
                f"train.epochs={a.epochs}",
                "train.finetune_epochs=0",
                f"train.batch_size={a.batch_size}",
                "policy.start_epoch=0",
                f"train.compile={str(a.compile).lower()}",
            ],
        )
        ds = load_dataset(cfg.dataset, cache_dir=cfg.paths.cache_dir)
    from sklearn.model_selection import StratifiedKFold

    labels = ds.train.labels.numpy()
    tr, va = next(StratifiedKFold(3, shuffle=True, random_state=0).split(labels, labels))
    settings = from_mapping(TrainSettings, cfg.train, "train")
    model = build_model(cfg.model, ds.input_shape, ds.num_classes).to(device)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *ds.input_shape, device=device))
    train_flops = 3 * counter.get_total_flops()
    pruner = build_pruner(model, cfg.policy, torch.zeros(1, *ds.input_shape, device=device))
    train = train_batches(ds, tr, settings, 0, device)
    val = eval_batches(ds, ds.train, va, settings, device)
    _sync(device)
    start = time.perf_counter()
    result = prune_and_train(model, pruner, train, val, settings, front=FrontSettings(points=0))
    _sync(device)
    seconds = time.perf_counter() - start
    images = a.epochs * len(train) * settings.batch_size
    ips = images / seconds
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_tflops(name)
    share = f"{ips * train_flops / (peak * 1e12):.2%}" if peak else "an unknown share"
    print(
        f"\nresnet20, CIFAR-10 fold 1 of 3 ({len(tr)} images), {a.epochs} epochs, batch "
        f"{a.batch_size}, {name}, compile={a.compile}: {seconds:.1f} s (evaluations and "
        f"mask updates included), val accuracy {result.accuracy:.3f}"
    )
    print(
        f"training FLOPs/image {train_flops / 1e6:.1f} M; peak bf16 "
        f"{peak if peak else '?'} TFLOP/s; share of peak {share}"
    )
    print(f"gpu_images_per_second: {ips:.0f} ({share} of peak)")


if __name__ == "__main__":
    main()
