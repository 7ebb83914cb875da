"""Training: one fold (:func:`prune_and_train`) and k-fold cross-validation
(:func:`cross_validate`).

Neither function knows about Optuna or MLflow: callers observe progress through the
``on_epoch`` callback and get plain dataclasses back.

Modules, lowest first: ``history`` (what a fold returns), ``device``, ``optim``
(optimizer and schedules), ``warmstart`` (the dense warm-start cache and its keys),
``checkpoint`` (per-trial checkpoints for resumed retries), ``evaluation`` (accuracy,
costs, the one-shot sweep), ``batching`` (a fold's batches and feedback hold-out),
``distill`` (the teacher and its loss), ``teacher`` (a dense teacher
trained first), ``trainer`` (the loop, :class:`FoldTrainer`),
``fold`` (:func:`prune_and_train`), ``cv`` (:func:`cross_validate`).
"""

from dtp_search.training.batching import attach_feedback, eval_batches, train_batches
from dtp_search.training.cv import CVResult, FoldHooks, cross_validate, fold_value
from dtp_search.training.device import resolve_device
from dtp_search.training.distill import check_teacher
from dtp_search.training.evaluation import CostProbe, evaluate, measured_sweep
from dtp_search.training.fold import prune_and_train
from dtp_search.training.history import DivergedError, EpochRecord, FoldResult
from dtp_search.training.trainer import FoldTrainer
from dtp_search.training.warmstart import WarmStart

__all__ = [
    "CVResult",
    "CostProbe",
    "DivergedError",
    "EpochRecord",
    "FoldHooks",
    "FoldResult",
    "FoldTrainer",
    "WarmStart",
    "attach_feedback",
    "check_teacher",
    "cross_validate",
    "eval_batches",
    "evaluate",
    "fold_value",
    "measured_sweep",
    "prune_and_train",
    "resolve_device",
    "train_batches",
]
