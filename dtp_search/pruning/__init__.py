"""The pruning core: masks, importance criteria and threshold policies.

A plain PyTorch library — it imports neither Optuna nor MLflow, so it can be used
(and tested) on its own.
"""

from dtp_search.pruning.criteria import CRITERIA, Criterion, Magnitude, build_criterion
from dtp_search.pruning.front import FrontPoint, one_shot_sweep, pareto_mask, pareto_points
from dtp_search.pruning.masks import (
    WeightMask,
    attach_masks,
    get_mask,
    layer_sparsity,
    masked_layers,
    prunable_layers,
    sparsity,
)
from dtp_search.pruning.policies import (
    POLICIES,
    AGPThreshold,
    ConstantThreshold,
    LayerView,
    ScheduledThreshold,
    StdScaledThreshold,
    ThresholdPolicy,
    build_policy,
    quantile_threshold,
)
from dtp_search.pruning.pruner import DynamicPruner

__all__ = [
    "CRITERIA", "POLICIES", "AGPThreshold", "ConstantThreshold", "Criterion", "DynamicPruner",
    "FrontPoint", "LayerView", "Magnitude", "ScheduledThreshold", "StdScaledThreshold",
    "ThresholdPolicy", "WeightMask", "attach_masks", "build_criterion", "build_policy",
    "get_mask", "layer_sparsity", "masked_layers", "one_shot_sweep", "pareto_mask",
    "pareto_points", "prunable_layers", "quantile_threshold", "sparsity",
]
