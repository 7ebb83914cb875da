"""Search spaces declared in config, sampled with Optuna's ``trial.suggest_*``.

A space is a mapping ``key → spec``; ``policy.space`` keys are relative to ``policy``
and ``search.space`` keys are absolute (``train.lr``). Specs:

    {type: float, low: 1e-3, high: 0.2, log: true}      # step optional
    {type: int, low: 0, high: 3}                         # log, step optional
    {type: categorical, choices: [global, layer]}

The Optuna parameter name is the absolute key, and the sampled value replaces that
key in the trial's copy of the config.

Searching across policies (``policy=choice``): every trial first samples the Optuna
parameter ``policy`` from ``policy.choices``, the trial's ``policy`` node becomes
``policy.options.<name>``, and only that policy's space is sampled — a conditional
space whose parameters are named ``<name>.<key>`` (``agp.final_sparsity``), so that
samplers model each policy's parameters separately.

A spec may take a bound from another key (``high: ${train.epochs}``). Such a dimension
is resolved once, when the study is created, and stored with it (:func:`pin_derived`):
a rerun that changes ``train.epochs`` (``study.allow_changes``) samples the same
distribution as the first run, because Optuna treats one parameter name with two
distributions as a mistake (a retried trial warns "Inconsistent parameter values") and
its samplers cannot model the two as one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

from dtp_search.errors import ConfigError

log = logging.getLogger(__name__)

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Dimension:
    key: str  # config key the sampled value is written to
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    name: str = ""  # Optuna parameter name; the key when empty
    derived: bool = False  # the spec interpolates another key (high: ${train.epochs})

    @property
    def param(self) -> str:
        return self.name or self.key

    @property
    def distribution(self) -> BaseDistribution:
        """The distribution :meth:`suggest` samples from (as Optuna stores it)."""
        if self.type == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return CategoricalDistribution(list(self.choices))

    def with_distribution(self, dist: BaseDistribution) -> Dimension:
        """This dimension sampling ``dist`` instead (a stored one, see :func:`pin_derived`)."""
        if isinstance(dist, CategoricalDistribution):
            return dataclasses.replace(self, type="categorical", choices=tuple(dist.choices))
        kind = "int" if isinstance(dist, IntDistribution) else "float"
        step = dist.step if kind == "float" or dist.step != 1 else None
        return dataclasses.replace(
            self,
            type=kind,
            low=float(dist.low),
            high=float(dist.high),
            log=dist.log,
            step=None if step is None else float(step),
        )

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(
                self.param, self.low, self.high, log=self.log, step=self.step
            )
        if self.type == "int":
            return trial.suggest_int(
                self.param, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_categorical(self.param, list(self.choices))


def _dimension(
    key: str, spec: Mapping[str, Any], name: str = "", derived: bool = False
) -> Dimension:
    where = f"search space key {name or key!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type={kind!r} is not allowed; allowed: {list(TYPES)}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown fields {sorted(unknown)}; allowed: "
            "type, low, high, log, step, choices"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
        return Dimension(key, kind, choices=tuple(choices), name=name, derived=derived)
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
    step = None if step is None else float(step)
    return Dimension(key, kind, float(low), float(high), log, step, name=name, derived=derived)


CHOICE = "choice"


@dataclass
class SearchSpace:
    """The dimensions of a study: shared ones, and one conditional sub-space per policy."""

    common: list[Dimension]
    policies: dict[str, list[Dimension]]  # policy name -> its dimensions
    choices: tuple[str, ...] = ()  # non-empty when the policy itself is searched

    @property
    def dimensions(self) -> list[Dimension]:
        return self.common + [d for dims in self.policies.values() for d in dims]


def policy_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """``{policy name: policy config}`` of every policy a study may use."""
    if cfg.policy.get("name") != CHOICE:
        return {str(cfg.policy.name): cfg.policy}
    options = cfg.policy.get("options") or {}
    choices = list(cfg.policy.get("choices") or [])
    bad = [c for c in choices if c not in options]
    if not choices or bad:
        raise ConfigError(
            f"policy.choices={choices} is not allowed; allowed: a non-empty list of {list(options)}"
        )
    return {c: options[c] for c in choices}


def parse_space(cfg: DictConfig) -> SearchSpace:
    """Every search dimension of a composed config, checked against the config's keys."""
    common: list[Dimension] = []
    for key, spec in _container(cfg.search.get("space")).items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"search space key {key!r} is not a key of the config")
        if key.startswith("policy.") and cfg.policy.get("name") == CHOICE:
            raise ConfigError(
                f"search.space key {key!r}: with policy=choice put policy "
                "dimensions in policy.options.<name>.space"
            )
        derived = _interpolates(cfg.search.space[key])
        common.append(_dimension(key, spec, derived=derived))
    choice = cfg.policy.get("name") == CHOICE
    policies: dict[str, list[Dimension]] = {}
    for pname, node in policy_nodes(cfg).items():
        dims = []
        for k, spec in _container(node.get("space")).items():
            where = f"policy.options.{pname}.{k}" if choice else f"policy.{k}"
            if OmegaConf.select(node, k, default=_MISSING) is _MISSING:
                raise ConfigError(f"search space key {where!r} is not a key of the config")
            name = f"{pname}.{k}" if choice else ""
            derived = _interpolates(node.space[k])
            dims.append(_dimension(f"policy.{k}", spec, name=name, derived=derived))
        policies[pname] = dims
    return SearchSpace(common, policies, tuple(policies) if choice else ())


_MISSING = object()


def _interpolates(spec: Any) -> bool:
    """Whether a spec node takes any of its fields from another key (``${...}``)."""
    if not isinstance(spec, DictConfig):
        return False
    raw = OmegaConf.to_container(spec, resolve=False)
    return "${" in json.dumps(raw, default=str)


# The study's user attribute that holds its space: {Optuna parameter: distribution JSON}.
SPACE_ATTR = "search_space"


def pin_derived(study: optuna.Study, space: SearchSpace, record: bool = True) -> SearchSpace:
    """``space`` with every derived dimension (a spec that interpolates another key)
    sampling the distribution its study first used, and the study's stored space
    (user attribute ``search_space``) completed with today's dimensions.

    The stored distribution of a parameter is the attribute's, or for a study made before
    the attribute existed, that of the first trial holding the parameter. A dimension
    written in full on the command line is not derived, and samples what it says.
    ``record=False`` (a worker of ``study.workers=N``) only reads: its parent has written.
    Two processes that create one study at the same moment with different derived bounds
    may each write their own; they define the study differently, which
    ``study.allow_changes`` was needed for.
    """
    stored: dict[str, str] = dict(study.user_attrs.get(SPACE_ATTR) or {})
    known = dict(stored)
    wanted = {d.param for d in space.dimensions if d.derived and d.param not in known}
    for trial in study.get_trials(deepcopy=False) if wanted else ():
        for param in wanted & set(trial.distributions):
            known.setdefault(param, distribution_to_json(trial.distributions[param]))

    def pinned(dims: list[Dimension]) -> list[Dimension]:
        out = []
        for d in dims:
            if d.derived and d.param in known:
                stored_dist = json_to_distribution(known[d.param])
                if stored_dist != d.distribution:
                    log.info(
                        "%s samples %s as the study first did (its spec gives %s today)",
                        d.param,
                        stored_dist,
                        d.distribution,
                    )
                d = d.with_distribution(stored_dist)
            out.append(d)
            known.setdefault(d.param, distribution_to_json(d.distribution))
        return out

    result = SearchSpace(
        pinned(space.common),
        {name: pinned(dims) for name, dims in space.policies.items()},
        space.choices,
    )
    if record and known != stored:
        study.set_user_attr(SPACE_ATTR, known)
    return result


def fix_set_keys(cfg: DictConfig, overrides: Iterable[str]) -> list[str]:
    """Take out of ``cfg``'s search spaces every key that the command line sets by hand,
    and return one line per key saying so.

    ``policy=constant policy.theta=1000`` means θ = 1000: a sampled θ would silently
    ignore what the user wrote. The key's dimension is deleted from its space node
    (``policy.space.theta``; ``policy.options.<name>.space.<key>`` for ``policy=choice``;
    ``search.space.<key>``), so the study's definition (:mod:`dtp_search.search.provenance`)
    holds the fixed value and the smaller space, and a rerun of a study that searched the
    key is refused like any other change. A space node written on the same command line
    as one of its keys contradicts it, and is refused.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    given = {o.key_or_group: o for o in parsed if not o.is_delete() and o.package is None}
    lines = []
    for node_key, prefix in _space_nodes(cfg):
        node = OmegaConf.select(cfg, node_key)
        for k in list(node or {}):
            key = f"{prefix}{k}"
            if key not in given:
                continue
            # The space node itself, or a spec inside it (``policy.space.theta.high=5``);
            # not its ancestors, which are config groups (``policy=constant``).
            written = [n for n in given if n == node_key or n.startswith(node_key + ".")]
            if written:
                raise ConfigError(
                    f"{key}={given[key].get_value_element_as_str()} and {written[0]}= are both "
                    f"on the command line: {key} would be both fixed and searched; allowed: "
                    f"one of them (drop {key} from {node_key} to fix it)"
                )
            spec = OmegaConf.to_container(node[k], resolve=True)
            with open_dict(node):
                del node[k]
            value = OmegaConf.select(cfg, key)
            lines.append(
                f"{key}={value} is set on the command line: fixed, not searched "
                f"(its space {_describe(spec)} in {node_key} is dropped)"
            )
    return lines


def _space_nodes(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(space node key, prefix of its keys' config paths)`` of every search space."""
    nodes = [("search.space", "")]
    if cfg.policy.get("name") == CHOICE:
        for name in cfg.policy.get("options") or {}:
            nodes.append((f"policy.options.{name}.space", f"policy.options.{name}."))
    else:
        nodes.append(("policy.space", "policy."))
    return nodes


def _describe(spec: Any) -> str:
    if not isinstance(spec, Mapping):
        return repr(spec)
    if spec.get("type") == "categorical":
        return f"categorical {list(spec.get('choices') or [])}"
    log = ", log" if spec.get("log") else ""
    return f"{spec.get('type')} [{spec.get('low')}, {spec.get('high')}{log}]"


def _container(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"a search space must be a mapping of key -> spec, got {node!r}")
    return dict(node)


def sample(trial: optuna.Trial, space: SearchSpace) -> tuple[str, dict[str, Any]]:
    """The policy of this trial and ``{config key: sampled value}``."""
    if space.choices:
        policy = trial.suggest_categorical("policy", list(space.choices))
    else:
        (policy,) = space.policies
    dims = space.common + space.policies[policy]
    return policy, {d.key: d.suggest(trial) for d in dims}


def apply(cfg: DictConfig, params: Mapping[str, Any], policy: str | None = None) -> DictConfig:
    """A copy of ``cfg`` with the trial's policy node and every sampled ``key → value`` written in."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if out.policy.get("name") == CHOICE:
        if policy is None:
            raise ValueError("policy=choice needs the sampled policy")
        node = OmegaConf.to_container(cfg.policy.options[policy], resolve=False)
        OmegaConf.update(out, "policy", node, merge=False)
    for key, value in params.items():
        OmegaConf.update(out, key, value, merge=False)
    return out
