"""Threshold policies: how the pruning threshold θ moves while the network trains.

:mod:`.base` has the rule every policy shares; one module per family (baselines, fixed
and scheduled thresholds, sparsity targets, accuracy feedback, splicing, learned
thresholds), and :mod:`.registry` maps config names to classes.
"""

# The families are imported in the registry's order, not sorted: ThresholdPolicy's
# "recover=true is not supported" message lists the recovering policies in the order
# their classes are defined.
# ruff: noqa: I001
from dtp_search.pruning.policies.base import LayerView, ThresholdPolicy
from dtp_search.pruning.policies.baselines import DenseBaseline, OneShotGlobal, RandomBaseline
from dtp_search.pruning.policies.fixed import (
    ConstantThreshold,
    ScheduledThreshold,
    StdScaledThreshold,
)
from dtp_search.pruning.policies.target import AGPThreshold
from dtp_search.pruning.policies.feedback import FeedbackThreshold
from dtp_search.pruning.policies.splicing import SplicingThreshold
from dtp_search.pruning.policies.learned import SoftThreshold
from dtp_search.pruning.policies.quantile import global_threshold, quantile_threshold
from dtp_search.pruning.policies.registry import POLICIES, build_policy
from dtp_search.pruning.policies.allocation import ALLOCATIONS, allocate

__all__ = [
    "ALLOCATIONS",
    "POLICIES",
    "AGPThreshold",
    "ConstantThreshold",
    "DenseBaseline",
    "FeedbackThreshold",
    "LayerView",
    "OneShotGlobal",
    "RandomBaseline",
    "ScheduledThreshold",
    "SoftThreshold",
    "SplicingThreshold",
    "StdScaledThreshold",
    "ThresholdPolicy",
    "allocate",
    "build_policy",
    "global_threshold",
    "quantile_threshold",
]
