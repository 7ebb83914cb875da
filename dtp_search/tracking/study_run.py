"""The study's parent run in MLflow: its experiment, created or reused on resume, the child
runs it opens for trials and refits, and what it shows of the whole study."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from dtp_search.storage import DEFAULT_PATIENCE, mask_url
from dtp_search.tracking.dataset import DatasetInfo, log_dataset
from dtp_search.tracking.front_axis import row_key
from dtp_search.tracking.patience import patient_client
from dtp_search.tracking.plots import plot_pareto
from dtp_search.tracking.tags import (
    KIND_TAG,
    REFIT_TAG,
    ROLE_TAG,
    SAMPLED_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRAINING_KIND,
    TRIAL_TAG,
)
from dtp_search.tracking.trial_run import TrialRun
from dtp_search.tracking.view import TRAINING_VIEW_HINT, front_range, runs_url, share_view

# The runs table's Source column (MLflow's fluent API sets these from the script it runs in).
SOURCE_TAGS = {"mlflow.source.name": "python -m dtp_search", "mlflow.source.type": "LOCAL"}


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
        self.client = patient_client(tracking_uri, patience)
        self.tracking_uri = tracking_uri
        self.study_name = study_name
        self.experiment_id = self._experiment(experiment, artifact_location)
        self.parent_run_id = self._parent_run()
        self.dataset: DatasetInfo | None = None
        self._view: tuple[list[str], str] | None = None  # (param keys, axis) once shared

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
        if self._view is not None:  # the process that shared the view: zoom its fronts
            keys, view_axis = self._view
            xs = [r[row_key(axis)] for r in rows if row_key(axis) in r]
            self.share_view(keys, view_axis, front_range(xs, axis))
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
        log_dataset(self.client, self.parent_run_id, dataset, "train")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)

    def share_view(
        self,
        param_keys: Iterable[str] = (),
        axis: str = "sparsity",
        x_range: tuple[float, float] | None = None,
    ) -> None:
        """Store dtp_search's view of the experiment, filtered to this study's runs, as an
        MLflow *shared view* (:func:`dtp_search.tracking.view.share_view`); each Pareto
        refresh (:meth:`log_pareto`) stores it again, its front charts' x range the
        front's (:func:`dtp_search.tracking.view.front_range`)."""
        self._view = (list(param_keys), axis)
        share_view(self.client, self.experiment_id, self.study_name, param_keys, axis, x_range)

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
            f"  fronts of every trial: {self.runs_url(charts=True)}\n"
            f"  {TRAINING_VIEW_HINT}"
        )


def _declare_table(client: MlflowClient, run_id: str, artifact_file: str) -> None:
    """Mark a JSON artifact as a table in ``mlflow.loggedArtifacts``, as ``log_table`` does."""
    tags = client.get_run(run_id).data.tags
    declared = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in declared:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*declared, entry]))
