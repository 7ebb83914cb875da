"""The trained dense teacher of distillation (``train.distill.teacher_epochs``).

The network as it stands when pruning begins is a weak teacher: after one or two dense
epochs it is far from what the dense network reaches, and distilling from it costs
accuracy (docs/benchmarks.md §6: 5–6 points on CIFAR-10). With ``teacher_epochs = E > 0``
the teacher is instead the fold's starting network trained dense for E epochs on the
fold's own training batches, with the fold's optimizer settings, at ``teacher_lr``
(default ``train.lr``) under ``teacher_lr_schedule`` (default ``train.lr_schedule``) over
the E epochs, on cross-entropy alone. It never sees the fold's validation samples, so the
cross-validated accuracy of a distilled trial stays an honest estimate; in the refit it
trains on the whole training split.

Every trial of a study that shares the fold, the starting weights and that recipe shares
one teacher: it is stored in the dense warm-start cache (:mod:`.warmstart`), keyed on all
of them, so a search pays for one teacher per fold, not one per trial. (The teacher's own
recipe keys exist so that a searched ``train.lr`` does not retrain the teacher in every
trial.) Its training leaves the student's batch order and random states as they were.

PyTorch and the distillation libraries take a trained teacher as given; training one per
fold, under the fold's own split and cached across trials, is this service's job, hence
this module.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from torch import nn

from dtp_search.data import TensorBatches
from dtp_search.interrupts import stop_if_requested
from dtp_search.settings import TrainSettings
from dtp_search.training.device import autocast
from dtp_search.training.distill import make_teacher
from dtp_search.training.evaluation import evaluate
from dtp_search.training.optim import make_lr_scheduler, make_optimizer
from dtp_search.training.warmstart import WarmStart, cache_key, start_key_parts

log = logging.getLogger(__name__)


def teacher_recipe(settings: TrainSettings) -> TrainSettings:
    """The settings the teacher trains with: the fold's, with ``epochs`` =
    ``teacher_epochs``, no fine-tuning, no penalty and no distillation, and its own
    learning rate and schedule where given."""
    d = settings.distill
    own = {
        "epochs": d.teacher_epochs,
        "finetune_epochs": 0,
        "lr": d.teacher_lr if d.teacher_lr is not None else settings.lr,
        "lr_schedule": d.teacher_lr_schedule or settings.lr_schedule,
        "l1": 0.0,
        "compile": False,
    }
    return TrainSettings(**{**asdict(settings), **own, "distill": type(d)()})


def trained_teacher(
    model: nn.Module,
    train: TensorBatches,
    val: TensorBatches,
    settings: TrainSettings,
    warm_start: WarmStart | None = None,
) -> tuple[nn.Module, float]:
    """A frozen (:func:`make_teacher`) copy of ``model``, trained dense as the module's
    docstring says, from the cache of ``warm_start`` where a run with the same key
    stored it, and its accuracy on ``val``. ``model`` must not have been pruned yet (its
    masks are all ones)."""
    recipe = teacher_recipe(settings)
    teacher = make_teacher(model)
    key = None
    if warm_start is not None:
        key = cache_key(
            **start_key_parts(model, train, warm_start.context),
            kind="teacher",
            recipe={k: v for k, v in asdict(recipe).items() if k != "distill"},
        )
        state = warm_start.cache.load(key, train.device)
        if state is not None:
            teacher.load_state_dict(state["teacher"])
            log.info(
                "distillation teacher: from the cache (%d dense epochs, validation accuracy %.4f)",
                recipe.epochs,
                state["val_accuracy"],
            )
            return teacher, float(state["val_accuracy"])
    _train_dense(teacher, train, recipe)
    accuracy = evaluate(teacher, val) if val.num_samples else float("nan")
    log.info(
        "distillation teacher: trained dense for %d epochs (validation accuracy %.4f)",
        recipe.epochs,
        accuracy,
    )
    if key is not None:
        warm_start.cache.save(key, {"teacher": teacher.state_dict(), "val_accuracy": accuracy})
    return teacher, accuracy


def _train_dense(teacher: nn.Module, train: TensorBatches, recipe: TrainSettings) -> None:
    """``recipe.epochs`` epochs of plain SGD/AdamW on CE; the batch order's and torch's
    random states are restored afterwards (the student's run does not see this one)."""
    teacher.train()
    teacher.requires_grad_(True)
    opt = make_optimizer(teacher, recipe, recipe.lr)
    sched = make_lr_scheduler(opt, recipe.lr_schedule, recipe.epochs * len(train))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    batches = train.generator.get_state()
    devices = [train.device] if train.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for _ in range(recipe.epochs):
            for x, y in train:
                with autocast(train.device, recipe.amp):
                    loss = loss_fn(teacher(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                stop_if_requested()
    train.generator.set_state(batches)
    teacher.eval()
    teacher.requires_grad_(False)
