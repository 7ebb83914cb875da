"""Decoding image files into one uint8 tensor on a few threads, and the errors and
warning of files that cannot be decoded."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dtp_search.data.decoders import BadFile, FileDecoder, read_file, size_pair
from dtp_search.errors import DatasetError

log = logging.getLogger(__name__)


def bad_file_error(bad: BadFile) -> DatasetError:
    return DatasetError(
        f"cannot decode the image {bad.path} ({bad.reason}); fix or remove it, "
        "or set dataset.skip_bad_files=true to leave unreadable files out"
    )


def nothing_decoded(paths: list[str]) -> DatasetError:
    return DatasetError(
        f"none of the {len(paths)} files under {os.path.commonpath(paths)} "
        "can be decoded as an image"
    )


def warn_skipped(root: Path, skipped: list[str], kept: int) -> None:
    if skipped:
        log.warning(
            "skipped %d unreadable file(s) under %s, kept %d (first: %s); "
            "dataset.skip_bad_files=true",
            len(skipped),
            root,
            kept,
            skipped[0],
        )


def file_channels(paths: list[str], channels: int | None, skip_bad_files: bool) -> int:
    """``channels``, or (None) those of the first readable image: 1-2 channels = grayscale."""
    from torchvision.io import ImageReadMode

    if channels is None:
        for p in paths:
            first = read_file(p, ImageReadMode.UNCHANGED)
            if isinstance(first, torch.Tensor):
                channels = 1 if first.shape[0] < 3 else 3
                break
            if not skip_bad_files:
                raise bad_file_error(first)
        else:
            raise nothing_decoded(paths)
    if channels not in (1, 3):
        raise DatasetError(f"dataset.channels={channels} is not supported; allowed: 1, 3, null")
    return channels


def decode_all(
    paths: list[str], channels: int | None, image_size: Any, skip_bad_files: bool = False
) -> tuple[torch.Tensor, list[int], list[str]]:
    """``(images, indices of the decoded paths, skipped paths)``; a bad file raises
    :class:`DatasetError` unless ``skip_bad_files``. Decodes exactly as
    :class:`~dtp_search.data.decoders.FileDecoder` does (the streamed path), on threads."""
    decoder = FileDecoder(
        paths, file_channels(paths, channels, skip_bad_files), size_pair(image_size)
    )
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(decoder.__getitem__, range(len(paths))))
    bad = [r for r in results if isinstance(r, BadFile)]
    if bad and not skip_bad_files:
        raise bad_file_error(bad[0])  # the first in file order, whichever thread met it
    good = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    if not good:
        raise nothing_decoded(paths)
    decoded = [results[i] for i in good]
    shapes = {tuple(t.shape) for t in decoded}
    if len(shapes) > 1:
        raise DatasetError(
            f"images have different sizes {sorted(shapes)[:3]}...; "
            "set dataset.image_size to resize them"
        )
    return torch.stack(decoded), good, [b.path for b in bad]
