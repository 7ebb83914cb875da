"""Range checks shared by every threshold policy's constructor, one message format each
(the way ``torch.nn.utils.prune`` shares ``_validate_pruning_amount``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def at_least(name: str, *values: float, low: float = 0, strict: bool = False) -> None:
    """Every value ≥ ``low`` (> ``low`` when ``strict``); several values share one message."""
    if any(v <= low if strict else v < low for v in values):
        got = ", ".join(str(v) for v in values)
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {got}")


def at_least_or_null(name: str, value: float | None, low: float) -> None:
    """``value`` is None or ≥ ``low``."""
    if value is not None and value < low:
        raise ValueError(f"{name} must be >= {low} or null, got {value}")


def fraction(name: str, value: float, *, open_low: bool = False, typed: bool = False) -> None:
    """``value`` in [0, 1), or in (0, 1) with ``open_low``. With ``typed`` a value that is
    not a number (a bool included) is refused with the same message instead of a TypeError."""
    if typed and (isinstance(value, bool) or not isinstance(value, (int, float))):
        ok = False
    else:
        ok = 0.0 < value < 1.0 if open_low else 0.0 <= value < 1.0
    if not ok:
        interval = "(0, 1)" if open_low else "[0, 1)"
        got = repr(value) if typed else str(value)
        raise ValueError(f"{name} must be in {interval}, got {got}")


def one_of(name: str, value: Any, choices: Collection[Any]) -> None:
    """``value`` is one of ``choices`` (the message shows ``choices`` as given)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def boolean(name: str, value: Any) -> None:
    """``value`` is a real bool (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
