"""The errors bad input raises. Each message names the key, the value and what is
allowed; ``python -m dtp_search`` prints it as one ``error:`` line and exits 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input; the message names the key, the value and what is allowed."""


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured (message says what to do)."""
