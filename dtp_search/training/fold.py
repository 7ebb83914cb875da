"""Training one fold: :func:`prune_and_train`.

It knows nothing about Optuna or MLflow: callers observe progress through the
``on_epoch`` callback and get plain dataclasses back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from torch import nn

from dtp_search.data import TensorBatches
from dtp_search.pruning import DynamicPruner
from dtp_search.settings import FrontSettings, TrainSettings
from dtp_search.training.evaluation import CostProbe
from dtp_search.training.history import EpochRecord, FoldResult
from dtp_search.training.trainer import FoldTrainer
from dtp_search.training.warmstart import WarmStart


def prune_and_train(
    model: nn.Module,
    pruner: DynamicPruner,
    train: TensorBatches,
    val: TensorBatches,
    settings: TrainSettings,
    *,
    front: FrontSettings | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    warm_start: WarmStart | None = None,
    cost: CostProbe | None = None,
    cost_epochs: Collection[int] = (),
) -> FoldResult:
    """Train ``model`` while ``pruner`` moves its masks, fine-tune, and measure its front.

    1. *Pruning phase* (``settings.epochs``): SGD/AdamW under ``settings.lr_schedule``
       (:func:`make_lr_scheduler`); after every optimizer step the pruner may update
       the masks.
    2. *Post-pruning phase* (``settings.finetune_epochs``): the policy's final
       threshold is applied once, then the masks are frozen while the surviving
       weights are fine-tuned: a fresh optimizer at ``lr · finetune_lr_scale`` under
       ``settings.finetune_lr_schedule``, or, with ``"continue"``, the pruning phase's
       optimizer and schedule, which then span both phases, or, with ``"rewind"``
       (learning-rate rewinding, Renda et al. 2020), a fresh optimizer under the pruning
       phase's own schedule replayed from its start: fine-tuning epoch i has the
       learning rates of pruning epoch i.
    3. *Front* (``front``, default :class:`FrontSettings()`): (sparsity, validation
       accuracy) after mask updates (at most four per epoch: policies such as splicing
       update at almost every step), for the final model, and for a one-shot sweep of
       ``front.points`` higher global thresholds up to ``front.max_sparsity`` (see
       :func:`dtp_search.pruning.one_shot_sweep`). The update points are scored on a
       class-stratified subset of ``front.update_samples`` validation samples (``None``:
       all): up to four full passes over the fold per epoch would cost more than the
       epoch's training itself, for points that only trace the trajectory. The per-epoch
       curve, the final model and the sweep use the whole fold.

    With ``settings.l1 = λ > 0`` the loss is CE + λ·Σ_l ‖W_l ⊙ M_l‖₁ over the layers the
    pruner masks (plus λ·Σ_l ‖b_l‖₁ with ``settings.l1_bias``), from the epoch with
    0-based index ``settings.l1_start_epoch`` on (``EpochRecord.epoch − 1``: counted from
    the pruning phase's first epoch, on through fine-tuning); before it, plain CE.

    With ``settings.distill.alpha = α > 0`` the CE term (with the penalty, if any) becomes
    (1 − α)·CE + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) (:mod:`dtp_search.training.distill`)
    from the first epoch after the policy's dense ones on; the teacher t is a frozen copy
    of the network taken then (the dense warm start, or the starting weights of a policy
    that prunes from the first step), run in eval mode on the same augmented batch.

    Conv nets run on channels-last tensors (``settings.channels_last``: the batches come
    so from :func:`train_batches`/:func:`eval_batches`); on CUDA the forward passes run
    under bf16 autocast (``settings.amp``); ``settings.compile`` trains through
    ``torch.compile(model)`` (mask updates write buffers in place, so they do not
    recompile it). ``on_epoch`` receives every :class:`EpochRecord`.

    Checkpoints. After every epoch ``on_checkpoint`` receives the complete training
    state (model, optimizer, scheduler, pruner, the batch order's and torch's random
    states, history, front) as plain containers and tensors; passing one back as
    ``resume`` continues with the next epoch and, on CPU, reproduces the uninterrupted
    run bit for bit.

    Dense warm start. When the policy leaves the network dense for its first ``d``
    epochs (:meth:`~dtp_search.pruning.ThresholdPolicy.dense_epochs`) and ``warm_start``
    is given, the state after those epochs is taken from its cache if a trial with the
    same data, model initialisation, optimiser settings and ``d`` stored it (their epoch
    records are passed to ``on_epoch`` as if trained), or stored there once trained.

    Costs. With ``cost`` (:class:`CostProbe`) the final model's FLOPs, parameters and
    latency as fractions of the dense network are measured (:attr:`FoldResult.costs`), the
    sweep's points get those of ``cost.sweep``, and so do the epoch records of the epochs
    ``cost_epochs``.
    """
    trainer = FoldTrainer(
        model,
        pruner,
        train,
        val,
        settings,
        front or FrontSettings(),
        on_epoch=on_epoch,
        on_checkpoint=on_checkpoint,
        warm_start=warm_start,
        cost=cost,
        cost_epochs=cost_epochs,
    )
    return trainer.run(resume)
