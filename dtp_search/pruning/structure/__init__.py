"""Which output units (neurons, channels) of a network can be removed, and what goes with
them: :func:`trace_channels` (:mod:`.trace` explains the coupling rules) finds the
:class:`ChannelGroup` s of coupled units."""

from dtp_search.pruning.structure._ops import is_depthwise
from dtp_search.pruning.structure.groups import ChannelGroup, Structure
from dtp_search.pruning.structure.trace import trace_channels

__all__ = ["ChannelGroup", "Structure", "is_depthwise", "trace_channels"]
