"""The dense warm-start cache: trials that begin with the same dense training share it.

A policy that starts pruning after ``start_epoch`` epochs (or prunes once at the end, like
``oneshot_global``) trains the plain dense network until then
(:meth:`~dtp_search.pruning.ThresholdPolicy.dense_epochs`). What that produces depends on
the data, the model, the fold, the seed, the optimiser settings and the number of dense
epochs — not on the policy's own parameters — so every later trial with the same
values can start from the stored state and train only its pruning phase.

The stored state is the training state of :func:`dtp_search.training.prune_and_train` at
the end of the dense epochs (model, optimiser, LR schedule, batch order and random
states, history, the criterion's running averages), the same containers a checkpoint
holds; resuming from it reproduces the uncached run bit for bit on CPU. Files are written
atomically and are never rewritten, so any number of workers can share the folder; they
are read with ``torch.load(weights_only=True)``.

PyTorch has no cache of this kind (``torch.ao.pruning`` and ``torch.nn.utils.prune`` prune
a given model; the warm-up is the caller's), hence this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtp_search.data import TensorBatches, tensor_digest
from dtp_search.files import atomic_save
from dtp_search.pruning import DynamicPruner
from dtp_search.settings import TrainSettings

log = logging.getLogger(__name__)

FORMAT = "dtp_search.warmstart/1"


def cache_key(**parts: Any) -> str:
    """A stable digest of everything the dense epochs depend on."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:24]


class WarmStartCache:
    """``<folder>/dense-<key>.pt`` files; counts its hits and stores for the caller's logs."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.stores = 0

    def path(self, key: str) -> Path:
        return self.folder / f"dense-{key}.pt"

    def load(self, key: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated by a full disk, or another version's format
            log.warning("ignoring unreadable warm-start state %s: %s", path, exc)
            return None
        if data.get("format") != FORMAT or data.get("key") != key:
            return None
        self.hits += 1
        return data["state"]

    def save(self, key: str, state: dict[str, Any]) -> None:
        path = self.path(key)
        if path.exists():  # another trial (or worker) stored the same state first
            return
        atomic_save({"format": FORMAT, "key": key, "state": state}, path)
        self.stores += 1


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
    """Everything the dense epochs (and their epoch records) depend on: the run's start
    (:func:`start_key_parts`), the settings, the validation fold and the criterion."""
    return cache_key(
        **start_key_parts(model, train, context),
        dense_epochs=dense_epochs,
        settings=_key_settings(settings),
        val=tensor_digest(val.indices),
        criterion=[type(pruner.criterion).__name__, getattr(pruner.criterion, "beta", None)],
        layers=sorted(pruner.masks),
    )


def start_key_parts(model: nn.Module, train: TensorBatches, context: Any) -> dict[str, Any]:
    """Where a run on a fold starts, as cache-key parts: the dataset (``context``), the
    initial weights, the fold's training indices, batches and augmentation, the random
    states, the device and torch's version. Weights, indices and random states are hashed
    themselves, so a key holds whatever produced them (model config, seeds, feedback
    hold-out)."""
    return {
        "context": context,
        "weights": tensor_digest(*model.state_dict().values()),
        "train": tensor_digest(train.indices),
        "batch_size": train.batch_size,
        "augment": [train.augment, train.crop_padding],
        "batches": tensor_digest(train.generator.get_state()),
        "rng": tensor_digest(torch.get_rng_state()),
        "device": str(train.device),
        "torch": torch.__version__,
    }


# TrainSettings fields younger than the cache: left out of the key at their defaults (which
# train what the code before them trained), so that the states stored before still match.
_KEY_OPTIONAL = ("l1_start_epoch", "l1_bias")


# Keys the dense epochs never read: distillation starts once they are over (its teacher is
# their result), so distilled and plain trials share the same cached dense epochs.
_KEY_UNUSED = ("distill",)


def _key_settings(settings: TrainSettings) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(TrainSettings) if f.name in _KEY_OPTIONAL}
    return {
        k: v
        for k, v in asdict(settings).items()
        if k not in _KEY_UNUSED and (k not in defaults or v != defaults[k])
    }
