"""One child run of the study, a trial's or a refit's: its params, config and dataset, its
metrics as training goes, its front, its artifacts and how it ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from dtp_search.pruning.front import FrontPoint
from dtp_search.tracking.dataset import DatasetInfo, log_dataset
from dtp_search.tracking.front_axis import FRONT_STEPS, front_x, x_key
from dtp_search.tracking.plots import plot_trial_front
from dtp_search.tracking.tags import STATE_TAG

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _rgb(fig: Figure) -> np.ndarray:
    """A drawn matplotlib figure as an H × W × 3 uint8 array (for ``log_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


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
            log_dataset(self.client, self.run_id, dataset, context)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=list(chunk))

    def log_metrics(
        self,
        values: dict[str, float],
        step: int = 0,
        model_id: str | None = None,
        dataset: DatasetInfo | None = None,
    ) -> None:
        """Log ``values`` at ``step``; with ``model_id`` they are also the figures of that
        logged model (MLflow 3 links a run's metric to one of its models), measured on
        ``dataset`` (the Models tab groups a model's metrics by it)."""
        ts = int(time.time() * 1000)
        on = (
            {}
            if dataset is None
            else {"dataset_name": dataset.name, "dataset_digest": dataset.digest}
        )
        metrics = [
            Metric(k, float(v), ts, int(step), model_id=model_id, **on) for k, v in values.items()
        ]
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
        step = round(1000 · x), beside ``front/<axis>`` (``front/test_<axis>``,
        :func:`x_key`) holding x itself at the same steps, so that one MLflow line chart,
        its x axis that metric, overlays the fronts of every run.

        The metrics hold the final model and its one-shot sweep; where folds share a step,
        they are the folds' mean accuracy and mean x.
        """
        rows = [
            {"fold": k, **{n: v for n, v in p.as_dict().items() if n != "costs"}, **p.costs}
            for k, pts in fronts.items()
            for p in pts
        ]
        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file="front.json")
        by_step: dict[int, list[tuple[float, float]]] = {}
        for pts in fronts.values():
            for p in pts:
                x = front_x(p, axis)
                if p.source in ("final", "sweep") and x is not None:
                    by_step.setdefault(round(FRONT_STEPS * x), []).append((x, p.accuracy))
        key = "front/test_accuracy" if split == "test" else "front/accuracy"
        ts = int(time.time() * 1000)
        metrics = [
            Metric(name, sum(v) / len(v), ts, step)
            for step, xa in sorted(by_step.items())
            for name, v in ((key, [a for _, a in xa]), (x_key(axis, split), [x for x, _ in xa]))
        ]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=list(chunk))
        fig = plot_trial_front(fronts, title, split=split, axis=axis)
        # Drawn once, stored twice (the file and the image grid's entry): log_figure would
        # draw it again, and a draw (about 0.2 s here) is the costly part of a figure.
        pixels = _rgb(fig)
        plt.close(fig)
        self.client.log_image(self.run_id, pixels, artifact_file="front.png")
        self.client.log_image(self.run_id, pixels, key="front", step=0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_figure(self, fig: Figure, name: str) -> None:
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
