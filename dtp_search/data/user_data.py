"""The user's own data: ``dataset=torchvision`` (any ``torchvision.datasets`` class) and
``dataset=custom`` (a factory returning ``(train, test)``), as two
:class:`~dtp_search.data.streaming.Source` splits ready to be decoded into memory or streamed.

* ``torchvision``: ``dataset._target_`` names the class; its train and test splits come
  from its own ``train=True/False`` or ``split="train"/"test"`` argument (``root`` and
  ``download`` are passed only when it takes them). A class with neither (e.g.
  ``torchvision.datasets.FakeData``) is built once, and a fixed class-stratified
  ``dataset.test_fraction`` of it (seed ``dataset.split_seed``) is held out as the test
  split, as for ``digits``.
* ``custom``: ``dataset._target_`` names a callable returning two map-style datasets of
  ``(image, label)``.

Every other key under ``dataset`` (``dataset.args``) is a keyword argument of the target.
The classes come from the training dataset's ``classes`` attribute, else from the labels
(``0..max``); the labels from its ``targets`` attribute when it has one of the right
length, else from one pass over the items (in worker processes).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtp_search import targets
from dtp_search.data.decoders import (
    ALLOWED_ITEM,
    DatasetDecoder,
    image_channels,
    size_pair,
    to_uint8,
)
from dtp_search.data.splits import stratified_subset
from dtp_search.data.streaming import Source
from dtp_search.errors import DatasetError
from dtp_search.settings import DatasetSettings

ALLOWED_RETURN = "(train, test), two map-style datasets of (image, label)"
# torchvision.datasets classes that are building blocks, not datasets of their own.
_GENERIC = {"visiondataset", "datasetfolder", "imagefolder"}


def locate(cfg: DatasetSettings) -> Any:
    """The object ``dataset._target_`` names; an import failure is a DatasetError naming it."""
    what = (
        "a torchvision.datasets class, e.g. torchvision.datasets.FakeData"
        if cfg.kind == "torchvision"
        else "a callable returning " + ALLOWED_RETURN
    )
    obj = targets.locate(
        str(cfg._target_),
        "dataset._target_",
        error=DatasetError,
        allowed=f"a dotted path to {what}",
    )
    if not callable(obj):
        raise DatasetError(
            f"dataset._target_={cfg._target_!r} is a {type(obj).__name__}, not "
            "callable; allowed: a dotted path to a class or function"
        )
    return obj


@functools.cache
def known_names() -> frozenset[str]:
    """Lower-cased names of the datasets this package knows: the built-in kinds and every
    dataset class of ``torchvision.datasets``."""
    import torchvision.datasets as tvd
    from torch.utils.data import Dataset

    names = {
        n.lower()
        for n in dir(tvd)
        if isinstance(getattr(tvd, n), type) and issubclass(getattr(tvd, n), Dataset)
    }
    return frozenset((names - _GENERIC) | {"digits", "cifar10", "mnist"})


def _call(target: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except DatasetError:
        raise
    except Exception as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetError(f"dataset._target_={target} raised {type(exc).__name__}: {why}") from exc


def _is_map_style(ds: Any) -> bool:
    return (
        hasattr(ds, "__getitem__") and hasattr(ds, "__len__") and not isinstance(ds, (str, bytes))
    )


def build_splits(
    cfg: DatasetSettings,
) -> tuple[Any, Any, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``(train dataset, test dataset, train indices, test indices, labels)``: the indices
    are the held-out split of a class without ``train``/``split`` (None: the whole
    dataset), and ``labels`` that whole dataset's (read to stratify it; else None)."""
    target = str(cfg._target_)
    fn = locate(cfg)
    args = dict(cfg.args)
    if cfg.kind == "custom":
        out = _call(target, fn, **args)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(map(_is_map_style, out))):
            raise DatasetError(
                f"dataset._target_={target} returned {_describe(out)}; allowed: {ALLOWED_RETURN}"
            )
        return out[0], out[1], None, None, None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for key in ("train", "split"):
        if key in args and key in params:
            raise DatasetError(
                f"dataset.args.{key}={args[key]!r} is not allowed: {target} "
                f"builds both splits with its own {key}= argument"
            )
    if "root" in params:
        args.setdefault("root", str(Path(cfg.root or ".").expanduser()))
    if "download" in params:
        args.setdefault("download", bool(cfg.download))
    if "train" in params:
        return (
            _call(target, fn, **args, train=True),
            _call(target, fn, **args, train=False),
            None,
            None,
            None,
        )
    if "split" in params:
        return (
            _call(target, fn, **args, split="train"),
            _call(target, fn, **args, split="test"),
            None,
            None,
            None,
        )
    whole = _call(target, fn, **args)
    if not _is_map_style(whole):
        raise DatasetError(
            f"dataset._target_={target} built {_describe(whole)}; allowed: a "
            "map-style dataset of (image, label)"
        )
    from sklearn.model_selection import train_test_split

    labels = labels_of(whole, None, f"dataset._target_={target}", cfg)
    try:
        tr, te = train_test_split(
            np.arange(len(labels)),
            test_size=float(cfg.test_fraction),
            stratify=labels,
            random_state=int(cfg.split_seed),
        )
    except ValueError as exc:
        raise DatasetError(
            f"dataset._target_={target}: cannot hold out dataset.test_fraction="
            f"{cfg.test_fraction} of its {len(labels)} items as a stratified test "
            f"split ({exc})"
        ) from exc
    return whole, whole, np.sort(tr), np.sort(te), labels


def _describe(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        kinds = ", ".join(type(o).__name__ for o in obj[:3]) + (", ..." if len(obj) > 3 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({kinds})"
    return f"a {type(obj).__name__}"


def _label_only(dataset: Any, i: int) -> Any:
    item = dataset[i]
    return (
        item[1]
        if isinstance(item, (tuple, list)) and len(item) == 2
        else _NotAPair(type(item).__name__)
    )


class _NotAPair(str):
    """What an item that is not an (image, label) pair was (a label pass marker)."""


class _Labels:
    """Item ``i``: the label of ``dataset[indices[i]]`` (a DataLoader's dataset)."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return _label_only(self.dataset, int(self.indices[i]))


def labels_of(
    dataset: Any, indices: np.ndarray | None, what: str, cfg: DatasetSettings, split: str = "train"
) -> np.ndarray:
    """The labels of ``dataset`` (at ``indices``) as int64: its ``targets`` when it has
    them for every item, else one pass over its items. Anything but an integer label is
    a DatasetError naming the split."""
    idx = np.arange(len(dataset)) if indices is None else indices
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        try:
            raw = list(targets) if not isinstance(targets, torch.Tensor) else targets.tolist()
        except TypeError:
            raw = None
        if raw is not None and len(raw) == len(dataset):
            return _as_labels([raw[int(i)] for i in idx], idx, what, split)
    from torch.utils.data import DataLoader

    from dtp_search.data.streaming import default_workers

    loader = DataLoader(
        _Labels(dataset, idx),
        batch_size=256,
        collate_fn=list,
        num_workers=min(default_workers(cfg.num_workers), -(-len(idx) // 256)),
    )
    raw = [y for batch in loader for y in batch]
    return _as_labels(raw, idx, what, split)


def _as_labels(raw: Sequence[Any], idx: np.ndarray, what: str, split: str) -> np.ndarray:
    out = np.empty(len(raw), dtype=np.int64)
    for k, y in enumerate(raw):
        if isinstance(y, _NotAPair):
            raise DatasetError(
                f"{what}: {split} item {int(idx[k])} is a {y}; allowed: {ALLOWED_ITEM}"
            )
        if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
            y = y.item()
        if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
            raise DatasetError(
                f"{what}: {split} item {int(idx[k])} has the label {y!r}; allowed: "
                "integers 0..classes-1"
            )
        out[k] = int(y)
    return out


def check_labels(
    labels: np.ndarray, num_classes: int, what: str, split: str, positions: np.ndarray
) -> None:
    """Refuse a label outside ``0..num_classes-1``, naming the split and the label."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        k = int(bad[0])
        raise DatasetError(
            f"{what}: the {split} split holds the label {int(labels[k])} (item "
            f"{int(positions[k])}); allowed: 0..{num_classes - 1} "
            f"({num_classes} classes)"
        )


def _declared_classes(dataset: Any) -> list[str] | None:
    """The dataset's ``classes`` attribute as strings (torchvision's convention), or None."""
    classes = getattr(dataset, "classes", None)
    if classes is None or isinstance(classes, (str, bytes)):
        return None
    try:
        return [str(c) for c in classes] or None
    except TypeError:  # not iterable: not a class list
        return None


def _few(classes: Sequence[str]) -> str:
    """A class list short enough for a one-line error (ImageNet has 1,000)."""
    if len(classes) <= 6:
        return str(list(classes))
    return f"{str(list(classes[:6]))[:-1]}, ... ({len(classes)} in all)]"


def load_user_sources(cfg: DatasetSettings) -> tuple[Source, Source, list[str]]:
    """The two splits of ``dataset=torchvision``/``custom`` as undecoded sources, with
    labels checked, limits applied and one image decoded to learn the shape."""
    target = str(cfg._target_)
    what = f"dataset._target_={target}"
    train_ds, test_ds, tr_idx, te_idx, whole = build_splits(cfg)
    labels, positions = {}, {}
    for split, ds, idx in (("train", train_ds, tr_idx), ("test", test_ds, te_idx)):
        positions[split] = np.arange(len(ds)) if idx is None else idx
        labels[split] = (
            whole[positions[split]]
            if whole is not None
            else labels_of(ds, positions[split], what, cfg, split)
        )
        if not len(labels[split]):
            raise DatasetError(
                f"{what}: the {split} split is empty; allowed: {ALLOWED_RETURN}, neither empty"
            )
    classes = _declared_classes(train_ds)
    test_classes = _declared_classes(test_ds)
    if classes is not None and test_classes is not None and classes != test_classes:
        raise DatasetError(
            f"{what}: the train split's classes {_few(classes)} differ from the test "
            f"split's {_few(test_classes)}; allowed: the same classes, in the same order, "
            "in both (label i must name one class in train and test)"
        )
    if classes is None:
        classes = [str(c) for c in range(int(max(labels["train"].max(), labels["test"].max())) + 1)]
    for split in ("train", "test"):
        check_labels(labels[split], len(classes), what, split, positions[split])
    first = train_ds[int(positions["train"][0])]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise DatasetError(
            f"{what}: train item {int(positions['train'][0])} is a "
            f"{type(first).__name__}; allowed: {ALLOWED_ITEM}"
        )
    channels = cfg.channels if cfg.channels is not None else image_channels(first[0])
    if channels not in (1, 3):
        if cfg.channels is not None:
            raise DatasetError(
                f"dataset.channels={cfg.channels} is not supported; allowed: 1, 3, null"
            )
        raise DatasetError(
            f"{what}: train item {int(positions['train'][0])} holds a "
            f"{type(first[0]).__name__}; allowed: {ALLOWED_ITEM}"
        )
    size = size_pair(cfg.image_size)
    sources = []
    for split, ds in (("train", train_ds), ("test", test_ds)):
        keep = stratified_subset(labels[split], getattr(cfg, f"{split}_limit"))
        decoder = DatasetDecoder(ds, positions[split][keep], channels, size, f"{what}: {split}")
        img = decoder[0]
        if not isinstance(img, torch.Tensor):
            raise DatasetError(img.message)
        sources.append(Source(decoder, labels[split][keep], tuple(img.shape)))
    return sources[0], sources[1], classes


__all__ = [
    "build_splits",
    "check_labels",
    "known_names",
    "labels_of",
    "load_user_sources",
    "locate",
    "to_uint8",
]
