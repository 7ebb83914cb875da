"""What happens when a policy asks a layer for fewer units than ``min_keep`` allows.

Collapse. ``min_keep`` is the fewest units a layer may keep — a fraction of the layer
when < 1, a count when ≥ 1, nothing when 0. A policy decision that asks a layer for fewer
is a *collapse*, handled as ``on_collapse`` says
(:class:`~dtp_search.pruning.pruner.dynamic.DynamicPruner`):

* ``"restore"`` (default): the layer's largest-magnitude units are restored up to the
  floor and training goes on; :attr:`DynamicPruner.restored` counts how often, per layer.
  Global thresholds routinely take a large, redundant layer under a 1 % floor at high
  sparsity (a CIFAR ``simple_cnn`` classifier at 95 %) and the restored network is a
  useful point of the front.
* ``"prune"``: :class:`LayerCollapse` is raised at once, so a search spends no more
  time on a configuration whose result the floor, not the policy, would decide.
* ``"penalize"``: restored as with ``"restore"``; the pruner behaves the same, and the
  search layer records the result but keeps it out of the Pareto front when the run
  *ends* with a layer at the floor (:attr:`DynamicPruner.floored`).

Either way a restored network is not what the policy asked for: :attr:`DynamicPruner.floored`
names the layers whose current mask is the floor's, not the policy's.

A decision that leaves a layer with no unit at all raises :class:`LayerCollapse`
whatever ``on_collapse`` says when ``min_keep`` is 0: there is nothing to restore, and a
layer that emits only its bias cuts the network (chance accuracy for the rest of the trial).
"""

from __future__ import annotations

import math
from typing import Any

COLLAPSE_ACTIONS = ("restore", "prune", "penalize")


class LayerCollapse(RuntimeError):
    """A policy asked a layer to keep fewer units than ``min_keep`` allows (see the module
    docstring). ``epoch`` is the training time of the decision (``None``: the final masks)."""

    def __init__(
        self, layer: str, kept: int, total: int, minimum: int, unit: str, epoch: float | None
    ) -> None:
        self.layer, self.kept, self.total, self.minimum = layer, kept, total, minimum
        self.epoch = epoch
        when = "in the final masks" if epoch is None else f"at epoch {epoch:.2f}"
        floor = f"min_keep allows no fewer than {minimum}" if minimum else "min_keep=0"
        super().__init__(
            f"the policy would leave layer {layer} with {kept} of {total} {unit}s {when} ({floor})"
        )


def check_floor(min_keep: Any, on_collapse: Any) -> None:
    """Raise ``ValueError`` naming the setting unless ``min_keep`` and ``on_collapse`` are valid."""
    if (
        isinstance(min_keep, bool)
        or not isinstance(min_keep, (int, float))
        or min_keep < 0
        or (min_keep >= 1 and not float(min_keep).is_integer())
    ):
        raise ValueError(
            f"min_keep={min_keep} is not allowed; allowed: a fraction in "
            "[0, 1) or a whole count >= 1"
        )
    if on_collapse not in COLLAPSE_ACTIONS:
        raise ValueError(
            f"on_collapse={on_collapse!r} is not allowed; allowed: {list(COLLAPSE_ACTIONS)}"
        )


def min_units(min_keep: float, n: int) -> int:
    """The fewest of ``n`` units a layer may keep under ``min_keep`` (fraction or count)."""
    if min_keep == 0:
        return 0
    if min_keep < 1:
        return min(max(math.ceil(min_keep * n), 1), n)
    return min(int(min_keep), n)
