"""The training loop of one fold (:class:`FoldTrainer`, behind
:func:`~dtp_search.training.prune_and_train`): both phases, mask updates, the front,
checkpoints and the dense warm start."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.data import TensorBatches
from dtp_search.interrupts import stop_if_requested
from dtp_search.pruning import DynamicPruner, FrontPoint, layer_sparsity
from dtp_search.settings import CONTINUE, REWIND, FrontSettings, TrainSettings
from dtp_search.training.device import autocast
from dtp_search.training.distill import (
    distillation_loss,
    load_teacher,
    make_teacher,
    teacher_logits,
)
from dtp_search.training.evaluation import CostProbe, evaluate, measured_sweep
from dtp_search.training.history import DivergedError, EpochRecord, FoldResult
from dtp_search.training.optim import make_lr_scheduler, make_optimizer
from dtp_search.training.teacher import trained_teacher
from dtp_search.training.warmstart import WarmStart, warm_start_key


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
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-d parameters only
        self.forward = torch.compile(model) if settings.compile else model
        samples = front.update_samples
        self.update_val = val if not samples else val.subsample(int(samples))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        # The penalty reaches the tensors the policy prunes (policy.layers), not those kept
        # dense: Linear/Conv weights and attention in-projections (PrunableTensor).
        self.l1_layers = list(pruner.tensors.values()) if settings.l1 > 0 else []
        # Distillation: the teacher is the network as it stands when pruning begins, taken
        # before the first epoch after the policy's dense ones (training/distill.py), or a
        # dense copy trained first (training/teacher.py) that takes over then.
        self.distill = settings.distill if settings.distill.alpha > 0 else None
        self.teacher: nn.Module | None = None
        self.dense_teacher: nn.Module | None = None
        self.teacher_accuracy: float | None = None  # the dense teacher's, on the fold
        self.teacher_epoch = pruner.policy.dense_epochs(settings.epochs) + 1
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
        d = self.distill
        # A teacher trained first (unless a resumed state holds it), from the starting
        # weights: before the warm start or ``resume`` replace them.
        if d and d.teacher_epochs > 0 and not d.teacher and "teacher" not in (resume or {}):
            self.dense_teacher, self.teacher_accuracy = trained_teacher(
                self.model, self.train, self.val, self.settings, self.warm_start
            )
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
        self.warm_key = warm_start_key(
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
        if self.distill is not None and "teacher" in state:
            self.teacher = make_teacher(self.model)
            self.teacher.load_state_dict(state["teacher"])
        self.last_front_step = int(state["last_front_step"])
        self.done_epochs = int(state["epoch"])

    def _amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.train.device, self.settings.amp)

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
                return self._data_loss(x, y)
            # cached(): each masked weight W ⊙ M is computed once per step, not twice.
            with parametrize.cached():
                loss = self._data_loss(x, y)
                return loss + self.settings.l1 * sum(p.abs().sum() for p in self._l1_terms())

    def _data_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE on the labels, mixed with the teacher's soft targets once there is one."""
        out = self.forward(x)
        loss = self.loss_fn(out, y)
        if self.teacher is None:
            return loss
        d = self.distill
        return distillation_loss(out, teacher_logits(self.teacher, x), loss, d.alpha, d.temperature)

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
        elif phase == "prune" or s.finetune_lr_schedule == REWIND:
            # (rewind: fine-tuning replays the pruning phase's schedule from its start)
            lr, schedule, epochs = s.lr, s.lr_schedule, s.epochs
        else:
            lr, schedule = s.lr * s.finetune_lr_scale, s.finetune_lr_schedule
            epochs = s.finetune_epochs
        # With "continue" a checkpoint of either phase holds this very pair.
        same = resume is not None and (continued or resume["phase"] == phase)
        opt = make_optimizer(self.model, s, lr, self.pruner.param_groups())
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
            if self.distill is not None and self.teacher is None and e >= self.teacher_epoch:
                given = self.distill.teacher
                self.teacher = self.dense_teacher or (
                    load_teacher(self.model, given) if given else make_teacher(self.model)
                )
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
            stop_if_requested()
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
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
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
            self.teacher_accuracy,
        )


def _get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
