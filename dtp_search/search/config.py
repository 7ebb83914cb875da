"""Config helpers: OmegaConf resolvers, the checks that run before any data is loaded or
any trial starts (the schema and its rules are :mod:`dtp_search.settings`), and the
factories of the Optuna storage, sampler and early stopping and of the weight pruner."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import hydra
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError
from optuna.storages import BaseStorage

from dtp_search import storage as storages
from dtp_search.errors import ConfigError
from dtp_search.pruning import (
    CRITERIA,
    CostMeter,
    DynamicPruner,
    LayerSelection,
    build_criterion,
    build_policy,
)
from dtp_search.pruning.pruner import check_floor
from dtp_search.redaction import mask_urls
from dtp_search.search import space as search_space
from dtp_search.search.early_stop import ParetoFoldStop
from dtp_search.search.fidelity import FidelityRung
from dtp_search.settings import (
    PrunerSettings,
    Settings,
    check,
    cost_measures,
    front_axis,
    register_schema,
)
from dtp_search.tracking import check_tracking_uri
from dtp_search.training import CostProbe, WarmStart, check_teacher
from dtp_search.training.warmstart import WarmStartCache

__all__ = ["ConfigError", "check_config", "make_early_stop", "make_sampler", "make_storage"]


def settings_of(cfg: DictConfig) -> Settings:
    """The typed settings of ``cfg`` with every rule of :mod:`dtp_search.settings`
    checked; raises :class:`ConfigError` naming the key and what it allows."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise _required(missing[0])
    try:
        out = Settings.of(cfg)
    except MissingMandatoryValue as exc:
        raise _required(exc.full_key) from exc
    except (ValidationError, InterpolationResolutionError) as exc:
        raise ConfigError(
            " ".join(str(exc).split("\n")[0].split())
            + (f" (at {exc.full_key})" if getattr(exc, "full_key", None) else "")
        ) from exc
    except ValueError as exc:  # a key the schema does not have
        raise ConfigError(str(exc)) from exc
    try:
        check(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return out


def _required(key: str) -> ConfigError:
    return ConfigError(f"{key} is required (it is ???); set it on the command line, e.g. {key}=...")


def register_resolvers() -> None:
    """``${abspath:dtp_runs}`` → absolute path against the launch directory;
    ``${target_name:a.b.resnet18}`` → ``resnet18``; ``${dataset_name:a.CIFAR100}`` → ``cifar100``."""
    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(os.path.expanduser(p)))
    # model=custom and dataset=torchvision/custom name themselves after their _target_.
    if not OmegaConf.has_resolver("target_name"):
        OmegaConf.register_new_resolver("target_name", lambda t: str(t).rpartition(".")[2])
    if not OmegaConf.has_resolver("dataset_name"):
        OmegaConf.register_new_resolver("dataset_name", lambda t: str(t).rpartition(".")[2].lower())
    register_schema()


def policy_params(policy_cfg: DictConfig) -> dict[str, Any]:
    """Constructor arguments of the policy: every key of ``policy`` but the pruner's
    (:class:`~dtp_search.settings.PrunerSettings`) and the search space."""
    return PrunerSettings.split(policy_cfg)[1]


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
    """``(min_keep, on_collapse)`` of a policy node, unchecked."""
    pruner = PrunerSettings.split(policy_cfg)[0]
    return pruner.min_keep, pruner.on_collapse


def criterion_args(pruner: PrunerSettings) -> dict[str, Any]:
    """The arguments of the pruner's criterion: ``criterion_args`` itself (``{beta: 0}``),
    or, when its keys are criterion names (``{taylor: {beta: 0}, gradient: {beta: 0}}``,
    for a space that samples ``criterion``), the entry of the chosen criterion."""
    args = dict(pruner.criterion_args)
    if args and set(args) <= set(CRITERIA):
        return dict(args.get(pruner.criterion) or {})
    return args


def check_policy(policy_cfg: DictConfig, settings: Settings | None = None) -> None:
    """Build what a policy node describes short of the model: raise ``ValueError`` (or
    ``TypeError``) for bad arguments, for a criterion that cannot score the chosen
    granularity (``activation_gradient`` scores units, not weights), and, with
    ``settings``, for distillation without a dense teacher (:func:`check_teacher`)."""
    pruner, params = PrunerSettings.split(policy_cfg)
    policy = build_policy(pruner.name, params)
    criterion = build_criterion(pruner.criterion, criterion_args(pruner))
    for who, allowed in (
        (f"policy {pruner.name}", policy.granularities),
        (f"criterion {pruner.criterion}", criterion.granularities),
    ):
        if pruner.granularity not in allowed:
            raise ValueError(
                f"{who} cannot prune granularity={pruner.granularity!r}; allowed: {list(allowed)}"
            )
    check_floor(pruner.min_keep, pruner.on_collapse)
    check(pruner)  # round_to
    _selection(pruner)
    if settings is not None:
        check_teacher(settings.train, policy, settings.model.checkpoint)


def build_pruner(model: Any, policy_cfg: DictConfig, example_input: Any) -> DynamicPruner:
    """The pruner a policy node describes: the policy with its own arguments, and the
    criterion (with ``criterion_args``), granularity, ``min_keep``, ``on_collapse``,
    ``round_to`` and layer selection of :class:`~dtp_search.settings.PrunerSettings`."""
    pruner, params = PrunerSettings.split(policy_cfg)
    return DynamicPruner(
        model,
        build_policy(pruner.name, params),
        build_criterion(pruner.criterion, criterion_args(pruner)),
        granularity=pruner.granularity,
        min_keep=float(pruner.min_keep),
        on_collapse=pruner.on_collapse,
        example_input=example_input,
        layers=_selection(pruner),
        round_to=pruner.round_to,
    )


def _selection(pruner: PrunerSettings) -> LayerSelection:
    return LayerSelection(
        include=tuple(pruner.layers.include),
        exclude=tuple(pruner.layers.exclude),
        exclude_classifier=pruner.exclude_classifier,
    )


# Keys of ``train`` that choose how the engine runs, not what is trained: same result.
ENGINE_KEYS = ("train.eval_batch_size", "train.amp", "train.channels_last", "train.compile")


def config_yaml(cfg: DictConfig) -> str:
    """The resolved trial config as YAML, passwords masked (the run's ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.create(loggable(cfg)))


def loggable(cfg: DictConfig) -> dict[str, Any]:
    """A trial config without search-space declarations and policy options (not settings)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for node in ("policy", "search"):
        out.get(node, {}).pop("space", None)
    out.get("policy", {}).pop("options", None)
    # Passwords never reach MLflow params or config.yaml: not only study.storage and
    # tracking.uri carry URLs (an artifact location, a user's dataset argument can).
    return _mask_passwords(out)


def _mask_passwords(value: Any) -> Any:
    if isinstance(value, str):
        return mask_urls(value)
    if isinstance(value, dict):
        return {k: _mask_passwords(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_passwords(v) for v in value]
    return value


def check_config(
    cfg: DictConfig, settings: Settings | None = None
) -> tuple[Settings, search_space.SearchSpace]:
    """Checks that need no data: raise :class:`ConfigError` before any work starts.
    Returns the typed settings and the search space. ``settings``: ``cfg``'s, where the
    caller has them already (:func:`settings_of` merges the whole schema, a few tenths
    of a second)."""
    settings = settings or settings_of(cfg)
    make_early_stop(settings)
    make_fidelity(settings)
    storages.check_storage(settings.study.storage, settings.study.workers)
    space = search_space.parse_space(cfg)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            check_policy(node, settings)
        except ConfigError:
            raise  # names its own key (train.distill)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{policy_key(cfg, name)}: {exc}") from exc
    # Servers last: each probe may wait a few seconds for an answer.
    storages.check_reachable(settings.study.storage)
    check_tracking_uri(settings.tracking.uri)
    return settings, space


def policy_key(cfg: DictConfig, name: str) -> str:
    """Where a policy's settings live: ``policy`` or ``policy.options.<name>``."""
    return f"policy.options.{name}" if cfg.policy.get("name") == search_space.CHOICE else "policy"


def make_storage(s: Settings) -> BaseStorage:
    """The study's Optuna storage, with heartbeats and retries where Optuna has them, and
    calls retried while a database server is away (``study.storage_patience``)."""
    return storages.make_storage(
        s.study.storage,
        heartbeat_interval=s.search.heartbeat_interval,
        grace_period=s.search.grace_period,
        max_retry=s.search.max_retry,
        patience=s.study.storage_patience,
    )


def make_warm_start(s: Settings, data_digest: str) -> WarmStart | None:
    """The dense warm-start cache for the runs of a trial's settings ``s`` (its folds or
    its refit), or ``None`` with ``search.warm_start=false``. The dataset's settings and
    its content digest (:meth:`~dtp_search.data.ImageDataset.content_digest`) are hashed
    into every key: the keys see the sample indices, not which data set they index, nor
    whether its files were edited since (a dense state trained on the old images must
    not be reused)."""
    if not s.search.warm_start:
        return None
    context = {"dataset": dataclasses.asdict(s.dataset), "digest": data_digest}
    return WarmStart(WarmStartCache(s.paths.warm_start), context)


def make_cost_meter(
    measures: Any, policy_cfg: DictConfig, input_shape: Any, device: Any, batch_size: int
) -> CostMeter | None:
    """The meter of the costs ``measures`` (of ``flops``, ``params``, ``latency``) of
    networks pruned as ``policy_cfg`` says, on ``device``: FLOPs and parameters at batch
    1, latency at ``batch_size`` (``export.batch_size``) inputs of ``input_shape``; ``None``
    when there is nothing to measure. Weight-level masks remove no unit: their compacted
    network is the dense one (every fraction 1, nothing traced or timed)."""
    measures = tuple(measures)
    if not measures:
        return None
    example = torch.zeros(1, *input_shape, device=device)
    batch = None
    if "latency" in measures:
        # Values do not change what dense kernels do; a fixed draw keeps runs alike.
        gen = torch.Generator().manual_seed(0)
        batch = torch.randn(int(batch_size), *input_shape, generator=gen).to(device)
    granularity = PrunerSettings.split(policy_cfg)[0].granularity
    return CostMeter(measures, example, batch=batch, structured=granularity != "weight")


def make_cost_probe(
    s: Settings, policy_cfg: DictConfig, input_shape: Any, device: Any, rung_epoch: int | None
) -> CostProbe | None:
    """What each fold of a trial measures of its network's cost (:class:`CostProbe`), or
    ``None`` for a study of accuracy and sparsity alone: the final model's costs (those
    the objectives and ``search.max_flops`` need, :func:`~dtp_search.settings.cost_measures`);
    at each point of the one-shot sweep the front's axis (the study's second objective)
    when it is a cost; at the fidelity rung (``rung_epoch`` of fold 0) the costs among the
    objectives."""
    meter = make_cost_meter(
        cost_measures(s.search), policy_cfg, input_shape, device, s.export.batch_size
    )
    if meter is None:
        return None
    objectives = list(s.search.objectives)
    axis = front_axis(objectives)
    at_rung = rung_epoch is not None and any(o in meter.measures for o in objectives)
    return CostProbe(
        meter,
        sweep=(axis,) if axis in meter.measures else (),
        epochs={0: (rung_epoch,)} if at_rung else {},
    )


def make_fidelity(s: Settings) -> FidelityRung | None:
    """The study's reduced-budget rung (``search.fidelity``), or ``None`` when off.

    The rung must come before the run's last epoch (``train.epochs +
    train.finetune_epochs``): a rung there saves nothing. A trial whose sampled budget
    ends before the rung never reaches it and runs to its end.
    """
    f = s.search.fidelity
    if not f.enabled:
        return None
    rung = FidelityRung(f.epoch, f.eta, f.n_startup_trials)
    total = s.train.epochs + s.train.finetune_epochs
    epoch = rung.rung_epoch(s.train.epochs)
    if epoch >= total:
        raise ConfigError(
            f"search.fidelity.epoch={epoch} is not allowed; allowed: an integer "
            f"in [1, {total - 1}] (before the run's last epoch, train.epochs + "
            f"train.finetune_epochs = {total})"
        )
    return rung


def make_early_stop(s: Settings) -> optuna.pruners.BasePruner:
    """The study's early stopping of hopeless trials between folds (``early_stop=``; an
    Optuna pruner, called "early stop" here so that "pruner" means weight pruning only).

    Steps are folds. One objective: the configured Optuna pruner (``median``,
    ``wilcoxon``, ``pareto``, ``none`` or any ``optuna.pruners`` class) sees each fold's
    value through ``trial.report``. Several objectives: Optuna's ``report`` and
    ``should_prune`` do not exist there, so :class:`~dtp_search.search.early_stop.ParetoFoldStop`
    decides — the configured one (``early_stop=pareto``), or one with its defaults when
    a single-objective pruner is configured (``median``, the default); ``early_stop=none``
    runs every fold.
    """
    node = s.search.early_stop
    if node is None:
        return optuna.pruners.NopPruner()
    try:
        built = hydra.utils.instantiate(node)
    except Exception as exc:
        raise ConfigError(
            f"search.early_stop could not be built ({exc}); allowed: "
            "early_stop=median, early_stop=wilcoxon, early_stop=pareto, "
            "early_stop=none or any optuna.pruners class"
        ) from exc
    if len(s.search.objectives) > 1 and not isinstance(
        built, (ParetoFoldStop, optuna.pruners.NopPruner)
    ):
        return ParetoFoldStop()
    return built


def make_sampler(s: Settings, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; a set seed is offset by ``offset`` (the trial number, see
    :func:`dtp_search.search.trial.objective`)."""
    sampler = dict(s.search.sampler)
    if sampler.get("seed") is not None:
        sampler["seed"] = int(sampler["seed"]) + offset
    try:
        # The sampler's arguments are the config's choice (TPE's experimental `group`,
        # for the conditional space of policy=choice): not news on every run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return hydra.utils.instantiate(sampler)
    except Exception as exc:
        raise ConfigError(f"search.sampler could not be built ({exc})") from exc
