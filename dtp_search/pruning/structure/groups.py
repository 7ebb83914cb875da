"""What the channel trace finds: the :class:`ChannelGroup` s of coupled units the pruner
removes together, and the :class:`Structure` that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChannelGroup:
    """Coupled channels the pruner removes together: ``size`` units, unit ``u`` made of

    * rows ``rows[layer][u]`` (a ``[size, r]`` index tensor) of every *producer* layer — the
      weight rows (filters, neurons) and bias entries that write the channel, depthwise
      filters included;
    * entries ``norms[norm][u]`` of every batch norm on the channel;
    * input columns ``columns[layer][u]`` (``[size, c]``; c = H·W after a flatten) of every
      *consumer* layer that reads it;
    * zero channels ``pads[module][u]`` of a
      :class:`~dtp_search.pruning.layers.ChannelPadShortcut` that write into it (entry j
      is its front zero channel j, entry −(j+1) its back zero channel j).

    ``inexact`` names the consumers that read the units through a path on which a zeroed
    unit no longer emits exactly 0 (see :mod:`dtp_search.pruning.structure.trace`).
    ``name`` is the first producer's layer name in model order (with ``#k`` appended when
    several groups start at the same layer); ``producers`` lists the producers in model
    order.
    """

    name: str
    size: int
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    pads: dict[str, torch.Tensor] = field(default_factory=dict)
    inexact: frozenset[str] = frozenset()

    @property
    def producers(self) -> list[str]:
        return list(self.rows)

    @property
    def layers(self) -> set[str]:
        """Every Linear/Conv layer the group touches (producers and consumers)."""
        return set(self.rows) | set(self.columns)


@dataclass
class Structure:
    """The result of :func:`trace_channels`: the removable :class:`ChannelGroup` s, and the
    zero channels of :class:`~dtp_search.pruning.layers.ChannelPadShortcut` modules that nothing
    writes (``{module: [output positions]}``), which compaction drops as well."""

    groups: list[ChannelGroup]
    zero_channels: dict[str, list[int]]
