"""The whole configuration, typed (:class:`Settings`), registered in Hydra's
``ConfigStore`` as ``dtp_search_schema`` on import, and the look-ups over it: a dotted
key's field, the text fields, a settings object from a mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dtp_search.settings.inputs import OPEN_NODES, DatasetSettings, ModelSettings, split_args
from dtp_search.settings.rules import SEED_HIGH, rule
from dtp_search.settings.study import (
    PathsSettings,
    SearchSettings,
    StudySettings,
    TrackingSettings,
)
from dtp_search.settings.train import (
    ConsoleSettings,
    CVSettings,
    ExportSettings,
    FrontSettings,
    RefitSettings,
    TrainSettings,
)

MODES = ("search", "refit", "compare")


@dataclass
class Settings:
    """The whole configuration, typed (``conf/config.yaml`` holds its values)."""

    mode: str = rule("search", choices=MODES)
    seed: int = rule(0, low=0, high=SEED_HIGH)
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int | None = rule(None, low=1)  # torch CPU threads
    paths: PathsSettings = field(default_factory=PathsSettings)
    study: StudySettings = field(default_factory=StudySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    cv: CVSettings = field(default_factory=CVSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    refit: RefitSettings = field(default_factory=RefitSettings)
    front: FrontSettings = field(default_factory=FrontSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    policy: Any = MISSING  # untyped: see the module docstring

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        """The typed settings of a composed config, interpolations resolved (raises
        OmegaConf's errors for missing values, ``ValueError`` for a key the schema does
        not have; :func:`check` is separate). The keys of an open node (``model``,
        ``dataset``) beyond its schema are its ``_target_``'s arguments (``args``)."""
        plain = None
        for node, owner in OPEN_NODES.items():
            if node in cfg and isinstance(cfg[node], DictConfig):
                data = OmegaConf.to_container(cfg[node], resolve=True)
                mine, args = split_args(owner, data, node)
                if len(mine) != len(data) or "args" in data:
                    if plain is None:
                        plain = OmegaConf.to_container(cfg, resolve=True)
                    plain[node] = {**mine, "args": args}
        if plain is not None:
            cfg = OmegaConf.create(plain)
        _refuse_unknown(cfg, cls, "")
        if OmegaConf.get_type(cfg) is not cls:
            # A plain copy (the search space's, or a trial's stored config): merged into
            # the schema, so it is typed and takes the defaults of keys added since.
            cfg = OmegaConf.merge(OmegaConf.structured(cls), cfg)
        return OmegaConf.to_object(cfg)


def _refuse_unknown(node: Any, owner: type, prefix: str) -> None:
    # Hydra's `+train.foo=1` appends a key even to a typed node, and to_object drops it
    # without a word; a typo must not silently change nothing.
    fields = {f.name: f for f in dataclasses.fields(owner)}
    for key in node:
        f = fields.get(key)
        if f is None:
            raise ValueError(
                f"{prefix}{key} is not a setting; allowed keys of "
                f"{prefix.rstrip('.') or 'the config'}: {sorted(fields)}"
            )
        sub = f.default_factory
        if (
            isinstance(sub, type)
            and dataclasses.is_dataclass(sub)
            and isinstance(node[key], DictConfig)
        ):
            _refuse_unknown(node[key], sub, f"{prefix}{key}.")


SCHEMA = "dtp_search_schema"


def register_schema() -> None:
    """Put :class:`Settings` in Hydra's ConfigStore (``conf/config.yaml`` starts from it).
    Importing this module does it, so that any code composing the config finds it."""
    ConfigStore.instance().store(name=SCHEMA, node=Settings)


register_schema()


_S = TypeVar("_S")


def from_mapping(cls: type[_S], value: _S | Mapping[str, Any], key: str) -> _S:
    """``value`` as a ``cls`` settings object: itself, or built from a mapping of some of
    its fields (a plain dict, or a ``DictConfig``, resolved), the others at their
    defaults. Raises ``ValueError`` naming ``key.<field>`` for a key ``cls`` lacks."""
    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if cls in OPEN_NODES.values():
        mine, args = split_args(cls, value, key)
        return cls(**mine, args=args)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(
            f"{key}.{unknown[0]} is not a setting; allowed keys of {key}: {sorted(known)}"
        )
    nested = {  # a nested settings node (train.distill) given as a mapping
        name: from_mapping(f.default_factory, value[name], f"{key}.{name}")
        for name, f in known.items()
        if name in value and isinstance(f.default_factory, type)
        if dataclasses.is_dataclass(f.default_factory) and isinstance(value[name], Mapping)
    }
    return cls(**{**value, **nested})


def field_owner(key: str) -> tuple[type, str] | None:
    """The dataclass and field name a dotted ``key`` names, e.g. ``train.lr`` →
    ``(TrainSettings, "lr")``; None when the key is not a typed field."""
    owner: type = Settings
    *nodes, name = key.split(".")
    for node in nodes:
        fields = {f.name: f for f in dataclasses.fields(owner)}
        f = fields.get(node)
        if (
            f is None
            or not isinstance(f.default_factory, type)
            or not dataclasses.is_dataclass(f.default_factory)
        ):
            return None
        owner = f.default_factory
    if name not in {f.name for f in dataclasses.fields(owner)}:
        return None
    return owner, name


def text_fields() -> Sequence[str]:
    """Dotted keys of the typed text fields (a number given there is read as text)."""
    out = []

    def walk(owner: type, prefix: str) -> None:
        for f in dataclasses.fields(owner):
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, prefix + f.name + ".")
            elif str(f.type) in ("str", "str | None"):
                out.append(prefix + f.name)

    walk(Settings, "")
    return out
