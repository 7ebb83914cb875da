"""Where a study lives, and the cross-process locks that let many workers share it.

Storages (``study.storage``):

* ``sqlite:////abs/path.db`` — Optuna's :class:`~optuna.storages.RDBStorage` on SQLite,
  the single-user default. SQLite serialises writers on one file lock, so it is refused
  for ``study.workers > 1`` (see :func:`check_storage`).
* ``postgresql://user:pass@host:port/db`` (or ``mysql://``) — the same RDBStorage on a
  server: any number of workers on any number of machines.
* ``journal:///abs/path.log`` — Optuna's :class:`~optuna.storages.JournalStorage` with
  its file backend: several workers on *one* machine without a server. Optuna's
  journal has no heartbeat, so a dead worker's trial is detected here by process
  liveness instead (same host only; see :func:`fail_dead_trials`).

RDB storages get Optuna's heartbeat (``search.heartbeat_interval``/``grace_period``) with
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`: a trial whose worker stopped
beating is failed by whichever worker looks next and re-queued with the same parameters.

:class:`StudyLock` is a mutex shared by every worker of a study, held only for the few
milliseconds of a decision that must not race (admit a trial, create the MLflow parent
run, claim the refit). Optuna has no such primitive, so it is built on what the storage
already offers: a PostgreSQL advisory lock (or MySQL ``GET_LOCK``) on the study's own
database, or ``flock`` on a file beside a SQLite/journal file. All of them are released
by the operating system or the server when the holder dies, so a SIGKILLed worker never
leaves a lock behind.

Servers restart. Every call to an RDB storage goes through :class:`RetryingStorage`, and
every lock operation through the same :class:`~dtp_search.storage.outage.Patience`: a refused or
dropped connection is retried for up to ``study.storage_patience`` seconds. A lock held
on a server dies with its connection when the server restarts; :meth:`StudyLock.still_held`
tells its holder, who takes it again and redoes the decision it guarded.
"""

from dtp_search.storage.lock import LOCK_DIR, StudyLock
from dtp_search.storage.make import make_storage
from dtp_search.storage.retrying import RetryingStorage
from dtp_search.storage.urls import (
    DEFAULT_PATIENCE,
    PROBE_TIMEOUT,
    check_reachable,
    check_storage,
    local_path,
    mask_url,
    scheme,
)
from dtp_search.storage.workers import fail_dead_trials, has_heartbeat, worker_id

__all__ = [
    "DEFAULT_PATIENCE",
    "LOCK_DIR",
    "PROBE_TIMEOUT",
    "RetryingStorage",
    "StudyLock",
    "check_reachable",
    "check_storage",
    "fail_dead_trials",
    "has_heartbeat",
    "local_path",
    "make_storage",
    "mask_url",
    "scheme",
    "worker_id",
]
