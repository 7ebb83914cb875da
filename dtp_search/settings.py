"""The configuration's schema: one typed dataclass per config node, registered in Hydra's
``ConfigStore`` as ``dtp_search_schema``.

``conf/config.yaml`` lists the schema first in its defaults, so every YAML file and every
command-line override is merged *into* these dataclasses: OmegaConf checks types and key
names at compose time (``seed=abc`` and ``train.epoch=5`` fail there), and the YAML
files only supply values. What a type cannot say — ranges and choices — is in each
field's :func:`rule`, and :func:`check` tests every rule from one place; its message is
the one-line ``key=value is not allowed; allowed: …`` the CLI prints.

The code past the CLI takes these objects (``Settings.of(cfg)``), not the raw
``DictConfig``. Two things stay untyped on purpose:

- ``policy``: each policy takes different arguments, so its schema is its constructor
  (:func:`dtp_search.pruning.build_policy` refuses unknown or bad arguments), plus the
  pruner keys of :class:`PrunerSettings`.
- ``search.sampler`` and ``search.early_stop``: any Optuna class, built by
  ``hydra.utils.instantiate`` from its ``_target_``.

The search layer (:mod:`dtp_search.space`) keeps working on the ``DictConfig``, because
sampled values are merged into it and interpolations such as a policy's
``end_epoch: ${train.epochs}`` must follow them; ``Settings.of`` is taken after that.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = [
    "CONTINUE",
    "COST_OBJECTIVES",
    "DATASET_KINDS",
    "LR_SCHEDULES",
    "MODEL_ARCHS",
    "OBJECTIVES",
    "OBJECTIVE_DIRECTIONS",
    "PrunerSettings",
    "Settings",
    "TrainSettings",
    "allowed",
    "check",
    "cost_measures",
    "from_mapping",
    "front_axis",
    "register_schema",
    "rule",
    "split_args",
]

LR_SCHEDULES = ("cosine", "onecycle", "step", "constant")
CONTINUE = "continue"  # train.finetune_lr_schedule: the pruning phase's schedule runs on
MODES = ("search", "refit", "compare")
DIRECTIONS = ("maximize", "minimize")
# search.objectives and the direction each must be given: accuracy and sparsity are
# maximised; the costs of the compacted network (dtp_search.pruning.cost, fractions of the
# dense network's FLOPs, parameters and latency) are minimised.
OBJECTIVE_DIRECTIONS = {
    "accuracy": "maximize",
    "sparsity": "maximize",
    "flops": "minimize",
    "params": "minimize",
    "latency": "minimize",
}
OBJECTIVES = tuple(OBJECTIVE_DIRECTIONS)
COST_OBJECTIVES = ("flops", "params", "latency")  # == dtp_search.pruning.COSTS
# Seeds go to scikit-learn and numpy, which take [0, 2**32).
SEED_HIGH = 2**32


@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type: ``low <= value < high`` (``above``: strictly
    greater), one of ``choices``, or ``each`` of a list's items among ``choices``."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] | None = None
    each: bool = False
    words: str | None = None  # what is allowed, where the type and limits say too little

    def allows(self, value: Any) -> bool:
        if value is None:
            return True  # Optional fields: the type already allowed null
        if self.choices is not None:
            items = value if self.each else [value]
            return bool(items) and all(v in self.choices for v in items)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # not a number: the type check is OmegaConf's
        return (
            math.isfinite(value)
            and (self.low is None or value >= self.low)
            and (self.high is None or value < self.high)
            and (self.above is None or value > self.above)
        )


def rule(default: Any = MISSING, **limits: Any) -> Any:
    """A dataclass field with ``default`` and a :class:`Rule` (``low``, ``high``,
    ``above``, ``choices``, ``each``, ``words``)."""
    if "choices" in limits:
        limits["choices"] = tuple(limits["choices"])
    meta = {"rule": Rule(**limits)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def allowed(owner: type, name: str) -> str:
    """What field ``name`` of dataclass ``owner`` allows, in words: ``an integer >= 1``,
    ``null or a number in [0, 1)``, ``['sgd', 'adam']``, ``true, false``."""
    f = {f.name: f for f in dataclasses.fields(owner)}[name]
    hint = _hints(owner)[name]
    r: Rule = f.metadata.get("rule", Rule())
    null = "None" in hint
    if r.words is not None:
        return r.words
    if r.choices is not None:
        text = f"a non-empty list of {list(r.choices)}" if r.each else str(list(r.choices))
        return ("null or " if null else "") + text
    if "bool" in hint:
        return "true, false"
    if "list" in hint:
        item = "integers" if "int" in hint else "numbers" if "float" in hint else "values"
        noun = f"a list of {item}"
    elif "dict" in hint:
        noun = "a mapping"
    elif "int" in hint and "float" not in hint:
        noun = "an integer"
    elif "float" in hint:
        noun = "a number"
    else:
        noun = "a text"
    if r.above is not None and r.high is not None:
        span = f" in ({r.above}, {r.high})"
    elif r.low is not None and r.high is not None:
        span = (
            f" in [{r.low}, {r.high - 1}]" if noun == "an integer" else f" in [{r.low}, {r.high})"
        )
    elif r.low is not None:
        span = f" >= {r.low}"
    elif r.above is not None:
        span = f" > {r.above}"
    elif r.high is not None:
        span = f" < {r.high}"
    else:
        span = ""
    return ("null or " if null else "") + noun + span


def _hints(owner: type) -> dict[str, str]:
    # Annotations are strings (``from __future__ import annotations``); the words in
    # them are all `allowed` needs, and reading them avoids evaluating forward references.
    return {f.name: str(f.type) for f in dataclasses.fields(owner)}


def check(obj: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` (``key=value is not allowed; allowed: …``) for the first field
    of ``obj`` or of its nested settings that breaks its :class:`Rule`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check(value, key + ".")
            continue
        r = f.metadata.get("rule")
        if r is not None and not r.allows(value):
            raise ValueError(
                f"{key}={_show(value)} is not allowed; allowed: {allowed(type(obj), f.name)}"
            )
    extra = getattr(obj, "_check", None)
    if extra is not None:
        extra(prefix)


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)


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
    """A reduced-budget rung on fold 0 (:class:`dtp_search.fidelity.FidelityRung`)."""

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


def front_axis(objectives: Sequence[str]) -> str:
    """The x of a study's fronts and Pareto plots: its first objective other than
    ``accuracy`` (``sparsity`` when it has none), e.g. ``flops`` for
    ``search.objectives=[accuracy,flops]``."""
    return next((o for o in objectives if o != "accuracy"), "sparsity")


def cost_measures(search: SearchSettings | Mapping[str, Any]) -> tuple[str, ...]:
    """The costs (:data:`COST_OBJECTIVES`) a study's trials measure: those among its
    objectives, ``flops`` under ``search.max_flops``; ``flops`` and ``params`` come
    together (one compaction gives both). Empty for accuracy and sparsity alone."""
    get = search.get if isinstance(search, Mapping) else lambda k, d=None: getattr(search, k, d)
    wanted = set(get("objectives") or ()) & set(COST_OBJECTIVES)
    if get("max_flops") is not None:
        wanted.add("flops")
    if wanted & {"flops", "params"}:
        wanted |= {"flops", "params"}
    return tuple(c for c in COST_OBJECTIVES if c in wanted)


@dataclass
class CVSettings:
    folds: int = rule(3, low=2)  # StratifiedKFold over the training split


@dataclass
class TrainSettings:
    """Optimisation settings of one fold (the ``train`` node). The YAML's values are
    these defaults (tests/test_settings.py holds them equal)."""

    epochs: int = rule(15, low=0)  # pruning phase: the policy moves θ
    finetune_epochs: int = rule(3, low=0)  # post-pruning phase: final θ, masks frozen
    batch_size: int = rule(64, low=1)
    eval_batch_size: int = rule(1024, low=1)
    optimizer: str = rule("sgd", choices=("sgd", "adam"))
    lr: float = rule(0.1, above=0)
    momentum: float = rule(0.9, low=0, high=1)
    nesterov: bool = True
    weight_decay: float = rule(5e-4, low=0)
    lr_schedule: str = rule("cosine", choices=LR_SCHEDULES)  # pruning phase
    # Post-pruning phase: one of LR_SCHEDULES, starting at lr · finetune_lr_scale, or
    # "continue": one optimizer and one schedule run over both phases (as a plain loop
    # that prunes inside a single OneCycle schedule does).
    finetune_lr_schedule: str = rule("cosine", choices=(*LR_SCHEDULES, CONTINUE))
    finetune_lr_scale: float = rule(0.1, low=0)
    label_smoothing: float = rule(0.0, low=0, high=1)
    l1: float = rule(0.0, low=0)  # λ of the penalty λ·Σ|W ⊙ M| over the pruned layers' weights
    l1_start_epoch: int = rule(0, low=0)  # epochs (from the first) trained without the penalty
    l1_bias: bool = False  # the penalty covers the pruned layers' biases too
    channels_last: bool = True  # NHWC memory format for conv nets (faster on CPU and GPU)
    amp: bool = True  # CUDA only: bf16 autocast for forward passes
    compile: bool = False  # torch.compile the model for training (any device)

    def _check(self, prefix: str) -> None:
        if self.epochs + self.finetune_epochs < 1:
            raise ValueError(
                f"{prefix}epochs={self.epochs!r} is not allowed; allowed: "
                "epochs + finetune_epochs >= 1"
            )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first ``train.<key>`` whose value cannot work."""
        check(self, "train.")

    @classmethod
    def from_config(cls, node: Any) -> TrainSettings:
        """The settings of a ``train`` node (a ``DictConfig`` or mapping)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: node[k] for k in node if k in known})


@dataclass
class RefitSettings:
    enabled: bool = True  # retrain the chosen trials on the whole training split, test once
    top_k: int | None = rule(None, low=1)  # null = every Pareto-optimal trial
    trials: str = rule("pareto", choices=("pareto", "all"))  # all: a comparison's every cell
    register: bool = False  # register the most accurate refit in the Model Registry


@dataclass
class FrontSettings:
    points: int = rule(10, low=0)  # one-shot thresholds above the final one
    max_sparsity: float = rule(0.995, above=0, high=1)
    update_samples: int | None = rule(1000, low=1)


@dataclass
class ExportSettings:
    """How a compacted network's cost is measured (search objectives and refit measures)."""

    batch_size: int = rule(64, low=1)  # latency: the batch size the network is deployed with


@dataclass
class ConsoleSettings:
    progress: bool = True


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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"{key}.{unknown[0]} is not a setting; allowed keys of {key}: {sorted(known)}"
        )
    return cls(**value)


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
