"""dtp_search's shared view of a study in the MLflow UI: its front charts (one per split,
x: the front's own axis metric, zoomed to where the fronts fall), its scatters and its
image grid, as the state the UI reads."""

from __future__ import annotations

import math

import pytest

from dtp_search.tracking.view import _view_state, front_range


def test_the_front_range_starts_below_the_lowest_pareto_sparsity():
    lo, hi = front_range([0.95, 0.8, 0.99, math.nan])
    assert hi == 1.0 and lo == pytest.approx(0.79)  # 5 % of the span [0.8, 1] below 0.8
    assert front_range([0.999])[0] == pytest.approx(0.989)  # at least 0.01 of margin
    # a cost (fraction of the dense network's, smaller is better): from 0 past the highest
    assert front_range([0.2, 0.5], "flops") == (0.0, pytest.approx(0.525))
    assert front_range([]) is None and front_range([math.nan]) is None


def test_the_view_draws_each_front_against_its_own_x_and_the_refits_on_test():
    state = _view_state(["policy.final_sparsity"], "sparsity", "", (0.79, 1.0))
    charts = {c["uuid"]: c for c in state["compareRunCharts"]}
    trials, refits = charts["dtp-front-trials"], charts["dtp-front-refits"]
    # one metric per chart (a run has one of the two), x: a metric, not the step
    assert trials["selectedMetricKeys"] == ["front/accuracy"]
    assert refits["selectedMetricKeys"] == ["front/test_accuracy"]
    assert (trials["xAxisKey"], trials["selectedXAxisMetricKey"]) == ("metric", "front/sparsity")
    assert refits["selectedXAxisMetricKey"] == "front/test_sparsity"
    assert trials["range"] == {"xMin": 0.79, "xMax": 1.0} == refits["range"]
    cv, test = charts["dtp-cv-scatter"], charts["dtp-test-scatter"]
    assert (cv["xaxis"]["key"], cv["yaxis"]["key"]) == ("cv_sparsity", "cv_accuracy")
    assert (test["xaxis"]["key"], test["yaxis"]["key"]) == ("sparsity", "test_accuracy")
    images = charts["dtp-front-images"]
    assert images["imageKeys"] == ["front"] and images["showRunParams"] is False
    assert all(c["metricSectionId"] == "dtp_search" for c in charts.values())
    # no range before a Pareto front exists; a cost axis draws its own metrics
    flops = {c["uuid"]: c for c in _view_state([], "flops")["compareRunCharts"]}
    assert "range" not in flops["dtp-front-trials"]
    assert flops["dtp-front-trials"]["selectedXAxisMetricKey"] == "front/flops"
    assert flops["dtp-test-scatter"]["xaxis"]["key"] == "cv_flops"
