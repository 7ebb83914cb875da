"""Config helpers: OmegaConf resolvers, the error type for bad input, and checks that
run before any data is loaded or any trial starts."""

from __future__ import annotations

import math
import os
from typing import Any

import hydra
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage

from dtp_search import space as search_space
from dtp_search import storage as storages
from dtp_search.errors import ConfigError
from dtp_search.pruning import DynamicPruner, build_criterion, build_policy
from dtp_search.pruning.pruner import check_floor
from dtp_search.storage import mask_url
from dtp_search.tracking import check_tracking_uri
from dtp_search.training import TrainSettings

__all__ = ["ConfigError", "check_config", "make_early_stop", "make_sampler", "make_storage"]

OBJECTIVES = ("accuracy", "sparsity")
MODES = ("search", "refit", "compare")
DIRECTIONS = ("maximize", "minimize")


def number(cfg: DictConfig, key: str, kind: type = int, *, low: float | None = None,
           high: float | None = None, null: bool = False, default: Any = None) -> Any:
    """The value at the dotted ``key`` of ``cfg``, checked to be a ``kind`` (``int``; or
    ``float``, which takes integers too; never a bool) in ``[low, high)``, or null when
    ``null`` allows it; ``default`` stands in for a missing key.

    Reading a setting straight with ``int()`` ends in Python's "invalid literal"
    traceback for ``seed=abc``; this names the key, the value and what is allowed.
    """
    value = OmegaConf.select(cfg, key, default=default)
    if value is None and null:
        return None
    types = (int,) if kind is int else (int, float)
    ok = (isinstance(value, types) and not isinstance(value, bool)
          and (kind is int or math.isfinite(value))
          and (low is None or value >= low) and (high is None or value < high))
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: "
                          f"{_number_range(kind, low, high, null)}")
    return value


def _number_range(kind: type, low: float | None, high: float | None, null: bool) -> str:
    """``an integer >= 1``, ``null or an integer in [0, 9]``, ``a number in [0, 1)``."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        span = f" in [{low}, {high - 1}]" if kind is int else f" in [{low}, {high})"
    elif low is not None:
        span = f" >= {low}"
    elif high is not None:
        span = f" < {high}"
    else:
        span = ""
    return ("null or " if null else "") + noun + span


# The numeric settings the orchestration reads, and what each allows. check_config checks
# them all before any data is loaded; code that reads one outside a checked run
# (mode=compare opens the storage first) reads it through setting(). Seeds go to
# scikit-learn and numpy, which take [0, 2**32); Optuna wants a heartbeat and a grace
# period of at least one second.
NUMBERS: dict[str, dict[str, Any]] = {
    "seed": {"low": 0, "high": 2**32},
    "threads": {"low": 1, "null": True},
    "study.workers": {"low": 1, "default": 1},
    "search.n_trials": {"low": 1},
    "search.max_failures": {"low": 1},
    "search.heartbeat_interval": {"low": 1},
    "search.grace_period": {"low": 1},
    "search.max_retry": {"low": 0},
    "search.sampler.seed": {"low": 0, "high": 2**32, "null": True},
    "search.min_sparsity": {"kind": float, "low": 0, "high": 1, "null": True},
    "cv.folds": {"low": 2},
    "refit.top_k": {"low": 1, "null": True},
    "front.points": {"low": 0},
    "front.update_samples": {"low": 1, "null": True},
    "dataset.train_limit": {"low": 1, "null": True},
    "dataset.test_limit": {"low": 1, "null": True},
    "dataset.crop_padding": {"low": 0, "default": 4},
}


def setting(cfg: DictConfig, key: str) -> Any:
    """The numeric setting ``key`` (one of :data:`NUMBERS`), checked."""
    return number(cfg, key, **NUMBERS[key])


def check_numbers(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first of :data:`NUMBERS` that is out of bounds."""
    for key in NUMBERS:
        setting(cfg, key)


def register_resolvers() -> None:
    """``${abspath:dtp_runs}`` → absolute path against the launch directory."""
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(os.path.expanduser(p)))


# Keys of a policy node that configure the pruner around the policy, not the policy.
PRUNER_KEYS = ("criterion", "granularity", "min_keep", "on_collapse")


def policy_params(policy_cfg: DictConfig) -> dict[str, Any]:
    """Constructor arguments of the policy: every key of ``policy`` except its metadata."""
    meta = {"name", "space", *PRUNER_KEYS}
    return {k: v for k, v in OmegaConf.to_container(policy_cfg, resolve=True).items() if k not in meta}


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf (lists are kept as values)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def floor_settings(policy_cfg: DictConfig) -> tuple[Any, Any]:
    """``(min_keep, on_collapse)`` of a policy node, unchecked, with the pruner's defaults."""
    return policy_cfg.get("min_keep", 0.01), policy_cfg.get("on_collapse", "restore")


def build_pruner(model: Any, policy_cfg: DictConfig, example_input: Any) -> Any:
    """The pruner a policy config describes: policy, criterion, granularity, ``min_keep``
    and ``on_collapse``."""
    min_keep, on_collapse = floor_settings(policy_cfg)
    return DynamicPruner(model, build_policy(str(policy_cfg.name), policy_params(policy_cfg)),
                         build_criterion(str(policy_cfg.get("criterion", "magnitude"))),
                         granularity=str(policy_cfg.get("granularity", "weight")),
                         min_keep=float(min_keep), on_collapse=str(on_collapse),
                         example_input=example_input)


# Keys of ``train`` that choose how the engine runs, not what is trained: same result.
ENGINE_KEYS = ("train.eval_batch_size", "train.amp", "train.channels_last", "train.compile")


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """The MLflow params of a trial or refit run: the trial's own configuration (seed, folds,
    dataset name, model, policy, training recipe) and nothing about where or how it runs
    (console, paths, stores, sampler, engine switches), so that the runs table compares
    what differs between trials. The whole config goes to the run as ``config.yaml``."""
    flat = flatten(loggable(cfg))
    keep = {"seed", "cv.folds", "dataset.name"}
    out = {k: v for k, v in flat.items()
           if (k in keep or k.split(".", 1)[0] in ("model", "policy", "train"))
           and k not in ENGINE_KEYS}
    if out.get("model.arch") == out.get("model.name"):
        out.pop("model.arch", None)  # says nothing more than the name
    return out


def config_yaml(cfg: DictConfig) -> str:
    """The resolved trial config as YAML, passwords masked (the run's ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.create(loggable(cfg)))


def loggable(cfg: DictConfig) -> dict[str, Any]:
    """A trial config without search-space declarations and policy options (not settings)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for node in ("policy", "search"):
        out.get(node, {}).pop("space", None)
    out.get("policy", {}).pop("options", None)
    # Database passwords never reach MLflow params.
    for node, key in (("study", "storage"), ("tracking", "uri")):
        if isinstance(out.get(node, {}).get(key), str):
            out[node][key] = mask_url(out[node][key])
    return out


def check_config(cfg: DictConfig) -> search_space.SearchSpace:
    """Checks that need no data: raise :class:`ConfigError` before any work starts."""
    name = cfg.study.name
    if not isinstance(name, str) or not name.strip():
        # `study.name=nan` or `=123` reach here as numbers (YAML typing).
        raise ConfigError(f"study.name={name!r} is not allowed; allowed: a non-empty text, "
                          f"quoted when it looks like a number: study.name='\"{name}\"'")
    check_numbers(cfg)
    objectives = list(cfg.search.objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"search.objectives={objectives} is not allowed; "
                          f"allowed: a non-empty list of {list(OBJECTIVES)}")
    directions = list(cfg.search.directions)
    if len(directions) != len(objectives) or any(d not in DIRECTIONS for d in directions):
        raise ConfigError(f"search.directions={directions} must give one of {list(DIRECTIONS)} "
                          f"per objective {objectives}")
    make_early_stop(cfg)
    allowed_changes(cfg)
    if str(cfg.get("mode", "search")) not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not allowed; allowed: {list(MODES)}")
    for key in ("enabled", "register"):
        if not isinstance(cfg.refit.get(key, False), bool):
            raise ConfigError(f"refit.{key}={cfg.refit[key]!r} is not allowed; allowed: true, false")
    max_sparsity = cfg.front.get("max_sparsity")
    if (isinstance(max_sparsity, bool) or not isinstance(max_sparsity, (int, float))
            or not 0 < max_sparsity < 1):
        raise ConfigError(f"front.max_sparsity={max_sparsity!r} is not allowed; "
                          "allowed: a number in (0, 1)")
    storages.check_storage(str(cfg.study.storage), setting(cfg, "study.workers"))
    try:
        TrainSettings.from_config(cfg.train).validate()
    except TypeError as exc:
        raise ConfigError(f"train: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    space = search_space.parse_space(cfg)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            build_policy(str(node.name), policy_params(node))
            build_criterion(str(node.get("criterion", "magnitude")))
            check_floor(*floor_settings(node))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{policy_key(cfg, name)}: {exc}") from exc
    # Servers last: each probe may wait a few seconds for an answer.
    storages.check_reachable(str(cfg.study.storage))
    check_tracking_uri(str(cfg.tracking.uri))
    return space


def policy_key(cfg: DictConfig, name: str) -> str:
    """Where a policy's settings live: ``policy`` or ``policy.options.<name>``."""
    return f"policy.options.{name}" if cfg.policy.get("name") == search_space.CHOICE else "policy"



def allowed_changes(cfg: DictConfig) -> list[str]:
    """``study.allow_changes``: the defining keys (or nodes, e.g. ``train``) a resumed
    study may change (see :mod:`dtp_search.provenance`)."""
    value = OmegaConf.to_container(cfg.study, resolve=True).get("allow_changes") or []
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"study.allow_changes={value!r} is not allowed; allowed: a list of "
                          "config keys or nodes, e.g. study.allow_changes=[train.epochs,policy]")
    return value

def make_storage(cfg: DictConfig) -> BaseStorage:
    """The study's Optuna storage, with heartbeats and retries where Optuna has them."""
    return storages.make_storage(
        str(cfg.study.storage), heartbeat_interval=setting(cfg, "search.heartbeat_interval"),
        grace_period=setting(cfg, "search.grace_period"),
        max_retry=setting(cfg, "search.max_retry"))


def make_early_stop(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """Optuna's early stopping of hopeless trials (``early_stop=median|wilcoxon|none``,
    an Optuna pruner; "early stop" here so that "pruner" means weight pruning only) for a
    single-objective study.

    Steps are folds: a trial reports each fold's value and may stop after it. Optuna's
    ``report``/``should_prune`` do not exist for multi-objective studies — a trial's
    partial result is a point, and no point is "worse than the median" of a Pareto front —
    so two-objective studies always run every fold (``NopPruner``).
    """
    node = cfg.search.get("early_stop")
    if len(cfg.search.objectives) > 1 or node is None:
        return optuna.pruners.NopPruner()
    try:
        return hydra.utils.instantiate(node)
    except Exception as exc:
        raise ConfigError(f"search.early_stop could not be built ({exc}); allowed: "
                          "early_stop=median, early_stop=wilcoxon, early_stop=none or any "
                          "optuna.pruners class") from exc


def make_sampler(cfg: DictConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; a set seed is offset by ``offset`` (the trial number, see
    :func:`objective`)."""
    sampler_cfg = OmegaConf.to_container(cfg.search.sampler, resolve=True)
    if sampler_cfg.get("seed") is not None:
        sampler_cfg["seed"] = setting(cfg, "search.sampler.seed") + offset
    try:
        return hydra.utils.instantiate(sampler_cfg)
    except Exception as exc:
        raise ConfigError(f"search.sampler could not be built ({exc})") from exc
