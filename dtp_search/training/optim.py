"""The optimizer of a phase (weight decay on weights only) and its learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtp_search.settings import LR_SCHEDULES, TrainSettings


def make_optimizer(
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
