"""The machine, checked up front and met mid-run (issue 26, findings 5, 8 and 9): a full
disk is one line naming the file (the trial's fail_reason and the run's last line); a
corrupt store is refused before either store is opened; the study's folders stay under
``paths.root`` and are checked before any data is read."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import sqlalchemy
import torch
from hydra import compose, initialize_config_dir
from inprocess import run_here
from mlflow.tracking import MlflowClient

from dtp_search.__main__ import CONFIG_DIR
from dtp_search.errors import DiskFullError, disk_full, writing
from dtp_search.files import atomic_save
from dtp_search.models import build_model
from dtp_search.search.config import ConfigError, register_resolvers, settings_of
from dtp_search.search.preflight import SQLITE_HEADER, check_free_space, check_machine, space_needed

register_resolvers()

TINY = [
    "cv.folds=2",
    "train.epochs=1",
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
    "search.n_trials=1",
]
# torch.save's own report of a full disk: the ENOSPC only in its chain.
TORCH_WORDS = "[enforce fail at inline_container.cc:672] . unexpected pos 160512 vs 160416"


def _settings(root: Path, *overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return settings_of(compose("config", overrides=[f"paths.root={root}", *overrides]))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _noise(n: int = 1024) -> bytes:
    return random.Random(26).randbytes(n)


def _torch_full_disk() -> RuntimeError:
    """What torch.save raises on a full disk: its RuntimeError, ENOSPC chained."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise RuntimeError(TORCH_WORDS) from exc
    except RuntimeError as exc:
        return exc


# ---------------------------------------------------------------- finding 5: a full disk


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this machine")
def test_a_real_full_device_is_one_line_naming_the_file():
    with pytest.raises(DiskFullError) as info, writing("/dev/full"), open("/dev/full", "wb") as f:
        torch.save({"w": torch.zeros(100_000)}, f)
    text = str(info.value)
    assert text.startswith("no space left on device: /dev/full could not be written; ")
    assert "\n" not in text and info.value.errno == errno.ENOSPC


def test_disk_full_finds_the_cause_in_any_chain_and_nothing_else():
    found = disk_full(_torch_full_disk(), "/x/trial-0.pt")
    assert found is not None and found.filename == "/x/trial-0.pt"
    # shutil's copy into a full artifact folder names source and destination
    copy = OSError(errno.ENOSPC, "No space left on device", "/tmp/front.png", None, "/a/front.png")
    assert disk_full(copy).filename == "/a/front.png"
    quota = disk_full(OSError(errno.EDQUOT, "Disk quota exceeded", "/q"))
    assert str(quota).startswith("disk quota exceeded: /q could not be written")
    # SQLite has no errno; SQLAlchemy (and MLflow over it) wrap its error
    wrapped = sqlalchemy.exc.OperationalError(
        "INSERT ...", {}, sqlite3.OperationalError("database or disk is full")
    )
    assert str(disk_full(wrapped)).startswith("no space left on device: an SQLite store")
    assert disk_full(RuntimeError("unexpected pos 1 vs 2")) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied", "/p")) is None


def test_atomic_save_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "s" / "trial-0.pt"
    atomic_save({"v": 1}, target)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise _torch_full_disk()

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        atomic_save({"v": 2}, target)
    assert info.value.filename == str(target)
    assert [p.name for p in target.parent.iterdir()] == ["trial-0.pt"]  # the old one, kept
    assert torch.load(target, weights_only=True) == {"v": 1}


@pytest.mark.slow  # one trial's training (about 25 s alone on two busy cores)
def test_a_full_checkpoint_disk_fails_the_trial_with_one_line_and_ends_the_run(
    tmp_path, monkeypatch
):
    """Only paths.checkpoints is full: the trial's fail_reason (Optuna and MLflow) and the
    run's last line say so, with the file; no traceback, status 1."""
    root = tmp_path / "runs"
    checkpoints = tmp_path / "full-disk"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        target = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if target.startswith(str(checkpoints)):
            f.write(b"partial")
            raise _torch_full_disk()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    proc = run_here(root, "study.name=full", f"paths.checkpoints={checkpoints}", *TINY)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on device: {checkpoints}/full/trial-0.pt ")
    (trial,) = optuna.load_study(study_name="full", storage=f"sqlite:///{root}/optuna.db").trials
    assert trial.state == optuna.trial.TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert reason.startswith(f"no space left on device: {checkpoints}/full/")
    assert "\n" not in reason and "unexpected pos" not in reason
    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["fail_reason"] == reason
    assert not list(checkpoints.rglob("*.tmp"))  # no partial file left behind


# ------------------------------------------------------------------ free space, up front


def test_space_needed_is_weights_masks_and_optimizer_per_running_trial_and_fold(tmp_path):
    s = _settings(tmp_path, "cv.folds=3", "study.workers=1")
    assert space_needed(s, 1000) == {
        "paths.checkpoints": 2 * 1000 * 4 * 3,  # old + new file, (weights, masks, momentum)
        "paths.warm_start": 3 * 1000 * 4 * 3,  # one dense state per fold
    }
    adam = _settings(tmp_path, "train.optimizer=adam", "search.warm_start=false")
    assert space_needed(adam, 1000) == {"paths.checkpoints": 2 * 1000 * 4 * 4}
    plain = _settings(tmp_path, "train.momentum=0", "search.checkpoint=false", "cv.folds=2")
    assert space_needed(plain, 1000) == {"paths.warm_start": 2 * 1000 * 4 * 2}


def test_too_little_free_space_is_one_warning_naming_the_folders(tmp_path, monkeypatch, caplog):
    s = _settings(tmp_path)
    digits = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)
    parameters = sum(p.numel() for p in build_model(s.model, (1, 8, 8), 10).parameters())
    with caplog.at_level("WARNING", logger="dtp_search.search.preflight"):
        need = check_free_space(s, digits)
    assert sum(need.values()) == 2 * parameters * 12 + s.cv.folds * parameters * 12
    assert not caplog.records  # this disk has room
    monkeypatch.setattr(
        "dtp_search.search.preflight.shutil.disk_usage", lambda p: SimpleNamespace(free=1000)
    )
    with caplog.at_level("WARNING", logger="dtp_search.search.preflight"):
        check_free_space(s, digits)
    (record,) = caplog.records
    text = record.getMessage()
    assert text.startswith(f"paths.checkpoints={tmp_path}/checkpoints and paths.warm_start=")
    assert (
        "1000.0 B free on its disk, less than the ~" in text
        and f"({parameters} parameters)" in text
    )


# ------------------------------------------------------------ finding 8: corrupt stores


@pytest.mark.parametrize(
    ("name", "key", "content"),
    [
        ("optuna.db", "study.storage", _noise()),
        ("mlflow.db", "tracking.uri", _noise()),
        ("optuna.db", "study.storage", SQLITE_HEADER + _noise()),  # a header, then noise
    ],
    ids=["optuna-noise", "mlflow-noise", "optuna-header-then-noise"],
)
def test_a_corrupt_store_is_refused_before_either_store_is_opened(tmp_path, name, key, content):
    root = tmp_path / "runs"
    root.mkdir()
    (root / name).write_bytes(content)
    proc = run_here(root, "study.name=new", *TINY, premade_store=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {key}='sqlite:///{root}/{name}': {root}/{name} is not an ")
    assert "restore it from a backup, or move it away" in line
    assert _files(root) == {name}  # no other store, study, cache or folder
    assert (root / name).read_bytes() == content


def test_a_corrupt_journal_is_refused_and_good_or_empty_stores_pass(tmp_path):
    journal = tmp_path / "optuna.log"
    journal.write_bytes(_noise())
    s = _settings(tmp_path, f"study.storage=journal:///{journal}")
    with pytest.raises(ConfigError, match=r"is not an Optuna journal \(its first line is not a"):
        check_machine(s)
    journal.write_bytes(b"")  # empty: the journal starts in it
    check_machine(s)
    journal.unlink()
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    optuna.create_study(storage=optuna.storages.JournalStorage(backend))  # a real journal
    check_machine(s)
    optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db")  # a real database
    (tmp_path / "mlflow.db").write_bytes(b"")
    check_machine(_settings(tmp_path))


# ------------------------------------------------- finding 9: paths stay where they belong


@pytest.mark.parametrize(
    "name", ["../../escape", "a/b", "a\\b", ".hidden", "-x", "trailing ", "x" * 201]
)
def test_a_study_name_that_is_no_single_folder_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, f"study.name='{name}'")
    assert str(info.value).startswith(f"study.name={name!r} is not allowed; allowed: a folder ")


def test_an_escaping_study_name_stops_the_run_before_anything_is_written(tmp_path):
    root = tmp_path / "a" / "b" / "runs"
    root.parent.mkdir(parents=True)
    proc = run_here(root, "study.name=../../escape", *TINY, premade_store=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: study.name='../../escape' is not allowed; allowed: ")
    assert _files(tmp_path) == {"a", "a/b", "a/b/runs"}  # (paths.root: made by the CLI)


@pytest.mark.parametrize(
    "key", ["paths.checkpoints", "paths.cache_dir", "paths.warm_start", "paths.data_dir"]
)
def test_a_folder_inside_a_regular_file_is_refused_up_front(tmp_path, key):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "notes.txt").write_text("a file")
    folder = root / "notes.txt" / "sub"
    proc = run_here(root, "study.name=s", f"{key}={folder}", *TINY, premade_store=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {key}='{folder}' cannot be created: it lies inside the file "
        f"{root}/notes.txt, not a folder; allowed: a folder you can create and write to"
    )
    assert _files(root) == {"notes.txt"}


def test_the_folder_checks_create_nothing(tmp_path):
    root = tmp_path / "fresh"
    check_machine(_settings(root))
    assert not root.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"paths.data_dir='.*/file' cannot be created: it is a"):
        check_machine(_settings(root, f"paths.data_dir={tmp_path / 'file'}"))
