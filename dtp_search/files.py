"""Files written whole or not at all: a reader (another worker, the next run) sees the
old file or the new one, never a partial write, and a full disk is one clear error."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dtp_search.errors import writing


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: readers (other
    workers) see the old file or the new one, never a partial write.

    A full disk raises :class:`~dtp_search.errors.DiskFullError` naming ``path`` (and
    leaves no temporary file). The write goes through a Python file object rather than a
    path: torch then meets the ``OSError(ENOSPC)`` itself and chains it to its own error,
    where from a path it reports only ``basic_ios::clear: iostream error``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
