"""The policy registry: config name → policy class, and the factory that builds one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dtp_search.pruning.policies.base import ThresholdPolicy
from dtp_search.pruning.policies.baselines import DenseBaseline, OneShotGlobal, RandomBaseline
from dtp_search.pruning.policies.feedback import FeedbackThreshold
from dtp_search.pruning.policies.fixed import (
    ConstantThreshold,
    ScheduledThreshold,
    StdScaledThreshold,
)
from dtp_search.pruning.policies.learned import SoftThreshold
from dtp_search.pruning.policies.splicing import SplicingThreshold
from dtp_search.pruning.policies.target import AGPThreshold

POLICIES: dict[str, type[ThresholdPolicy]] = {
    cls.name: cls
    for cls in (
        DenseBaseline,
        OneShotGlobal,
        RandomBaseline,
        ConstantThreshold,
        StdScaledThreshold,
        ScheduledThreshold,
        AGPThreshold,
        FeedbackThreshold,
        SplicingThreshold,
        SoftThreshold,
    )
}


def build_policy(name: str, params: Mapping[str, Any]) -> ThresholdPolicy:
    """Instantiate the policy registered as ``name`` with keyword ``params``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"policy.name={name!r} is not supported; allowed: {list(POLICIES)}"
        ) from None
    return cls(**params)
