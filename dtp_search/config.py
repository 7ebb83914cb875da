"""Config helpers: OmegaConf resolvers, the error type for bad input, and checks that
run before any data is loaded or any trial starts."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad user input; the message names the key, the value and what is allowed."""


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
    from dtp_search.pruning import DynamicPruner, build_criterion, build_policy

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
    from dtp_search.storage import mask_url

    out = OmegaConf.to_container(cfg, resolve=True)
    for node in ("policy", "search"):
        out.get(node, {}).pop("space", None)
    out.get("policy", {}).pop("options", None)
    # Database passwords never reach MLflow params.
    for node, key in (("study", "storage"), ("tracking", "uri")):
        if isinstance(out.get(node, {}).get(key), str):
            out[node][key] = mask_url(out[node][key])
    return out
