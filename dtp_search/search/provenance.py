"""A study that knows its own configuration.

The first run of a study stores the parts of the config that define it (what is trained,
on which data, how it is scored and searched) in the study's user attributes, and every
trial stores its own resolved config. A later run of the same ``study.name`` is compared
against the stored definition before it writes anything: a changed policy, dataset,
model, fold count or training budget would mix trials whose CV figures are not
comparable on one Pareto front, so it is refused with the differing keys, unless the
user names them in ``study.allow_changes``. Refit rebuilds each trial from its own
stored config, not from today's command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from dtp_search.models import checkpoint_digest
from dtp_search.search.config import ENGINE_KEYS, ConfigError, flatten, loggable
from dtp_search.settings import PrunerSettings, Settings
from dtp_search.tracking import records

# Config nodes (or keys) that define a study. Not in it: where things run and are stored
# (paths, study.storage, tracking, device, threads, console, workers), the budget
# (search.n_trials: a rerun tops up), the sampler, and the engine switches.
DEFINING = (
    "seed",
    "dataset",
    "model",
    "policy",
    "cv",
    "train",
    "front",
    "search.objectives",
    "search.directions",
    "search.min_sparsity",
    "search.max_flops",
    "search.space",
)
# A trial's config nodes that refit takes from the trial (the rest: today's run).
TRIAL_NODES = ("seed", "model", "policy", "cv", "train", "front")
# Where the data and the trained weights live may change between machines; their content
# may not (``dataset.digest``, ``model.checkpoint_digest``).
_DATA_LOCATION = ("path", "root", "download")
# How the data is read (decoded into memory or streamed) does not change what it is.
_DATA_ENGINE = ("in_memory", "memory_limit", "num_workers")
_NOT_DEFINING = (
    *ENGINE_KEYS,
    *(f"dataset.{k}" for k in (*_DATA_LOCATION, *_DATA_ENGINE)),
    "model.checkpoint",
)
_ABSENT = "(absent)"
STUDY_ATTR = "config"
TRIAL_ATTR = "config"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def defining_config(cfg: DictConfig, dataset_digest: str) -> dict[str, Any]:
    """The flat ``key → value`` that defines the study ``cfg`` runs, JSON-normalised."""
    full = OmegaConf.to_container(cfg, resolve=True)
    flat = {
        k: v
        for k, v in flatten(full).items()
        if _under(k, DEFINING) and not _under(k, _NOT_DEFINING)
    }
    flat["dataset.digest"] = dataset_digest
    if "latency" in (OmegaConf.select(cfg, "search.objectives") or []):
        # A latency objective is timed at this batch size: other sizes, other values.
        flat["export.batch_size"] = OmegaConf.select(cfg, "export.batch_size")
    checkpoint = OmegaConf.select(cfg, "model.checkpoint")
    if checkpoint:
        flat["model.checkpoint_digest"] = checkpoint_digest(checkpoint)
    return json.loads(json.dumps(flat, default=str))


# Not part of what a trial trains: the search spaces (a trial holds its sampled values).
_SPACES = ("policy.space", "policy.options", "search.space")


def trial_key(tcfg: DictConfig, dataset_digest: str) -> str:
    """Hash of what a trial's training depends on, the key of its checkpoint: the same
    keys as the drift check compares (:func:`defining_config`), without the search spaces.
    A change the drift check lets through unasked (``train.amp``, ``dataset.path``: how
    or from where, not what) keeps the checkpoint; one it refuses changes the key."""
    flat = {
        k: v for k, v in defining_config(tcfg, dataset_digest).items() if not _under(k, _SPACES)
    }
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def changes(
    stored: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """``key → (stored, current)`` for every defining key that differs, except those
    under an ``allowed`` prefix (``train`` allows every ``train.*`` key)."""
    allowed = list(allowed)
    # ``policy.name`` and the like first: they say the most about what changed.
    keys = sorted(set(stored) | set(current), key=lambda k: (not k.endswith(".name"), k))
    defaults = _defaults()
    return {
        k: (stored.get(k, _ABSENT), current.get(k, _ABSENT))
        for k in keys
        if stored.get(k, _ABSENT) != current.get(k, _ABSENT)
        and not _under(k, allowed)
        and not _added_at_default(k, stored, current, defaults)
    }


def _added_at_default(
    key: str, stored: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]
) -> bool:
    # A setting added to the schema after the study was stored (train.l1_start_epoch,
    # policy.exclude_classifier) changes nothing while it holds its default.
    if key in stored:
        return False
    # A policy's own keys have no schema default; one added at null (policy.allocation:
    # null follows scope, as before it existed) is unset.
    if key.startswith("policy.") and key not in defaults and current.get(key) is None:
        return True
    return key in defaults and current.get(key) == defaults[key]


def _defaults() -> dict[str, Any]:
    """The schema's defaults as flat, JSON-normalised ``key → value`` (policy: the
    pruner's keys)."""
    tree = OmegaConf.to_container(OmegaConf.structured(Settings))
    tree["policy"] = dataclasses.asdict(PrunerSettings())
    return json.loads(json.dumps(flatten(tree), default=str))


def check_unchanged(
    study: optuna.Study, current: Mapping[str, Any], allowed: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Raise :class:`ConfigError` when ``study`` was defined by another configuration
    (see :func:`changes`); return the changes that ``allowed`` lets through. A study
    without a stored definition (older than this check) passes."""
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        return {}
    every = changes(stored, current)
    allowed = list(allowed)
    refused = {k: v for k, v in every.items() if not _under(k, allowed)}
    if refused:
        shown = [f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in list(refused.items())[:6]]
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        keys = ",".join(_allow_keys(refused))
        raise ConfigError(
            f"study.name={study.study_name!r} was created with another configuration "
            f"({'; '.join(shown)}{more}); its trials would not be comparable. Use a new "
            f"study.name, or study.allow_changes=[{keys}] to continue it with these changes"
        )
    return every


def record_study(
    study: optuna.Study, current: Mapping[str, Any], allowed_changes: Mapping[str, tuple[Any, Any]]
) -> None:
    """Store ``current`` as the study's definition; log the allowed changes with it."""
    if allowed_changes:
        history = list(study.user_attrs.get(records.CONFIG_CHANGES, []))
        history.append(sorted(allowed_changes))
        study.set_user_attr(records.CONFIG_CHANGES, history)
    if study.user_attrs.get(STUDY_ATTR) != current:
        study.set_user_attr(STUDY_ATTR, dict(current))


def record_trial(trial: optuna.Trial, tcfg: DictConfig) -> None:
    """Store the trial's resolved config (passwords masked) with the trial."""
    trial.set_user_attr(TRIAL_ATTR, json.loads(json.dumps(loggable(tcfg), default=str)))


def stored_trial_config(cfg: DictConfig, trial: optuna.trial.FrozenTrial) -> DictConfig | None:
    """The config ``trial`` ran with: today's ``cfg`` with the trial's own stored
    :data:`TRIAL_NODES` and dataset settings written in (the data's location stays
    today's); None for a trial older than the stored configs."""
    stored = trial.user_attrs.get(TRIAL_ATTR)
    if stored is None:
        return None
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for node in TRIAL_NODES:
        if node in stored:
            OmegaConf.update(out, node, stored[node], merge=False)
    dataset = dict(stored.get("dataset", {}))
    for key in _DATA_LOCATION:
        if key in out.dataset:
            dataset[key] = out.dataset[key]
    OmegaConf.update(out, "dataset", dataset, merge=False)
    if OmegaConf.select(out, "model.checkpoint") or OmegaConf.select(cfg, "model.checkpoint"):
        # the weights' content is checked by the study's digest; their place is today's
        OmegaConf.update(
            out, "model.checkpoint", OmegaConf.select(cfg, "model.checkpoint"), merge=False
        )
    return out


def _allow_keys(refused: Mapping[str, Any]) -> list[str]:
    """What to put in ``study.allow_changes``: a node where it holds several changes."""
    by_node: dict[str, list[str]] = {}
    for key in refused:
        by_node.setdefault(key.split(".")[0], []).append(key)
    out: list[str] = []
    for node, keys in by_node.items():
        out += [node] if len(keys) > 2 else keys
    return out


def _show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)
