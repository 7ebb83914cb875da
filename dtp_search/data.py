"""Datasets as whole uint8 tensors — or, when they do not fit in memory, streamed.

Every split is decoded once into ``images: uint8[N, C, H, W]`` and ``labels: int64[N]``
(ImageFolder trees cached on disk, keyed by the source path and every file's size, mtime
and ctime, so that an image overwritten in place is decoded again).
Training then never touches PIL or a ``DataLoader``: :class:`TensorBatches` indexes the
split tensor with a permutation, applies random-crop/flip to the whole batch at once, and
normalises it with one fused multiply-add. For data that fits in memory this removes the
per-sample Python work that dominates small-model training on CPU.

Data larger than memory (``dataset.in_memory``): ``auto`` decodes a split into memory
only when its decoded size fits what is left of ``dataset.memory_limit`` (GiB; null = a
quarter of the RAM; the training split is planned first); otherwise the split is a
:class:`~dtp_search.streaming.StreamedSplit`, decoded batch by batch in
``dataset.num_workers`` DataLoader worker processes (:class:`StreamBatches`), with the
same folds, augmentation and seeds: both paths yield the same batches. ``true`` / ``false``
force one path. This applies to ImageFolder trees (``imagefolder``, and ``cifar10`` /
``mnist`` given one as ``path``) and to ``torchvision`` / ``custom``; ``digits``, MNIST's
IDX files and torchvision's CIFAR-10 / MNIST arrays are in memory already.

A streamed split is decoded once when the dataset is loaded (:func:`~dtp_search.streaming.scan`):
that validates it (undecodable files, sizes), and gives the training split's channel
statistics and the dataset's content digest *exactly* as the in-memory path computes
them, so a study's drift check and its training do not depend on the path (``auto`` may
choose differently on a machine with less memory). For ImageFolder trees the scan's
result is cached in ``paths.cache_dir`` (keyed like the decoded-tensor cache), so it runs
once per tree; for ``torchvision`` / ``custom`` data it runs at every load.

Sources:
* ``digits`` — scikit-learn's bundled 8×8 digits (no download); a fixed stratified
  train/test split.
* ``cifar10`` — ``torchvision.datasets.CIFAR10(download=...)``, or, with ``path``, an
  ImageFolder tree with ``train/`` and ``test/``.
* ``mnist`` — ``torchvision.datasets.MNIST(download=...)``, or, with ``path``, a folder of
  the four IDX files (plain or ``.gz``, directly in it or in ``MNIST/raw/``) or an
  ImageFolder tree with ``train/`` and ``test/``.
* ``imagefolder`` — any ImageFolder tree with ``train/`` and ``test/`` (RGB or grayscale).
  A file that cannot be decoded stops the load with its path, or, with
  ``skip_bad_files``, is left out (one warning says how many were).
* ``torchvision`` / ``custom`` — the user's own data (:mod:`dtp_search.user_data`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search.batches import Batches, StreamBatches, TensorBatches, random_crop_flip
from dtp_search.checkpoint import atomic_save
from dtp_search.decoders import BadFile, FileDecoder, read_file, size_pair
from dtp_search.errors import DatasetError, reason, writing
from dtp_search.settings import DatasetSettings, from_mapping
from dtp_search.splits import PixelSums, Split, channel_stats, stratified_subset, tensor_digest
from dtp_search.streaming import (
    Source,
    StreamedSplit,
    decode_into_memory,
    default_workers,
    memory_budget,
    scan,
)

__all__ = [
    "KINDS",
    "Batches",
    "DatasetError",
    "ImageDataset",
    "PixelSums",
    "Source",
    "Split",
    "StreamBatches",
    "StreamedSplit",
    "TensorBatches",
    "channel_stats",
    "load_dataset",
    "load_imagefolder",
    "random_crop_flip",
    "read_idx",
    "stratified_subset",
    "tensor_digest",
]

log = logging.getLogger(__name__)

# 2: keyed by every file's stat (1: by folder mtimes, blind to files overwritten in place).
_CACHE_VERSION = 2
_SCAN_VERSION = 2
KINDS = ("digits", "cifar10", "mnist", "imagefolder", "torchvision", "custom")
# Kinds whose data is known: a dataset.name naming another dataset is refused.
_KNOWN_DATA = ("digits", "cifar10", "mnist", "torchvision")


@dataclass
class ImageDataset:
    name: str
    train: Split | StreamedSplit
    test: Split | StreamedSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop with padding + horizontal flip (natural images)
    crop_padding: int = 4
    digest: str | None = None  # content digest, when computed at load (streamed splits)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image (a streamed split knows it without its images)."""
        split = self.train
        if isinstance(split, StreamedSplit):
            return split.shape  # type: ignore[return-value]
        return tuple(split.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streamed(self) -> bool:
        """Whether any split is streamed from its source."""
        return isinstance(self.train, StreamedSplit) or isinstance(self.test, StreamedSplit)

    def content_digest(self) -> str:
        """SHA-1 of both splits' images and labels (``tensor_digest(train.images,
        train.labels, test.images, test.labels)``), the same for streamed splits."""
        if self.digest is None:
            self.digest = tensor_digest(
                self.train.images, self.train.labels, self.test.images, self.test.labels
            )
        return self.digest


# --------------------------------------------------------------------------- loading


class _Plan:
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


def load_dataset(
    settings: DatasetSettings | Mapping[str, Any], cache_dir: str | os.PathLike | None = None
) -> ImageDataset:
    """Load the dataset the ``dataset`` settings describe (a mapping of some of its keys
    is read as :class:`~dtp_search.settings.DatasetSettings` with defaults for the rest).

    Keys: ``kind`` (one of :data:`KINDS`), ``name``, ``path`` (ImageFolder root; for
    ``mnist`` also a folder of IDX files), ``root`` (torchvision download folder),
    ``download``, ``_target_`` and its ``args`` (``torchvision``/``custom``), ``channels``,
    ``image_size``, ``train_limit``/``test_limit`` (stratified subsets), ``mean``/``std``
    (``null`` = computed on the training split), ``augment``, ``crop_padding``,
    ``skip_bad_files`` (leave out ImageFolder files that cannot be decoded instead of
    stopping), ``in_memory``/``memory_limit``/``num_workers`` (see the module docstring),
    ``test_fraction``/``split_seed`` (the fixed held-out test split of ``digits`` and of a
    torchvision class without ``train``/``split``).

    A ``name`` that names another known dataset than the kind loads is refused (digits,
    cifar10, mnist, torchvision). Train and test splits of different image shapes (C×H×W:
    size or channels) or different class lists are refused here, before any trial: the
    test split is otherwise read only by the refit, after the whole search.
    """
    try:
        cfg = from_mapping(DatasetSettings, settings, "dataset")
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    kind = cfg.kind
    if kind not in KINDS:
        raise DatasetError(f"dataset.kind={kind!r} is not supported; allowed: {list(KINDS)}")
    skip = cfg.skip_bad_files
    if not isinstance(skip, bool):
        raise DatasetError(f"dataset.skip_bad_files={skip!r} is not allowed; allowed: true, false")
    if cfg.in_memory not in ("auto", True, False) or type(cfg.in_memory) is int:
        raise DatasetError(
            f"dataset.in_memory={cfg.in_memory!r} is not allowed; allowed: auto, true, false"
        )
    if kind in ("torchvision", "custom") and not cfg._target_:
        raise DatasetError(
            f"dataset._target_ is required for dataset={kind}; allowed: a dotted "
            "path, e.g. dataset._target_=torchvision.datasets.FakeData"
        )
    _check_name(cfg)
    plan = _Plan(cfg)
    num_workers = default_workers(cfg.num_workers)
    path = cfg.path
    if kind == "digits":
        train, test, classes = _load_digits(cfg)
    elif kind in ("torchvision", "custom"):
        train, test, classes = _load_user_data(cfg, plan, num_workers)
    elif path and kind == "mnist":
        train, test, classes = _load_mnist_path(cfg, Path(path), cache_dir, plan)
    elif path:
        train, test, classes = _load_imagefolder_splits(cfg, Path(path), cache_dir, plan)
    elif kind == "cifar10":
        train, test, classes = _load_torchvision_cifar10(cfg, cache_dir)
    elif kind == "mnist":
        train, test, classes = _load_torchvision_mnist(cfg)
    else:
        raise DatasetError(
            "dataset.path is required for dataset=imagefolder "
            "(a folder with train/<class>/* and test/<class>/*)"
        )
    _check_same_shape(train, test, _where(cfg))
    digest, sums = None, None
    if isinstance(train, Source) or isinstance(test, Source):
        train, test, digest, sums = _scan(
            train, test, num_workers, plan.scan_key, cache_dir, classes
        )
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        mean, std = sums.stats() if sums is not None else channel_stats(train.images)
    return ImageDataset(
        name=cfg.name,
        train=train,
        test=test,
        classes=list(classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        augment=bool(cfg.augment),
        crop_padding=int(cfg.crop_padding),
        digest=digest,
    )


def _check_name(cfg: DatasetSettings) -> None:
    """Refuse a ``dataset.name`` that names another dataset than a known kind loads
    (``dataset=digits dataset.name=fashionmnist``); imagefolder/custom: any name."""
    if cfg.kind not in _KNOWN_DATA:
        return
    from dtp_search.user_data import known_names

    if cfg.kind == "torchvision":
        own = str(cfg._target_).rpartition(".")[2].lower()
        loads = f"dataset=torchvision ({cfg._target_})"
    else:
        own, loads = cfg.kind, f"dataset={cfg.kind}"
    name = str(cfg.name).strip().lower()
    if name != own and name in known_names():
        raise DatasetError(
            f"dataset.name={cfg.name!r} names another dataset than {loads} "
            f"loads; allowed: any name that is not another dataset's, e.g. "
            f"dataset.name={own}"
        )


def _where(cfg: DatasetSettings) -> str:
    """The key that says where the data comes from, for the cross-split errors."""
    if cfg.kind in ("torchvision", "custom"):
        return f"dataset._target_={cfg._target_}"
    if cfg.path:
        return f"dataset.path={str(Path(cfg.path).expanduser())!r}"
    return f"dataset={cfg.kind}"


def _shape_of(split: Split | Source | StreamedSplit) -> tuple[int, ...]:
    if isinstance(split, Split):
        return tuple(split.images.shape[1:])
    return tuple(split.shape)


def _check_same_shape(train: Any, test: Any, where: str) -> None:
    """Refuse train and test images of different shapes (C×H×W) when the data is loaded:
    a network is built for the training shape, and the test split is read only by the
    refit, after the whole search."""
    a, b = _shape_of(train), _shape_of(test)
    if a == b:
        return
    show = lambda s: "×".join(map(str, s))  # noqa: E731
    fixes = []
    if a[0] != b[0]:
        fixes.append(f"dataset.channels={a[0] if a[0] in (1, 3) else 3} to convert both")
    if a[1:] != b[1:]:
        fixes.append(f"dataset.image_size={a[1]} to resize both")
    raise DatasetError(
        f"{where}: the train images are {show(a)} (C×H×W) but the test images "
        f"{show(b)}; allowed: one shape for both splits (set {' and '.join(fixes)})"
    )


def _check_same_classes(train: Sequence[str], test: Sequence[str], where: str) -> None:
    """Refuse train and test splits with different class lists: label ``i`` would name
    another class in each, and the test accuracy would be measured against wrong labels."""
    if list(train) == list(test):
        return
    only_train = [c for c in train if c not in set(test)]
    only_test = [c for c in test if c not in set(train)]
    if only_train or only_test:
        found = f"only in train: {only_train[:5]}, only in test: {only_test[:5]}"
    else:
        found = f"the same {len(train)} classes in another order"
    raise DatasetError(
        f"{where}: the train and test splits have different classes ({found}); allowed: "
        "the same classes in both (an ImageFolder tree: the same class folders under "
        "train/ and test/)"
    )


def _load_user_data(
    cfg: DatasetSettings, plan: _Plan, num_workers: int
) -> tuple[Split | Source, Split | Source, list[str]]:
    """``dataset=torchvision``/``custom`` (:mod:`dtp_search.user_data`), each split decoded
    into memory when the plan keeps it there (else a source, streamed after the scan)."""
    from dtp_search.user_data import load_user_sources

    train, test, classes = load_user_sources(cfg)
    _check_same_shape(train, test, _where(cfg))  # before decoding anything
    out = []
    for source in (train, test):
        out.append(decode_into_memory(source, num_workers) if plan.keep(source.nbytes) else source)
    return out[0], out[1], classes


def _scan(
    train: Split | Source,
    test: Split | Source,
    num_workers: int,
    key: dict[str, Any] | None,
    cache_dir: Any,
    classes: Sequence[str],
) -> tuple[Split | StreamedSplit, Split | StreamedSplit, str, PixelSums]:
    """:func:`~dtp_search.streaming.scan`, through a JSON cache when ``key`` says what
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
    result = scan(train, test, num_workers, _bad_file_error)
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
        _warn_skipped(root, bad, len(split))
        empty = sorted(set(range(len(classes))) - set(split.labels.tolist()))
        if empty:
            raise DatasetError(
                f"class folder(s) {[classes[c] for c in empty]} under {root} hold no readable image"
            )


def _load_digits(cfg: DatasetSettings) -> tuple[Split, Split, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset is uint8 in the same units.
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # A fixed split (its own seed, not the study's) so the test set never changes.
    tr, te = train_test_split(
        np.arange(len(labels)),
        test_size=float(cfg.test_fraction),
        stratify=labels,
        random_state=int(cfg.split_seed),
    )
    tr = tr[stratified_subset(labels[tr], cfg.train_limit)]
    te = te[stratified_subset(labels[te], cfg.test_limit)]
    classes = [str(c) for c in bunch.target_names]
    return (
        Split(torch.from_numpy(images[tr]), torch.from_numpy(labels[tr])),
        Split(torch.from_numpy(images[te]), torch.from_numpy(labels[te])),
        classes,
    )


def _load_torchvision_cifar10(
    cfg: DatasetSettings, cache_dir: Any
) -> tuple[Split, Split, list[str]]:
    """torchvision's CIFAR-10 (downloaded into ``dataset.root`` when ``dataset.download``)."""
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser()
    splits = []
    classes: list[str] = []
    for train in (True, False):
        try:
            ds = CIFAR10(root=str(root), train=train, download=bool(cfg.download))
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
            raise DatasetError(
                f"CIFAR-10 not found under dataset.root={str(root)!r} ({exc}). Either allow the "
                "download (dataset.download=true, needs network) or point dataset.path at an "
                "ImageFolder copy with train/ and test/ folders."
            ) from exc
        except OSError as exc:  # the download: urllib's URLError, a timeout, a reset
            raise _download_failed(
                "cifar10",
                "CIFAR-10",
                root,
                reason(exc),
                "ImageFolder copy, e.g. dataset.path=/path/to/cifar10 holding "
                "train/<class>/*.png and test/<class>/*.png",
            ) from exc
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = np.asarray(ds.targets, dtype=np.int64)
        keep = stratified_subset(labels, cfg.train_limit if train else cfg.test_limit)
        splits.append(Split(images[keep].contiguous(), torch.from_numpy(labels[keep])))
        classes = list(ds.classes)
    return splits[0], splits[1], classes


def _download_failed(kind: str, title: str, root: Path, why: str, local_copy: str) -> DatasetError:
    """The one-line error of a failed torchvision download: why, and the offline alternative."""
    return DatasetError(
        f"dataset={kind}: downloading {title} into dataset.root={str(root)!r} failed ({why}); "
        f"without network, point dataset.path at a local {local_copy}"
    )


# ------------------------------------------------------------------------------ MNIST

IDX_IMAGES = 0x00000803  # IDX magic numbers: unsigned bytes, 3 dimensions (N, rows, cols) ...
IDX_LABELS = 0x00000801  # ... and 1 dimension (N)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_NAMES = ", ".join(n for pair in MNIST_FILES.values() for n in pair)
_MNIST_LOCAL = (
    f"copy, e.g. dataset.path=/path/to/mnist holding the four IDX files ({_MNIST_NAMES}, "
    "optionally .gz) or an ImageFolder tree train/<class>/*.png and test/<class>/*.png"
)


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """The uint8 tensor of an IDX file (``.gz`` read through gzip), shaped as its header says.

    Written here rather than taken from ``torchvision.datasets.mnist.read_image_file``:
    torchvision opens the file with plain ``open`` (no ``.gz``), checks the header with
    ``assert`` (gone under ``python -O``, and a bare AssertionError otherwise) and does not
    tell an image file from a label file. Here each of those is a :class:`DatasetError`.
    """
    path = Path(path)
    what = "image" if magic == IDX_IMAGES else "label"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            data = bytearray(fh.read())  # writable: torch.frombuffer shares it without a warning
    except (OSError, EOFError) as exc:  # unreadable, not gzip (BadGzipFile), truncated gzip
        raise DatasetError(f"cannot read the MNIST {what} file {path} ({reason(exc)})") from exc
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "none, the file is shorter than 4 bytes" if found is None else f"0x{found:08x}"
        raise DatasetError(
            f"{path} is not an MNIST {what} file: its magic number is {shown}, "
            f"expected 0x{magic:08x} (an IDX file of unsigned bytes)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])  # sizes are big-endian uint32
    if len(data) - header != int(np.prod(dims)):
        raise DatasetError(
            f"{path} holds {len(data) - header} bytes after its header, which "
            f"declares {'×'.join(map(str, dims))}; the file is truncated or corrupt"
        )
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).view(*dims)


def _idx_folder(root: Path) -> Path | None:
    """The folder holding MNIST's IDX files: ``root`` itself or torchvision's ``root/MNIST/raw``."""
    names = [n for pair in MNIST_FILES.values() for n in pair]
    for folder in (root, root / "MNIST" / "raw"):
        if any((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


def _idx_file(folder: Path, name: str) -> Path:
    # torchvision's raw folder holds both; the plain file skips the gunzip.
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"dataset.path: the MNIST file {name} (or {name}.gz) is missing from "
        f"{folder}, which needs all four IDX files ({_MNIST_NAMES}); or point "
        "dataset.path at an ImageFolder tree (train/<class>/*, test/<class>/*), "
        "or drop it to download MNIST with torchvision (dataset.download=true)"
    )


def _load_mnist_path(
    cfg: DatasetSettings, root: Path, cache_dir: Any, plan: _Plan | None = None
) -> tuple[Split | Source, Split | Source, list[str]]:
    """MNIST from ``dataset.path``: the IDX files, else an ImageFolder tree."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"dataset.path={str(root)!r} does not exist. Give a folder with "
            "MNIST's IDX files or train/<class>/* and test/<class>/* images, or "
            "drop dataset.path to download MNIST with torchvision"
        )
    folder = _idx_folder(root)
    if folder is None and (root / "train").is_dir():
        return _load_imagefolder_splits(cfg, root, cache_dir, plan)
    if folder is None:
        raise DatasetError(
            f"dataset.path={str(root)!r} holds neither MNIST's IDX files ({_MNIST_NAMES}, "
            f"optionally .gz, looked for in {root} and {root / 'MNIST' / 'raw'}) nor an "
            "ImageFolder tree (train/<class>/* and test/<class>/*); give one of those, or drop "
            "dataset.path to download MNIST with torchvision (dataset.download=true, needs network)"
        )
    # Not cached in cache_dir: reading IDX files is a copy of their bytes (plus a gunzip),
    # about as fast as loading the cached tensors would be.
    splits = []
    for split, (image_name, label_name) in MNIST_FILES.items():
        image_file, label_file = _idx_file(folder, image_name), _idx_file(folder, label_name)
        images, labels = read_idx(image_file, IDX_IMAGES), read_idx(label_file, IDX_LABELS)
        if len(images) != len(labels):
            raise DatasetError(
                f"MNIST {split} split: {image_file} holds {len(images)} images but "
                f"{label_file} holds {len(labels)} labels"
            )
        splits.append(_mnist_split(cfg, images, labels.long(), split, str(label_file)))
    return splits[0], splits[1], _mnist_classes()  # (their shapes: load_dataset checks)


def _mnist_classes() -> list[str]:
    # torchvision's names, so that the IDX copy and the download describe the same classes.
    from torchvision.datasets import MNIST

    return list(MNIST.classes)


def _mnist_split(
    cfg: DatasetSettings, images: torch.Tensor, labels: torch.Tensor, split: str, source: str
) -> Split:
    """``uint8 [N, 28, 28]`` and labels → a stratified subset, ``[N, C, H, W]`` as configured."""
    bad = labels[(labels < 0) | (labels >= 10)]
    if len(bad):
        raise DatasetError(f"{source} holds label {int(bad[0])}; MNIST labels are 0..9")
    keep = torch.from_numpy(stratified_subset(labels.numpy(), getattr(cfg, f"{split}_limit")))
    x = images[keep].unsqueeze(1)
    size = cfg.image_size
    if size is not None and tuple(x.shape[2:]) != (int(size), int(size)):
        from torchvision.transforms.v2.functional import resize

        x = resize(x, [int(size)] * 2, antialias=True)
    channels = cfg.channels
    if channels not in (None, 1, 3):
        raise DatasetError(f"dataset.channels={channels} is not supported; allowed: 1, 3, null")
    if channels == 3:  # grayscale repeated, for models built for RGB input
        x = x.expand(-1, 3, -1, -1)
    return Split(x.contiguous(), labels[keep].contiguous())


def _load_torchvision_mnist(cfg: DatasetSettings) -> tuple[Split, Split, list[str]]:
    """torchvision's MNIST (downloaded into ``dataset.root`` when ``dataset.download``).

    Its ``.data`` and ``.targets`` tensors are used directly: no PIL image per sample.
    """
    from torchvision.datasets import MNIST

    root = Path(cfg.root).expanduser()
    download = bool(cfg.download)
    splits = []
    for split in ("train", "test"):
        try:
            ds = MNIST(root=str(root), train=split == "train", download=download)
        except RuntimeError as exc:
            text = str(exc)
            if not text.startswith("Error downloading"):  # "Dataset not found. ..."
                raise DatasetError(
                    f"MNIST not found under dataset.root={str(root)!r} (dataset.download="
                    f"{str(download).lower()}). Either allow the download (dataset.download=true, "
                    f"needs network) or point dataset.path at a local {_MNIST_LOCAL}"
                ) from exc
            raise _download_failed(
                "mnist", "MNIST", root, _mirror_reasons(text), _MNIST_LOCAL
            ) from exc
        except OSError as exc:  # a timeout or reset that torchvision's mirror loop lets through
            raise _download_failed("mnist", "MNIST", root, reason(exc), _MNIST_LOCAL) from exc
        splits.append(_mnist_split(cfg, ds.data, ds.targets.long(), split, str(ds.raw_folder)))
    return splits[0], splits[1], _mnist_classes()


def _mirror_reasons(text: str) -> str:
    """Why each mirror failed, in a few words, from the RuntimeError of ``MNIST.download``.

    torchvision tries every mirror, swallows each URLError and raises one RuntimeError
    listing them ("Tried <mirror>, got:\\n<urlopen error [Errno 111] Connection refused>"),
    with no exception chained, so the reasons can only be read from that text.
    """
    lines = text.splitlines()
    whys = []
    for line, nxt in zip(lines, [*lines[1:], ""], strict=True):
        if line.startswith("Tried ") and nxt.strip():
            why = re.sub(r"^<urlopen error (.*)>$", r"\1", nxt.strip())
            whys.append(re.sub(r"^\[Errno -?\d+\] ", "", why))
    return "; ".join(dict.fromkeys(whys)) or (lines[0] if lines else "unknown error")


# ------------------------------------------------------------------ ImageFolder + cache


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


def _load_imagefolder_splits(
    cfg: DatasetSettings, root: Path, cache_dir: Any, plan: _Plan | None = None
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
            _check_same_classes(classes, split_classes, _where(cfg))
        classes = split_classes
        out.append(s)
    if plan is not None:
        plan.scan_key = {"v": _SCAN_VERSION, **keys}
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
    """An ImageFolder split as a :class:`~dtp_search.streaming.Source` to stream: its
    files (the same stratified subset :func:`load_imagefolder` decodes), labels, and the
    shape of one image (the first readable one is decoded to learn it)."""
    root = Path(root).resolve()
    folder = _list_imagefolder(root)
    labels = np.asarray(folder.targets, dtype=np.int64)
    keep = stratified_subset(labels, limit)
    paths = [folder.samples[i][0] for i in keep]
    channels = _file_channels(paths, channels, skip_bad_files)
    decoder = FileDecoder(paths, channels, size_pair(image_size))
    for i in range(len(paths)):
        img = decoder[i]
        if isinstance(img, torch.Tensor):
            shape = tuple(img.shape)
            break
        if not skip_bad_files:
            raise _bad_file_error(img)
    else:
        raise _nothing_decoded(paths)
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
            _warn_skipped(root, blob.get("skipped", []), len(blob["labels"]))
            return Split(blob["images"], blob["labels"]), list(blob["classes"])

    folder = _list_imagefolder(root)
    labels = np.asarray(folder.targets, dtype=np.int64)
    keep = stratified_subset(labels, limit)
    paths = [folder.samples[i][0] for i in keep]
    images, good, skipped = _decode_all(paths, channels, image_size, skip_bad_files)
    split = Split(images, torch.from_numpy(labels[keep][good]))
    _warn_skipped(root, skipped, len(split))
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


# Kept under their old names: the in-memory ImageFolder loader and its tests use them.
_BadFile = BadFile
_read = read_file


def _bad_file_error(bad: BadFile) -> DatasetError:
    return DatasetError(
        f"cannot decode the image {bad.path} ({bad.reason}); fix or remove it, "
        "or set dataset.skip_bad_files=true to leave unreadable files out"
    )


def _nothing_decoded(paths: list[str]) -> DatasetError:
    return DatasetError(
        f"none of the {len(paths)} files under {os.path.commonpath(paths)} "
        "can be decoded as an image"
    )


def _warn_skipped(root: Path, skipped: list[str], kept: int) -> None:
    if skipped:
        log.warning(
            "skipped %d unreadable file(s) under %s, kept %d (first: %s); "
            "dataset.skip_bad_files=true",
            len(skipped),
            root,
            kept,
            skipped[0],
        )


def _file_channels(paths: list[str], channels: int | None, skip_bad_files: bool) -> int:
    """``channels``, or (None) those of the first readable image: 1-2 channels = grayscale."""
    from torchvision.io import ImageReadMode

    if channels is None:
        for p in paths:
            first = _read(p, ImageReadMode.UNCHANGED)
            if isinstance(first, torch.Tensor):
                channels = 1 if first.shape[0] < 3 else 3
                break
            if not skip_bad_files:
                raise _bad_file_error(first)
        else:
            raise _nothing_decoded(paths)
    if channels not in (1, 3):
        raise DatasetError(f"dataset.channels={channels} is not supported; allowed: 1, 3, null")
    return channels


def _decode_all(
    paths: list[str], channels: int | None, image_size: Any, skip_bad_files: bool = False
) -> tuple[torch.Tensor, list[int], list[str]]:
    """``(images, indices of the decoded paths, skipped paths)``; a bad file raises
    :class:`DatasetError` unless ``skip_bad_files``. Decodes exactly as
    :class:`~dtp_search.decoders.FileDecoder` does (the streamed path), on threads."""
    decoder = FileDecoder(
        paths, _file_channels(paths, channels, skip_bad_files), size_pair(image_size)
    )
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(decoder.__getitem__, range(len(paths))))
    bad = [r for r in results if isinstance(r, BadFile)]
    if bad and not skip_bad_files:
        raise _bad_file_error(bad[0])  # the first in file order, whichever thread met it
    good = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    if not good:
        raise _nothing_decoded(paths)
    decoded = [results[i] for i in good]
    shapes = {tuple(t.shape) for t in decoded}
    if len(shapes) > 1:
        raise DatasetError(
            f"images have different sizes {sorted(shapes)[:3]}...; "
            "set dataset.image_size to resize them"
        )
    return torch.stack(decoded), good, [b.path for b in bad]
