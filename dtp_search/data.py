"""Datasets as whole uint8 tensors, and batches cut from them on the training device.

Every split is decoded once into ``images: uint8[N, C, H, W]`` and ``labels: int64[N]``
and cached on disk (keyed by the source path and its modification time). Training then
never touches PIL or a ``DataLoader``: :class:`TensorBatches` indexes the split tensor
with a permutation, applies random-crop/flip to the whole batch at once, and normalises
it with one fused multiply-add. For data that fits in memory this removes the
per-sample Python work that dominates small-model training on CPU.

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
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dtp_search.checkpoint import atomic_save
from dtp_search.errors import DatasetError, reason
from dtp_search.settings import DatasetSettings, from_mapping

log = logging.getLogger(__name__)

_CACHE_VERSION = 1
KINDS = ("digits", "cifar10", "mnist", "imagefolder")


@dataclass
class Split:
    """One split as tensors: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageDataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop with padding + horizontal flip (natural images)
    crop_padding: int = 4

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-1 of the tensors' bytes, in order (warm-start keys, dataset records)."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


def load_dataset(settings: DatasetSettings | Mapping[str, Any],
                 cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load the dataset the ``dataset`` settings describe (a mapping of some of its keys
    is read as :class:`~dtp_search.settings.DatasetSettings` with defaults for the rest).

    Keys: ``kind`` (one of :data:`KINDS`), ``name``, ``path`` (ImageFolder root; for
    ``mnist`` also a folder of IDX files), ``root`` (torchvision download folder),
    ``download``, ``channels``, ``image_size``,
    ``train_limit``/``test_limit`` (stratified subsets), ``mean``/``std`` (``null`` =
    computed on the training split), ``augment``, ``crop_padding``, ``skip_bad_files``
    (leave out ImageFolder files that cannot be decoded instead of stopping).
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
    path = cfg.path
    if kind == "digits":
        train, test, classes = _load_digits(cfg)
    elif path and kind == "mnist":
        train, test, classes = _load_mnist_path(cfg, Path(path), cache_dir)
    elif path:
        train, test, classes = _load_imagefolder_splits(cfg, Path(path), cache_dir)
    elif kind == "cifar10":
        train, test, classes = _load_torchvision_cifar10(cfg, cache_dir)
    elif kind == "mnist":
        train, test, classes = _load_torchvision_mnist(cfg)
    else:
        raise DatasetError("dataset.path is required for dataset=imagefolder "
                           "(a folder with train/<class>/* and test/<class>/*)")
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        mean, std = channel_stats(train.images)
    return ImageDataset(
        name=cfg.name, train=train, test=test, classes=list(classes),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        augment=bool(cfg.augment), crop_padding=int(cfg.crop_padding),
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-6)
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified subset of at most ``limit`` samples (all when None)."""
    n = len(labels)
    if not limit or limit >= n:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(n), train_size=int(limit), stratify=labels,
                              random_state=seed)
    return np.sort(idx)


def _load_digits(cfg: DatasetSettings) -> tuple[Split, Split, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset is uint8 in the same units.
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # A fixed split (its own seed, not the study's) so the test set never changes.
    tr, te = train_test_split(np.arange(len(labels)), test_size=float(cfg.test_fraction),
                              stratify=labels, random_state=int(cfg.split_seed))
    tr = tr[stratified_subset(labels[tr], cfg.train_limit)]
    te = te[stratified_subset(labels[te], cfg.test_limit)]
    classes = [str(c) for c in bunch.target_names]
    return (Split(torch.from_numpy(images[tr]), torch.from_numpy(labels[tr])),
            Split(torch.from_numpy(images[te]), torch.from_numpy(labels[te])), classes)


def _load_torchvision_cifar10(cfg: DatasetSettings, cache_dir: Any) -> tuple[Split, Split, list[str]]:
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


def _load_mnist_path(cfg: DatasetSettings, root: Path, cache_dir: Any) -> tuple[Split, Split, list[str]]:
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
        return _load_imagefolder_splits(cfg, root, cache_dir)
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
    if splits[0].images.shape[1:] != splits[1].images.shape[1:]:
        raise DatasetError(
            f"MNIST train and test images under {folder} differ in size: "
            f"{tuple(splits[0].images.shape[2:])} and {tuple(splits[1].images.shape[2:])}"
        )
    return splits[0], splits[1], _mnist_classes()


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


def _tree_stamp(root: Path) -> list[tuple[str, int]]:
    """(path, mtime_ns) of the split folder and its class folders: changes when files come or go."""
    entries = [(str(root), root.stat().st_mtime_ns)]
    for child in sorted(root.iterdir()):
        if child.is_dir():
            entries.append((child.name, child.stat().st_mtime_ns))
    return entries


def _load_imagefolder_splits(
    cfg: DatasetSettings, root: Path, cache_dir: Any
) -> tuple[Split, Split, list[str]]:
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
    out, classes = [], None
    for split in ("train", "test"):
        split_root = root / split
        if not split_root.is_dir():
            raise DatasetError(
                f"dataset.path={str(root)!r} has no {split}/ folder; an ImageFolder "
                "tree needs train/<class>/* and test/<class>/*"
            )
        s, split_classes = load_imagefolder(
            split_root,
            channels=cfg.channels,
            image_size=cfg.image_size,
            limit=getattr(cfg, f"{split}_limit"),
            cache_dir=cache_dir,
            skip_bad_files=skip,
        )
        if classes is not None and split_classes != classes:
            raise DatasetError(f"train/ and test/ under {root} have different class folders")
        classes = split_classes
        out.append(s)
    return out[0], out[1], classes or []


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
    from torchvision.datasets import ImageFolder

    root = Path(root).resolve()
    key = {
        "v": _CACHE_VERSION,
        "root": str(root),
        "stamp": _tree_stamp(root),
        "channels": channels,
        "size": image_size,
        "limit": limit,
    }
    if skip_bad_files:  # only then: the caches of strict loads keep their names
        key["skip_bad_files"] = True
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"imagefolder-{root.parent.name}-{root.name}-{digest}.pt"
        if cache_file.exists():
            blob = torch.load(cache_file, weights_only=True)
            _warn_skipped(root, blob.get("skipped", []), len(blob["labels"]))
            return Split(blob["images"], blob["labels"]), list(blob["classes"])

    try:
        folder = ImageFolder(str(root))
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DatasetError(f"{exc}; an ImageFolder split needs <class>/<image> files") from exc
    if not folder.samples:
        raise DatasetError(f"no images found under {root}")
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


class _BadFile(NamedTuple):
    path: str
    reason: str


def _read(path: str, mode: Any) -> torch.Tensor | _BadFile:
    """The decoded image, or why it could not be decoded (a non-image, a truncated file)."""
    from torchvision.io import decode_image

    try:
        return decode_image(path, mode=mode)
    except (RuntimeError, OSError) as exc:
        # torchvision prefixes "decode_jpeg, <source file>.cpp:171, "; the rest says why.
        text = re.sub(r"^\w+, \S+:\d+, ", "", str(exc).strip())
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
        return _BadFile(path, first)


def _bad_file_error(bad: _BadFile) -> DatasetError:
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


def _decode_all(
    paths: list[str], channels: int | None, image_size: Any, skip_bad_files: bool = False
) -> tuple[torch.Tensor, list[int], list[str]]:
    """``(images, indices of the decoded paths, skipped paths)``; a bad file raises
    :class:`DatasetError` unless ``skip_bad_files``."""
    from torchvision.io import ImageReadMode
    from torchvision.transforms.v2.functional import resize

    if channels is None:  # infer from the first readable image: 1-2 channels = grayscale
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
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    size = (
        None
        if image_size is None
        else (
            [int(image_size)] * 2 if isinstance(image_size, int) else [int(s) for s in image_size]
        )
    )

    def decode(p: str) -> torch.Tensor | _BadFile:
        img = _read(p, mode)
        if isinstance(img, torch.Tensor) and size is not None and list(img.shape[1:]) != size:
            img = resize(img, size, antialias=True)
        return img

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(decode, paths))
    bad = [r for r in results if isinstance(r, _BadFile)]
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


# ------------------------------------------------------------------------ batching


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator, channels_last: bool = False
) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a uint8 batch, in one gather.

    ``torchvision.transforms.v2`` applied to a batch tensor draws *one* crop for the
    whole batch; augmentation needs one per sample, so the crop offsets and flips are
    drawn per sample and folded into the flat source index of every output element,
    gathered with one ``torch.take`` (about twice as fast on CPU as the equivalent
    four-tensor advanced indexing). With ``channels_last`` the gather writes NHWC order
    directly (the result is the same NCHW-shaped batch with channels-last strides),
    saving a copy before the convolutions.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    ph, pw = h + 2 * padding, w + 2 * padding
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    # Flat index into the contiguous (b, c, ph, pw) padded batch.
    sample = (torch.arange(b, device=dev) * (c * ph * pw)).view(b, 1, 1, 1)
    plane = torch.arange(c, device=dev) * (ph * pw)
    if channels_last:  # index laid out (b, h, w, c), returned as an NCHW-shaped view
        idx = (
            sample + (rows * pw)[:, :, None, None] + cols[:, None, :, None] + plane.view(1, 1, 1, c)
        )
        return padded.reshape(-1).take(idx).permute(0, 3, 1, 2)
    idx = sample + plane.view(1, c, 1, 1) + (rows * pw)[:, None, :, None] + cols[:, None, None, :]
    return padded.reshape(-1).take(idx)


class TensorBatches:
    """Iterates ``(x, y)`` batches over ``indices`` of a split that lives on ``device``.

    ``x`` is float32, normalised ``(u8 / 255 − mean) / std``; with ``augment`` each
    sample is randomly cropped (after zero padding) and flipped first.
    """

    def __init__(
        self,
        split: Split,
        indices: torch.Tensor | np.ndarray | None,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        if indices is None:
            indices = torch.arange(len(split))
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.device)
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.crop_padding = shuffle, augment, crop_padding
        self.drop_last = drop_last
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def subsample(self, limit: int, seed: int = 0) -> TensorBatches:
        """These batches over a class-stratified subset of at most ``limit`` of the indices
        (``self`` when there are no more than ``limit``)."""
        if limit >= self.num_samples:
            return self
        keep = stratified_subset(self.labels[self.indices].cpu().numpy(), limit, seed)
        out = copy.copy(self)
        out.indices = self.indices[torch.as_tensor(keep, dtype=torch.long, device=self.device)]
        out.generator = torch.Generator(device=self.device)
        out.generator.manual_seed(seed)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            perm = torch.randperm(len(order), generator=self.generator, device=self.device)
            order = order[perm]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(
                    x, self.crop_padding, self.generator, channels_last=self.channels_last
                )
            x = torch.addcmul(-self._shift, x.float(), self._scale)
            if self.channels_last:  # NHWC: the fast layout for convolutions
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
