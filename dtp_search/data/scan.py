"""Which splits go into memory (the plan of ``dataset.in_memory``), and the scan of the
streamed ones — decoded once at load to validate them — through a JSON cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search.data.decode import bad_file_error, warn_skipped
from dtp_search.data.splits import PixelSums, Split
from dtp_search.data.streaming import Source, StreamedSplit, memory_budget, scan
from dtp_search.errors import DatasetError, writing
from dtp_search.settings import DatasetSettings

SCAN_VERSION = 2


class ScanPlan:
    """Which splits go into memory (``dataset.in_memory``, ``dataset.memory_limit``), and
    the scan-cache key of an ImageFolder load."""

    def __init__(self, cfg: DatasetSettings) -> None:
        self.mode = cfg.in_memory
        self.left = memory_budget(cfg.memory_limit)
        self.scan_key: dict[str, Any] | None = None

    def keep(self, nbytes: int) -> bool:
        """Decode a split of ``nbytes`` into memory? (``auto``: when it fits what is left.)"""
        if self.mode is True or self.mode is False:
            return self.mode
        if nbytes <= self.left:
            self.left -= nbytes
            return True
        return False


def scan_splits(
    train: Split | Source,
    test: Split | Source,
    num_workers: int,
    key: dict[str, Any] | None,
    cache_dir: Any,
    classes: Sequence[str],
) -> tuple[Split | StreamedSplit, Split | StreamedSplit, str, PixelSums]:
    """:func:`~dtp_search.data.streaming.scan`, through a JSON cache when ``key`` says what
    the splits are (ImageFolder trees): the digest, the training sums and the left-out files."""
    cache_file = None
    if key is not None and cache_dir is not None:
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"scan-{digest}.json"
        if cache_file.exists():
            blob = json.loads(cache_file.read_text())
            splits = [
                _apply_skipped(s, blob["skipped"].get(name, []), num_workers)
                for name, s in (("train", train), ("test", test))
            ]
            sums = PixelSums(tuple(blob["sums"][0]), tuple(blob["sums"][1]), int(blob["sums"][2]))
            _after_scan(splits, blob["skipped"], classes)
            return splits[0], splits[1], blob["digest"], sums
    result = scan(train, test, num_workers, bad_file_error)
    _after_scan([result.train, result.test], result.skipped, classes)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        s = result.train_sums
        blob = {
            "digest": result.digest,
            "skipped": result.skipped,
            "sums": [list(s.total), list(s.squares), s.count],
        }
        try:
            with writing(cache_file):
                tmp.write_text(json.dumps(blob))
                os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)  # (a full disk leaves no half-written file behind)
    return result.train, result.test, result.digest, result.train_sums


def _apply_skipped(
    split: Split | Source, skipped: list[str], num_workers: int
) -> Split | StreamedSplit:
    if isinstance(split, Split):
        return split
    decoder, labels = split.decoder, np.asarray(split.labels, dtype=np.int64)
    if skipped:
        gone = set(skipped)
        good = [i for i in range(len(decoder)) if decoder.where(i) not in gone]
        decoder, labels = decoder.keep(good), labels[good]
    return StreamedSplit(decoder, torch.from_numpy(labels), split.shape, num_workers)


def _after_scan(
    splits: list[Any], skipped: Mapping[str, list[str]], classes: Sequence[str]
) -> None:
    """The warning and the empty-class check of left-out files, as for in-memory splits."""
    for name, split in zip(("train", "test"), splits, strict=True):
        bad = skipped.get(name, [])
        if not bad or not isinstance(split, StreamedSplit):
            continue
        root = Path(os.path.commonpath([*bad, *split.decoder.paths[:1]]))
        warn_skipped(root, bad, len(split))
        empty = sorted(set(range(len(classes))) - set(split.labels.tolist()))
        if empty:
            raise DatasetError(
                f"class folder(s) {[classes[c] for c in empty]} under {root} hold no readable image"
            )
