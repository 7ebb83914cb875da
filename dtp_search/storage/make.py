"""Optuna's storage for a ``study.storage`` URL: the journal, or an RDB storage with a
heartbeat, stale-trial retries and patience for a server that is away."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
    _CachedStorage,
)
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from dtp_search.storage.lock import StudyLock
from dtp_search.storage.outage import Patience
from dtp_search.storage.retrying import RetryingStorage
from dtp_search.storage.urls import (
    DEFAULT_PATIENCE,
    PROBE_TIMEOUT,
    STORAGE_ROLE,
    connect_timeout,
    local_path,
    mask_url,
    scheme,
)


def make_storage(
    url: str,
    *,
    heartbeat_interval: int = 30,
    grace_period: int = 120,
    max_retry: int | None = 2,
    patience: float = DEFAULT_PATIENCE,
) -> BaseStorage:
    """Optuna's storage for ``url``; RDB storages beat a heartbeat, retry stale trials, and
    ride out a server that is away for up to ``patience`` seconds (:class:`RetryingStorage`)."""
    if scheme(url) == "journal":
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(O_EXCL)-based lock works on every file system, NFS included.
        return JournalStorage(JournalFileBackend(str(path), JournalFileOpenLock(str(path))))
    path = local_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Optuna's default pool keeps connections open between calls; several workers on one
    # PostgreSQL server are better served with a ping before reuse (a restarted server
    # or a proxy that drops idle connections does not fail a trial). A connection attempt
    # is bounded, so that a host that went away (packets dropped, not refused) costs one
    # retry's wait rather than the operating system's two-minute TCP timeout.
    engine_kwargs: dict[str, Any] = {}
    if scheme(url) != "sqlite":
        engine_kwargs["pool_pre_ping"] = True
        engine_kwargs["connect_args"] = connect_timeout(url, 2 * PROBE_TIMEOUT)
    patient = Patience(STORAGE_ROLE, mask_url(url), patience)

    def open_rdb() -> RDBStorage:
        # Heartbeats and their retry callback are marked experimental in Optuna, and are
        # its only way to find and retry the trials of a dead worker: chosen on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url=url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry
                ),
            )

    # RDBStorage creates its tables on first use; workers that start together on an empty
    # database would race in CREATE TYPE/TABLE (a unique-violation error), so the first
    # creates them while the others wait on the lock.
    with StudyLock(url, "", "schema", patience=patience):
        rdb = patient.call(open_rdb)
    return RetryingStorage(_CachedStorage(rdb), patient)
