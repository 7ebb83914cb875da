"""dtp_search's view of an experiment in the MLflow UI (a *shared view*: columns, order,
the fronts' charts, one study's runs) and the links that open it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from mlflow.tracking import MlflowClient

from dtp_search.tracking import records
from dtp_search.tracking.front_axis import x_key
from dtp_search.tracking.tags import ROLE_TAG, STUDY_TAG

SHARED_VIEW_TAG, VIEW_KEY = "mlflow.sharedViewState.", "dtp_search"
# The links dtp_search writes open the training pages (workflowType in the URL); MLflow's own
# (a run's name, the breadcrumb) follow the browser's remembered switch, GenAI until clicked.
TRAINING_VIEW_HINT = (
    "once per browser: click 'Model training' in the sidebar's GenAI | Model training switch"
)


def share_view(
    client: MlflowClient,
    experiment_id: str,
    study_name: str,
    param_keys: Iterable[str] = (),
    axis: str = "sparsity",
    x_range: tuple[float, float] | None = None,
) -> None:
    """Store dtp_search's view of the experiment as an MLflow *shared view* (the UI's own
    mechanism behind its "Share" button: an experiment tag ``mlflow.sharedViewState.<key>``
    read when the URL carries ``viewStateShareKey=<key>``). The view lists every run flat
    (trials and refits are not folded under the study run), most accurate first, with
    the CV and test metrics and the searched params as columns, and opens its chart tab
    on the fronts (``axis``: the study's second objective, sparsity by default): the
    trials' ``cv_<axis>``/``cv_accuracy`` scatter and the refits' ``<axis>``/
    ``test_accuracy`` one, the trials' fronts (``front/accuracy`` against ``front/<axis>``)
    and the refits' (``front/test_accuracy`` against ``front/test_<axis>``) each in a line
    chart of its own, its x axis
    limited to ``x_range`` (:func:`front_range`; MLflow's full range without it), and the
    grid of ``front`` images.

    Several studies may share one experiment (``tracking.experiment``): each study
    has a view of its own (key :func:`view_key`), filtered to its own runs.
    """
    state = _view_state(list(param_keys), axis, study_filter(study_name), x_range)
    client.set_experiment_tag(
        experiment_id,
        SHARED_VIEW_TAG + view_key(study_name),
        json.dumps(state, separators=(",", ":")),
    )


def front_range(xs: Iterable[float], axis: str = "sparsity") -> tuple[float, float] | None:
    """The x range of the front charts: where the study's fronts begin to fall, from the
    Pareto points' x (``xs``: CV sparsities, or costs for a cost axis), to the end of the
    axis. Sparsity: from just below the lowest Pareto sparsity up to 1; a cost (fraction
    of the dense network's, smaller is better): from 0 up to just above the highest.
    The margin is 5 % of the span, at least 0.01. ``None`` without a point."""
    xs = [float(x) for x in xs if x == x]  # NaN: a trial without the measure
    if not xs:
        return None
    if axis == "sparsity":
        lo = min(xs)
        return max(0.0, lo - max(0.01, 0.05 * (1.0 - lo))), 1.0
    hi = max(xs)
    return 0.0, hi + max(0.01, 0.05 * hi)


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
    the runs table of an experiment, in the UI's model-training pages (the URL decides
    them; MLflow's own links then follow the browser's remembered switch), in
    dtp_search's shared view of ``study_name`` (which filters to that study's runs;
    the UI shows the filter in its search box); ``charts`` opens its chart tab."""
    key = VIEW_KEY if study_name is None else view_key(study_name)
    url = (
        f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}"
    )
    return url + ("&compareRunsMode=CHART" if charts else "")


def _view_state(
    param_keys: list[str],
    axis: str = "sparsity",
    search: str = "",
    x_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
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

    def front(uuid: str, key: str, split: str) -> dict[str, Any]:
        # x: the metric front/<axis> at the same steps (the UI titles the axis with its key);
        # y: the front's accuracy, the card's title. One metric per chart: a run has one.
        return chart(
            uuid,
            "LINE",
            metricKey=key,
            selectedMetricKeys=[key],
            xAxisKey="metric",
            selectedXAxisMetricKey=x_key(axis, split),
            xAxisScaleType="linear",
            scaleType="linear",
            lineSmoothness=0,
            displayPoints=True,
            **({} if x_range is None else {"range": {"xMin": x_range[0], "xMax": x_range[1]}}),
        )

    def scatter(uuid: str, x: str, y: str) -> dict[str, Any]:
        return chart(
            uuid, "SCATTER", xaxis={"key": x, "type": "METRIC"}, yaxis={"key": y, "type": "METRIC"}
        )

    metrics = list(
        dict.fromkeys([records.CV_ACCURACY, records.CV_SPARSITY, records.cv(axis), "test_accuracy"])
    )
    return {
        "searchFilter": search,
        "orderByKey": f"metrics.`{records.CV_ACCURACY}`",
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
            front("dtp-front-trials", "front/accuracy", "validation"),
            front("dtp-front-refits", "front/test_accuracy", "test"),
            scatter("dtp-cv-scatter", records.cv(axis), records.CV_ACCURACY),
            # the refits on their test figures (a refit's own x: its sparsity, or its
            # cv_<cost>, the measure it carries from its trial)
            scatter(
                "dtp-test-scatter",
                "sparsity" if axis == "sparsity" else records.cv(axis),
                "test_accuracy",
            ),
            chart("dtp-front-images", "IMAGE", imageKeys=["front"], step=0, showRunParams=False),
        ],
    }


def print_runs_urls(tracking_uri: str, base: str = "http://127.0.0.1:5000") -> None:
    """One line per study of a store: its name and runs URL, and its fronts' URL (``make
    ui`` prints these); experiments that hold no study, one line each; then the one click
    that keeps MLflow's own links in the training pages (:data:`TRAINING_VIEW_HINT`)."""
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
    print(TRAINING_VIEW_HINT)
