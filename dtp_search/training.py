"""Training one fold: ``prune_and_train`` and ``cross_validate``.

Neither function knows about Optuna or MLflow: callers observe progress through the
``on_epoch`` callback and get plain dataclasses back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.data import (
    ImageDataset,
    StreamBatches,
    StreamedSplit,
    TensorBatches,
    tensor_digest,
)
from dtp_search.pruning import (
    CostMeter,
    DynamicPruner,
    FrontPoint,
    layer_sparsity,
    one_shot_sweep,
)
from dtp_search.settings import CONTINUE, LR_SCHEDULES, FrontSettings, TrainSettings
from dtp_search.warmstart import WarmStartCache, cache_key


@dataclass
class EpochRecord:
    epoch: int  # 1-based, counted across both phases
    phase: str  # "prune" or "finetune"
    loss: float
    val_accuracy: float
    sparsity: float
    threshold: float
    lr: float
    recovered: int = 0  # units the policy turned back on (0 → 1) during this epoch
    costs: dict[str, float] = field(default_factory=dict)  # at CostProbe.epochs only


@dataclass
class FoldResult:
    accuracy: float  # validation accuracy of the final, fine-tuned model
    sparsity: float
    history: list[EpochRecord] = field(default_factory=list)
    front: list[FrontPoint] = field(default_factory=list)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    warm_start_epochs: int = 0  # dense epochs taken from the warm-start cache
    min_keep_restored: dict[str, int] = field(default_factory=dict)  # see DynamicPruner.restored
    floored_layers: list[str] = field(default_factory=list)  # see DynamicPruner.floored
    costs: dict[str, float] = field(default_factory=dict)  # the final model's (CostProbe)


class DivergedError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


# Set by a signal handler (see dtp_search.__main__): training stops at the next optimizer
# step, a safe point, instead of wherever the signal lands (a database write, say).
_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Ask the running fold to stop (it raises ``KeyboardInterrupt`` after its current step)."""
    global _stop_reason
    _stop_reason = reason


def stop_requested() -> str | None:
    return _stop_reason


_stopping = False  # a stop's KeyboardInterrupt has been raised: the run is unwinding


def stop_now() -> NoReturn:
    """Raise the ``KeyboardInterrupt`` that stops the run for the requested reason (or a
    second signal's), and remember that the run is unwinding (:func:`stopping`)."""
    global _stopping
    _stopping = True
    raise KeyboardInterrupt(_stop_reason)


def stopping() -> bool:
    """Whether :func:`stop_now` has raised: the run is already on its way out (closing
    its runs, saying why), and another signal must not cut that short."""
    return _stopping


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, batches: TensorBatches) -> float:
    """Top-1 accuracy of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches.device)
    # cached(): every masked weight W ⊙ M is computed once per pass, not once per batch.
    with parametrize.cached():
        for x, y in batches:
            correct += (model(x).argmax(dim=1) == y).sum()
    model.train(was_training)
    return float(correct) / max(batches.num_samples, 1)


def _make_optimizer(
    model: nn.Module, s: TrainSettings, lr: float, extra_groups: list[dict[str, Any]] = ()
) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying biases and batch-norm affine parameters
    # hurts accuracy and has nothing to do with sparsity. Parameters a pruning policy
    # adds (learned thresholds) come in their own groups with their own decay.
    claimed = {id(p) for g in extra_groups for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in claimed:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups += [g for g in extra_groups if any(p.requires_grad for p in g["params"])]
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0
        )
    if s.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"train.optimizer={s.optimizer!r} is not supported; allowed: ['sgd', 'adam']")


def make_lr_scheduler(
    opt: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of one phase, stepped after every optimizer step.

    With η the learning rate the optimizer was built with and T = ``total_steps``:

    * ``cosine`` — η_k = η · (1 + cos(π k / T)) / 2 (``CosineAnnealingLR``);
    * ``onecycle`` — ``OneCycleLR(max_lr=η)`` with PyTorch's defaults: warm-up from η/25
      over the first 30 % of T, cosine down to η/10⁴ (SGD momentum cycles 0.95 ↔ 0.85);
    * ``step`` — η, then η/10 after 50 % and η/100 after 75 % of T (``MultiStepLR``);
    * ``constant`` — η throughout.
    """
    total_steps = max(int(total_steps), 1)
    sched = torch.optim.lr_scheduler
    if schedule == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=total_steps)
    if schedule == "onecycle":
        momentum = "momentum" in opt.defaults and opt.defaults["momentum"] > 0
        return sched.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total_steps,
            cycle_momentum=momentum or "betas" in opt.defaults,
        )
    if schedule == "step":
        return sched.MultiStepLR(
            opt, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1
        )
    if schedule == "constant":
        return sched.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(
        f"train.lr_schedule={schedule!r} is not supported; allowed: {list(LR_SCHEDULES)}"
    )


@dataclass(frozen=True)
class CostProbe:
    """What a fold measures of its pruned network's cost, as fractions of the dense
    network (:class:`~dtp_search.pruning.CostMeter`): every measure of ``meter`` for the
    final model (:attr:`FoldResult.costs`, and the final front point's); ``sweep``: the
    measures each point of the one-shot sweep gets (the front's axis); ``epochs``: fold →
    the epochs whose :class:`EpochRecord` carries every measure too (the fidelity rung)."""

    meter: CostMeter
    sweep: tuple[str, ...] = ()
    epochs: Mapping[int, Collection[int]] = field(default_factory=dict)


def measured_sweep(
    pruner: DynamicPruner,
    evaluate: Callable[[nn.Module], float],
    cost: CostProbe | None,
    *,
    n_points: int,
    max_sparsity: float,
    epoch: float,
) -> list[FrontPoint]:
    """:func:`~dtp_search.pruning.one_shot_sweep`, each point with the costs ``cost.sweep``
    of its swept network (the masks of the point, compacted), measured where it is scored."""
    measures = cost.sweep if cost is not None else ()
    costs: list[dict[str, float]] = []

    def scored(model: nn.Module) -> float:
        if measures:
            costs.append(cost.meter.measure(model, only=measures))
        return evaluate(model)

    points = one_shot_sweep(
        pruner, scored, n_points=n_points, max_sparsity=max_sparsity, epoch=epoch
    )
    if not measures:
        return points
    return [dataclasses.replace(p, costs=c) for p, c in zip(points, costs, strict=True)]


@dataclass
class WarmStart:
    """The dense warm-start cache of :func:`prune_and_train`, and what its keys cannot see."""

    cache: WarmStartCache
    context: Any = None  # hashed into every key: the dataset's config and content digest


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
       optimizer and schedule, which then span both phases.
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


class FoldTrainer:
    """One fold's training (:func:`prune_and_train`): the model, pruner, batches and
    settings, and the state that changes while it trains (history, front, the live
    optimizer and schedule, the step counter)."""

    def __init__(
        self,
        model: nn.Module,
        pruner: DynamicPruner,
        train: TensorBatches,
        val: TensorBatches,
        settings: TrainSettings,
        front: FrontSettings,
        *,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
        warm_start: WarmStart | None = None,
        cost: CostProbe | None = None,
        cost_epochs: Collection[int] = (),
    ) -> None:
        self.steps_per_epoch = len(train)
        if self.steps_per_epoch == 0:
            raise ValueError("the training fold is smaller than one batch; lower train.batch_size")
        self.model, self.pruner, self.train, self.val = model, pruner, train, val
        self.settings, self.front_settings = settings, front
        self.on_epoch, self.on_checkpoint, self.warm_start = on_epoch, on_checkpoint, warm_start
        self.cost, self.cost_epochs = cost, frozenset(cost_epochs if cost is not None else ())
        self.autocast = train.device.type == "cuda" and settings.amp
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-d parameters only
        self.forward = torch.compile(model) if settings.compile else model
        samples = front.update_samples
        self.update_val = val if not samples else val.subsample(int(samples))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        # The penalty reaches the tensors the policy prunes (policy.layers), not those kept
        # dense: Linear/Conv weights and attention in-projections (PrunableTensor).
        self.l1_layers = list(pruner.tensors.values()) if settings.l1 > 0 else []
        self.history: list[EpochRecord] = []
        self.front: list[FrontPoint] = []
        self.front_gap = max(1, self.steps_per_epoch // 4)
        self.last_front_step = -self.front_gap
        self.done_epochs = 0  # epochs finished before this run (a checkpoint's, the cache's)
        self.dense_epochs = 0
        self.warm_key: str | None = None
        self.warmed = 0  # dense epochs taken from the warm-start cache
        self.resume: dict[str, Any] | None = None  # the state this run continues from
        self.opt: torch.optim.Optimizer | None = None  # the live optimizer and schedule
        self.sched: Any = None
        self.step = 0  # optimizer steps, counted across both phases

    def run(self, resume: dict[str, Any] | None = None) -> FoldResult:
        """Train both phases (after ``resume``'s epochs, or the warm start's); measure the front."""
        resume = self._warm_start(resume)
        if resume is not None:
            self._restore(resume)
        self.resume = resume
        self.model.train()
        s = self.settings
        self._run_phase("prune", s.epochs, 1, update_masks=True)
        if not self.pruner.finalized:
            self.pruner.finalize()
        self._run_phase("finetune", s.finetune_epochs, s.epochs + 1, update_masks=False)
        return self._result()

    def _warm_start(self, resume: dict[str, Any] | None) -> dict[str, Any] | None:
        """The state to continue from: ``resume``, else the cached dense epochs, if any."""
        if self.warm_start is None:
            return resume
        self.dense_epochs = self.pruner.policy.dense_epochs(self.settings.epochs)
        if self.dense_epochs <= 0:
            return resume
        self.warm_key = _warm_start_key(
            self.model,
            self.pruner,
            self.train,
            self.val,
            self.settings,
            self.dense_epochs,
            self.warm_start.context,
        )
        if resume is not None:
            return resume
        state = self.warm_start.cache.load(self.warm_key, self.train.device)
        if state is not None:
            self.warmed = self.dense_epochs
            for record in state["history"]:
                if self.on_epoch is not None:
                    self.on_epoch(EpochRecord(**record))
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if "pruner" in state:
            self.pruner.load_state_dict(state["pruner"])
        else:  # a warm-start state: the policy has not acted yet, only the criterion ran
            self.pruner.criterion.load_state_dict(state["criterion"])
        self.train.generator.set_state(state["batches"])
        _set_rng_state(state["rng"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.front = [FrontPoint(**p) for p in state["front"]]
        self.last_front_step = int(state["last_front_step"])
        self.done_epochs = int(state["epoch"])

    def _amp(self) -> contextlib.AbstractContextManager:
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )

    def _score(self, m: nn.Module, batches: TensorBatches | None = None) -> float:
        """Accuracy of ``m`` on ``batches`` (default: the whole validation fold)."""
        with self._amp():
            return evaluate(m, self.val if batches is None else batches)

    def _penalized(self, epoch: int) -> bool:
        """Whether the L1 penalty applies in ``epoch`` (1-based, across both phases)."""
        return bool(self.l1_layers) and epoch - 1 >= self.settings.l1_start_epoch

    def _loss(self, x: torch.Tensor, y: torch.Tensor, penalized: bool) -> torch.Tensor:
        with self._amp():
            if not penalized:
                return self.loss_fn(self.forward(x), y)
            # cached(): each masked weight W ⊙ M is computed once per step, not twice.
            with parametrize.cached():
                loss = self.loss_fn(self.forward(x), y)
                return loss + self.settings.l1 * sum(p.abs().sum() for p in self._l1_terms())

    def _l1_terms(self) -> list[torch.Tensor]:
        """The (masked) weights W_l ⊙ M_l the L1 penalty covers, each followed by its bias
        b_l with ``settings.l1_bias`` (an attention in-projection's rows of ``in_proj_bias``)."""
        terms = []
        for t in self.l1_layers:
            terms.append(t.weight)
            if self.settings.l1_bias and t.bias is not None:
                terms.append(t.bias)
        return terms

    def _optimizer_for(self, phase: str) -> tuple[torch.optim.Optimizer, Any]:
        """The phase's optimizer and schedule; with ``"continue"`` one pair over both."""
        s, resume = self.settings, self.resume
        continued = s.finetune_lr_schedule == CONTINUE
        if continued and self.opt is not None:
            return self.opt, self.sched
        if continued:  # one optimizer and one schedule over both phases
            lr, schedule, epochs = s.lr, s.lr_schedule, s.epochs + s.finetune_epochs
        elif phase == "prune":
            lr, schedule, epochs = s.lr, s.lr_schedule, s.epochs
        else:
            lr, schedule = s.lr * s.finetune_lr_scale, s.finetune_lr_schedule
            epochs = s.finetune_epochs
        # With "continue" a checkpoint of either phase holds this very pair.
        same = resume is not None and (continued or resume["phase"] == phase)
        opt = _make_optimizer(self.model, s, lr, self.pruner.param_groups())
        sched = make_lr_scheduler(opt, schedule, epochs * self.steps_per_epoch)
        if same:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        return opt, sched

    def _run_phase(self, phase: str, epochs: int, first_epoch: int, update_masks: bool) -> None:
        begin = max(first_epoch, self.done_epochs + 1)
        if epochs <= 0 or begin >= first_epoch + epochs:
            return  # empty, or finished before the checkpoint we resume from
        self.opt, self.sched = self._optimizer_for(phase)
        self.step = (begin - 1) * self.steps_per_epoch
        for e in range(begin, first_epoch + epochs):
            record = self._train_epoch(phase, e, update_masks)
            self.history.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record)
            self._checkpoint(e, phase)

    def _train_epoch(self, phase: str, e: int, update_masks: bool) -> EpochRecord:
        opt, sched, pruner = self.opt, self.sched, self.pruner
        loss_sum = torch.zeros((), device=self.train.device)
        recovered_before = pruner.recovered
        penalized = self._penalized(e)
        for x, y in self.train:
            loss = self._loss(x, y, penalized)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            self.step += 1
            if _stop_reason is not None:
                stop_now()
            if update_masks:
                self._update_masks()
        mean_loss = float(loss_sum) / self.steps_per_epoch
        if not math.isfinite(mean_loss):
            raise DivergedError(f"loss became {mean_loss} in epoch {e} ({phase} phase)")
        return EpochRecord(
            e,
            phase,
            mean_loss,
            self._score(self.model),
            pruner.sparsity(),
            pruner.mean_threshold(),
            opt.param_groups[0]["lr"],
            pruner.recovered - recovered_before,
            self.cost.meter.measure(self.model) if e in self.cost_epochs else {},
        )

    def _update_masks(self) -> None:
        """Let the pruner act after this step; if it did, maybe add a front point."""
        epoch_f = self.step / self.steps_per_epoch
        if self.pruner.step(self.step, epoch_f) is not None:
            self._maybe_front_point(epoch_f)

    def _maybe_front_point(self, epoch_f: float) -> None:
        """A front point after a mask update, at most one per ``front_gap`` steps."""
        if self.step - self.last_front_step < self.front_gap:
            return
        self.last_front_step = self.step
        self.front.append(
            FrontPoint(
                self.pruner.sparsity(),
                self._score(self.model, self.update_val),
                self.pruner.mean_threshold(),
                epoch_f,
                "update",
            )
        )

    def _checkpoint(self, e: int, phase: str) -> None:
        """After epoch ``e``: the state to ``on_checkpoint``, and to the warm-start cache
        at the end of the dense epochs."""
        store_warm = (
            self.warm_key is not None
            and not self.warmed
            and phase == "prune"
            and e == self.dense_epochs
        )
        if self.on_checkpoint is None and not store_warm:
            return
        state = {
            "epoch": e,
            "phase": phase,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "batches": self.train.generator.get_state(),
            "rng": _get_rng_state(),
            "history": [asdict(r) for r in self.history],
            "front": [p.as_dict() for p in self.front],
            "last_front_step": self.last_front_step,
        }
        if store_warm:
            self.warm_start.cache.save(
                self.warm_key, {**state, "criterion": self.pruner.criterion.state_dict()}
            )
        if self.on_checkpoint is not None:
            self.on_checkpoint({**state, "pruner": self.pruner.state_dict()})

    def _result(self) -> FoldResult:
        """The final model's accuracy and sparsity, with its front point and the sweep."""
        s, pruner = self.settings, self.pruner
        total_epochs = float(s.epochs + s.finetune_epochs)
        # After fine-tuning the last epoch record already measured this very model.
        last = self.history[-1] if self.history else None
        accuracy = (
            last.val_accuracy
            if last is not None
            and last.phase == "finetune"
            and last.epoch == s.epochs + s.finetune_epochs
            else self._score(self.model)
        )
        final_sparsity = pruner.sparsity()
        # The dense latency is timed again at each fold's end (the sweep's points reuse it),
        # so that the two times of a ratio are taken close together, under one load.
        costs = self.cost.meter.measure(self.model, remeasure_dense=True) if self.cost else {}
        self.front.append(
            FrontPoint(
                final_sparsity, accuracy, pruner.mean_threshold(), total_epochs, "final", costs
            )
        )
        self.front += measured_sweep(
            pruner,
            self._score,
            self.cost,
            n_points=self.front_settings.points,
            max_sparsity=self.front_settings.max_sparsity,
            epoch=total_epochs,
        )
        return FoldResult(
            accuracy,
            final_sparsity,
            self.history,
            self.front,
            layer_sparsity(self.model),
            self.warmed,
            dict(pruner.restored),
            sorted(pruner.floored),
            costs,
        )


def _warm_start_key(
    model: nn.Module,
    pruner: DynamicPruner,
    train: TensorBatches,
    val: TensorBatches,
    settings: TrainSettings,
    dense_epochs: int,
    context: Any,
) -> str:
    """Everything the dense epochs (and their epoch records) depend on. The initial
    weights, the fold's indices and the random states are hashed themselves, so the key
    holds whatever produced them (model config, seeds, feedback hold-out)."""
    return cache_key(
        context=context,
        dense_epochs=dense_epochs,
        settings=_key_settings(settings),
        weights=tensor_digest(*model.state_dict().values()),
        train=tensor_digest(train.indices),
        val=tensor_digest(val.indices),
        batch_size=train.batch_size,
        augment=[train.augment, train.crop_padding],
        batches=tensor_digest(train.generator.get_state()),
        rng=tensor_digest(torch.get_rng_state()),
        criterion=[type(pruner.criterion).__name__, getattr(pruner.criterion, "beta", None)],
        layers=sorted(pruner.masks),
        device=str(train.device),
        torch=torch.__version__,
    )


# TrainSettings fields younger than the cache: left out of the key at their defaults (which
# train what the code before them trained), so that the states stored before still match.
_KEY_OPTIONAL = ("l1_start_epoch", "l1_bias")


def _key_settings(settings: TrainSettings) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(TrainSettings) if f.name in _KEY_OPTIONAL}
    return {k: v for k, v in asdict(settings).items() if k not in defaults or v != defaults[k]}


def _get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fold_to_dict(result: FoldResult) -> dict[str, Any]:
    """A :class:`FoldResult` as plain containers (for checkpoints)."""
    return asdict(result)


def fold_from_dict(data: dict[str, Any]) -> FoldResult:
    return FoldResult(
        data["accuracy"],
        data["sparsity"],
        [EpochRecord(**r) for r in data["history"]],
        [FrontPoint(**p) for p in data["front"]],
        dict(data["layer_sparsity"]),
        int(data.get("warm_start_epochs", 0)),
        dict(data.get("min_keep_restored", {})),
        list(data.get("floored_layers", [])),
        dict(data.get("costs", {})),
    )


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
) -> CVResult:
    """k-fold cross-validation of one pruning configuration on the *training* split.

    Folds come from ``sklearn.model_selection.StratifiedKFold(folds, shuffle=True,
    random_state=seed)``; each fold trains a fresh model (seeded with ``seed + fold``)
    on k−1 parts and validates on the held-out part. The test split is not read.

    * ``dataset``: its training split is cross-validated; ``folds``: k (≥ 2);
      ``seed``: the folds' split, and ``seed + k`` seeds fold k's model and batch order.
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
    from sklearn.model_selection import StratifiedKFold

    front = front or FrontSettings()
    hooks = hooks or FoldHooks()
    labels = dataset.train.labels.numpy()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
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


def _batches_class(split: Any) -> type[TensorBatches] | type[StreamBatches]:
    """:class:`StreamBatches` for a split streamed from its source, else :class:`TensorBatches`
    (both yield the same batches; see :mod:`dtp_search.batches`)."""
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
