"""The MLflow side of an outage: a client whose every call is retried while the tracking
store cannot be reached (:mod:`dtp_search.storage.outage` decides what is transient and how long
to wait), and MLflow's own HTTP retries kept short."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from mlflow.tracking import MlflowClient

from dtp_search.storage import mask_url
from dtp_search.storage.outage import Patience, is_transient

TRACKING_ROLE = "the tracking store"


def _http_retries(patience: float) -> dict[str, str]:
    """MLflow's own retries of a request to a tracking server (urllib3's: refused
    connections, 5xx of a gateway), kept to a few seconds of ``patience``: they carry a
    request over a blip, and :class:`~dtp_search.storage.outage.Patience` waits out the rest of an
    outage with the same clock as the storage's. (MLflow's alone could not: at most 10
    retries of at most 120 s each, and its messages would not say what to do.)
    urllib3 waits 0, 2, 4, 8 s ... × the backoff factor between attempts."""
    retries = 1
    while retries < 4 and 2 ** (retries + 1) - 2 <= patience / 4:
        retries += 1
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }


class _PatientClient:
    """An ``MlflowClient`` whose every call is retried while the tracking store cannot be
    reached (:class:`~dtp_search.storage.outage.Patience`): a tracking server, or the SQL database
    of an ``sqlite:``/``postgresql:`` store, that restarts under a run. Attributes that are
    not methods (``tracking_uri``) are the client's own."""

    def __init__(self, client: MlflowClient, patience: Patience) -> None:
        self._client, self._patience = client, patience

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        patience = self._patience

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return patience.call(attr, *args, **kwargs)

        return call


class _QuietOutage(logging.Filter):
    """MLflow's SQL store logs every OperationalError with its traceback before raising
    it; while the outage is being retried that is noise (one warning says it instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_transient(record.exc_info[1]))


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietOutage())


def patient_client(tracking_uri: str, patience: float) -> _PatientClient:
    """An ``MlflowClient`` of ``tracking_uri`` whose every call (its creation included) is
    retried for up to ``patience`` seconds while the store does not answer."""
    if tracking_uri.split(":", 1)[0].lower() in ("http", "https"):
        for key, value in _http_retries(patience).items():
            os.environ.setdefault(key, value)  # the user's own settings win
    patient = Patience(TRACKING_ROLE, mask_url(tracking_uri), patience)
    return _PatientClient(patient.call(MlflowClient, tracking_uri=tracking_uri), patient)
