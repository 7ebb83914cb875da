"""Layers the pruning core knows how to edit, for networks written with them.

:class:`ChannelPadShortcut` is the option-A shortcut of the CIFAR ResNets as a module, so
that :mod:`dtp_search.pruning.structure` can couple its input channel j with output
channel ``front + j`` and a compacted network can lower ``front``/``back``; an ``F.pad``
call written inline has constant widths that no edit can change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut of a CIFAR ResNet (He et al. 2016): subsample by ``stride``, then
    append ``front`` zero channels before and ``back`` after the input's channels.

    A module rather than an ``F.pad`` call inside the block, so that structured pruning can
    see it (:mod:`dtp_search.pruning.structure`): input channel j feeds output channel
    ``front + j``, and a compacted network keeps only the zero channels whose residual
    channel survives, by lowering ``front`` and ``back``. No parameters, no buffers.
    """

    def __init__(self, stride: int, front: int, back: int) -> None:
        super().__init__()
        self.stride, self.front, self.back = int(stride), int(front), int(back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.front or self.back:
            x = F.pad(x, (0, 0, 0, 0, self.front, self.back))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, front={self.front}, back={self.back}"
