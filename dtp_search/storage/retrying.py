"""The Optuna side of :mod:`dtp_search.storage.outage`'s decisions: a storage whose every call
is retried while its server is away, with creations and state changes safe to repeat."""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable, Container, Sequence
from datetime import datetime
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from dtp_search.storage.outage import Patience, is_transient

_log = logging.getLogger(__name__)

# Marks the trial a create_new_trial call writes, so that a retry after a lost answer finds
# it rather than creating a second one (which nobody would run or ever fail).
_CREATION_ATTR = "dtp_search:creation"


def _retried(name: str) -> Callable[..., Any]:
    """A method that calls the wrapped storage's ``name`` through the patience."""

    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patience.call(getattr(self._storage, name), *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The wrapped storage's ``{name}``, retried while its server is away."
    return method


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's storage (``_CachedStorage`` over ``RDBStorage``, as ``optuna.create_study``
    would wrap it) with every call retried while the server cannot be reached
    (:class:`~dtp_search.storage.outage.Patience`), so that Optuna's own trial loop, its heartbeat
    thread and dtp_search's calls all survive a database restart.

    A write that may have reached the server although its answer did not is made safe to
    repeat: a new trial carries a unique mark and a retry looks for it first; a state
    change is not repeated once the trial holds it. The other writes (attributes, params,
    intermediate values, heartbeats) are upserts and may simply be repeated.

    Wraps the cache rather than subclassing RDBStorage: only Optuna's public storage
    interface is overridden, and no retry sleeps while the cache holds its lock.
    """

    def __init__(self, storage: BaseStorage, patience: Patience) -> None:
        self._storage = storage
        self.patience = patience

    create_new_study = _retried("create_new_study")
    delete_study = _retried("delete_study")
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_all_studies = _retried("get_all_studies")
    set_trial_param = _retried("set_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_best_trial = _retried("get_best_trial")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    get_trial = _retried("get_trial")
    _get_stale_trial_ids = _retried("_get_stale_trial_ids")

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return self.patience.call(self._storage.get_all_trials, study_id, deepcopy, states)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """A new trial, created once however often the call must be repeated."""
        mark = uuid.uuid4().hex
        if template_trial is None:  # what RDBStorage creates without a template
            template = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        else:
            template = copy.deepcopy(template_trial)
        template.system_attrs[_CREATION_ATTR] = mark

        def created() -> tuple[bool, int | None]:
            for t in self._storage.get_all_trials(study_id, deepcopy=False):
                if t.system_attrs.get(_CREATION_ATTR) == mark:
                    return True, t._trial_id
            return False, None

        return self.patience.call(
            self._storage.create_new_trial, study_id, template, applied=created
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's state change; a repeat after a lost answer reports the change made
        (the trial already holds ``state`` and ``values``) rather than refusing to update
        a finished trial."""

        def made() -> tuple[bool, bool]:
            t = self._storage.get_trial(trial_id)
            if t.state != state:
                return False, False
            # A WAITING trial this call set RUNNING: taken for ours (another worker taking
            # the same trial in the same instant is far rarer than a lost answer, and a
            # RUNNING trial nobody runs would have no heartbeat to ever fail it).
            return values is None or list(t.values or []) == list(values), True

        return self.patience.call(
            self._storage.set_trial_state_values, trial_id, state, values, applied=made
        )

    def record_heartbeat(self, trial_id: int) -> None:
        """One beat, not retried: Optuna's heartbeat thread beats again after
        ``heartbeat_interval``, and a beat that waited for the server would hold up the
        end of the trial (the thread is joined). A beat lost to an outage is what the
        grace period is for."""
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:
            if not is_transient(exc):
                raise
            _log.debug("heartbeat of trial %d skipped: the storage does not answer", trial_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._storage.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._storage.get_heartbeat_stale_trial_callback()

    def remove_session(self) -> None:
        self._storage.remove_session()
