"""Peak memory of one study on an ImageFolder tree, decoded into memory versus streamed.

Runs the same tiny study (1 trial, 2 folds, 1 epoch, ``model=mlp`` 16 wide, no refit) twice as
``python -m dtp_search`` subprocesses, each in a fresh ``paths.root`` (no decoded-tensor
or scan cache to start from): once with ``dataset.in_memory=true`` and once with
``dataset.in_memory=false`` (``dataset.num_workers`` DataLoader workers). The images are
resized up (``--image-size``) so that their decoded size is large. Printed side by side:

* decoded size — ``(train + test images) × C × H × W`` bytes, what the in-memory path holds;
* peak RSS (tree) — the largest sum of the resident set sizes of the study process and
  all its descendants (DataLoader workers), sampled from ``/proc`` every 200 ms. Forked
  workers share pages with their parent, which this sum counts once per process, so it
  overstates the memory in use;
* peak PSS (tree) — the same with the proportional set size (shared pages split between
  the processes sharing them, ``/proc/<pid>/smaps_rollup``): the fairer figure;
* peak RSS (largest process) — ``ru_maxrss`` of the study process as ``os.wait4`` returns
  it (the ``RUSAGE_CHILDREN`` figure of that one run): the largest resident set of any one
  process of the tree;
* wall time, and the ratio of each peak to the decoded size.

Usage::

    python scripts/bench_stream_memory.py --data ../shared/data/cifar10 \\
        --image-size 128 --train-limit 40000 --test-limit 8000
    python scripts/bench_stream_memory.py --smoke   # a tiny tree of its own, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

GiB = 2**30
MiB = 2**20


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
        return kb("Rss"), kb("Pss")
    except (OSError, ValueError):
        return 0, 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process tree until ``done`` is set."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.done = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_processes = 0

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            mem = [_memory(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem))
            self.peak_pss = max(self.peak_pss, sum(m[1] for m in mem))
            self.peak_processes = max(self.peak_processes, sum(1 for m in mem if m[0]))
            self.done.wait(self.every)


def study_args(data: Path, a: argparse.Namespace, in_memory: bool) -> list[str]:
    return [
        "dataset=imagefolder",
        f"dataset.path={data}",
        f"dataset.image_size={a.image_size}",
        f"dataset.train_limit={a.train_limit}",
        f"dataset.test_limit={a.test_limit}",
        f"dataset.in_memory={str(in_memory).lower()}",
        f"dataset.num_workers={a.workers}",
        # A narrow MLP: the study's compute stays small next to the data it reads.
        "model=mlp",
        "model.hidden=[16]",
        "search.n_trials=1",
        "cv.folds=2",
        "train.epochs=1",
        "train.finetune_epochs=0",
        f"train.batch_size={a.batch_size}",
        "front.points=0",
        "refit.enabled=false",
        "console.progress=false",
        "study.name=bench-stream",
        f"threads={a.threads}",
    ]


def run_one(data: Path, a: argparse.Namespace, in_memory: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"dtp-stream-{'mem' if in_memory else 'stream'}-"))
    cmd = [
        sys.executable,
        "-m",
        "dtp_search",
        f"paths.root={root}",
        *study_args(data, a, in_memory),
    ]
    start = time.perf_counter()
    with open(root / "run.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4, not proc.wait: its rusage is this run's alone (the process and the
        # descendants it reaped), where getrusage(RUSAGE_CHILDREN) keeps the maximum so far.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(
            f"in_memory={in_memory}: the study failed ({code}); its folder {root} is "
            f"kept:\n{(root / 'run.log').read_text()[-3000:]}"
        )
    shutil.rmtree(root, ignore_errors=True)  # the decoded-tensor cache is as big as the data
    return {
        "rss": sampler.peak_rss,
        "pss": sampler.peak_pss,
        "largest": usage.ru_maxrss * 1024,
        "wall": wall,  # ru_maxrss: kB on Linux
        "processes": sampler.peak_processes,
    }


def decoded_bytes(data: Path, a: argparse.Namespace) -> tuple[int, int]:
    """(images, bytes) the in-memory path holds: the limited splits at C × S × S."""
    n = 0
    for split, limit in (("train", a.train_limit), ("test", a.test_limit)):
        files = sum(len(os.listdir(d)) for d in (data / split).iterdir() if d.is_dir())
        n += min(files, limit)
    return n, n * 3 * a.image_size * a.image_size


def smoke_tree(root: Path) -> Path:
    """A tiny CIFAR-shaped JPEG tree (3 classes, 12 + 4 images each, 16×16)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/cifar10"),
        help="ImageFolder tree with train/ and test/",
    )
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=40000)
    p.add_argument("--test-limit", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="dataset.num_workers when streaming")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the study")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny tree of its own at 24 px: checks that both paths run",
    )
    a = p.parse_args(argv)
    tmp = None
    if a.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="dtp-stream-smoke-")
        a.data = smoke_tree(Path(tmp.name) / "tree")
        a.image_size, a.train_limit, a.test_limit, a.batch_size = 24, 36, 12, 8
        a.workers, a.threads = 1, 1
    data = a.data.expanduser().resolve()
    if not (data / "train").is_dir():
        sys.exit(f"no ImageFolder tree at {data} (needs train/<class>/* and test/<class>/*)")
    n, size = decoded_bytes(data, a)
    print(
        f"data: {data}, {n} images at 3×{a.image_size}×{a.image_size}; "
        f"decoded size {size / MiB:.0f} MiB; streaming with {a.workers} workers"
    )
    rows = {}
    for in_memory in (True, False):
        rows[in_memory] = run_one(data, a, in_memory)
    print()
    print(
        "| dataset.in_memory | decoded size (MiB) | peak RSS, tree (MiB) | peak PSS, tree (MiB) "
        "| peak RSS, largest process (MiB) | processes | wall (s) | PSS / decoded |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for in_memory, r in rows.items():
        print(
            f"| {str(in_memory).lower()} | {size / MiB:.0f} | {r['rss'] / MiB:.0f} | "
            f"{r['pss'] / MiB:.0f} | {r['largest'] / MiB:.0f} | {r['processes']} | "
            f"{r['wall']:.1f} | {r['pss'] / size:.2f} |"
        )
    mem, stream = rows[True], rows[False]
    print()
    print(
        f"streamed / in memory: peak PSS {stream['pss'] / mem['pss']:.2f}x, "
        f"peak RSS (tree) {stream['rss'] / mem['rss']:.2f}x, wall {stream['wall'] / mem['wall']:.2f}x"
    )
    print(f"streamed peak PSS over decoded size: {stream['pss'] / size:.2f} (target: well under 1)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
