"""Which differences between trials are noise: each trial's standard error, the Pareto
front's margins in those units, and the one-standard-error pick (``refit.select=one_se``).

A trial's CV accuracy is the mean of n fold results (n = ``cv.folds`` · ``cv.repeats``)
whose spread is σ (``cv_accuracy_std``, the population standard deviation over the
folds); its standard error is

    SE = σ / √n.

*Margins.* Along the front, most accurate first, a trial's margin over the next (less
accurate) one is m = (a − a_next) / SE in units of its own standard error: m < 1 says
the accuracy that trial buys with its lower sparsity is within the noise of its folds.

*One standard error* (Breiman et al. 1984; Hastie, Tibshirani & Friedman, "The Elements
of Statistical Learning" §7.10): among the candidates whose accuracy is within one SE
of the most accurate one, a* − SE* ≤ a, take the sparsest (the largest sparsity, or the
smallest cost on a cost axis). With one objective the candidates are every feasible
trial (those at the target sparsity, ``search.min_sparsity``) and one is picked. With
several, the front is cut into bins along its sparsity: walking it from its most
accurate trial, a bin holds the trials within one SE of the bin's first (most accurate)
trial, the next bin starts at the first trial below that, and each bin gives its
sparsest trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dtp_search.tracking.front_axis import row_key

SELECTS = ("best", "one_se")


def standard_error(row: dict[str, Any], folds: int | None = None) -> float:
    """σ/√n of a trial row (``accuracy_std`` over ``folds`` fold results; the row's own
    ``folds`` when it has them, else ``folds``); NaN when n is unknown."""
    n = row.get("folds") or folds
    if not n:
        return math.nan
    return float(row.get("accuracy_std", 0.0)) / math.sqrt(n)


def add_margins(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each row's ``margin_se``: (a − a_next)/SE over the next less accurate row
    (NaN for the least accurate, or where SE is unknown; ∞ where SE is 0)."""
    order = sorted(rows, key=lambda r: -r["accuracy"])
    for row, nxt in zip(order, [*order[1:], None], strict=True):
        se = standard_error(row)
        gap = math.nan if nxt is None else row["accuracy"] - nxt["accuracy"]
        if math.isnan(se) or math.isnan(gap):
            row["margin_se"] = math.nan
        else:
            row["margin_se"] = gap / se if se > 0 else (math.inf if gap > 0 else 0.0)
    return rows


def one_se(
    rows: Sequence[dict[str, Any]], axis: str, *, single: bool, folds: int | None = None
) -> list[dict[str, Any]]:
    """The one-standard-error picks among ``rows`` (module docstring): one row when
    ``single`` (one objective), else one per bin of the front. ``axis`` is the study's
    (``sparsity``, or a cost such as ``flops``); ``folds``: n for rows that lack it."""
    key = row_key(axis)

    def sparser(r: dict[str, Any]) -> float:
        x = r.get(key, math.nan)
        return x if axis == "sparsity" else -x

    todo = sorted(rows, key=lambda r: (-r["accuracy"], -sparser(r)))
    picks = []
    while todo:
        best = todo[0]
        se = standard_error(best, folds)
        floor = best["accuracy"] - (0.0 if math.isnan(se) else se)
        near = [r for r in todo if r["accuracy"] >= floor]
        picks.append(max(near, key=lambda r: (sparser(r), r["accuracy"])))
        if single:
            break
        todo = [r for r in todo if r["accuracy"] < floor]
    return picks
