"""MNIST: its IDX files read from ``dataset.path`` (plain or ``.gz``), an ImageFolder
copy, or torchvision's download."""

from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search.data.builtin import download_failed
from dtp_search.data.imagefolder import load_imagefolder_splits
from dtp_search.data.scan import ScanPlan
from dtp_search.data.splits import Split, stratified_subset
from dtp_search.data.streaming import Source
from dtp_search.errors import DatasetError, reason
from dtp_search.settings import DatasetSettings

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


def load_mnist_path(
    cfg: DatasetSettings, root: Path, cache_dir: Any, plan: ScanPlan | None = None
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
        return load_imagefolder_splits(cfg, root, cache_dir, plan)
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


def load_torchvision_mnist(cfg: DatasetSettings) -> tuple[Split, Split, list[str]]:
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
            raise download_failed(
                "mnist", "MNIST", root, _mirror_reasons(text), _MNIST_LOCAL
            ) from exc
        except OSError as exc:  # a timeout or reset that torchvision's mirror loop lets through
            raise download_failed("mnist", "MNIST", root, reason(exc), _MNIST_LOCAL) from exc
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
