"""Splits read from their source on demand, for data larger than memory.

A split is either decoded whole into memory (:class:`~dtp_search.data.Split`, uint8
``[N, C, H, W]``) or kept as a :class:`StreamedSplit`: its labels (a small tensor), the
shape of one image, and a *decoder* — a map-style dataset whose item ``i`` is image
``i`` decoded and resized to uint8 ``[C, H, W]``. A torch ``DataLoader`` runs the decoder
in ``num_workers`` worker processes (:func:`decoded_chunks`); everything random
(shuffling, crop/flip) happens on the main process, which is what makes streamed batches
equal to in-memory ones (:class:`dtp_search.data.batches.StreamBatches`).

The decoders themselves (:class:`~dtp_search.data.decoders.FileDecoder`,
:class:`~dtp_search.data.decoders.DatasetDecoder`) live in :mod:`dtp_search.data.decoders`.

:func:`scan` decodes a dataset's streamed splits once when it is loaded: it finds the
files that cannot be decoded, checks that every image has the split's shape, sums the
training pixels for the channel statistics, and hashes the content exactly as
:func:`~dtp_search.data.splits.tensor_digest` hashes the in-memory tensors.

Worker processes are forked on Linux (the DataLoader default); where they are spawned
(macOS, Windows) a user's dataset must be picklable.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dtp_search.data.decoders import BadFile, BadItem, Decoder
from dtp_search.data.splits import PixelSums, Split
from dtp_search.errors import DatasetError

# Images a worker decodes per task: bounds what is in flight (workers × 2 chunks),
# whatever the batch size.
CHUNK = 64


def default_workers(num_workers: int | None) -> int:
    """``dataset.num_workers``, null = min(4, the CPU cores this process may use)."""
    if num_workers is not None:
        return int(num_workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def _pack(items: list[Any]) -> torch.Tensor | list[Any]:
    # One stacked tensor crosses from a worker as one shared-memory block, not one per image.
    if all(isinstance(t, torch.Tensor) for t in items) and len({t.shape for t in items}) == 1:
        return torch.stack(items)
    return items


def _stack(items: list[Any]) -> torch.Tensor | BadFile | BadItem:
    for item in items:
        if not isinstance(item, torch.Tensor):
            return item
    shapes = sorted({tuple(t.shape) for t in items})
    if len(shapes) > 1:  # the load checked every image: a file changed since
        return BadItem(
            f"streamed images of different shapes {[_shape(s) for s in shapes[:3]]} (C×H×W): "
            "the files changed since the split was loaded; allowed: data that does not "
            "change during a run"
        )
    return torch.stack(items)


def _loader(
    decoder: Decoder,
    chunks: list[list[int]],
    num_workers: int,
    collate: Any,
    pin_memory: bool = False,
) -> Any:
    from torch.utils.data import DataLoader

    if not chunks:
        return iter(())
    workers = min(num_workers, len(chunks))
    return DataLoader(
        decoder,
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


def decoded_chunks(
    decoder: Decoder, positions: Sequence[int] | np.ndarray, num_workers: int, chunk: int = CHUNK
) -> Iterator[Sequence[torch.Tensor | BadFile | BadItem]]:
    """The decoder's items at ``positions``, in order, ``chunk`` at a time, decoded in
    ``num_workers`` worker processes (0: here): a stacked uint8 tensor when every item of
    the chunk is an image of one shape, else a list."""
    pos = [int(p) for p in positions]
    chunks = [pos[i : i + chunk] for i in range(0, len(pos), chunk)]
    yield from _loader(decoder, chunks, num_workers, _pack)


def stacked_chunks(
    decoder: Decoder, chunks: list[list[int]], num_workers: int, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """One uint8 ``[len(chunk), C, H, W]`` batch per chunk of positions, in order."""
    for x in _loader(decoder, chunks, num_workers, _stack, pin_memory):
        if isinstance(x, BadItem):
            raise DatasetError(x.message)
        if isinstance(x, BadFile):
            raise DatasetError(f"cannot decode the image {x.path} ({x.reason}) while streaming it")
        yield x


@dataclass
class Source:
    """A split not decoded yet: its decoder, labels, the shape of one decoded image and
    whether an undecodable file is left out (``skip_bad``) rather than an error."""

    decoder: Decoder
    labels: np.ndarray
    shape: tuple[int, int, int]
    skip_bad: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the split decoded into memory (uint8 images)."""
        return len(self.labels) * int(np.prod(self.shape))


class StreamedSplit:
    """One split read from its source on demand: ``labels`` int64 [N] (in memory),
    ``shape`` (C, H, W) of every image, and the ``decoder`` the DataLoader runs in
    ``num_workers`` worker processes. No ``images`` tensor: see :class:`Split`."""

    def __init__(
        self, decoder: Decoder, labels: torch.Tensor, shape: tuple[int, int, int], num_workers: int
    ) -> None:
        self.decoder, self.labels = decoder, labels
        self.shape = tuple(int(s) for s in shape)
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes the split would take decoded into memory."""
        return len(self) * int(np.prod(self.shape))

    def __repr__(self) -> str:
        return f"StreamedSplit({len(self)} images of {self.shape}, {self.num_workers} workers)"


def decode_into_memory(source: Source, num_workers: int) -> Split:
    """Decode a (user's) split whole into uint8 ``[N, C, H, W]``; a bad item raises."""
    n = len(source.labels)
    images = torch.empty((n, *source.shape), dtype=torch.uint8)
    at = 0
    for items in decoded_chunks(source.decoder, range(n), num_workers):
        if isinstance(items, torch.Tensor) and tuple(items.shape[1:]) == tuple(source.shape):
            images[at : at + len(items)] = items
            at += len(items)
            continue
        for img in items:
            _check_item(source.decoder, at, img, source.shape)
            images[at] = img
            at += 1
    return Split(images, torch.from_numpy(np.asarray(source.labels, dtype=np.int64)))


def _check_item(decoder: Decoder, i: int, img: Any, shape: tuple[int, ...]) -> None:
    if isinstance(img, BadItem):
        raise DatasetError(img.message)
    if isinstance(img, torch.Tensor) and tuple(img.shape) != tuple(shape):
        raise DatasetError(
            f"images have different sizes: {decoder.where(i)} is {_shape(img.shape)}, the "
            f"split's first image {_shape(shape)}; set dataset.image_size to resize them"
        )


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


@dataclass
class ScanResult:
    """What :func:`scan` found: the splits (streamed ones with their bad files left out),
    the dataset's content digest, the training split's pixel sums, and the left-out paths."""

    train: Split | StreamedSplit
    test: Split | StreamedSplit
    digest: str
    train_sums: PixelSums
    skipped: dict[str, list[str]]


def scan(
    train: Split | Source, test: Split | Source, num_workers: int, bad_file_error: Any
) -> ScanResult:
    """Decode every streamed split once: validate it (bad files, shapes), sum the training
    pixels and hash the content — the digest equals ``tensor_digest(train.images,
    train.labels, test.images, test.labels)`` of the same data decoded into memory.

    ``bad_file_error(BadFile)`` makes the error for an undecodable file of a source
    without ``skip_bad``."""
    h = hashlib.sha1()
    sums = PixelSums.empty()
    out: dict[str, Split | StreamedSplit] = {}
    skipped: dict[str, list[str]] = {}
    for name, split in (("train", train), ("test", test)):
        if isinstance(split, Split):
            h.update(split.images.contiguous().numpy().tobytes())
            h.update(split.labels.numpy().tobytes())
            if name == "train":
                sums = PixelSums.of(split.images)
            out[name] = split
            continue
        good: list[int] = []
        bad: list[str] = []
        at = 0
        for items in decoded_chunks(split.decoder, range(len(split.labels)), num_workers):
            batch = []
            for img in items:
                if isinstance(img, BadFile):
                    if not split.skip_bad:
                        raise bad_file_error(img)
                    bad.append(img.path)
                else:
                    _check_item(split.decoder, at, img, split.shape)
                    good.append(at)
                    batch.append(img)
                at += 1
            if batch:
                x = (
                    items
                    if len(batch) == len(items) and isinstance(items, torch.Tensor)
                    else torch.stack(batch)
                )
                h.update(x.numpy().tobytes())
                if name == "train":
                    sums = sums + PixelSums.of(x)
        labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64)[good])
        h.update(labels.numpy().tobytes())
        decoder = split.decoder.keep(good) if bad else split.decoder
        out[name] = StreamedSplit(decoder, labels, split.shape, num_workers)
        skipped[name] = bad
    return ScanResult(out["train"], out["test"], h.hexdigest(), sums, skipped)


def memory_budget(memory_limit: float | None) -> int:
    """``dataset.memory_limit`` in bytes (GiB given); null = a quarter of the RAM."""
    if memory_limit is not None:
        return int(float(memory_limit) * 2**30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        total = 8 * 2**30
    return total // 4
