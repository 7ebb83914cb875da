"""The checks of a dataset's settings and of its splits against each other: a
``dataset.name`` naming another dataset, train and test splits of different image
shapes or class lists — refused when the data is loaded, before any trial."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtp_search.data.splits import Split
from dtp_search.data.streaming import Source, StreamedSplit
from dtp_search.errors import DatasetError
from dtp_search.settings import DatasetSettings

# Kinds whose data is known: a dataset.name naming another dataset is refused.
_KNOWN_DATA = ("digits", "cifar10", "mnist", "torchvision")


def check_name(cfg: DatasetSettings) -> None:
    """Refuse a ``dataset.name`` that names another dataset than a known kind loads
    (``dataset=digits dataset.name=fashionmnist``); imagefolder/custom: any name."""
    if cfg.kind not in _KNOWN_DATA:
        return
    from dtp_search.data.user_data import known_names

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


def source_key(cfg: DatasetSettings) -> str:
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


def check_same_shape(train: Any, test: Any, where: str) -> None:
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


def check_same_classes(train: Sequence[str], test: Sequence[str], where: str) -> None:
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
