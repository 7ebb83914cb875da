"""The object a training loop talks to (:class:`DynamicPruner`), and what it does when a
policy would collapse a layer (:class:`LayerCollapse`)."""

from dtp_search.pruning.pruner.collapse import COLLAPSE_ACTIONS, LayerCollapse, check_floor
from dtp_search.pruning.pruner.dynamic import DynamicPruner

__all__ = ["COLLAPSE_ACTIONS", "DynamicPruner", "LayerCollapse", "check_floor"]
