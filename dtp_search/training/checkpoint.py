"""Per-trial checkpoints, so that a retried trial continues where its dead worker stopped.

One file per trial *lineage* (the first trial number of a retry chain:
:meth:`optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number`), holding
the finished folds and the training state of the running fold after its last epoch
(:func:`dtp_search.training.cross_validate`). The file is replaced atomically
(write to a temporary file, then ``os.replace``), so a worker killed mid-write leaves
the previous checkpoint intact, and it is read with ``torch.load(weights_only=True)``:
a checkpoint is data, never code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dtp_search.files import atomic_save

log = logging.getLogger(__name__)

FORMAT = "dtp_search.checkpoint/1"


class TrialCheckpoint:
    """``<folder>/trial-<lineage>.pt``; ``config_key`` guards against resuming a trial
    whose configuration has since changed (a different command-line override)."""

    def __init__(self, folder: str | Path, lineage: int, config_key: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"trial-{lineage}.pt"
        self.config_key = config_key

    def save(self, state: dict[str, Any]) -> None:
        atomic_save({"format": FORMAT, "config_key": self.config_key, "state": state}, self.path)

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The saved state (tensors on ``map_location``, the device the trial trains on),
        or ``None`` when there is none for this configuration."""
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated by a full disk, or written by another version
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, exc)
            return None
        if data.get("format") != FORMAT or data.get("config_key") != self.config_key:
            log.warning("ignoring checkpoint %s: written for another configuration", self.path)
            return None
        return data["state"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def describe(state: dict[str, Any]) -> str:
    """``fold 1, epoch 3`` — where a checkpoint resumes."""
    return f"fold {state['fold']}, epoch {state['train']['epoch']}"
