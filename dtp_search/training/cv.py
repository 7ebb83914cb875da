"""k-fold cross-validation of one pruning configuration (:func:`cross_validate`), its
result (:class:`CVResult`) and callbacks (:class:`FoldHooks`).

It knows nothing about Optuna or MLflow: callers observe progress through the hooks and
get plain dataclasses back.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dtp_search.data import ImageDataset
from dtp_search.pruning import DynamicPruner
from dtp_search.settings import FrontSettings, TrainSettings
from dtp_search.training.batching import attach_feedback, eval_batches, train_batches
from dtp_search.training.evaluation import CostProbe
from dtp_search.training.fold import prune_and_train
from dtp_search.training.history import EpochRecord, FoldResult, fold_from_dict, fold_to_dict
from dtp_search.training.warmstart import WarmStart


@dataclass
class CVResult:
    folds: list[FoldResult]

    @property
    def accuracy(self) -> float:
        return statistics.fmean(f.accuracy for f in self.folds)

    @property
    def accuracy_std(self) -> float:
        return statistics.pstdev(f.accuracy for f in self.folds)

    @property
    def sparsity(self) -> float:
        return statistics.fmean(f.sparsity for f in self.folds)

    @property
    def sparsity_std(self) -> float:
        return statistics.pstdev(f.sparsity for f in self.folds)

    def cost(self, name: str) -> float:
        """The mean over folds of the final models' cost ``name`` (``flops``, ...)."""
        return statistics.fmean(f.costs[name] for f in self.folds)

    def cost_std(self, name: str) -> float:
        return statistics.pstdev(f.costs[name] for f in self.folds)

    def value(self, objective: str) -> float:
        """The mean over folds of an objective of ``search.objectives`` (:func:`fold_value`)."""
        return statistics.fmean(fold_value(f, objective) for f in self.folds)


def fold_value(result: FoldResult, objective: str) -> float:
    """A fold's value of an objective of ``search.objectives``: its final model's
    accuracy, sparsity, or a cost it measured (:attr:`FoldResult.costs`)."""
    if objective == "accuracy":
        return result.accuracy
    if objective == "sparsity":
        return result.sparsity
    return result.costs[objective]


@dataclass
class FoldHooks:
    """The callbacks of :func:`cross_validate`; each may be ``None``."""

    on_fold_start: Callable[[int], None] | None = None  # fold k is about to start (or replay)
    on_fold_end: Callable[[int, FoldResult], None] | None = None  # fold k's result
    on_epoch: Callable[[int, EpochRecord], None] | None = None  # fold k's epoch record
    # {"folds": [finished folds], "fold": k, "train": <prune_and_train state>} after every epoch
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None

    def replay(self, k: int, records: Iterable[EpochRecord]) -> None:
        """Pass epochs trained before a resume to ``on_epoch`` as if trained now."""
        if self.on_epoch is not None:
            for record in records:
                self.on_epoch(k, record)

    def fold_epoch(self, k: int) -> Callable[[EpochRecord], None] | None:
        """``on_epoch`` for :func:`prune_and_train` of fold ``k``."""
        return None if self.on_epoch is None else functools.partial(self.on_epoch, k)

    def fold_checkpoint(
        self, k: int, finished: list[FoldResult]
    ) -> Callable[[dict[str, Any]], None] | None:
        """``on_checkpoint`` for :func:`prune_and_train` of fold ``k``, after ``finished``."""
        if self.on_checkpoint is None:
            return None
        return functools.partial(self._checkpoint, k, finished)

    def _checkpoint(self, k: int, finished: list[FoldResult], train_state: dict[str, Any]) -> None:
        self.on_checkpoint(
            {"folds": [fold_to_dict(r) for r in finished], "fold": k, "train": train_state}
        )


def cross_validate(
    dataset: ImageDataset,
    folds: int,
    seed: int,
    make_model: Callable[[], nn.Module],
    make_pruner: Callable[[nn.Module], DynamicPruner],
    settings: TrainSettings,
    *,
    device: torch.device | str = "cpu",
    front: FrontSettings | None = None,
    hooks: FoldHooks | None = None,
    resume: dict[str, Any] | None = None,
    warm_start: WarmStart | None = None,
    cost: CostProbe | None = None,
    repeats: int = 1,
) -> CVResult:
    """k-fold cross-validation of one pruning configuration on the *training* split.

    Folds come from ``sklearn.model_selection.RepeatedStratifiedKFold(n_splits=folds,
    n_repeats=repeats, random_state=seed)`` (with ``repeats=1`` the very splits of
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)``): k · repeats fold results,
    numbered 0 … k·repeats − 1, repetition r holding folds r·k … r·k + k − 1. Each fold
    trains a fresh model (seeded with ``seed + fold``) on k−1 parts and validates on the
    held-out part. The test split is not read.

    * ``dataset``: its training split is cross-validated; ``folds``: k (≥ 2);
      ``seed``: the folds' split, and ``seed + k`` seeds fold k's model and batch order;
      ``repeats``: how many times the k-fold split is drawn (each with its own shuffle).
    * ``make_model()``: a fresh model (on the CPU; it is moved to ``device``);
      ``make_pruner(model)``: the pruner of that model (policy, criterion, layers).
    * ``settings``: the optimisation of every fold (:func:`prune_and_train`);
      ``device``: where folds train.
    * ``front``: the front points of every fold (default ``FrontSettings()``).
    * ``hooks``: the callbacks (:class:`FoldHooks`; default none).
    * ``resume``: a state ``hooks.on_checkpoint`` received, to continue from.
    * ``warm_start``: the dense warm-start cache (:class:`WarmStart`; default none).
    * ``cost``: the costs each fold measures of its network (:class:`CostProbe`; default
      none: no compaction, no timing).

    A policy that needs feedback (``policy.needs_feedback``) reads accuracy on a
    stratified slice of ``policy.holdout`` of the fold's *training* part, which is then
    not trained on; the validation part stays unseen until the fold is scored.

    Checkpoints: ``hooks.on_checkpoint`` receives ``{"folds": [finished folds], "fold": k,
    "train": <prune_and_train state>}`` after every epoch; passing it back as ``resume``
    skips the finished folds (their results and epochs are replayed to the hooks)
    and continues fold k after its last finished epoch.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    front = front or FrontSettings()
    hooks = hooks or FoldHooks()
    labels = dataset.train.labels.numpy()
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    done = [fold_from_dict(d) for d in resume["folds"]] if resume else []
    results: list[FoldResult] = []
    for k, (tr_idx, va_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if hooks.on_fold_start is not None:
            hooks.on_fold_start(k)
        if k < len(done):  # finished before the checkpoint: replay, do not train again
            result = done[k]
            hooks.replay(k, result.history)
        else:
            state = resume["train"] if resume and resume.get("fold") == k else None
            if state is not None:
                hooks.replay(k, [EpochRecord(**r) for r in state["history"]])
            torch.manual_seed(seed + k)
            model = make_model().to(device)
            pruner = make_pruner(model)
            tr_idx = attach_feedback(
                pruner, model, dataset, tr_idx, labels, seed + k, settings, device
            )
            train = train_batches(dataset, tr_idx, settings, seed + k, device)
            val = eval_batches(dataset, dataset.train, va_idx, settings, device)
            result = prune_and_train(
                model,
                pruner,
                train,
                val,
                settings,
                front=front,
                on_epoch=hooks.fold_epoch(k),
                on_checkpoint=hooks.fold_checkpoint(k, results),
                resume=state,
                warm_start=warm_start,
                cost=cost,
                cost_epochs=cost.epochs.get(k, ()) if cost is not None else (),
            )
        results.append(result)
        if hooks.on_fold_end is not None:
            hooks.on_fold_end(k, result)
    return CVResult(results)
