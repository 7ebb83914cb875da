"""A split in memory, and what is computed from splits the same way on every path:
stratified subsets, channel statistics and content digests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """One split as tensors: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-1 of the tensors' bytes, in order (warm-start keys, dataset records)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified subset of at most ``limit`` samples (all when None)."""
    n = len(labels)
    if not limit or limit >= n:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(
        np.arange(n), train_size=int(limit), stratify=labels, random_state=seed
    )
    return np.sort(idx)


@dataclass(frozen=True)
class PixelSums:
    """Per-channel sums of uint8 pixel values and of their squares, and the pixel count:
    exact integers, so they add up chunk by chunk to the same totals in any order (a
    streamed split's statistics equal the in-memory split's bit for bit)."""

    total: tuple[int, ...]
    squares: tuple[int, ...]
    count: int

    @classmethod
    def empty(cls) -> PixelSums:
        return cls((), (), 0)

    @classmethod
    def of(cls, images: torch.Tensor, chunk: int = 1024) -> PixelSums:
        """The sums of uint8 ``images`` [N, C, H, W], ``chunk`` images at a time."""
        # A histogram of the 256 values per channel: exact, and no wide copy of the images.
        c = images.shape[1]
        hist = torch.zeros(c, 256, dtype=torch.int64)
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk]
            for ch in range(c):
                hist[ch] += torch.bincount(x[:, ch].reshape(-1), minlength=256)
        v = torch.arange(256, dtype=torch.int64)
        count = len(images) * images.shape[2] * images.shape[3]
        return cls(
            tuple((hist * v).sum(dim=1).tolist()),
            tuple((hist * v * v).sum(dim=1).tolist()),
            int(count),
        )

    def __add__(self, other: PixelSums) -> PixelSums:
        if not self.count:
            return other
        if not other.count:
            return self
        return PixelSums(
            tuple(a + b for a, b in zip(self.total, other.total, strict=True)),
            tuple(a + b for a, b in zip(self.squares, other.squares, strict=True)),
            self.count + other.count,
        )

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (unbiased) std in [0, 1] units; std at least 1e-6."""
        n = self.count
        mean = tuple(s / n / 255 for s in self.total)
        # Exact integer numerator, one rounding: (n·Σx² − (Σx)²) / (n(n−1)).
        var = tuple(
            (n * q - s * s) / (n * max(n - 1, 1))
            for s, q in zip(self.total, self.squares, strict=True)
        )
        std = tuple(max((v**0.5) / 255, 1e-6) for v in var)
        return mean, std


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    return PixelSums.of(images).stats()
