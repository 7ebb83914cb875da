"""The x of a front: sparsity, or the cost that is the study's second objective, with its
axis label, its key in a Pareto row and its step in the ``front/<metric>`` histories."""

from __future__ import annotations

from dtp_search.pruning.front import FrontPoint

FRONT_STEPS = 1000  # front/<metric> is logged at step = round(FRONT_STEPS * x), x: the axis
# What the x of a front or a Pareto plot is, per axis (the study's second objective).
AXIS_LABELS = {
    "sparsity": "sparsity (fraction of prunable weights = 0)",
    "flops": "FLOPs of the compacted network / dense",
    "params": "parameters of the compacted network / dense",
    "latency": "latency of the compacted network / dense",
}


def x_key(axis: str, split: str = "validation") -> str:
    """The metric history that holds a front's x at each of its steps, the x axis of the
    UI's front charts (titled with this key): ``front/<axis>`` on a trial's (validation)
    front, ``front/test_<axis>`` on a refit's test front (a key of their own: the UI's
    legend lists every run that has either key of a chart)."""
    return f"front/{axis}" if split != "test" else f"front/test_{axis}"


def row_key(axis: str) -> str:
    """The key of a Pareto row (:func:`dtp_search.tracking.results.pareto_rows`) that holds the CV
    value of ``axis``: ``sparsity``, or the cost's metric name (``cv_flops``, ...)."""
    return "sparsity" if axis == "sparsity" else f"cv_{axis}"


def front_x(point: FrontPoint, axis: str) -> float | None:
    """The x of a front point on a front drawn against ``axis``: its sparsity, or its cost
    ``axis`` (``None`` where that was not measured: the mask updates during training)."""
    return point.sparsity if axis == "sparsity" else point.costs.get(axis)
