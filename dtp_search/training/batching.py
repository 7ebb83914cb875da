"""A fold's batches: shuffled, augmented training batches, evaluation batches, and the
slice a feedback policy holds out of the training part."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dtp_search.data import ImageDataset, StreamBatches, StreamedSplit, TensorBatches
from dtp_search.pruning import DynamicPruner
from dtp_search.settings import TrainSettings
from dtp_search.training.evaluation import evaluate


def _batches_class(split: Any) -> type[TensorBatches] | type[StreamBatches]:
    """:class:`StreamBatches` for a split streamed from its source, else :class:`TensorBatches`
    (both yield the same batches; see :mod:`dtp_search.data.batches`)."""
    return StreamBatches if isinstance(split, StreamedSplit) else TensorBatches


def train_batches(
    dataset: ImageDataset,
    idx: np.ndarray,
    settings: TrainSettings,
    seed: int,
    device: torch.device | str,
) -> TensorBatches | StreamBatches:
    """Shuffled, augmented training batches over ``idx`` of the training split (in memory
    or streamed, as the split is)."""
    return _batches_class(dataset.train)(
        dataset.train,
        idx,
        batch_size=settings.batch_size,
        mean=dataset.mean,
        std=dataset.std,
        device=device,
        shuffle=True,
        augment=dataset.augment,
        crop_padding=dataset.crop_padding,
        seed=seed,
        drop_last=len(idx) > settings.batch_size,
        channels_last=settings.channels_last,
    )


def eval_batches(
    dataset: ImageDataset,
    split: Any,
    idx: np.ndarray,
    settings: TrainSettings,
    device: torch.device | str,
) -> TensorBatches | StreamBatches:
    """Evaluation batches (no shuffling, no augmentation) over ``idx`` of ``split`` (in
    memory or streamed, as the split is)."""
    return _batches_class(split)(
        split,
        idx,
        batch_size=settings.eval_batch_size,
        mean=dataset.mean,
        std=dataset.std,
        device=device,
        channels_last=settings.channels_last,
    )


def attach_feedback(
    pruner: DynamicPruner,
    model: nn.Module,
    dataset: ImageDataset,
    train_idx: np.ndarray,
    labels: np.ndarray,
    seed: int,
    settings: TrainSettings,
    device: torch.device | str,
) -> np.ndarray:
    """Give a feedback policy its held-out accuracy; returns the indices left to train on.

    A policy that needs feedback reads accuracy on a stratified slice (``policy.holdout``)
    of ``train_idx``, which is then not trained on. Other policies get ``train_idx`` back.
    """
    if not pruner.policy.needs_feedback:
        return train_idx
    train_idx, ho_idx = holdout_split(
        train_idx, labels, getattr(pruner.policy, "holdout", 0.1), seed
    )
    holdout = eval_batches(dataset, dataset.train, ho_idx, settings, device)
    pruner.policy.feedback = lambda: evaluate(model, holdout)
    return train_idx


def holdout_split(
    train_idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training indices into (train, held-out) parts, stratified by label."""
    from sklearn.model_selection import train_test_split

    y = labels[train_idx]
    n_hold = max(round(fraction * len(train_idx)), len(np.unique(y)))
    try:
        return tuple(train_test_split(train_idx, test_size=n_hold, stratify=y, random_state=seed))
    except ValueError:  # a class too small to stratify: fall back to a plain random split
        return tuple(train_test_split(train_idx, test_size=n_hold, random_state=seed))
