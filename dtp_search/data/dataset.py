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
:class:`~dtp_search.data.streaming.StreamedSplit`, decoded batch by batch in
``dataset.num_workers`` DataLoader worker processes (:class:`StreamBatches`), with the
same folds, augmentation and seeds: both paths yield the same batches. ``true`` / ``false``
force one path. This applies to ImageFolder trees (``imagefolder``, and ``cifar10`` /
``mnist`` given one as ``path``) and to ``torchvision`` / ``custom``; ``digits``, MNIST's
IDX files and torchvision's CIFAR-10 / MNIST arrays are in memory already.

A streamed split is decoded once when the dataset is loaded (:func:`~dtp_search.data.streaming.scan`):
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
* ``torchvision`` / ``custom`` — the user's own data (:mod:`dtp_search.data.user_data`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtp_search.data.builtin import load_digits_splits, load_torchvision_cifar10
from dtp_search.data.checks import check_name, check_same_shape, source_key
from dtp_search.data.imagefolder import load_imagefolder_splits
from dtp_search.data.mnist import load_mnist_path, load_torchvision_mnist
from dtp_search.data.scan import ScanPlan, scan_splits
from dtp_search.data.splits import Split, channel_stats, tensor_digest
from dtp_search.data.streaming import Source, StreamedSplit, decode_into_memory, default_workers
from dtp_search.errors import DatasetError
from dtp_search.settings import DATASET_KINDS, DatasetSettings, from_mapping

KINDS = DATASET_KINDS  # (the settings' list: one place for the allowed kinds)


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
    check_name(cfg)
    plan = ScanPlan(cfg)
    num_workers = default_workers(cfg.num_workers)
    path = cfg.path
    if kind == "digits":
        train, test, classes = load_digits_splits(cfg)
    elif kind in ("torchvision", "custom"):
        train, test, classes = _load_user_data(cfg, plan, num_workers)
    elif path and kind == "mnist":
        train, test, classes = load_mnist_path(cfg, Path(path), cache_dir, plan)
    elif path:
        train, test, classes = load_imagefolder_splits(cfg, Path(path), cache_dir, plan)
    elif kind == "cifar10":
        train, test, classes = load_torchvision_cifar10(cfg, cache_dir)
    elif kind == "mnist":
        train, test, classes = load_torchvision_mnist(cfg)
    else:
        raise DatasetError(
            "dataset.path is required for dataset=imagefolder "
            "(a folder with train/<class>/* and test/<class>/*)"
        )
    check_same_shape(train, test, source_key(cfg))
    digest, sums = None, None
    if isinstance(train, Source) or isinstance(test, Source):
        train, test, digest, sums = scan_splits(
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


def _load_user_data(
    cfg: DatasetSettings, plan: ScanPlan, num_workers: int
) -> tuple[Split | Source, Split | Source, list[str]]:
    """``dataset=torchvision``/``custom`` (:mod:`dtp_search.data.user_data`), each split decoded
    into memory when the plan keeps it there (else a source, streamed after the scan)."""
    from dtp_search.data.user_data import load_user_sources

    train, test, classes = load_user_sources(cfg)
    check_same_shape(train, test, source_key(cfg))  # before decoding anything
    out = []
    for source in (train, test):
        out.append(decode_into_memory(source, num_workers) if plan.keep(source.nbytes) else source)
    return out[0], out[1], classes
