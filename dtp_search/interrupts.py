"""The stop flag: a signal asks the running work to stop at its next safe point.

Set by a signal handler (see :mod:`dtp_search.__main__` and :mod:`dtp_search.search.workers`);
the training loop checks it after every optimizer step, the study between trials, and
the refit after each refit's training and before the report (a signal after the last
training step would otherwise go unanswered).
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


def stopping() -> bool:
    """Whether :func:`stop_now` has raised: the run is already on its way out (closing
    its runs, saying why), and another signal must not cut that short."""
    return _stopping
