"""Tiny ImageFolder trees written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def tree_with_a_bad_file(root: Path) -> Path:
    """Valid JPEG and PNG files under ``root/{train,test}/{cat,dog}``, and
    train/cat/bad.jpg of garbage bytes: the first file of the first class (``img*`` sorts
    after ``bad``), so channel detection meets it too. Returns the bad file's path."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                img = Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8))
                img.save(d / (f"img{i}.jpg" if i % 2 else f"img{i}.png"))
    bad = root / "train" / "cat" / "bad.jpg"
    bad.write_bytes(b"\x00 not an image \xff" * 16)
    return bad.resolve()


def tiny_cifar_tree(root: Path, train: int = 6, test: int = 2) -> Path:
    """A CIFAR-10-shaped ImageFolder tree (32×32 RGB PNGs, ten classes) under ``root``."""
    rng = np.random.default_rng(2)
    for split, n in (("train", train), ("test", test)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
    return root
