"""The dense warm start of a fold: the cache it reads and writes (:class:`WarmStart`),
and the key under which a fold's dense epochs are stored (:func:`warm_start_key`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from dtp_search.data import TensorBatches, tensor_digest
from dtp_search.pruning import DynamicPruner
from dtp_search.settings import TrainSettings
from dtp_search.training.warmstart import WarmStartCache, cache_key


@dataclass
class WarmStart:
    """The dense warm-start cache of :func:`prune_and_train`, and what its keys cannot see."""

    cache: WarmStartCache
    context: Any = None  # hashed into every key: the dataset's config and content digest


def warm_start_key(
    model: nn.Module,
    pruner: DynamicPruner,
    train: TensorBatches,
    val: TensorBatches,
    settings: TrainSettings,
    dense_epochs: int,
    context: Any,
) -> str:
    """Everything the dense epochs (and their epoch records) depend on. The initial
    weights, the fold's indices and the random states are hashed themselves, so the key
    holds whatever produced them (model config, seeds, feedback hold-out)."""
    return cache_key(
        context=context,
        dense_epochs=dense_epochs,
        settings=_key_settings(settings),
        weights=tensor_digest(*model.state_dict().values()),
        train=tensor_digest(train.indices),
        val=tensor_digest(val.indices),
        batch_size=train.batch_size,
        augment=[train.augment, train.crop_padding],
        batches=tensor_digest(train.generator.get_state()),
        rng=tensor_digest(torch.get_rng_state()),
        criterion=[type(pruner.criterion).__name__, getattr(pruner.criterion, "beta", None)],
        layers=sorted(pruner.masks),
        device=str(train.device),
        torch=torch.__version__,
    )


# TrainSettings fields younger than the cache: left out of the key at their defaults (which
# train what the code before them trained), so that the states stored before still match.
_KEY_OPTIONAL = ("l1_start_epoch", "l1_bias")


def _key_settings(settings: TrainSettings) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(TrainSettings) if f.name in _KEY_OPTIONAL}
    return {k: v for k, v in asdict(settings).items() if k not in defaults or v != defaults[k]}
