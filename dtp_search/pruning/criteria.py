"""Importance criteria: the score S(w) that a threshold θ is compared against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from dtp_search.pruning.masks import effective_weight


class Criterion(ABC):
    """Scores every weight of a layer; larger means more important."""

    name: ClassVar[str]

    @abstractmethod
    def scores(self, module: nn.Module) -> torch.Tensor:
        """A tensor shaped like ``module.weight`` (no autograd graph)."""


class Magnitude(Criterion):
    """S(w) = |w ⊙ m|: the magnitude of the effective weight (pruned weights score 0)."""

    name = "magnitude"

    @torch.no_grad()
    def scores(self, module: nn.Module) -> torch.Tensor:
        return effective_weight(module).abs()


CRITERIA: dict[str, type[Criterion]] = {cls.name: cls for cls in (Magnitude,)}


def build_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]()
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; allowed: {sorted(CRITERIA)}") from None
