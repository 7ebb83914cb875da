"""The one table of a study's objectives (``search.objectives``), the direction each is
optimised in, and what a study's objectives imply: the x of its fronts, the costs its
trials measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DIRECTIONS = ("maximize", "minimize")
# search.objectives and the direction each must be given: accuracy and sparsity are
# maximised; the costs of the compacted network (dtp_search.pruning.cost, fractions of the
# dense network's FLOPs, parameters and latency) are minimised.
OBJECTIVE_DIRECTIONS = {
    "accuracy": "maximize",
    "sparsity": "maximize",
    "flops": "minimize",
    "params": "minimize",
    "latency": "minimize",
}
OBJECTIVES = tuple(OBJECTIVE_DIRECTIONS)
COST_OBJECTIVES = ("flops", "params", "latency")  # == dtp_search.pruning.COSTS


def front_axis(objectives: Sequence[str]) -> str:
    """The x of a study's fronts and Pareto plots: its first objective other than
    ``accuracy`` (``sparsity`` when it has none), e.g. ``flops`` for
    ``search.objectives=[accuracy,flops]``."""
    return next((o for o in objectives if o != "accuracy"), "sparsity")


def cost_measures(search: Any) -> tuple[str, ...]:
    """The costs (:data:`COST_OBJECTIVES`) a study's trials measure (``search``: its
    :class:`~dtp_search.settings.study.SearchSettings` or a mapping): those among its
    objectives, ``flops`` under ``search.max_flops``; ``flops`` and ``params`` come
    together (one compaction gives both). Empty for accuracy and sparsity alone."""
    get = search.get if isinstance(search, Mapping) else lambda k, d=None: getattr(search, k, d)
    wanted = set(get("objectives") or ()) & set(COST_OBJECTIVES)
    if get("max_flops") is not None:
        wanted.add("flops")
    if wanted & {"flops", "params"}:
        wanted |= {"flops", "params"}
    return tuple(c for c in COST_OBJECTIVES if c in wanted)
