"""The MLflow params of a trial or refit run: the trial's own configuration, at most
:data:`MAX_PARAMS` keys, so that the runs table stays a table one can read.

What is left out is still in the run's ``config.yaml`` (the whole resolved config):
keys about where or how a run executes (console, paths, stores, engine switches), keys
that say nothing (empty lists, unset model keys) and keys that have no effect given
another one (:data:`INERT`: ``train.l1_bias`` while ``train.l1 = 0``). Should a
configuration still hold more, keys at their schema default go next, last key first;
the sampled keys always stay.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig

from dtp_search.search.config import ENGINE_KEYS, flatten, loggable
from dtp_search.settings import PrunerSettings
from dtp_search.settings.train import TrainSettings

log = logging.getLogger(__name__)

MAX_PARAMS = 40  # the developers' guide: a trial run logs at most 40 params


def _off(value: Any) -> bool:
    return not value


# key → (the key that decides, whether its value makes ``key`` inert).
INERT: dict[str, tuple[str, Callable[[Any], bool]]] = {
    # the recovery hysteresis band acts only where pruned weights may recover
    "policy.band": ("policy.recover", _off),
    # channel counts are rounded only when whole neurons/channels are pruned
    "policy.round_to": ("policy.granularity", lambda g: g == "weight"),
    # the L1 penalty's start and reach, without a penalty
    "train.l1_start_epoch": ("train.l1", _off),
    "train.l1_bias": ("train.l1", _off),
    # SGD's momentum settings, with Adam
    "train.momentum": ("train.optimizer", lambda o: o != "sgd"),
    "train.nesterov": ("train.optimizer", lambda o: o != "sgd"),
    # distillation's temperature and teacher file, without distillation; no teacher file
    "train.distill.temperature": ("train.distill.alpha", _off),
    "train.distill.teacher": ("train.distill.alpha", _off),
    "train.distill.teacher_epochs": ("train.distill.alpha", _off),
    # the trained teacher's own learning rate and schedule, without one
    "train.distill.teacher_lr": ("train.distill.teacher_epochs", _off),
    "train.distill.teacher_lr_schedule": ("train.distill.teacher_epochs", _off),
    # the scope an allocation supersedes; an allocation left to follow the scope
    "policy.scope": ("policy.allocation", lambda a: a is not None),
    "policy.allocation": ("policy.allocation", lambda a: a is None),
}


def run_params(cfg: DictConfig, sampled: Iterable[str] = ()) -> dict[str, Any]:
    """The MLflow params of a trial or refit run: the trial's own configuration (seed, folds,
    dataset name, model, policy, training recipe) and nothing about where or how it runs
    (console, paths, stores, sampler, engine switches), so that the runs table compares
    what differs between trials; at most :data:`MAX_PARAMS` keys, ``sampled`` (the
    trial's sampled keys) among them. The whole config goes to the run as ``config.yaml``."""
    flat = flatten(loggable(cfg))
    keep = {"seed", "cv.folds", "dataset.name"}
    out = {
        k: v
        for k, v in flat.items()
        if (k in keep or k.split(".", 1)[0] in ("model", "policy", "train"))
        and k not in ENGINE_KEYS
    }
    # Empty lists (policy.layers.include=[]: all layers) say nothing in the runs table.
    out = {k: v for k, v in out.items() if v != []}
    # Unset model keys (a built-in network's _target_ and checkpoint, or an architecture's
    # keys another architecture has) say nothing either.
    out = {k: v for k, v in out.items() if not (k.startswith("model.") and v is None)}
    if out.get("model.arch") == out.get("model.name"):
        out.pop("model.arch", None)  # says nothing more than the name
    sampled = set(sampled)
    out = {
        k: v
        for k, v in out.items()
        if k in sampled or k not in INERT or not INERT[k][1](flat.get(INERT[k][0]))
    }
    return _at_most(out, sampled)


def _schema_defaults() -> dict[str, Any]:
    train = {f"train.{k}": v for k, v in dataclasses.asdict(TrainSettings()).items()}
    pruner = dataclasses.asdict(PrunerSettings(name="-"))
    return {**train, **{f"policy.{k}": v for k, v in pruner.items() if k != "name"}}


def _at_most(params: dict[str, Any], sampled: set[str]) -> dict[str, Any]:
    """``params`` cut to :data:`MAX_PARAMS` keys: those at their schema default first
    (last key first), then, with a warning, any other key that was not sampled."""
    if len(params) <= MAX_PARAMS:
        return params
    defaults = _schema_defaults()
    out = dict(params)
    for k in reversed(list(params)):
        if len(out) <= MAX_PARAMS:
            return out
        if k not in sampled and k in defaults and out[k] == defaults[k]:
            del out[k]
    dropped = []
    for k in reversed(list(out)):
        if len(out) <= MAX_PARAMS:
            break
        if k not in sampled:
            dropped.append(k)
            del out[k]
    if dropped:
        log.warning("a run logs at most %d params: %s left to its config.yaml", MAX_PARAMS, dropped)
    return out
