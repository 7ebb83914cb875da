r"""What a pruned network costs to run with ordinary dense kernels: FLOPs, parameters and
latency of its compacted form, as fractions of the same network unpruned.

A mask only saves work where the kernels can skip it. Dense PyTorch kernels skip nothing:
a layer with 90 % of its weights zeroed still multiplies them all. What does shrink the
work is a *smaller* network — :func:`~dtp_search.pruning.compact_model` removes the dead
neurons and channels of structured pruning — so the costs here are those of the
compacted network, against the dense one:

.. math::

    \text{flops} = \frac{F(\mathrm{compact}(M))}{F(M_\text{dense})}, \qquad
    \text{params} = \frac{P(\mathrm{compact}(M))}{P(M_\text{dense})}, \qquad
    \text{latency} = \frac{\tilde t(\mathrm{compact}(M), B)}{\tilde t(M_\text{dense}, B)}

with :math:`F` the FLOPs of one forward pass of a batch of one example as
``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix products and
convolutions, 2 FLOPs per multiply-add), :math:`P` the number of parameters, and
:math:`\tilde t(\cdot, B)` the median wall time of a forward pass of a batch of
:math:`B` examples (:func:`median_latency_ms`). :math:`M_\text{dense}` is the network
with its masks baked in (:func:`~dtp_search.pruning.strip_masks`): the same shapes as the
unpruned network, so the same FLOPs, parameters and dense-kernel time.

Weight-level (unstructured) masks remove no unit — a weight row is dead only when its
whole row, bias and norm entries are zero, which weight masks never arrange — so they
leave every fraction at 1: unstructured sparsity saves nothing on dense kernels, and these
measures do not pretend otherwise.

Plain PyTorch: no Optuna, no MLflow.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dtp_search.pruning.compact import compact_model, strip_masks

__all__ = [
    "COSTS",
    "CostMeter",
    "StructuralCost",
    "count_flops",
    "count_params",
    "median_latency_ms",
    "no_fastpath",
    "structural_cost",
]

# The cost measures, each a fraction of the dense network's (lower is cheaper).
COSTS = ("flops", "params", "latency")


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Switch off the fused inference kernels of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` (``torch.backends.mha``) for a while: FlopCounterMode
    has no formula for them (it would count their projections as 0 FLOPs), and the fused
    encoder layer never calls its submodules, so their forward hooks would not run."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``inputs`` (``FlopCounterMode``: matrix products and
    convolutions at 2 FLOPs per multiply-add; elementwise operations count 0). They depend
    on the shapes only, never on the values: zeroed weights count in full."""
    with torch.no_grad(), no_fastpath(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (zeros included)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class StructuralCost:
    """FLOPs (one example) and parameters of a network's dense and compacted forms."""

    flops_dense: int
    flops_compact: int
    params_dense: int
    params_compact: int

    @property
    def flops(self) -> float:
        """F(compact) / F(dense): the fraction of the dense FLOPs still computed."""
        return self.flops_compact / max(self.flops_dense, 1)

    @property
    def params(self) -> float:
        """P(compact) / P(dense): the fraction of the parameters still stored."""
        return self.params_compact / max(self.params_dense, 1)


@torch.no_grad()
def structural_cost(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    compact: nn.Module | None = None,
    dense: tuple[int, int] | None = None,
) -> StructuralCost:
    """FLOPs and parameters of ``compact_model(model, example_input)`` against those of
    ``model`` unpruned (its masks baked in: the dense shapes), both at batch 1.

    ``example_input`` is one example (its first row is used), on the model's device.
    ``compact``: the compacted network when the caller already has it; ``dense``:
    ``(flops_dense, params_dense)`` from an earlier call on the same architecture, so
    that a sweep over many masks counts the dense network once.
    """
    x = example_input[:1]
    if dense is None:
        plain = strip_masks(model).eval()
        dense = (count_flops(plain, x), count_params(plain))
    small = (compact if compact is not None else compact_model(model, x)).eval()
    return StructuralCost(dense[0], count_flops(small, x), dense[1], count_params(small))


@torch.inference_mode()
def median_latency_ms(
    model: nn.Module, batch: torch.Tensor, *, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall time, in milliseconds, of ``repeats`` forward passes of ``batch``
    after ``warmup`` untimed ones, under ``torch.inference_mode`` in eval mode (the
    model's mode is restored after). On CUDA the device is synchronised before the clock
    starts and before it stops, so that the time is the kernels', not their launch's.
    The median, not the mean: one pass slowed by another process moves it little."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, not {repeats}, {warmup}")
    cuda = batch.device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(batch)
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(batch.device)
            t0 = time.perf_counter()
            model(batch)
            if cuda:
                torch.cuda.synchronize(batch.device)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


class CostMeter:
    """The costs ``measures`` (of :data:`COSTS`) of a pruned network, as fractions of its
    dense form (module docstring), for a network whose masks change: the final model of a
    fold, then each point of its one-shot sweep.

    :param measures: which of ``flops``, ``params``, ``latency`` to measure.
    :param example_input: one example (batch 1) on the model's device: traces the network
        for compaction and counts FLOPs.
    :param batch: the batch whose forward pass is timed (the batch size the network is
        deployed with), on the model's device; needed for ``latency``.
    :param structured: ``False`` for weight-level masks: they remove no unit, so the
        compacted network *is* the dense one and every fraction is 1 exactly, without
        tracing or timing anything (timing one network twice would only add noise).
    :param warmup, repeats: of :func:`median_latency_ms`.

    The dense FLOPs and parameters are counted on the first call (the architecture does
    not change); the dense latency on the first call and again whenever ``measure`` is
    asked to (``remeasure_dense``: at the end of each fold, so that the two times of a
    ratio are taken close together, under the same load of the machine).
    """

    def __init__(
        self,
        measures: Sequence[str],
        example_input: torch.Tensor,
        *,
        batch: torch.Tensor | None = None,
        structured: bool = True,
        warmup: int = 3,
        repeats: int = 10,
    ) -> None:
        unknown = [m for m in measures if m not in COSTS]
        if unknown:
            raise ValueError(f"unknown cost measure(s) {unknown}; allowed: {list(COSTS)}")
        if "latency" in measures and batch is None:
            raise ValueError("measuring latency needs the batch to time (batch=...)")
        self.measures = tuple(dict.fromkeys(measures))
        self.example = example_input[:1]
        self.batch = batch
        self.structured = structured
        self.warmup, self.repeats = warmup, repeats
        self._dense: tuple[int, int] | None = None
        self._dense_ms: float | None = None

    def measure(
        self,
        model: nn.Module,
        *,
        remeasure_dense: bool = False,
        only: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """``{measure: fraction}`` for ``model`` with its current masks (see the class);
        ``only``: a subset of the meter's measures (a sweep point needs the front's axis)."""
        measures = self.measures if only is None else tuple(dict.fromkeys(only))
        if not set(measures) <= set(self.measures):
            raise ValueError(f"measures {list(measures)} not among {list(self.measures)}")
        if not measures:
            return {}
        if not self.structured:
            return dict.fromkeys(measures, 1.0)
        out: dict[str, float] = {}
        small = compact_model(model, self.example).eval()
        if "flops" in measures or "params" in measures:
            cost = structural_cost(model, self.example, compact=small, dense=self._dense)
            self._dense = (cost.flops_dense, cost.params_dense)
            out["flops"], out["params"] = cost.flops, cost.params
        if "latency" in measures:
            if self._dense_ms is None or remeasure_dense:
                self._dense_ms = self._time(strip_masks(model).eval())
            out["latency"] = self._time(small) / self._dense_ms
        return {m: out[m] for m in measures}

    def _time(self, model: nn.Module) -> float:
        return median_latency_ms(model, self.batch, warmup=self.warmup, repeats=self.repeats)
