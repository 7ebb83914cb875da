"""Training one fold: ``prune_and_train`` and ``cross_validate``.

Neither function knows about Optuna or MLflow: callers observe progress through the
``on_epoch`` callback and get plain dataclasses back.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from dtp_search.data import ImageDataset, TensorBatches, tensor_digest
from dtp_search.pruning import (
    DynamicPruner,
    FrontPoint,
    layer_sparsity,
    one_shot_sweep,
)
from dtp_search.settings import CONTINUE, LR_SCHEDULES, TrainSettings
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


def _make_optimizer(model: nn.Module, s: TrainSettings, lr: float,
                    extra_groups: list[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying biases and batch-norm affine parameters
    # hurts accuracy and has nothing to do with sparsity. Parameters a pruning policy
    # adds (learned thresholds) come in their own groups with their own decay.
    claimed = {id(p) for g in extra_groups for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in claimed:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups += [g for g in extra_groups if any(p.requires_grad for p in g["params"])]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=s.momentum,
                               nesterov=s.nesterov and s.momentum > 0)
    if s.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"train.optimizer={s.optimizer!r} is not supported; allowed: ['sgd', 'adam']")


def make_lr_scheduler(opt: torch.optim.Optimizer, schedule: str,
                      total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
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
        return sched.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                total_steps=total_steps,
                                cycle_momentum=momentum or "betas" in opt.defaults)
    if schedule == "step":
        return sched.MultiStepLR(opt, milestones=[total_steps // 2, (3 * total_steps) // 4],
                                 gamma=0.1)
    if schedule == "constant":
        return sched.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"train.lr_schedule={schedule!r} is not supported; "
                     f"allowed: {list(LR_SCHEDULES)}")


def prune_and_train(model: nn.Module, pruner: DynamicPruner, train: TensorBatches,
                    val: TensorBatches, settings: TrainSettings, *,
                    front_points: int = 10, front_max_sparsity: float = 0.995,
                    front_update_samples: int | None = 1000,
                    on_epoch: Callable[[EpochRecord], None] | None = None,
                    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                    resume: dict[str, Any] | None = None,
                    warm_start: WarmStartCache | None = None,
                    warm_start_context: Any = None) -> FoldResult:
    """Train ``model`` while ``pruner`` moves its masks, fine-tune, and measure its front.

    1. *Pruning phase* (``settings.epochs``): SGD/AdamW under ``settings.lr_schedule``
       (:func:`make_lr_scheduler`); after every optimizer step the pruner may update
       the masks.
    2. *Post-pruning phase* (``settings.finetune_epochs``): the policy's final
       threshold is applied once, then the masks are frozen while the surviving
       weights are fine-tuned: a fresh optimizer at ``lr · finetune_lr_scale`` under
       ``settings.finetune_lr_schedule``, or, with ``"continue"``, the pruning phase's
       optimizer and schedule, which then span both phases.
    3. *Front*: (sparsity, validation accuracy) after mask updates (at most four per
       epoch: policies such as splicing update at almost every step), for the final
       model, and for a one-shot sweep of higher global thresholds (see
       :func:`dtp_search.pruning.one_shot_sweep`). The update points are scored on a
       class-stratified subset of ``front_update_samples`` validation samples (``None``:
       all): up to four full passes over the fold per epoch would cost more than the
       epoch's training itself, for points that only trace the trajectory. The per-epoch
       curve, the final model and the sweep use the whole fold.

    With ``settings.l1 = λ > 0`` the loss is CE + λ·Σ_l ‖W_l ⊙ M_l‖₁ in both phases.

    Conv nets run on channels-last tensors (``settings.channels_last``: the batches come
    so from :func:`train_batches`/:func:`eval_batches`); on CUDA the forward passes run
    under bf16 autocast (``settings.amp``); ``settings.compile`` trains through
    ``torch.compile(model)`` (mask updates write buffers in place, so they do not
    recompile it).

    Checkpoints. After every epoch ``on_checkpoint`` receives the complete training
    state (model, optimizer, scheduler, pruner, the batch order's and torch's random
    states, history, front) as plain containers and tensors; passing one back as
    ``resume`` continues with the next epoch and, on CPU, reproduces the uninterrupted
    run bit for bit.

    Dense warm start. When the policy leaves the network dense for its first ``d``
    epochs (:meth:`~dtp_search.pruning.ThresholdPolicy.dense_epochs`) and ``warm_start``
    is given, the state after those epochs is taken from the cache if a trial with the
    same data, model initialisation, optimiser settings and ``d`` stored it (their epoch
    records are passed to ``on_epoch`` as if trained), or stored there once trained.
    ``warm_start_context`` names what the key cannot see: the dataset.
    """
    steps_per_epoch = len(train)
    if steps_per_epoch == 0:
        raise ValueError("the training fold is smaller than one batch; lower train.batch_size")
    cuda = train.device.type == "cuda"
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-d parameters only

    def amp() -> contextlib.AbstractContextManager:
        return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and settings.amp
                else contextlib.nullcontext())

    forward = torch.compile(model) if settings.compile else model

    def score(m: nn.Module, batches: TensorBatches = val) -> float:
        with amp():
            return evaluate(m, batches)

    update_val = val if not front_update_samples else val.subsample(int(front_update_samples))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    history: list[EpochRecord] = []
    front: list[FrontPoint] = []
    # The penalty reaches the layers the policy prunes (policy.layers), not those kept dense.
    modules = dict(model.named_modules())
    l1_layers = [modules[n] for n in pruner.masks] if settings.l1 > 0 else []
    front_gap = max(1, steps_per_epoch // 4)
    last_front_step = -front_gap
    done_epochs = 0
    dense_epochs = pruner.policy.dense_epochs(settings.epochs) if warm_start is not None else 0
    warm_key = None
    warmed = 0
    if dense_epochs > 0:
        warm_key = _warm_start_key(model, pruner, train, val, settings, dense_epochs,
                                   warm_start_context)
        if resume is None:
            resume = warm_start.load(warm_key, train.device)
            if resume is not None:
                warmed = dense_epochs
                for record in resume["history"]:
                    if on_epoch is not None:
                        on_epoch(EpochRecord(**record))
    if resume is not None:
        model.load_state_dict(resume["model"])
        if "pruner" in resume:
            pruner.load_state_dict(resume["pruner"])
        else:  # a warm-start state: the policy has not acted yet, only the criterion ran
            pruner.criterion.load_state_dict(resume["criterion"])
        train.generator.set_state(resume["batches"])
        _set_rng_state(resume["rng"])
        history = [EpochRecord(**r) for r in resume["history"]]
        front = [FrontPoint(**p) for p in resume["front"]]
        last_front_step = int(resume["last_front_step"])
        done_epochs = int(resume["epoch"])
    model.train()

    def compute_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp():
            if not l1_layers:
                return loss_fn(forward(x), y)
            # cached(): each masked weight W ⊙ M is computed once per step, not twice.
            with parametrize.cached():
                loss = loss_fn(forward(x), y)
                return loss + settings.l1 * sum(m.weight.abs().sum() for m in l1_layers)

    continued = settings.finetune_lr_schedule == CONTINUE
    live: dict[str, Any] = {}  # the optimizer and schedule that "continue" carries over

    def optimizer_for(phase: str) -> tuple[torch.optim.Optimizer, Any]:
        if continued and live:
            return live["opt"], live["sched"]
        if continued:  # one optimizer and one schedule over both phases
            lr, schedule = settings.lr, settings.lr_schedule
            steps = (settings.epochs + settings.finetune_epochs) * steps_per_epoch
            same = resume is not None  # a checkpoint of either phase holds this very pair
        elif phase == "prune":
            lr, schedule = settings.lr, settings.lr_schedule
            steps, same = settings.epochs * steps_per_epoch, resume is not None and resume["phase"] == phase
        else:
            lr, schedule = settings.lr * settings.finetune_lr_scale, settings.finetune_lr_schedule
            steps, same = settings.finetune_epochs * steps_per_epoch, resume is not None and resume["phase"] == phase
        opt = _make_optimizer(model, settings, lr, pruner.param_groups())
        sched = make_lr_scheduler(opt, schedule, steps)
        if same:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        live.update(opt=opt, sched=sched)
        return opt, sched

    def run_phase(phase: str, epochs: int, first_epoch: int, update_masks: bool) -> None:
        nonlocal last_front_step
        begin = max(first_epoch, done_epochs + 1)
        if epochs <= 0 or begin >= first_epoch + epochs:
            return  # empty, or finished before the checkpoint we resume from
        opt, sched = optimizer_for(phase)
        step = (begin - 1) * steps_per_epoch
        for e in range(begin, first_epoch + epochs):
            loss_sum = torch.zeros((), device=train.device)
            recovered_before = pruner.recovered
            for x, y in train:
                loss = compute_loss(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                step += 1
                if _stop_reason is not None:
                    raise KeyboardInterrupt(_stop_reason)
                if update_masks:
                    epoch_f = step / steps_per_epoch
                    updated = pruner.step(step, epoch_f) is not None
                    if updated and step - last_front_step >= front_gap:
                        last_front_step = step
                        front.append(FrontPoint(pruner.sparsity(), score(model, update_val),
                                                pruner.mean_threshold(), epoch_f, "update"))
            mean_loss = float(loss_sum) / steps_per_epoch
            if not math.isfinite(mean_loss):
                raise DivergedError(f"loss became {mean_loss} in epoch {e} ({phase} phase)")
            record = EpochRecord(e, phase, mean_loss, score(model), pruner.sparsity(),
                                 pruner.mean_threshold(), opt.param_groups[0]["lr"],
                                 pruner.recovered - recovered_before)
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            store_warm = (warm_key is not None and not warmed and phase == "prune"
                          and e == dense_epochs)
            if on_checkpoint is None and not store_warm:
                continue
            state = {"epoch": e, "phase": phase, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "batches": train.generator.get_state(), "rng": _get_rng_state(),
                     "history": [asdict(r) for r in history],
                     "front": [p.as_dict() for p in front], "last_front_step": last_front_step}
            if store_warm:
                warm_start.save(warm_key, {**state, "criterion": pruner.criterion.state_dict()})
            if on_checkpoint is not None:
                on_checkpoint({**state, "pruner": pruner.state_dict()})

    run_phase("prune", settings.epochs, 1, update_masks=True)
    if not pruner.finalized:
        pruner.finalize()
    run_phase("finetune", settings.finetune_epochs, settings.epochs + 1, update_masks=False)

    total_epochs = float(settings.epochs + settings.finetune_epochs)
    # After fine-tuning the last epoch record already measured this very model.
    last = history[-1] if history else None
    accuracy = (last.val_accuracy if last is not None and last.phase == "finetune"
                and last.epoch == settings.epochs + settings.finetune_epochs else score(model))
    final_sparsity = pruner.sparsity()
    front.append(FrontPoint(final_sparsity, accuracy, pruner.mean_threshold(), total_epochs, "final"))
    front += one_shot_sweep(pruner, score, n_points=front_points,
                            max_sparsity=front_max_sparsity, epoch=total_epochs)
    return FoldResult(accuracy, final_sparsity, history, front, layer_sparsity(model), warmed,
                      dict(pruner.restored), sorted(pruner.floored))


def _warm_start_key(model: nn.Module, pruner: DynamicPruner, train: TensorBatches,
                    val: TensorBatches, settings: TrainSettings, dense_epochs: int,
                    context: Any) -> str:
    """Everything the dense epochs (and their epoch records) depend on. The initial
    weights, the fold's indices and the random states are hashed themselves, so the key
    holds whatever produced them (model config, seeds, feedback hold-out)."""
    return cache_key(
        context=context, dense_epochs=dense_epochs, settings=asdict(settings),
        weights=tensor_digest(*model.state_dict().values()),
        train=tensor_digest(train.indices), val=tensor_digest(val.indices),
        batch_size=train.batch_size, augment=[train.augment, train.crop_padding],
        batches=tensor_digest(train.generator.get_state()), rng=tensor_digest(torch.get_rng_state()),
        criterion=[type(pruner.criterion).__name__, getattr(pruner.criterion, "beta", None)],
        layers=sorted(pruner.masks), device=str(train.device),
        torch=torch.__version__)


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
    return FoldResult(data["accuracy"], data["sparsity"],
                      [EpochRecord(**r) for r in data["history"]],
                      [FrontPoint(**p) for p in data["front"]], dict(data["layer_sparsity"]),
                      int(data.get("warm_start_epochs", 0)),
                      dict(data.get("min_keep_restored", {})),
                      list(data.get("floored_layers", [])))


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


def cross_validate(dataset: ImageDataset, folds: int, seed: int,
                   make_model: Callable[[], nn.Module],
                   make_pruner: Callable[[nn.Module], DynamicPruner],
                   settings: TrainSettings, *, device: torch.device | str = "cpu",
                   front_points: int = 10, front_max_sparsity: float = 0.995,
                   front_update_samples: int | None = 1000,
                   on_fold_start: Callable[[int], None] | None = None,
                   on_fold_end: Callable[[int, FoldResult], None] | None = None,
                   on_epoch: Callable[[int, EpochRecord], None] | None = None,
                   on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                   resume: dict[str, Any] | None = None,
                   warm_start: WarmStartCache | None = None,
                   warm_start_context: Any = None) -> CVResult:
    """k-fold cross-validation of one pruning configuration on the *training* split.

    Folds come from ``sklearn.model_selection.StratifiedKFold(folds, shuffle=True,
    random_state=seed)``; each fold trains a fresh model (seeded with ``seed + fold``)
    on k−1 parts and validates on the held-out part. The test split is not read.

    A policy that needs feedback (``policy.needs_feedback``) reads accuracy on a
    stratified slice of ``policy.holdout`` of the fold's *training* part, which is then
    not trained on; the validation part stays unseen until the fold is scored.

    Checkpoints: ``on_checkpoint`` receives ``{"folds": [finished folds], "fold": k,
    "train": <prune_and_train state>}`` after every epoch; passing it back as ``resume``
    skips the finished folds (their results and epochs are replayed to the callbacks)
    and continues fold k after its last finished epoch.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = dataset.train.labels.numpy()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    done = [fold_from_dict(d) for d in resume["folds"]] if resume else []
    results: list[FoldResult] = []
    for k, (tr_idx, va_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if on_fold_start is not None:
            on_fold_start(k)
        if k < len(done):  # finished before the checkpoint: replay, do not train again
            result = done[k]
            for record in result.history:
                if on_epoch is not None:
                    on_epoch(k, record)
        else:
            state = resume["train"] if resume and resume.get("fold") == k else None
            if state is not None and on_epoch is not None:
                for record in state["history"]:
                    on_epoch(k, EpochRecord(**record))
            torch.manual_seed(seed + k)
            model = make_model().to(device)
            pruner = make_pruner(model)
            tr_idx = attach_feedback(pruner, model, dataset, tr_idx, labels, seed + k, settings,
                                     device)
            train = train_batches(dataset, tr_idx, settings, seed + k, device)
            val = eval_batches(dataset, dataset.train, va_idx, settings, device)
            checkpoint = None
            if on_checkpoint is not None:
                def checkpoint(train_state: dict[str, Any], k: int = k) -> None:
                    on_checkpoint({"folds": [fold_to_dict(r) for r in results], "fold": k,
                                   "train": train_state})
            result = prune_and_train(
                model, pruner, train, val, settings, front_points=front_points,
                front_max_sparsity=front_max_sparsity, front_update_samples=front_update_samples,
                on_epoch=None if on_epoch is None else (lambda r, k=k: on_epoch(k, r)),
                on_checkpoint=checkpoint, resume=state, warm_start=warm_start,
                warm_start_context=warm_start_context)
        results.append(result)
        if on_fold_end is not None:
            on_fold_end(k, result)
    return CVResult(results)


def train_batches(dataset: ImageDataset, idx: np.ndarray, settings: TrainSettings, seed: int,
                  device: torch.device | str) -> TensorBatches:
    """Shuffled, augmented training batches over ``idx`` of the training split."""
    return TensorBatches(dataset.train, idx, batch_size=settings.batch_size, mean=dataset.mean,
                         std=dataset.std, device=device, shuffle=True, augment=dataset.augment,
                         crop_padding=dataset.crop_padding, seed=seed,
                         drop_last=len(idx) > settings.batch_size,
                         channels_last=settings.channels_last)


def eval_batches(dataset: ImageDataset, split: Any, idx: np.ndarray, settings: TrainSettings,
                 device: torch.device | str) -> TensorBatches:
    """Evaluation batches (no shuffling, no augmentation) over ``idx`` of ``split``."""
    return TensorBatches(split, idx, batch_size=settings.eval_batch_size, mean=dataset.mean,
                         std=dataset.std, device=device, channels_last=settings.channels_last)


def attach_feedback(pruner: DynamicPruner, model: nn.Module, dataset: ImageDataset,
                    train_idx: np.ndarray, labels: np.ndarray, seed: int,
                    settings: TrainSettings, device: torch.device | str) -> np.ndarray:
    """Give a feedback policy its held-out accuracy; returns the indices left to train on.

    A policy that needs feedback reads accuracy on a stratified slice (``policy.holdout``)
    of ``train_idx``, which is then not trained on. Other policies get ``train_idx`` back.
    """
    if not pruner.policy.needs_feedback:
        return train_idx
    train_idx, ho_idx = holdout_split(train_idx, labels, getattr(pruner.policy, "holdout", 0.1), seed)
    holdout = eval_batches(dataset, dataset.train, ho_idx, settings, device)
    pruner.policy.feedback = lambda: evaluate(model, holdout)
    return train_idx


def holdout_split(train_idx: np.ndarray, labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training indices into (train, held-out) parts, stratified by label."""
    from sklearn.model_selection import train_test_split

    y = labels[train_idx]
    n_hold = max(round(fraction * len(train_idx)), len(np.unique(y)))
    try:
        return tuple(train_test_split(train_idx, test_size=n_hold, stratify=y, random_state=seed))
    except ValueError:  # a class too small to stratify: fall back to a plain random split
        return tuple(train_test_split(train_idx, test_size=n_hold, random_state=seed))
