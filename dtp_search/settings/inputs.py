"""The settings of what a study prunes: ``dataset``, ``model`` (open nodes: keys beyond
the schema are their ``_target_``'s arguments, :func:`split_args`) and a policy's pruner
keys (:class:`PrunerSettings`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from dtp_search.settings.rules import SEED_HIGH, rule

# dataset.kind: the built-in loaders, then the user's own data (torchvision's classes, a factory).
DATASET_KINDS = ("digits", "cifar10", "mnist", "imagefolder", "torchvision", "custom")
IN_MEMORY = ("auto", True, False)


@dataclass
class DatasetSettings:
    """Every dataset kind's keys (conf/dataset); a kind reads the ones it needs.

    ``torchvision`` and ``custom`` build the user's data from ``_target_`` (Hydra's
    ``instantiate`` convention); every key under ``dataset`` that is not one of these
    fields is passed to it as a keyword argument and collected in ``args``."""

    kind: str = rule(MISSING, choices=DATASET_KINDS)
    name: str = MISSING
    _target_: str | None = None  # torchvision: the dataset class; custom: a (train, test) factory
    path: str | None = None  # an ImageFolder tree (offline copy)
    root: str | None = None  # torchvision's download folder
    download: bool = True
    channels: int | None = rule(None, low=1)
    image_size: int | None = rule(None, low=1)
    skip_bad_files: bool = False
    train_limit: int | None = rule(None, low=1)
    test_limit: int | None = rule(None, low=1)
    mean: list[float] | None = None  # null = computed on the training split
    std: list[float] | None = None
    augment: bool = False
    crop_padding: int = rule(4, low=0)
    test_fraction: float = rule(0.2, above=0, high=1)  # digits: fixed stratified test split
    split_seed: int = rule(0, low=0, high=SEED_HIGH)
    # auto: decode a split into memory when it fits memory_limit, else stream it from its
    # source through a DataLoader; true/false force one path.
    in_memory: Any = rule("auto", choices=IN_MEMORY, words="auto, true, false")  # noqa: RUF009
    memory_limit: float | None = rule(None, above=0)  # GiB; null = a quarter of the RAM
    num_workers: int | None = rule(
        None, low=0
    )  # streaming: DataLoader workers; null: min(4, cores)
    args: dict[str, Any] = field(default_factory=dict)  # the _target_'s keyword arguments

    def _check(self, prefix: str) -> None:
        if isinstance(self.in_memory, int) and not isinstance(self.in_memory, bool):
            raise ValueError(
                f"{prefix}in_memory={self.in_memory!r} is not allowed; allowed: auto, true, false"
            )
        if self.kind in ("torchvision", "custom") and not self._target_:
            raise ValueError(
                f"{prefix}_target_ is required for dataset={self.kind} (a dotted "
                "path, e.g. dataset._target_=torchvision.datasets.FakeData)"
            )


MODEL_ARCHS = ("mlp", "lenet5", "simple_cnn", "vgg", "resnet20", "custom")


@dataclass
class ModelSettings:
    """Every architecture's keys (conf/model); an architecture reads the ones it needs.

    ``custom`` builds the user's network from ``_target_`` (any callable returning an
    ``nn.Module``); every key under ``model`` that is not one of these fields is passed to
    it as a keyword argument and collected in ``args``."""

    name: str = MISSING
    arch: str = rule(MISSING, choices=MODEL_ARCHS)
    _target_: str | None = (
        None  # custom: dotted path of the factory, e.g. torchvision.models.resnet18
    )
    checkpoint: str | None = None  # trained weights to start from (any arch): a state_dict file
    hidden: list[int] | None = None  # mlp
    conv: list[int] | None = None  # lenet5, simple_cnn
    fc: list[int] | None = None
    kernel_size: int | None = rule(None, low=1)
    padding: list[int] | None = None
    depth_n: int | None = rule(None, low=1)  # resnet20: blocks per stage
    widths: list[Any] | None = None  # vgg (ints and "M"), resnet20
    args: dict[str, Any] = field(default_factory=dict)  # the _target_'s keyword arguments

    def _check(self, prefix: str) -> None:
        if self.arch == "custom" and not self._target_:
            raise ValueError(
                f"{prefix}_target_ is required for model=custom (a dotted path, "
                "e.g. model._target_=torchvision.models.resnet18)"
            )
        if self._target_ and self.arch != "custom":
            raise ValueError(
                f"{prefix}_target_={self._target_!r} needs model=custom; "
                f"model.arch={self.arch!r} is a built-in network"
            )


# Nodes whose keys beyond the schema's are the keyword arguments of their ``_target_``.
OPEN_NODES: dict[str, type] = {"model": ModelSettings, "dataset": DatasetSettings}


def split_args(
    owner: type, node: Mapping[str, Any], key: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the schema's keys, the _target_'s keyword arguments)`` of an open node (a plain
    mapping). Extra keys are arguments only when the node has a ``_target_``; otherwise
    the first one raises ``ValueError`` naming it."""
    known = {f.name for f in dataclasses.fields(owner)}
    extra = {k: v for k, v in node.items() if k not in known}
    if extra and not node.get("_target_"):
        first = sorted(extra)[0]
        raise ValueError(
            f"{key}.{first} is not a setting; allowed keys of {key}: "
            f"{sorted(known - {'args'})} (keys of your own pass to a _target_: "
            f"{key}=custom)"
        )
    mine = {k: v for k, v in node.items() if k in known}
    args = {**dict(mine.pop("args", None) or {}), **extra}
    return mine, args


@dataclass
class LayerSettings:
    include: list[str] = field(default_factory=list)  # fnmatch globs over module names; [] = all
    exclude: list[str] = field(default_factory=list)


@dataclass
class PrunerSettings:
    """The keys of a policy node that configure the pruner around the policy (every
    other key is the policy's own argument). The choices of ``criterion``,
    ``granularity`` and ``on_collapse`` are the pruning core's and are checked there."""

    name: str = MISSING
    criterion: str = "magnitude"
    criterion_args: dict[str, Any] = field(default_factory=dict)
    granularity: str = "weight"
    min_keep: float = 0.01
    on_collapse: str = "restore"
    layers: LayerSettings = field(default_factory=LayerSettings)
    exclude_classifier: bool = False
    # Structured pruning: the channel counts of a coupled group are rounded up to a
    # multiple of round_to (e.g. 8), where that helps the kernels.
    round_to: int = 1

    def _check(self, prefix: str) -> None:
        r = self.round_to
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{prefix}round_to={r!r} is not allowed; allowed: an integer >= 1")

    @classmethod
    def split(cls, node: Mapping[str, Any] | DictConfig) -> tuple[PrunerSettings, dict[str, Any]]:
        """``(pruner settings, the policy's own arguments)`` of a policy node."""
        data = (
            OmegaConf.to_container(node, resolve=True)
            if isinstance(node, DictConfig)
            else dict(node)
        )
        data.pop("space", None)
        data.pop("options", None)
        keys = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in data.items() if k in keys}
        layers = mine.pop("layers", None) or {}
        if not isinstance(layers, Mapping) or set(layers) - {"include", "exclude"}:
            raise ValueError(
                f"layers={layers!r} is not allowed; allowed: {{include: [globs], exclude: [globs]}}"
            )
        if not isinstance(mine.get("criterion_args", {}), Mapping):
            raise ValueError(
                f"criterion_args={mine['criterion_args']!r} is not allowed; "
                "allowed: a mapping, e.g. criterion_args={beta: 0}"
            )
        pruner = cls(**mine, layers=LayerSettings(**{k: list(v or []) for k, v in layers.items()}))
        return pruner, {k: v for k, v in data.items() if k not in keys}
