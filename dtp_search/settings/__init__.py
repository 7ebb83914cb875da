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

The search layer (:mod:`dtp_search.search.space`) keeps working on the ``DictConfig``, because
sampled values are merged into it and interpolations such as a policy's
``end_epoch: ${train.epochs}`` must follow them; ``Settings.of`` is taken after that.
"""

from dtp_search.settings.inputs import (
    DATASET_KINDS,
    MODEL_ARCHS,
    DatasetSettings,
    ModelSettings,
    PrunerSettings,
    split_args,
)
from dtp_search.settings.objectives import (
    COST_OBJECTIVES,
    OBJECTIVE_DIRECTIONS,
    OBJECTIVES,
    cost_measures,
    front_axis,
)
from dtp_search.settings.rules import allowed, check, rule
from dtp_search.settings.schema import (
    Settings,
    field_owner,
    from_mapping,
    register_schema,
    text_fields,
)
from dtp_search.settings.train import (
    CONTINUE,
    LR_SCHEDULES,
    REWIND,
    DistillSettings,
    FrontSettings,
    TrainSettings,
)

__all__ = [
    "CONTINUE",
    "COST_OBJECTIVES",
    "DATASET_KINDS",
    "LR_SCHEDULES",
    "MODEL_ARCHS",
    "OBJECTIVES",
    "OBJECTIVE_DIRECTIONS",
    "REWIND",
    "DatasetSettings",
    "DistillSettings",
    "FrontSettings",
    "ModelSettings",
    "PrunerSettings",
    "Settings",
    "TrainSettings",
    "allowed",
    "check",
    "cost_measures",
    "field_owner",
    "from_mapping",
    "front_axis",
    "register_schema",
    "rule",
    "split_args",
    "text_fields",
]
