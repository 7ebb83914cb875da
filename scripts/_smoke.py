"""What the benchmarks' ``--smoke`` runs share: a CIFAR-10-shaped ImageFolder tree small
enough to decode and train on in seconds, so that a script written for the CIFAR-10 copy
(../shared/data/cifar10) runs its every step without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def tiny_cifar(root: Path, train: int = 12, test: int = 4) -> Path:
    """``root/{train,test}/class<c>/<i>.png``: 32x32 RGB noise, ten classes, ``train`` and
    ``test`` images per class (3 or more train images per class: the 3-fold split needs
    them). Returns ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(10):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return Path(root)
