"""The settings of training and measuring one network: ``cv``, ``train``, ``refit``,
``front``, ``export`` and ``console``."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtp_search.settings.rules import rule

LR_SCHEDULES = ("cosine", "onecycle", "step", "constant")
CONTINUE = "continue"  # train.finetune_lr_schedule: the pruning phase's schedule runs on
REWIND = "rewind"  # train.finetune_lr_schedule: the pruning phase's schedule again from its start


@dataclass
class CVSettings:
    folds: int = rule(3, low=2)  # StratifiedKFold over the training split
    repeats: int = rule(1, low=1)  # RepeatedStratifiedKFold: folds · repeats fold results


@dataclass
class DistillSettings:
    """Knowledge distillation from the dense network (``train.distill``; Hinton et al. 2015):
    the loss is (1 − α)·CE(y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)), t the teacher's and
    s the student's logits. α = 0 (the default) is plain CE."""

    alpha: float = rule(0.0, low=0, at_most=1, words="a number in [0, 1]; 0 = off")
    temperature: float = rule(4.0, above=0)
    # A state_dict of this very network to distil from (e.g. the dense network trained
    # once, by hand); null: the fold's own dense network (below).
    teacher: str | None = None
    # > 0: the teacher is the fold's starting network trained dense for this many epochs
    # on the fold (training/teacher.py), once per fold and recipe (cached with the warm
    # starts); 0: the network as it stands when pruning begins.
    teacher_epochs: int = rule(0, low=0)
    teacher_lr: float | None = rule(None, above=0)  # the teacher's; null: train.lr
    # the teacher's schedule; null: train.lr_schedule
    teacher_lr_schedule: str | None = rule(None, choices=LR_SCHEDULES)


@dataclass
class TrainSettings:
    """Optimisation settings of one fold (the ``train`` node). The YAML's values are
    these defaults (tests/test_settings.py holds them equal)."""

    epochs: int = rule(15, low=0)  # pruning phase: the policy moves θ
    finetune_epochs: int = rule(3, low=0)  # post-pruning phase: final θ, masks frozen
    batch_size: int = rule(64, low=1)
    eval_batch_size: int = rule(1024, low=1)
    optimizer: str = rule("sgd", choices=("sgd", "adam"))
    lr: float = rule(0.1, above=0)
    momentum: float = rule(0.9, low=0, high=1)
    nesterov: bool = True
    weight_decay: float = rule(5e-4, low=0)
    lr_schedule: str = rule("cosine", choices=LR_SCHEDULES)  # pruning phase
    # Post-pruning phase: one of LR_SCHEDULES, starting at lr · finetune_lr_scale, or
    # "continue": one optimizer and one schedule run over both phases (as a plain loop
    # that prunes inside a single OneCycle schedule does); "rewind": learning-rate
    # rewinding (Renda et al. 2020), a fresh optimizer replaying the pruning phase's
    # schedule (lr, lr_schedule, its length) from its start.
    finetune_lr_schedule: str = rule("cosine", choices=(*LR_SCHEDULES, CONTINUE, REWIND))
    finetune_lr_scale: float = rule(0.1, low=0)
    label_smoothing: float = rule(0.0, low=0, high=1)
    # Distillation from the dense network of the fold (training/distill.py)
    distill: DistillSettings = field(default_factory=DistillSettings)
    l1: float = rule(0.0, low=0)  # λ of the penalty λ·Σ|W ⊙ M| over the pruned layers' weights
    l1_start_epoch: int = rule(0, low=0)  # epochs (from the first) trained without the penalty
    l1_bias: bool = False  # the penalty covers the pruned layers' biases too
    channels_last: bool = True  # NHWC memory format for conv nets (faster on CPU and GPU)
    amp: bool = True  # CUDA only: bf16 autocast for forward passes
    compile: bool = False  # torch.compile the model for training (any device)

    def _check(self, prefix: str) -> None:
        if self.epochs + self.finetune_epochs < 1:
            raise ValueError(
                f"{prefix}epochs={self.epochs!r} is not allowed; allowed: "
                "epochs + finetune_epochs >= 1"
            )


@dataclass
class RefitSettings:
    enabled: bool = True  # retrain the chosen trials on the whole training split, test once
    top_k: int | None = rule(None, low=1)  # null = every Pareto-optimal trial
    trials: str = rule("pareto", choices=("pareto", "all"))  # all: a comparison's every cell
    # best: the chosen trials as they are; one_se: the sparsest within one standard error
    # of the most accurate (tracking/selection.py), per bin of the front
    select: str = rule("best", choices=("best", "one_se"))
    register: bool = False  # register the most accurate refit in the Model Registry


@dataclass
class FrontSettings:
    points: int = rule(10, low=0)  # one-shot thresholds above the final one
    max_sparsity: float = rule(0.995, above=0, high=1)
    update_samples: int | None = rule(1000, low=1)


@dataclass
class ExportSettings:
    """How a compacted network's cost is measured (search objectives and refit measures)."""

    batch_size: int = rule(64, low=1)  # latency: the batch size the network is deployed with


@dataclass
class ConsoleSettings:
    progress: bool = True
