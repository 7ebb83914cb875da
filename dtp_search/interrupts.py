"""The stop flag: a signal asks the running work to stop at its next safe point.

Set by a signal handler (see :mod:`dtp_search.__main__` and :mod:`dtp_search.search.workers`);
the running work acts on it at its safe points (:func:`stop_if_requested`).
"""

from __future__ import annotations

from typing import NoReturn

# Set by a signal handler (see dtp_search.__main__): training stops at the next optimizer
# step, a safe point, instead of wherever the signal lands (a database write, say).
_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Ask the running fold to stop (it raises ``KeyboardInterrupt`` after its current step)."""
    global _stop_reason
    _stop_reason = reason


def stop_requested() -> str | None:
    return _stop_reason


_stopping = False  # a stop's KeyboardInterrupt has been raised: the run is unwinding


def stop_now() -> NoReturn:
    """Raise the ``KeyboardInterrupt`` that stops the run for the requested reason (or a
    second signal's), and remember that the run is unwinding (:func:`stopping`)."""
    global _stopping
    _stopping = True
    raise KeyboardInterrupt(_stop_reason)


def stop_if_requested() -> None:
    """A safe point: raise :func:`stop_now`'s ``KeyboardInterrupt`` if a stop was requested.
    Called after every optimizer step, between trials, while workers run, after each
    refit's training and before the report: a request that came after the last training
    step would otherwise go unanswered, and the run would exit 0 although the user pressed
    Ctrl-C (a second Ctrl-C is no safety net: Python drops a ``KeyboardInterrupt`` raised
    inside a garbage-collection callback)."""
    if _stop_reason is not None:
        stop_now()


def stopping() -> bool:
    """Whether :func:`stop_now` has raised: the run is already on its way out (closing
    its runs, saying why), and another signal must not cut that short."""
    return _stopping
