"""Networks "from the user's own package" for the tests of ``model=custom``: importable as
``user_nets.<Name>`` (the tests folder is on ``sys.path`` in pytest, and on ``PYTHONPATH``
for the command-line runs), written the way a user would, with nothing dtp_search-specific.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU, a depthwise conv, global pooling, a linear classifier."""

    def __init__(self, num_classes: int, width: int = 8, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class PatchAttention(nn.Module):
    """A one-block vision transformer: patches by a strided Conv2d, a Conv1d mixer over the
    tokens, multi-head self-attention with layer norms, a linear classifier."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, dim: int = 16, patch: int = 2, heads: int = 2
    ) -> None:
        super().__init__()
        self.patches = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2)  # [B, dim, T]
        tokens = (tokens + self.mix(tokens)).transpose(1, 2)  # [B, T, dim]
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        return self.classifier(self.norm2(tokens).mean(dim=1))


def no_class_count() -> nn.Module:
    """A factory that takes no ``num_classes``: always 10 outputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def broken(num_classes: int) -> nn.Module:
    """A factory that raises, as a user's can."""
    raise RuntimeError("width must be even")


def not_a_module(num_classes: int) -> str:
    return "not a network"
