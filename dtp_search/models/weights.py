"""Trained weights a network starts from (``model.checkpoint``): the file's digest,
its ``state_dict`` (read safely, cached per file) and loading it into the network."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtp_search.errors import ConfigError


def checkpoint_digest(path: str | Path) -> str:
    """SHA-1 of the checkpoint file's bytes (part of a study's definition)."""
    return _digest(*_file_key(path))


def _file_key(path: str | Path) -> tuple[str, int, int]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"model.checkpoint={str(path)!r} does not exist; allowed: a file "
            "written by torch.save(model.state_dict(), path)"
        )
    st = p.stat()
    return str(p.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` stored at ``path``: the file itself, or a dict holding it under
    ``state_dict`` or ``model`` (as training scripts and Lightning save them); a
    ``module.`` prefix (``DataParallel``) is dropped. Read with ``weights_only=True``, so
    no code in the file runs. Cached per file (path, modification time, size): every
    fold of every trial starts from it."""
    return _load(*_file_key(path))


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.checkpoint={path!r} cannot be read with torch.load("
            f"weights_only=True) ({first[:200]}); allowed: a state_dict saved "
            "with torch.save"
        ) from exc
    state = blob
    if isinstance(blob, Mapping) and not _is_state(blob):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), Mapping) and _is_state(blob[key]):
                state = blob[key]
                break
    if not isinstance(state, Mapping) or not _is_state(state):
        keys = list(blob)[:5] if isinstance(blob, Mapping) else type(blob).__name__
        raise ConfigError(
            f"model.checkpoint={path!r} holds no state_dict (found {keys}); "
            "allowed: a state_dict, or a dict holding one under 'state_dict' "
            "or 'model'"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state(d: Mapping[str, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def apply_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into ``model``, refusing (:class:`ConfigError`) missing or unexpected
    keys and shape mismatches, with the first few names of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs network)", shapes),
    ):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    if problems:
        raise ConfigError(
            f"model.checkpoint={path!r} does not fit the network ("
            f"{'; '.join(problems)}); allowed: a state_dict of this very network"
        )
    model.load_state_dict(state)
