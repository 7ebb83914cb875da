"""Search spaces declared in config, sampled with Optuna's ``trial.suggest_*``.

A space is a mapping ``key → spec``; ``policy.space`` keys are relative to ``policy``
and ``search.space`` keys are absolute (``train.lr``). Specs:

    {type: float, low: 1e-3, high: 0.2, log: true}      # step optional
    {type: int, low: 0, high: 3}                         # log, step optional
    {type: categorical, choices: [global, layer]}

The Optuna parameter name is the absolute key, and the sampled value replaces that
key in the trial's copy of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from dtp_search.config import ConfigError

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Dimension:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))


def _dimension(key: str, spec: Mapping[str, Any]) -> Dimension:
    where = f"search space key {key!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type={kind!r} is not allowed; allowed: {list(TYPES)}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; allowed: "
                          "type, low, high, log, step, choices")
    if kind == "categorical":
        choices = spec.get("choices")
        if not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
        return Dimension(key, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if low is None or high is None:
        raise ConfigError(f"{where}: {kind} needs 'low' and 'high'")
    if not low <= high:
        raise ConfigError(f"{where}: empty range low={low} > high={high}; need low <= high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: log=true needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None and log:
        raise ConfigError(f"{where}: 'step' and log=true cannot be combined")
    return Dimension(key, kind, float(low), float(high), log, None if step is None else float(step))


def parse_space(cfg: DictConfig) -> list[Dimension]:
    """Every search dimension of a composed config, checked against the config's keys."""
    dims: list[Dimension] = []
    raw: list[tuple[str, Any]] = []
    raw += [(f"policy.{k}", v) for k, v in _container(cfg.policy.get("space")).items()]
    raw += list(_container(cfg.search.get("space")).items())
    for key, spec in raw:
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"search space key {key!r} is not a key of the config")
        dims.append(_dimension(key, spec))
    return dims


_MISSING = object()


def _container(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"a search space must be a mapping of key -> spec, got {node!r}")
    return dict(node)


def sample(trial: optuna.Trial, dims: list[Dimension]) -> dict[str, Any]:
    return {d.key: d.suggest(trial) for d in dims}


def apply(cfg: DictConfig, params: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with every sampled ``key → value`` written in."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in params.items():
        OmegaConf.update(out, key, value, merge=False)
    return out
