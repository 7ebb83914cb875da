"""ImageFolder trees: listing a split, streaming it as a source, or decoding it into
memory through the decoded-tensor cache, keyed by every file's stat."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search.data.checks import check_same_classes, source_key
from dtp_search.data.decode import (
    bad_file_error,
    decode_all,
    file_channels,
    nothing_decoded,
    warn_skipped,
)
from dtp_search.data.decoders import FileDecoder, size_pair
from dtp_search.data.scan import SCAN_VERSION, ScanPlan
from dtp_search.data.splits import Split, stratified_subset
from dtp_search.data.streaming import Source
from dtp_search.errors import DatasetError
from dtp_search.files import atomic_save
from dtp_search.settings import DatasetSettings

log = logging.getLogger(__name__)

# 2: keyed by every file's stat (1: by folder mtimes, blind to files overwritten in place).
_CACHE_VERSION = 2


def _files_stamp(root: Path) -> str:
    """SHA-1 of ``(path under root, size, mtime_ns, ctime_ns)`` of every file under ``root``.

    What the caches of a tree are keyed by, so that a file overwritten in place is decoded
    again (a folder's mtime changes only when names come or go). One ``stat`` per file: on
    CIFAR-10's 60,000 files about 0.3 s for both splits, against minutes to decode them; a
    content hash would read every byte. ``ctime`` is there because no tool can set it: an
    edit that keeps the size and puts the old mtime back (``cp -p``, ``rsync -a``,
    ``touch -r``) still changes it. A metadata-only change (``chmod``) costs one decode.

    Written by hand: neither torchvision's ImageFolder (which lists, never stats) nor the
    standard library (``filecmp`` compares two trees) stamps one. Symbolic links are
    followed as ImageFolder follows them (``os.walk(followlinks=True)``).
    """
    h = hashlib.sha1()
    folders = [(root, "")]
    while folders:
        folder, prefix = folders.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        lines = []
        for entry in entries:
            name = prefix + entry.name
            try:
                if entry.is_dir():
                    folders.append((Path(entry.path), name + "/"))
                    continue
                st = entry.stat()
            except OSError:  # a dangling link, a file gone meanwhile: what ImageFolder meets
                lines.append(f"{name}\0-\n")
                continue
            lines.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
        h.update("".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _imagefolder_key(
    root: Path, channels: int | None, image_size: Any, limit: int | None, skip_bad_files: bool
) -> dict[str, Any]:
    """What an ImageFolder split's decoded content depends on (the caches' key): its files
    as :func:`_files_stamp` sees them, and how they are decoded."""
    key = {
        "v": _CACHE_VERSION,
        "root": str(root),
        "files": _files_stamp(root),
        "channels": channels,
        "size": image_size,
        "limit": limit,
    }
    if skip_bad_files:  # only then: the caches of strict loads keep their names
        key["skip_bad_files"] = True
    return key


def load_imagefolder_splits(
    cfg: DatasetSettings, root: Path, cache_dir: Any, plan: ScanPlan | None = None
) -> tuple[Split | Source, Split | Source, list[str]]:
    """Both splits of an ImageFolder tree: decoded into memory (through the tensor cache)
    or, where the plan says so, as sources to stream (their scan cached by ``plan.scan_key``)."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"dataset.path={str(root)!r} does not exist. Give a folder with "
            "train/<class>/* and test/<class>/* images"
            + (
                ", or drop dataset.path to download CIFAR-10 with torchvision"
                if cfg.kind == "cifar10"
                else ""
            )
        )
    skip = cfg.skip_bad_files
    out, classes, keys = [], None, {}
    for split in ("train", "test"):
        split_root = root / split
        if not split_root.is_dir():
            raise DatasetError(
                f"dataset.path={str(root)!r} has no {split}/ folder; an ImageFolder "
                "tree needs train/<class>/* and test/<class>/*"
            )
        limit = getattr(cfg, f"{split}_limit")
        keys[split] = _imagefolder_key(
            split_root.resolve(), cfg.channels, cfg.image_size, limit, skip
        )
        source = None
        if plan is not None and plan.mode is not True:
            source, split_classes = imagefolder_source(
                split_root,
                channels=cfg.channels,
                image_size=cfg.image_size,
                limit=limit,
                skip_bad_files=skip,
            )
            if plan.keep(source.nbytes):
                source = None
        if source is None:
            s, split_classes = _decode_imagefolder(
                split_root.resolve(),
                keys[split],
                cfg.channels,
                cfg.image_size,
                limit,
                cache_dir,
                skip,
            )
        else:
            s = source
        if classes is not None:
            check_same_classes(classes, split_classes, source_key(cfg))
        classes = split_classes
        out.append(s)
    if plan is not None:
        plan.scan_key = {"v": SCAN_VERSION, **keys}
    return out[0], out[1], classes or []


def _list_imagefolder(root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DatasetError(f"{exc}; an ImageFolder split needs <class>/<image> files") from exc
    if not folder.samples:
        raise DatasetError(f"no images found under {root}")
    return folder


def imagefolder_source(
    root: str | os.PathLike,
    *,
    channels: int | None = None,
    image_size: int | Sequence[int] | None = None,
    limit: int | None = None,
    skip_bad_files: bool = False,
) -> tuple[Source, list[str]]:
    """An ImageFolder split as a :class:`~dtp_search.data.streaming.Source` to stream: its
    files (the same stratified subset :func:`load_imagefolder` decodes), labels, and the
    shape of one image (the first readable one is decoded to learn it)."""
    root = Path(root).resolve()
    folder = _list_imagefolder(root)
    labels = np.asarray(folder.targets, dtype=np.int64)
    keep = stratified_subset(labels, limit)
    paths = [folder.samples[i][0] for i in keep]
    channels = file_channels(paths, channels, skip_bad_files)
    decoder = FileDecoder(paths, channels, size_pair(image_size))
    for i in range(len(paths)):
        img = decoder[i]
        if isinstance(img, torch.Tensor):
            shape = tuple(img.shape)
            break
        if not skip_bad_files:
            raise bad_file_error(img)
    else:
        raise nothing_decoded(paths)
    return Source(decoder, labels[keep], shape, skip_bad=skip_bad_files), list(folder.classes)


def load_imagefolder(
    root: str | os.PathLike,
    *,
    channels: int | None = None,
    image_size: int | Sequence[int] | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_files: bool = False,
) -> tuple[Split, list[str]]:
    """Decode an ImageFolder split into tensors, through the on-disk cache.

    ``torchvision.datasets.ImageFolder`` finds the files and classes; decoding uses
    ``torchvision.io.decode_image`` (libjpeg/libpng, no PIL) on a few threads. A file that
    cannot be decoded raises :class:`DatasetError` naming it, or with ``skip_bad_files``
    is left out with one warning. Nothing is cached unless every kept file decoded.
    """
    root = Path(root).resolve()
    key = _imagefolder_key(root, channels, image_size, limit, skip_bad_files)
    return _decode_imagefolder(root, key, channels, image_size, limit, cache_dir, skip_bad_files)


def _decode_imagefolder(
    root: Path,
    key: dict[str, Any],
    channels: int | None,
    image_size: Any,
    limit: int | None,
    cache_dir: Any,
    skip_bad_files: bool,
) -> tuple[Split, list[str]]:
    """:func:`load_imagefolder` with its cache key made already (one stat walk per load).
    The key is taken before the files are read: a file changed meanwhile leaves a cache
    entry under a key that no longer matches, so it is decoded again next time."""
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"imagefolder-{root.parent.name}-{root.name}-{digest}.pt"
        if cache_file.exists():
            blob = torch.load(cache_file, weights_only=True)
            warn_skipped(root, blob.get("skipped", []), len(blob["labels"]))
            return Split(blob["images"], blob["labels"]), list(blob["classes"])

    folder = _list_imagefolder(root)
    labels = np.asarray(folder.targets, dtype=np.int64)
    keep = stratified_subset(labels, limit)
    paths = [folder.samples[i][0] for i in keep]
    images, good, skipped = decode_all(paths, channels, image_size, skip_bad_files)
    split = Split(images, torch.from_numpy(labels[keep][good]))
    warn_skipped(root, skipped, len(split))
    empty = sorted(set(range(len(folder.classes))) - set(split.labels.tolist()))
    if empty:
        raise DatasetError(
            f"class folder(s) {[folder.classes[c] for c in empty]} under {root} "
            "hold no readable image"
        )
    if cache_file is not None:
        atomic_save(
            {
                "images": split.images,
                "labels": split.labels,
                "classes": list(folder.classes),
                "skipped": skipped,
            },
            cache_file,
        )
        log.info("cached %d decoded images from %s in %s", len(split), root, cache_file)
    return split, list(folder.classes)
