"""The errors bad input raises. Each message names the key, the value and what is
allowed; ``python -m dtp_search`` prints it as one ``error:`` line and exits 2."""

from __future__ import annotations


def reason(exc: BaseException) -> str:
    """Why a connection or download failed, in a few words: ``Connection refused``,
    ``timed out``, ``Tunnel connection failed: 403 Forbidden`` (a URLError's own reason)."""
    why = getattr(exc, "reason", None) or exc
    return getattr(why, "strerror", None) or str(why) or type(why).__name__


class ConfigError(ValueError):
    """Bad user input; the message names the key, the value and what is allowed."""


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured (message says what to do)."""
