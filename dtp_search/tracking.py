"""MLflow tracking: one parent run per study, one nested child run per Optuna trial.

Uses ``MlflowClient`` with explicit run ids instead of the fluent ``mlflow.start_run``
stack, so that the parent run can be re-opened on resume, and so that several worker
processes can log to the same study without sharing any global "active run".

Layout in MLflow (experiment = ``tracking.experiment``, tagged as a model-training
experiment, ``mlflow.experimentKind=custom_model_development``, so that the UI opens on its
runs table rather than its GenAI traces view):

* parent run ``<study name>`` — tags ``dtp_search.role=study``, ``dtp_search.study``;
  artifacts ``pareto_front.json`` (a table), ``pareto_front.png``; metrics
  ``n_complete``, ``pareto_size``, ``pareto_hypervolume`` (step = complete trials).
* child run ``trial-<n>`` — tags ``mlflow.parentRunId``, ``dtp_search.role=trial``,
  ``optuna.trial_number``, ``optuna.trial_state``, ``dtp_search.sampled`` (the sampled
  keys); params = the trial's own configuration (:func:`dtp_search.config.run_params`),
  the whole resolved config as ``config.yaml``; the dataset as a run input; per-epoch
  metrics ``fold_<k>/{loss,val_accuracy,sparsity,threshold,lr,recovered}`` and fold means
  (step = epoch); the accuracy-versus-sparsity front as ``front.json`` (a table),
  ``front.png``, the image ``front`` (the chart view's image grid) and the metric history
  ``front/accuracy`` whose step is 1000 × sparsity, so that MLflow's own line chart
  overlays the fronts of every trial. When the study's second objective is a cost
  (``flops``, ``params``, ``latency``: fractions of the dense network's), the fronts are
  drawn against it instead (:func:`front_x`): step = 1000 × that fraction.
* child run ``refit-<n>`` — tag ``dtp_search.role=refit`` (its MLflow status says how it
  ended), the trial's ``cv_*`` metrics, ``test_accuracy``, the test front as
  ``front/test_accuracy`` and the model, named ``<study>-trial-<n>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_LOGGED_ARTIFACTS

from dtp_search.data import ImageDataset
from dtp_search.errors import ConfigError, reason
from dtp_search.outage import Patience, is_transient
from dtp_search.pruning.front import FrontPoint
from dtp_search.storage import DEFAULT_PATIENCE, PROBE_TIMEOUT, mask_url

log = logging.getLogger(__name__)

ROLE_TAG, STUDY_TAG = "dtp_search.role", "dtp_search.study"
TRIAL_TAG, STATE_TAG = "optuna.trial_number", "optuna.trial_state"
REFIT_TAG, SAMPLED_TAG = "dtp_search.refit_of", "dtp_search.sampled"
# The UI's experiment kind: "custom_model_development" is its model-training workflow.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# The runs table's Source column (MLflow's fluent API sets these from the script it runs in).
SOURCE_TAGS = {"mlflow.source.name": "python -m dtp_search", "mlflow.source.type": "LOCAL"}
SHARED_VIEW_TAG, VIEW_KEY = "mlflow.sharedViewState.", "dtp_search"
FRONT_STEPS = 1000  # front/<metric> is logged at step = round(FRONT_STEPS * x), x: the axis
# What the x of a front or a Pareto plot is, per axis (the study's second objective).
AXIS_LABELS = {
    "sparsity": "sparsity (fraction of prunable weights = 0)",
    "flops": "FLOPs of the compacted network / dense",
    "params": "parameters of the compacted network / dense",
    "latency": "latency of the compacted network / dense",
}


def row_key(axis: str) -> str:
    """The key of a Pareto row (:func:`dtp_search.results.pareto_rows`) that holds the CV
    value of ``axis``: ``sparsity``, or the cost's metric name (``cv_flops``, ...)."""
    return "sparsity" if axis == "sparsity" else f"cv_{axis}"


def front_x(point: FrontPoint, axis: str) -> float | None:
    """The x of a front point on a front drawn against ``axis``: its sparsity, or its cost
    ``axis`` (``None`` where that was not measured: the mask updates during training)."""
    return point.sparsity if axis == "sparsity" else point.costs.get(axis)


_MAX_PARAM_LEN = 6000


_GATEWAY_ERRORS = (502, 503, 504)  # a proxy's answer for a server behind it that is down


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Refuse an ``http(s)://`` tracking URI where no server answers within ``timeout``
    seconds, before any data is loaded or any trial starts.

    MLflow's client retries a failed request with backoff for over two minutes and then
    raises its own traceback. Its MLFLOW_HTTP_REQUEST_MAX_RETRIES/_TIMEOUT variables would
    shorten that, but for the whole run, where retries are what carry a study over a
    server restart; so one plain GET of the server's ``/health`` is sent here instead.
    Any HTTP answer (even 401 or 404) or a TLS error means something listens there, and
    MLflow's own client (with its credentials and certificates) takes it from there; only
    a connection that fails or times out is reported.
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return
    # Without user:password@ (urllib would read it as part of the host name).
    netloc = parts.netloc.rpartition("@")[2]
    probe = urlunsplit(
        parts._replace(
            netloc=netloc, path=parts.path.rstrip("/") + "/health", query="", fragment=""
        )
    )
    try:
        # urllib, like MLflow's requests, honours http_proxy/https_proxy/no_proxy.
        with urllib.request.urlopen(probe, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        # A gateway (proxy, load balancer) answering for a server that is down: MLflow
        # retries these for minutes, as it does a refused connection.
        if exc.code not in _GATEWAY_ERRORS:
            return
        text = f"HTTP {exc.code} {exc.reason}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timeout, bad port
        if isinstance(getattr(exc, "reason", exc), ssl.SSLError):
            return
        text = reason(exc)
    raise ConfigError(
        f"tracking.uri={mask_url(uri)!r} cannot be reached ({text}); start the "
        "tracking server (mlflow server --host 0.0.0.0 --port 5000 ...) or use a "
        "local store, e.g. tracking.uri=sqlite:////abs/mlflow.db"
    )


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


TRACKING_ROLE = "the tracking store"


def _http_retries(patience: float) -> dict[str, str]:
    """MLflow's own retries of a request to a tracking server (urllib3's: refused
    connections, 5xx of a gateway), kept to a few seconds of ``patience``: they carry a
    request over a blip, and :class:`~dtp_search.outage.Patience` waits out the rest of an
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
    reached (:class:`~dtp_search.outage.Patience`): a tracking server, or the SQL database
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


class StudyTracker:
    """Create-or-reuse the study's parent run and open child runs for trials.

    Every MLflow call is retried for up to ``patience`` seconds while the store does not
    answer (``study.storage_patience``)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        study_name: str,
        artifact_location: str | None = None,
        patience: float = DEFAULT_PATIENCE,
    ) -> None:
        if tracking_uri.split(":", 1)[0].lower() in ("http", "https"):
            for key, value in _http_retries(patience).items():
                os.environ.setdefault(key, value)  # the user's own settings win
        patient = Patience(TRACKING_ROLE, mask_url(tracking_uri), patience)
        self.client = _PatientClient(patient.call(MlflowClient, tracking_uri=tracking_uri), patient)
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.experiment_id = self._experiment(experiment, artifact_location)
        self.parent_run_id = self._parent_run()
        self.dataset: DatasetInfo | None = None

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(KIND_TAG) != TRAINING_KIND:  # created by an older dtp_search
                self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
            return exp.experiment_id
        # A tracking server stores artifacts where it was told (--artifacts-destination) and
        # proxies them to every worker; a local folder would split them across machines.
        remote = self.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks")
        location = (
            Path(artifact_location).resolve().as_uri() if artifact_location and not remote else None
        )
        try:
            return self.client.create_experiment(
                name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND}
            )
        except Exception:  # another worker created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _find_runs(self, filter_string: str) -> list:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )

    def _parent_run(self) -> str:
        existing = self._find_runs(
            f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{self.study_name}'"
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.study_name,
            tags={ROLE_TAG: "study", STUDY_TAG: self.study_name},
        )
        return run.info.run_id

    # ------------------------------------------------------------------ trials

    def start_trial(
        self, trial_number: int, params: dict[str, Any], sampled: Iterable[str], config_yaml: str
    ) -> TrialRun:
        """A child run for a trial: its own configuration as params (the sampled keys
        named in a tag, not repeated), the whole config as ``config.yaml``, the dataset."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial_number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                ROLE_TAG: "trial",
                STUDY_TAG: self.study_name,
                TRIAL_TAG: str(trial_number),
                STATE_TAG: "RUNNING",
                SAMPLED_TAG: ",".join(sorted(sampled)),
                **SOURCE_TAGS,
            },
        )
        trial_run = TrialRun(self.client, run.info.run_id)
        trial_run.start(params, config_yaml, self.dataset)
        return trial_run

    def find_refit(self, trial_number: int):
        """The finished refit run of trial ``trial_number``, or ``None``."""
        runs = self._find_runs(
            f"tags.`{ROLE_TAG}` = 'refit' and "
            f"tags.`{STUDY_TAG}` = '{self.study_name}' and "
            f"tags.`{REFIT_TAG}` = '{trial_number}' and "
            "attributes.status = 'FINISHED'"
        )
        return runs[0] if runs else None

    def start_refit(
        self, trial_number: int, params: dict[str, Any], policy: str, config_yaml: str
    ) -> TrialRun:
        """A child run for the refit of a trial. Its role is its ``dtp_search.role`` tag and
        its outcome MLflow's run status: it carries no Optuna trial state of its own."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"refit-{trial_number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                ROLE_TAG: "refit",
                STUDY_TAG: self.study_name,
                REFIT_TAG: str(trial_number),
                "policy": policy,
                **SOURCE_TAGS,
            },
        )
        refit_run = TrialRun(self.client, run.info.run_id, state_tag=False)
        refit_run.start(params, config_yaml, self.dataset, context="train+test")
        return refit_run

    def close_orphans(self, live_states: dict[int, str]) -> int:
        """Mark child runs left RUNNING by a dead process as FAILED; returns how many."""
        n = 0
        for run in self._find_runs(
            f"tags.`{ROLE_TAG}` = 'trial' and "
            f"tags.`{STUDY_TAG}` = '{self.study_name}' and "
            "attributes.status = 'RUNNING'"
        ):
            number = int(run.data.tags.get(TRIAL_TAG, -1))
            state = live_states.get(number)
            if state != "RUNNING":
                self.client.set_tag(run.info.run_id, STATE_TAG, state or "FAIL")
                self.client.set_terminated(run.info.run_id, "FAILED")
                n += 1
        return n

    # ------------------------------------------------------------------ parent

    def log_pareto(
        self,
        rows: list[dict[str, Any]],
        n_complete: int,
        hypervolume: float,
        trial_fronts: dict[int, list[tuple[float, float]]] | None = None,
        policies: dict[int, str] | None = None,
        floored: Iterable[int] = (),
        axis: str = "sparsity",
    ) -> None:
        """Refresh the study's Pareto table and plot (overwritten, not appended); the plot's
        x is ``axis`` (the study's second objective)."""
        df = pd.DataFrame(rows)
        # log_table appends to an existing file; the parent's table must be replaced on
        # every refresh, so it is written in log_table's JSON layout with log_dict and
        # declared a table the way log_table does it (the UI then shows it as one).
        self.client.log_dict(
            self.parent_run_id, df.to_dict(orient="split", index=False), "pareto_front.json"
        )
        _declare_table(self.client, self.parent_run_id, "pareto_front.json")
        fig = plot_pareto(
            rows,
            trial_fronts or {},
            title=self.study_name,
            policies=policies,
            floored=floored,
            axis=axis,
        )
        self.client.log_figure(self.parent_run_id, fig, "pareto_front.png")
        plt.close(fig)
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_run_id,
            metrics=[
                Metric("n_complete", n_complete, ts, n_complete),
                Metric("pareto_size", len(rows), ts, n_complete),
                Metric("pareto_hypervolume", hypervolume, ts, n_complete),
            ],
        )

    def set_dataset(self, dataset: DatasetInfo) -> None:
        """The study's dataset: an input of the parent run and of every run started after
        (the runs table's Dataset column)."""
        self.dataset = dataset
        _log_dataset(self.client, self.parent_run_id, dataset, "train")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)

    def share_view(self, param_keys: Iterable[str] = (), axis: str = "sparsity") -> None:
        """Store dtp_search's view of the experiment as an MLflow *shared view* (the UI's own
        mechanism behind its "Share" button: an experiment tag ``mlflow.sharedViewState.<key>``
        read when the URL carries ``viewStateShareKey=<key>``). The view lists every run flat
        (trials and refits are not folded under the study run), most accurate first, with
        the CV and test metrics and the searched params as columns, and opens its chart tab
        on the fronts: the trials' ``cv_<axis>``/``cv_accuracy`` scatter (``axis``: the
        study's second objective, sparsity by default), the overlay of every run's
        ``front/accuracy`` history and the grid of ``front`` images.

        Several studies may share one experiment (``tracking.experiment``): each study
        has a view of its own (key :func:`view_key`), filtered to its own runs.
        """
        state = _view_state(list(param_keys), axis, study_filter(self.study_name))
        self.client.set_experiment_tag(
            self.experiment_id,
            SHARED_VIEW_TAG + view_key(self.study_name),
            json.dumps(state, separators=(",", ":")),
        )

    def runs_url(self, base: str = "http://127.0.0.1:5000", charts: bool = False) -> str:
        """The study's runs table (or with ``charts`` its chart tab) in the MLflow UI, in
        the model-training view, with its shared view (:meth:`share_view`)."""
        return runs_url(base, self.experiment_id, charts=charts, study_name=self.study_name)

    def ui_command(self) -> str:
        if self.tracking_uri.split(":", 1)[0] in ("http", "https"):
            return (
                f"open {self.runs_url(self.tracking_uri.rstrip('/'))} "
                "(the MLflow server the workers log to)"
            )
        return (
            f"mlflow ui --backend-store-uri {mask_url(self.tracking_uri)} "
            f"--host 127.0.0.1 --port 5000\n  then open {self.runs_url()}\n"
            f"  fronts of every trial: {self.runs_url(charts=True)}"
        )


def view_key(study_name: str) -> str:
    """The key of a study's shared view: ``dtp_search-<hash of the name>`` (tag keys and
    URLs take a few characters only; a study name may hold others)."""
    digest = hashlib.blake2b(study_name.encode(), digest_size=5).hexdigest()
    return f"{VIEW_KEY}-{digest}"


def study_filter(study_name: str) -> str:
    """MLflow's search filter for the runs of one study (its parent, trials and refits)."""
    quoted = "'" + study_name + "'" if "'" not in study_name else '"' + study_name + '"'
    return f"tags.`{STUDY_TAG}` = {quoted}"


def runs_url(
    base: str, experiment_id: str, charts: bool = False, study_name: str | None = None
) -> str:
    """``<base>/#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=…``:
    the runs table of an experiment, without the UI's GenAI/training toggle, in
    dtp_search's shared view of ``study_name`` (which filters to that study's runs;
    the UI shows the filter in its search box); ``charts`` opens its chart tab."""
    key = VIEW_KEY if study_name is None else view_key(study_name)
    url = (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}"
    )
    return url + ("&compareRunsMode=CHART" if charts else "")


def _view_state(param_keys: list[str], axis: str = "sparsity", search: str = "") -> dict[str, Any]:
    """The shared view's state in the layout the UI reads (search facets + UI state)."""
    section = "dtp_search"

    def chart(uuid: str, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "uuid": uuid,
            "type": kind,
            "runsCountToCompare": 100,
            "deleted": False,
            "isGenerated": False,
            "metricSectionId": section,
            **fields,
        }

    metrics = list(dict.fromkeys(["cv_accuracy", "cv_sparsity", f"cv_{axis}", "test_accuracy"]))
    return {
        "searchFilter": search,
        "orderByKey": "metrics.`cv_accuracy`",
        "orderByAsc": False,
        "selectedColumns": (
            ["attributes.`Dataset`"]
            + [f"metrics.`{m}`" for m in metrics]
            + [f"params.`{k}`" for k in ["policy.name", *param_keys]]
        ),
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        "isAccordionReordered": True,
        "compareRunSections": [
            {"uuid": section, "name": "dtp_search: fronts", "display": True, "isReordered": False}
        ],
        "compareRunCharts": [
            chart(
                "dtp-cv-scatter",
                "SCATTER",
                xaxis={"key": f"cv_{axis}", "type": "METRIC"},
                yaxis={"key": "cv_accuracy", "type": "METRIC"},
            ),
            chart(
                "dtp-fronts",
                "LINE",
                metricKey="front/accuracy",
                selectedMetricKeys=["front/accuracy", "front/test_accuracy"],
                xAxisKey="step",
                scaleType="linear",
                lineSmoothness=0,
            ),
            chart("dtp-front-images", "IMAGE", imageKeys=["front"]),
        ],
    }


def print_runs_urls(tracking_uri: str, base: str = "http://127.0.0.1:5000") -> None:
    """One line per study of a store: its name and runs URL, and its fronts' URL (``make
    ui`` prints these); experiments that hold no study, one line each."""
    client = MlflowClient(tracking_uri=tracking_uri)
    for exp in client.search_experiments():
        studies = [
            r.data.tags[STUDY_TAG]
            for r in client.search_runs(
                [exp.experiment_id], f"tags.`{ROLE_TAG}` = 'study'", max_results=1000
            )
        ]
        for name in sorted(set(studies)):
            where = name if name == exp.name else f"{name} (experiment {exp.name})"
            print(
                f"{where}: {runs_url(base, exp.experiment_id, study_name=name)}\n"
                f"    fronts: {runs_url(base, exp.experiment_id, charts=True, study_name=name)}"
            )
        if not studies and (
            exp.name != "Default" or client.search_runs([exp.experiment_id], max_results=1)
        ):
            print(f"{exp.name}: {runs_url(base, exp.experiment_id)}")


@dataclass(frozen=True)
class DatasetInfo:
    """What a run records of its dataset (``mlflow.log_input``): name, content digest,
    where it came from and its split sizes."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any]

    def entity(self) -> Dataset:
        return Dataset(
            name=self.name,
            digest=self.digest,
            source_type="local",
            source=json.dumps({"uri": self.source}),
            profile=json.dumps(self.profile),
        )


def describe_dataset(dataset: ImageDataset, source: str) -> DatasetInfo:
    """Name, content digest (SHA-1 of both splits' images and labels) and split sizes.

    The digest is :meth:`ImageDataset.content_digest`: for splits in memory the hash of
    their tensors; for streamed splits the same hash, computed while the load decoded
    them once (:func:`dtp_search.streaming.scan`; cached for ImageFolder trees) without
    holding them in memory. Whether a split is streamed therefore never changes the
    digest, and the study's drift check compares the data, not the path it took."""
    digest = dataset.content_digest()
    profile = {
        "train": len(dataset.train.labels),
        "test": len(dataset.test.labels),
        "classes": dataset.num_classes,
        "shape": list(dataset.input_shape),
    }
    return DatasetInfo(dataset.name, digest[:16], source, profile)


def _log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInfo, context: str) -> None:
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset.entity(), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
            )
        ],
    )


def _declare_table(client: MlflowClient, run_id: str, artifact_file: str) -> None:
    """Mark a JSON artifact as a table in ``mlflow.loggedArtifacts``, as ``log_table`` does."""
    tags = client.get_run(run_id).data.tags
    declared = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in declared:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*declared, entry]))


class TrialRun:
    """One child run; every call logs as it happens so the UI shows progress live.

    Metrics go through MLflow's asynchronous logging queue when the store is a tracking
    server: a request there costs a network round trip (about 0.1 s on a loaded server),
    which would stall training at every epoch; the queue sends them from a thread and
    batches what piles up. :meth:`finish` waits for them before it closes the run.
    Local stores answer in milliseconds and are written synchronously.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, state_tag: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.state_tag = state_tag  # trials record their Optuna state; refits do not
        self._synchronous = not client.tracking_uri.startswith(("http:", "https:"))
        self._pending: list[Any] = []  # RunOperations of async metric batches

    def start(
        self,
        params: dict[str, Any],
        config_yaml: str,
        dataset: DatasetInfo | None,
        context: str = "train",
    ) -> None:
        self.log_params(params)
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        if dataset is not None:
            _log_dataset(self.client, self.run_id, dataset, context)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=list(chunk))

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, int(step)) for k, v in values.items()]
        for chunk in _chunks(metrics, 1000):
            op = self.client.log_batch(
                self.run_id, metrics=list(chunk), synchronous=self._synchronous
            )
            if op is not None:
                self._pending.append(op)

    def flush(self) -> None:
        """Wait until every metric logged so far is stored."""
        pending, self._pending = self._pending, []
        for op in pending:
            op.wait()

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_front(
        self,
        fronts: dict[int, list[FrontPoint]],
        title: str,
        *,
        split: str = "validation",
        axis: str = "sparsity",
    ) -> None:
        """The run's accuracy-versus-``axis`` front (sparsity, or the cost that is the
        study's second objective, :func:`front_x`), four ways: ``front.json`` (a table, one
        row per point, its costs as columns), ``front.png``, the image ``front`` (so that
        the chart view's image grid puts every run's front side by side) and the metric
        history ``front/accuracy`` (``front/test_accuracy`` when ``split="test"``) at
        step = round(1000 · x), so that one MLflow line chart overlays the fronts of every
        run.

        The metric holds the final model and its one-shot sweep; where folds share a step,
        it is their mean accuracy.
        """
        rows = [
            {"fold": k, **{n: v for n, v in p.as_dict().items() if n != "costs"}, **p.costs}
            for k, pts in fronts.items()
            for p in pts
        ]
        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file="front.json")
        by_step: dict[int, list[float]] = {}
        for pts in fronts.values():
            for p in pts:
                x = front_x(p, axis)
                if p.source in ("final", "sweep") and x is not None:
                    by_step.setdefault(round(FRONT_STEPS * x), []).append(p.accuracy)
        key = "front/test_accuracy" if split == "test" else "front/accuracy"
        ts = int(time.time() * 1000)
        metrics = [Metric(key, sum(a) / len(a), ts, step) for step, a in sorted(by_step.items())]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=list(chunk))
        fig = plot_trial_front(fronts, title, split=split, axis=axis)
        self.client.log_figure(self.run_id, fig, "front.png")
        self.client.log_image(self.run_id, _rgb(fig), key="front", step=0)
        plt.close(fig)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)
        plt.close(fig)

    def finish(self, state: str, status: str | None = None) -> None:
        """``state``: the Optuna trial state; ``status``: MLflow's (FINISHED/FAILED/KILLED)."""
        try:
            self.flush()
        except Exception as exc:  # a lost curve must not hide the trial's own outcome
            log.warning("run %s: some metrics were not stored (%s)", self.run_id, exc)
        if self.state_tag:
            self.client.set_tag(self.run_id, STATE_TAG, state)
        if status is None:
            status = "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED"
        RunStatus.from_string(status)  # validates
        self.client.set_terminated(self.run_id, status)


# ----------------------------------------------------------------------- plots


def _rgb(fig) -> np.ndarray:
    """A drawn matplotlib figure as an H × W × 3 uint8 array (for ``log_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_trial_front(
    fronts: dict[int, list[FrontPoint]],
    title: str,
    split: str = "validation",
    axis: str = "sparsity",
):
    """Accuracy versus ``axis`` (:func:`front_x`) for each fold: updates during training,
    final model, sweep; points without a value of ``axis`` (updates, against a cost) are
    left out. ``split="test"`` (a refit: one model, scored on the test split) labels it so."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, pts in sorted(fronts.items()):
        c = colors[k % len(colors)]
        who = "refit" if split == "test" else f"fold {k}"
        pts = [p for p in pts if front_x(p, axis) is not None]
        upd = [p for p in pts if p.source == "update"]
        tail = sorted(
            (p for p in pts if p.source in ("final", "sweep")), key=lambda p: front_x(p, axis)
        )
        if upd:
            ax.scatter(
                [front_x(p, axis) for p in upd],
                [p.accuracy for p in upd],
                s=10,
                color=c,
                alpha=0.35,
                label=f"{who}: mask updates",
            )
        if tail:
            ax.plot(
                [front_x(p, axis) for p in tail],
                [p.accuracy for p in tail],
                "-o",
                ms=3,
                color=c,
                label=f"{who}: one-shot sweep from the final masks",
            )
            final = [p for p in tail if p.source == "final"]
            if final:
                ax.scatter(
                    [front_x(final[0], axis)],
                    [final[0].accuracy],
                    marker="*",
                    s=120,
                    color=c,
                    edgecolor="k",
                    zorder=5,
                    label=f"{who}: final model",
                )
        base = [p for p in pts if p.source == "checkpoint"]
        if base:  # the trained network the study started from, not pruned (refit)
            ax.scatter(
                [front_x(base[0], axis)],
                [base[0].accuracy],
                marker="D",
                s=60,
                color="k",
                zorder=6,
                label="checkpoint, not pruned",
            )
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_pareto(
    rows: list[dict[str, Any]],
    trial_fronts: dict[int, list[tuple[float, float]]],
    title: str,
    policies: dict[int, str] | None = None,
    floored: Iterable[int] = (),
    axis: str = "sparsity",
):
    """The study's Pareto-optimal trials over every trial's (CV ``axis``, CV accuracy) —
    ``axis`` is the study's second objective: sparsity (maximised) or a cost (minimised)
    — trials coloured by policy when the study used more than one; trials that end with a
    layer held at the ``min_keep`` floor (``floored``) are crossed out in red."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    policies = policies or {}
    names = sorted({policies.get(n, "") for n in trial_fronts})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    for i, name in enumerate(names):
        pts = [p for n, ps in trial_fronts.items() if policies.get(n, "") == name for p in ps]
        single = len(names) == 1
        ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            s=14 if single else 24,
            color="0.6" if single else colors[i % len(colors)],
            marker="o" if single else markers[(i // len(colors)) % len(markers)],
            alpha=0.6 if single else 0.75,
            label=("all trials" if single else name) + (f" ({name})" if single and name else ""),
        )
    held = [p for n in floored for p in trial_fronts.get(n, [])]
    if held:
        ax.scatter(
            [p[0] for p in held],
            [p[1] for p in held],
            marker="x",
            s=60,
            color="tab:red",
            zorder=4,
            label="ends with a layer at the min_keep floor",
        )
    x = row_key(axis)
    pareto = sorted(rows, key=lambda r: r[x])
    if pareto:
        # Attainment boundary: between two Pareto points the best reachable accuracy is
        # that of the sparser one, so each step takes the value on its right ("pre");
        # against a cost (lower is better) that of the cheaper one, on its left ("post").
        ax.step(
            [r[x] for r in pareto],
            [r["accuracy"] for r in pareto],
            "-",
            where="pre" if axis == "sparsity" else "post",
            color="k",
            alpha=0.45,
        )
        # Hollow rings, so that the policy colour of the trial underneath stays visible.
        ax.errorbar(
            [r[x] for r in pareto],
            [r["accuracy"] for r in pareto],
            yerr=[r.get("accuracy_std", 0.0) for r in pareto],
            fmt="o",
            color="k",
            mfc="none",
            ms=9,
            capsize=3,
            label="Pareto-optimal trials (± fold std)",
        )
        # Neighbouring labels alternate above and below their ring, so close points stay legible.
        for i, r in enumerate(pareto):
            ax.annotate(
                str(r["trial"]),
                (r[x], r["accuracy"]),
                fontsize=7,
                xytext=(4, 5) if i % 2 == 0 else (4, -11),
                textcoords="offset points",
            )
    ax.set_xlabel("CV sparsity" if axis == "sparsity" else f"CV {AXIS_LABELS.get(axis, axis)}")
    ax.set_ylabel("CV accuracy")
    ax.set_title(f"Pareto front — {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_layer_sparsity(models: dict[int, dict[str, float]], title: str):
    """Per-layer sparsity as grouped bars, one group per layer, one bar per model (trial)."""
    layers = list(next(iter(models.values()), {}))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(layers) + 2), 3.8), dpi=110)
    width = 0.8 / max(len(models), 1)
    for i, (trial, ls) in enumerate(sorted(models.items())):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [ls.get(name, 0.0) for name in layers], width=width, label=f"trial {trial}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
