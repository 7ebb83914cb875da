"""Which worker runs a trial, and what is done about a worker that died: Optuna's
heartbeat on RDB storages, process liveness on this host for the journal."""

from __future__ import annotations

import logging
import os
import socket
import warnings

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

_log = logging.getLogger(__name__)


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether ``storage`` beats Optuna's heartbeat (RDB storages; not the journal)."""
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def worker_id() -> str:
    """``host:pid`` — stored on every trial so a dead worker's trial can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(worker: str) -> bool | None:
    """True/False for a worker on this host, ``None`` when it ran elsewhere (unknown)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, max_retry: int | None) -> list[int]:
    """Storages without Optuna's heartbeat (the journal): fail RUNNING trials whose worker
    process on this host no longer exists and re-queue them as the heartbeat would.

    Returns the numbers of the trials it failed.
    """
    storage = study._storage  # the study's own storage object; Optuna exposes no getter
    failed = []
    with warnings.catch_warnings():  # experimental in Optuna; its retry is the one we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None or _alive_here(worker) is not False:
            continue
        # set_trial_state_values returns False when another worker changed it first.
        # (No reason attribute: the retry inherits every user attribute of the trial.)
        if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            _log.warning(
                "trial %d failed: its worker %s died; re-queued with the same parameters",
                t.number,
                worker,
            )
            retry(study, storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed
