"""What a fold's training returns: its epoch records and result, as dataclasses and as
the plain containers a checkpoint stores; and the error of a diverged loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dtp_search.pruning import FrontPoint


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
    # validation accuracy of the trained distillation teacher (train.distill.teacher_epochs)
    teacher_accuracy: float | None = None


class DivergedError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


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
        data.get("teacher_accuracy"),
    )
