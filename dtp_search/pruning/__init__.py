"""The pruning core: masks, importance criteria, threshold policies and structured export.

A plain PyTorch library — it imports neither Optuna nor MLflow, so it can be used
(and tested) on its own.
"""

from dtp_search.pruning.compact import compact_model, count_parameters, strip_masks
from dtp_search.pruning.criteria import (
    CRITERIA,
    GRANULARITIES,
    Activation,
    ActivationGradient,
    Criterion,
    Gradient,
    Magnitude,
    Taylor,
    build_criterion,
)
from dtp_search.pruning.front import FrontPoint, one_shot_sweep, pareto_mask
from dtp_search.pruning.masks import (
    LayerSelection,
    PrunableTensor,
    SoftThresholdMask,
    WeightMask,
    attach_masks,
    get_mask,
    layer_sparsity,
    prunable_layers,
    prunable_tensors,
    sparsity,
)
from dtp_search.pruning.policies import (
    POLICIES,
    AGPThreshold,
    ConstantThreshold,
    DenseBaseline,
    FeedbackThreshold,
    LayerView,
    OneShotGlobal,
    RandomBaseline,
    ScheduledThreshold,
    SoftThreshold,
    SplicingThreshold,
    StdScaledThreshold,
    ThresholdPolicy,
    build_policy,
    global_threshold,
    quantile_threshold,
)
from dtp_search.pruning.pruner import COLLAPSE_ACTIONS, DynamicPruner, LayerCollapse
from dtp_search.pruning.structure import UnitGroup, trace_units

__all__ = [
    "COLLAPSE_ACTIONS", "CRITERIA", "GRANULARITIES", "POLICIES", "AGPThreshold", "Activation",
    "ActivationGradient", "ConstantThreshold", "Criterion", "DenseBaseline", "DynamicPruner",
    "FeedbackThreshold", "FrontPoint", "Gradient", "LayerCollapse", "LayerSelection",
    "LayerView", "Magnitude", "OneShotGlobal", "PrunableTensor", "RandomBaseline",
    "ScheduledThreshold", "SoftThreshold", "SoftThresholdMask", "SplicingThreshold", "StdScaledThreshold", "Taylor",
    "ThresholdPolicy", "UnitGroup", "WeightMask", "attach_masks", "build_criterion",
    "build_policy", "compact_model", "count_parameters", "get_mask", "global_threshold",
    "layer_sparsity", "one_shot_sweep", "pareto_mask", "prunable_layers", "prunable_tensors",
    "quantile_threshold",
    "sparsity", "strip_masks", "trace_units",
]
