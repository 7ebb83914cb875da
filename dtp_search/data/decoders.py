"""Decoders: map-style datasets whose item ``i`` is image ``i`` decoded and resized to
uint8 ``[C, H, W]`` — what a streamed split reads its images with (:mod:`dtp_search.data.streaming`).

* :class:`FileDecoder` — ImageFolder files, decoded by ``torchvision.io.decode_image``
  exactly as the in-memory ImageFolder loader decodes them (same pixels);
* :class:`DatasetDecoder` — any map-style dataset of ``(image, label)`` (a torchvision
  class, a user's factory): PIL images or tensors (uint8, or float in [0, 1] quantised).

An item that cannot be decoded is a :class:`BadFile` or :class:`BadItem`, not an error,
so that a DataLoader worker hands it back to the main process to report or skip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch


class BadFile(NamedTuple):
    """A file that could not be decoded, and why."""

    path: str
    reason: str


class BadItem(NamedTuple):
    """An item of a user's dataset that is not an ``(image, label)`` pair the pipeline takes."""

    message: str


def read_file(path: str, mode: Any) -> torch.Tensor | BadFile:
    """The decoded image, or why it could not be decoded (a non-image, a truncated file)."""
    from torchvision.io import decode_image

    try:
        return decode_image(path, mode=mode)
    except (RuntimeError, OSError) as exc:
        # torchvision prefixes "decode_jpeg, <source file>.cpp:171, "; the rest says why.
        text = re.sub(r"^\w+, \S+:\d+, ", "", str(exc).strip())
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
        return BadFile(path, first)


def size_pair(image_size: int | Sequence[int] | None) -> list[int] | None:
    """``dataset.image_size`` as ``[H, W]`` (None: keep the images' own size)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return [int(image_size)] * 2
    return [int(s) for s in image_size]


def resized(img: torch.Tensor, size: list[int] | None) -> torch.Tensor:
    """``img`` (uint8 [C, H, W]) resized to ``size`` with antialiasing, as every loader does."""
    if size is not None and list(img.shape[1:]) != size:
        from torchvision.transforms.v2.functional import resize

        img = resize(img, size, antialias=True)
    return img


class FileDecoder:
    """Item ``i``: the image file ``paths[i]`` as uint8 ``[channels, H, W]`` (resized to
    ``size``), or a :class:`BadFile`."""

    def __init__(self, paths: Sequence[str], channels: int, size: list[int] | None) -> None:
        self.paths, self.channels, self.size = list(paths), int(channels), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | BadFile:
        from torchvision.io import ImageReadMode

        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        img = read_file(self.paths[i], mode)
        return img if isinstance(img, BadFile) else resized(img, self.size)

    def keep(self, positions: Sequence[int]) -> FileDecoder:
        """The decoder of the files at ``positions``."""
        return FileDecoder([self.paths[i] for i in positions], self.channels, self.size)

    def where(self, i: int) -> str:
        return self.paths[i]


ALLOWED_ITEM = "(image, label) with a PIL image or a tensor [C, H, W] (uint8, or float in [0, 1])"


def image_channels(image: Any) -> int | None:
    """1 (grayscale) or 3 (colour) as ``image`` comes; None when it is no image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    if isinstance(image, torch.Tensor) and image.ndim in (2, 3):
        return 1 if image.ndim == 2 or image.shape[0] < 3 else 3
    return None


def to_uint8(image: Any, channels: int) -> torch.Tensor | str:
    """``image`` (PIL, or a tensor: uint8, or float in [0, 1]) as uint8 ``[channels, H, W]``,
    or why it cannot be."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor, rgb_to_grayscale

    if isinstance(image, Image.Image):
        return pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    if not isinstance(image, torch.Tensor):
        return f"its image is a {type(image).__name__}"
    t = image.detach().cpu()
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] not in (1, 2, 3, 4):
        return f"its image is a tensor of shape {tuple(image.shape)}"
    if t.is_floating_point():
        lo, hi = float(t.min()), float(t.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also refuses NaN
            return f"its float image holds values in [{lo:g}, {hi:g}], not in [0, 1]"
        t = t.mul(255).round_().to(torch.uint8)
    elif t.dtype != torch.uint8:
        return f"its image is a {t.dtype} tensor"
    t = t[:1] if t.shape[0] == 2 else t[:3]  # drop an alpha channel
    if channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif channels == 1 and t.shape[0] == 3:
        t = rgb_to_grayscale(t)
    return t.contiguous()


class DatasetDecoder:
    """Item ``i``: the image of ``dataset[indices[i]]`` as uint8 ``[channels, H, W]``
    (resized to ``size``), or a :class:`BadItem` saying what is wrong with it.

    ``what`` names the split in messages, e.g. ``"dataset._target_=pkg.make: train"``."""

    def __init__(
        self, dataset: Any, indices: np.ndarray, channels: int, size: list[int] | None, what: str
    ) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.channels, self.size, self.what = int(channels), size, what

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor | BadItem:
        j = int(self.indices[i])
        item = self.dataset[j]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            return BadItem(
                f"{self.what} item {j} is a {type(item).__name__}; allowed: {ALLOWED_ITEM}"
            )
        img = to_uint8(item[0], self.channels)
        if isinstance(img, str):
            return BadItem(f"{self.what} item {j}: {img}; allowed: {ALLOWED_ITEM}")
        return resized(img, self.size)

    def keep(self, positions: Sequence[int]) -> DatasetDecoder:
        return DatasetDecoder(
            self.dataset,
            self.indices[np.asarray(positions, dtype=np.int64)],
            self.channels,
            self.size,
            self.what,
        )

    def where(self, i: int) -> str:
        return f"{self.what} item {int(self.indices[i])}"


Decoder = FileDecoder | DatasetDecoder
