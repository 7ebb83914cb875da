"""The datasets that need no path: scikit-learn's bundled digits and torchvision's
CIFAR-10, and the error of a failed torchvision download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search.data.splits import Split, stratified_subset
from dtp_search.errors import DatasetError, reason
from dtp_search.settings import DatasetSettings


def load_digits_splits(cfg: DatasetSettings) -> tuple[Split, Split, list[str]]:
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


def load_torchvision_cifar10(
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
            raise download_failed(
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


def download_failed(kind: str, title: str, root: Path, why: str, local_copy: str) -> DatasetError:
    """The one-line error of a failed torchvision download: why, and the offline alternative."""
    return DatasetError(
        f"dataset={kind}: downloading {title} into dataset.root={str(root)!r} failed ({why}); "
        f"without network, point dataset.path at a local {local_copy}"
    )
