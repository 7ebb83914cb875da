"""Checks before a study opens: store files readable, folders writable, free space on
this machine; and the config against the loaded data (:func:`check_against_data`).

:func:`check_machine` runs once per run, after the config's own checks and before the
data is loaded or either store is opened, so that a problem of the machine ends the run
with one ``error:`` line (:class:`~dtp_search.errors.ConfigError`, exit status 2) and
leaves nothing behind: no empty Optuna study beside a corrupt MLflow store, no trial
that fails mid-way on a checkpoint folder that cannot exist. :func:`check_free_space`
runs once the network is known (its size sets what the checkpoints need) and only warns:
the estimate is an upper bound, and a study that fills the disk anyway stops with
:class:`~dtp_search.errors.DiskFullError`'s one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dtp_search import storage as storages
from dtp_search.data import ImageDataset
from dtp_search.errors import ConfigError
from dtp_search.models import build_model, check_output, start_model
from dtp_search.search import space as search_space
from dtp_search.search.config import build_pruner, policy_key
from dtp_search.settings import Settings
from dtp_search.training import eval_batches

log = logging.getLogger(__name__)

# The first 16 bytes of every SQLite database file (https://sqlite.org/fileformat.html).
SQLITE_HEADER = b"SQLite format 3\x00"
# SQLITE_CORRUPT and SQLITE_NOTADB: what sqlite3 reports for a file that is not (or no
# longer) a database. "database is locked" and the like are not corruption.
_CORRUPT_CODES = (11, 26)
_CORRUPT_WORDS = ("file is not a database", "malformed", "corrupt")
# Optimizer state kept per parameter: SGD's momentum buffer, Adam's two moments.
_OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2}


def check_machine(s: Settings) -> None:
    """Refuse, with one line naming the key, the path, why and what is allowed, a store
    file that is not what its URL says (both stores before either is opened) and a
    folder the run could not create or write. Creates nothing."""
    for key, url in (("study.storage", s.study.storage), ("tracking.uri", s.tracking.uri)):
        _check_store(key, url)
    for key, folder in _folders(s):
        _check_folder(key, folder)


def check_free_space(s: Settings, dataset: ImageDataset) -> dict[str, int]:
    """Warn (one log line per disk) when a disk holds less free space than this study's
    checkpoints and warm-start states need there (:func:`space_needed`). Returns the
    estimate, bytes per folder key."""
    model = build_model(s.model, dataset.input_shape, dataset.num_classes)
    params = list(model.parameters())
    parameters = sum(p.numel() for p in params)
    element = max((p.element_size() for p in params), default=4)
    need = space_needed(s, parameters, element)
    disks: dict[int, tuple[list[str], int, Path]] = {}
    for key, nbytes in need.items():
        folder = Path(_folder_of(s, key))
        probe = _existing_ancestor(folder)
        if probe is None or not probe.is_dir():
            continue  # check_machine has refused it already, or it cannot be measured
        device = probe.stat().st_dev
        keys, total, _ = disks.get(device, ([], 0, probe))
        disks[device] = ([*keys, key], total + nbytes, probe)
    for keys, nbytes, probe in disks.values():
        free = shutil.disk_usage(probe).free
        if free < nbytes:
            names = " and ".join(f"{k}={_folder_of(s, k)}" for k in keys)
            log.warning(
                "%s: %s free on its disk, less than the ~%s this study's %s need "
                "(%d parameters); free space there or point %s at another disk",
                names,
                _size(free),
                _size(nbytes),
                "checkpoints and warm-start states" if len(keys) > 1 else _what(keys[0]),
                parameters,
                " / ".join(keys),
            )
    return need


def space_needed(s: Settings, parameters: int, element_bytes: int = 4) -> dict[str, int]:
    """Bytes this study's training states can hold at once, per folder key.

    One training state is the network's weights, its masks (one value per weight, the
    weights' dtype) and the optimizer's state (1 value per weight for SGD with momentum,
    2 for Adam): ``parameters × element_bytes × (2 + slots)``; the scheduler, batch order
    and history are small beside it (LeNet-300-100 on digits: 607 KB estimated, 623 KB
    written with SGD; 810 KB and 829 KB with Adam).

    - ``paths.checkpoints`` (``search.checkpoint``): one state per running trial
      (``study.workers``), twice, because a checkpoint is replaced by writing the new file
      beside the old one (:func:`dtp_search.files.atomic_save`).
    - ``paths.warm_start`` (``search.warm_start``): one dense state per fold (``cv.folds``)
      — for one dense-epoch count; a search over a policy's start epoch stores one set per
      value it tries.
    """
    momentum = s.train.optimizer != "sgd" or s.train.momentum > 0
    slots = _OPTIMIZER_SLOTS.get(s.train.optimizer, 2) if momentum else 0
    state = parameters * element_bytes * (2 + slots)
    need = {}
    if s.search.checkpoint:
        need["paths.checkpoints"] = 2 * state * s.study.workers
    if s.search.warm_start:
        need["paths.warm_start"] = state * s.cv.folds * s.cv.repeats
    return need


def _what(key: str) -> str:
    return "checkpoints" if key == "paths.checkpoints" else "warm-start states"


def _folder_of(s: Settings, key: str) -> str:
    return str(getattr(s.paths, key.split(".", 1)[1]))


def _size(nbytes: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while nbytes >= 1024 and i < len(units) - 1:
        nbytes, i = nbytes / 1024, i + 1
    return f"{nbytes:.1f} {units[i]}"


def _folders(s: Settings) -> list[tuple[str, str]]:
    """The folders a run writes, by the key that sets each."""
    folders = [
        ("paths.root", s.paths.root),
        ("paths.cache_dir", s.paths.cache_dir),
        ("paths.data_dir", s.paths.data_dir),
    ]
    if s.search.checkpoint:
        folders.append(("paths.checkpoints", s.paths.checkpoints))
    if s.search.warm_start:
        folders.append(("paths.warm_start", s.paths.warm_start))
    location = s.tracking.artifact_location
    if location and (location.startswith("file:") or "://" not in location):
        folders.append(("tracking.artifact_location", location.removeprefix("file://")))
    for key, url in (("study.storage", s.study.storage), ("tracking.uri", s.tracking.uri)):
        path = storages.local_path(url)
        if path is not None:
            folders.append((key, str(path.parent)))
    return folders


def _existing_ancestor(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists (``None`` when none can be seen)."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def _check_folder(key: str, folder: str) -> None:
    """``folder`` exists as a folder we can write, or could be created: its nearest
    existing ancestor is a folder we can write. A temporary file there is the test
    (``os.access`` would not see a read-only mount's or an ACL's refusal)."""
    path = Path(folder)
    allowed = "allowed: a folder you can create and write to"
    probe = _existing_ancestor(path)
    if probe is None:
        raise ConfigError(f"{key}={folder!r} cannot be created (no part of it exists); {allowed}")
    if not probe.is_dir():
        where = (
            "is a file" if probe == Path(os.path.abspath(path)) else f"lies inside the file {probe}"
        )
        raise ConfigError(
            f"{key}={folder!r} cannot be created: it {where}, not a folder; {allowed}"
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{key}={folder!r} cannot be written ({probe}: {exc.strerror or exc}); {allowed}"
        ) from exc


def _check_store(key: str, url: str) -> None:
    """A local store file of ``url`` is absent, empty, or what its scheme says: an SQLite
    database that SQLite opens, or an Optuna journal whose first line is a JSON record."""
    path = storages.local_path(url)
    if path is None or not path.exists():
        return
    shown = f"{key}={storages.mask_url(url)!r}"
    fix = (
        f"restore it from a backup, or move it away (mv {path} {path}.broken) to start a new "
        "store there"
    )
    if path.is_dir():
        raise ConfigError(f"{shown}: {path} is a folder; allowed: a store file or none; {fix}")
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError as exc:
        raise ConfigError(
            f"{shown}: {path} cannot be read ({exc.strerror or exc}); allowed: a file you can "
            "read and write"
        ) from exc
    if not head:
        return  # an empty file: the store creates its tables in it
    if storages.scheme(url) == "journal":
        why = _journal_problem(head)
        kind = "an Optuna journal"
    else:
        why = _sqlite_problem(path, head)
        kind = "an SQLite database"
    if why is not None:
        raise ConfigError(f"{shown}: {path} is not {kind} ({why}); {fix}")


def _journal_problem(head: bytes) -> str | None:
    """Why the start of a journal file is not Optuna's (JSON records, one per line)."""
    first = head.split(b"\n", 1)[0]
    try:
        record = json.loads(first)
    except ValueError:
        return "its first line is not a JSON record"
    if not isinstance(record, dict) or "op_code" not in record:
        return "its first line is not an Optuna journal record"
    return None


def _sqlite_problem(path: Path, head: bytes) -> str | None:
    """Why ``path`` is not a readable SQLite database: its header, then SQLite's own
    verdict on its schema (a damaged file can keep a good header)."""
    if not head.startswith(SQLITE_HEADER):
        return "it does not start with SQLite's header 'SQLite format 3'"
    # The standard library's sqlite3, read-only: SQLAlchemy would add nothing to one query,
    # and Optuna's and MLflow's engines create or migrate tables as they connect.
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return _corrupt(exc)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        return _corrupt(exc)
    finally:
        conn.close()
    return None


def _corrupt(exc: sqlite3.Error) -> str | None:
    """SQLite's words when ``exc`` says the file is damaged; ``None`` for anything else
    (a lock held by another worker, say), which the store itself will report or wait out."""
    text = str(exc)
    if getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES or any(
        w in text.lower() for w in _CORRUPT_WORDS
    ):
        return f"SQLite: {text}"
    return None


def check_against_data(cfg: DictConfig, s: Settings, dataset: ImageDataset) -> None:
    """Checks that need the data: fold count against the smallest class; the network
    built once (the user's factory, ``model.checkpoint`` loaded) and its output checked
    on one batch of training images; and every policy's pruner built on it, so that a
    model/dataset or granularity/model mismatch fails before the study is opened."""
    smallest_class = int(torch.bincount(dataset.train.labels).min())
    if s.cv.folds > smallest_class:
        raise ConfigError(
            f"cv.folds={s.cv.folds} exceeds the smallest class of the training "
            f"split ({smallest_class} samples); allowed: 2..{smallest_class}"
        )
    try:
        model = start_model(s.model, dataset.input_shape, dataset.num_classes)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"model={s.model.name}: {exc}") from exc
    check_output(model, _one_batch(dataset, s), dataset.num_classes)
    example = torch.zeros(1, *dataset.input_shape)
    for name, node in search_space.policy_nodes(cfg).items():
        try:
            build_pruner(copy.deepcopy(model), node, example)
        except ValueError as exc:
            raise ConfigError(f"{policy_key(cfg, name)} with model={s.model.name}: {exc}") from exc


def _one_batch(dataset: ImageDataset, s: Settings) -> torch.Tensor:
    """Two training images, normalised as training will see them (the output check's batch)."""
    batches = eval_batches(
        dataset,
        dataset.train,
        np.arange(min(2, len(dataset.train))),
        dataclasses.replace(s.train, eval_batch_size=2, channels_last=False),
        "cpu",
    )
    return next(iter(batches))[0]
