"""Time windows of the scheduled policies: where a window ends, and how far a time is through it."""

from __future__ import annotations


def window_end(end_epoch: float, start_epoch: float) -> float:
    """The end of a pruning window [t_s, t_e]. An end at or before the start makes the
    window one step at t_s: the policy prunes to its target at once there. Searched
    windows sample t_s and t_e independently, and this keeps every such pair a valid
    (if abrupt) schedule instead of a wasted trial."""
    return max(float(end_epoch), float(start_epoch))


def ramp(epoch: float, start: float, end: float) -> float:
    """Progress r ∈ [0, 1] of ``epoch`` through [start, end] (a step at ``start`` if end ≤ start)."""
    if end <= start:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / (end - start), 0.0), 1.0)
