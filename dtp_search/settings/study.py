"""The settings of where a study lives and how it searches: ``paths``, ``study``,
``tracking`` and ``search`` (with its ``fidelity`` rung)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from dtp_search.settings.objectives import DIRECTIONS, OBJECTIVE_DIRECTIONS, OBJECTIVES
from dtp_search.settings.rules import SEED_HIGH, allowed, rule


@dataclass
class PathsSettings:
    root: str = MISSING
    cache_dir: str = MISSING  # decoded datasets (uint8 tensors)
    warm_start: str = MISSING  # dense warm-up states shared by trials
    data_dir: str = MISSING  # torchvision downloads
    checkpoints: str = MISSING  # per-trial checkpoints


# study.name, in a form that is one folder name on every file system.
# (Spaces inside are kept: names such as "lenet sweep" were allowed before this check.)
_FOLDER_NAME = re.compile(r"\w(?:[\w .+@,=-]{0,198}[\w.+@,=-])?")
_STUDY_NAME_WORDS = (
    "a folder name of letters, digits, spaces and _ . - + @ , = (at most 200, the first a "
    "letter, digit or _, the last no space; no '..', / or \\), e.g. "
    "study.name=cifar10-resnet20-agp"
)


@dataclass
class StudySettings:
    name: str = MISSING
    storage: str = MISSING
    workers: int = rule(1, low=1)
    # Seconds a run keeps retrying a storage or tracking server that stopped answering
    # (a restart, a failover) before it ends with one line and leaves the trial to the
    # heartbeat's retry.
    storage_patience: float = rule(300.0, low=0)
    names: list[str] | None = None  # mode=compare
    allow_changes: list[str] = rule(  # noqa: RUF009
        [], words="a list of config keys or nodes, e.g. study.allow_changes=[train.epochs,policy]"
    )

    def _check(self, prefix: str) -> None:
        if not self.name.strip():
            raise ValueError(
                f"{prefix}name={self.name!r} is not allowed; allowed: a non-empty text"
            )
        # The name is a folder under paths.checkpoints (and paths.root/workers): "..", a
        # separator or a leading "-"/"." would put it elsewhere, hide it, or read as an option.
        if not _FOLDER_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(
                f"{prefix}name={self.name!r} is not allowed; allowed: {_STUDY_NAME_WORDS}"
            )
        if not all(k.strip() for k in self.allow_changes):
            raise ValueError(
                f"{prefix}allow_changes={list(self.allow_changes)!r} is not allowed; "
                f"allowed: {allowed(StudySettings, 'allow_changes')}"
            )


@dataclass
class TrackingSettings:
    uri: str = MISSING  # sqlite:///abs/path or http://...
    experiment: str = MISSING
    artifact_location: str | None = None


@dataclass
class FidelitySettings:
    """A reduced-budget rung on fold 0 (:class:`dtp_search.search.fidelity.FidelityRung`)."""

    enabled: bool = False
    epoch: int | None = rule(None, low=1)  # the rung's epoch; null = a third of train.epochs
    eta: float = rule(3.0, above=1)  # the top 1/eta of the rung go on to the full budget
    n_startup_trials: int = rule(5, low=0)  # rung points before the rung stops anyone


@dataclass
class SearchSettings:
    name: str = "tpe"  # the search config chosen (conf/search)
    sampler: Any = None  # an Optuna sampler: _target_ and its arguments
    early_stop: Any = None  # an Optuna pruner (conf/early_stop)
    n_trials: int = rule(20, low=1)
    objectives: list[str] = rule(["accuracy", "sparsity"], choices=OBJECTIVES, each=True)  # noqa: RUF009
    directions: list[str] = rule(["maximize", "maximize"], choices=DIRECTIONS, each=True)  # noqa: RUF009
    min_sparsity: float | None = rule(None, low=0, high=1)
    # A trial is feasible when its CV FLOPs fraction (compacted / dense) is <= this.
    max_flops: float | None = rule(None, above=0, high=1)
    space: dict[str, Any] = field(default_factory=dict)
    max_failures: int = rule(3, low=1)
    # Optuna wants a heartbeat and a grace period of at least one second.
    heartbeat_interval: int = rule(30, low=1)
    grace_period: int = rule(120, low=1)
    max_retry: int = rule(2, low=0)
    checkpoint: bool = True
    warm_start: bool = True
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)

    def _check(self, prefix: str) -> None:
        objectives, directions = list(self.objectives), list(self.directions)
        if len(set(objectives)) != len(objectives):
            raise ValueError(
                f"{prefix}objectives={objectives} is not allowed; allowed: each of "
                f"{list(OBJECTIVES)} at most once"
            )
        if len(directions) != len(objectives):
            raise ValueError(
                f"{prefix}directions={directions} must give one of "
                f"{list(DIRECTIONS)} per objective {objectives}"
            )
        expected = [OBJECTIVE_DIRECTIONS[o] for o in objectives]
        if directions != expected:
            raise ValueError(
                f"{prefix}directions={directions} is not allowed with {prefix}objectives="
                f"{objectives}; allowed: {prefix}directions=[{','.join(expected)}] "
                "(accuracy and sparsity are maximised; flops, params and latency minimised)"
            )
        seed = (self.sampler or {}).get("seed") if isinstance(self.sampler, Mapping) else None
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_HIGH
        ):
            raise ValueError(
                f"{prefix}sampler.seed={seed!r} is not allowed; allowed: null or "
                f"an integer in [0, {SEED_HIGH - 1}]"
            )
