"""The data a study reads is the data on disk, and its splits fit each other.

* Caches of an ImageFolder tree (decoded tensors, streamed splits' scans) are keyed by
  every file's size, mtime and ctime: an image overwritten in place — same size, its
  mtime and its folder's mtime put back — is decoded again, so the dataset digest
  changes and a study's drift check refuses the rerun or refit.
* Train and test splits of different shapes, channel counts or classes are refused when
  the data is loaded, before any trial, with one DatasetError naming the dataset key.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import optuna
import pytest
import torch
from inprocess import TINY, run_here
from PIL import Image

from dtp_search.data import (
    MNIST_FILES,
    DatasetError,
    StreamedSplit,
    load_dataset,
    load_imagefolder,
)
from dtp_search.data import imagefolder as imagefolder_mod
from dtp_search.data.batches import StreamBatches
from dtp_search.data.decoders import FileDecoder
from dtp_search.errors import ConfigError
from dtp_search.search import provenance

HERE = __name__  # the module's import name, for dataset._target_


# ------------------------------------------------------------------------------ trees


def _png(path: Path, seed: int, size: int = 8, mode: str = "RGB") -> None:
    """A random image saved uncompressed: its byte size depends on its shape alone, so
    two of one shape can replace each other in place without changing the file's size."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path, compress_level=0)


def _tree(
    root: Path,
    sizes: tuple[int, int] = (8, 8),
    classes: tuple[tuple[str, ...], tuple[str, ...]] = (("cat", "dog"), ("cat", "dog")),
    modes: tuple[str, str] = ("RGB", "RGB"),
    n: int = 4,
) -> Path:
    """``root/{train,test}/<class>/<i>.png``, each split with its own size, classes, mode."""
    seed = 0
    for split, size, names, mode in zip(("train", "test"), sizes, classes, modes, strict=True):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                _png(folder / f"{i}.png", seed, size, mode)
    return root


def _overwrite_in_place(path: Path, seed: int) -> None:
    """Another image written over ``path`` with the same size, the file's mtime and its
    folder's mtime put back: only the ctime (and the pixels) tell."""
    file_stat, folder_stat = path.stat(), path.parent.stat()
    _png(path, seed, Image.open(path).size[0])
    assert path.stat().st_size == file_stat.st_size  # the hardest case
    os.utime(path, ns=(file_stat.st_atime_ns, file_stat.st_mtime_ns))
    os.utime(path.parent, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == file_stat.st_mtime_ns
    assert path.parent.stat().st_mtime_ns == folder_stat.st_mtime_ns


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def _imagefolder(tree: Path, **keys) -> dict:
    return {"kind": "imagefolder", "name": "t", "path": str(tree), "num_workers": 0, **keys}


# ------------------------------------------------------------- finding 1: in-place edits


def test_the_files_stamp_sees_each_file_and_nothing_else(tmp_path):
    tree = _tree(tmp_path / "tree")
    root = tree / "train"
    stamp = imagefolder_mod._files_stamp(root)
    assert imagefolder_mod._files_stamp(root) == stamp  # nothing changed, nothing seen
    _overwrite_in_place(root / "dog" / "2.png", seed=99)
    edited = imagefolder_mod._files_stamp(root)
    assert edited != stamp
    (root / "dog" / "2.png").rename(root / "dog" / "9.png")  # same file, another name
    assert imagefolder_mod._files_stamp(root) not in (stamp, edited)


def test_an_image_overwritten_in_place_is_decoded_again(tmp_path, monkeypatch):
    tree = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    target = tree / "train" / "dog" / "1.png"
    first, _ = load_imagefolder(tree / "train", cache_dir=cache)
    _overwrite_in_place(target, seed=99)
    decoded = []
    real = imagefolder_mod.decode_all
    monkeypatch.setattr(
        imagefolder_mod, "decode_all", lambda *a, **k: decoded.append(1) or real(*a, **k)
    )
    again, _ = load_imagefolder(tree / "train", cache_dir=cache)
    assert decoded == [1]
    position = 4 + 1  # cat/0..3, then dog/0, dog/1
    assert torch.equal(again.images[position], _pixels(target))
    assert not torch.equal(first.images[position], again.images[position])
    assert len(list(cache.glob("*.pt"))) == 2  # the old entry is not read again


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_the_digest_follows_an_in_place_edit_through_the_caches(tmp_path, in_memory):
    tree = _tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    settings = _imagefolder(tree, in_memory=in_memory)
    before = load_dataset(settings, cache_dir=cache).content_digest()
    assert load_dataset(settings, cache_dir=cache).content_digest() == before  # cached
    _overwrite_in_place(tree / "test" / "cat" / "0.png", seed=99)
    after = load_dataset(settings, cache_dir=cache)
    assert after.content_digest() != before
    # What a load without any cache (and the other path) sees: the files as they are now.
    fresh = load_dataset({**settings, "in_memory": not in_memory})
    assert after.content_digest() == fresh.content_digest()


def test_a_study_of_the_tree_refuses_the_digest_after_an_in_place_edit(tmp_path):
    # The drift check's own steps on the digests before and after (fast); the CLI's
    # rerun and refit: the slow test below.
    tree = _tree(tmp_path / "tree")
    settings = _imagefolder(tree)
    before = load_dataset(settings, cache_dir=tmp_path / "cache").content_digest()
    study = optuna.create_study(study_name="kept", directions=["maximize", "maximize"])
    provenance.record_study(study, {"dataset.digest": before}, {})
    _overwrite_in_place(tree / "train" / "cat" / "3.png", seed=99)
    after = load_dataset(settings, cache_dir=tmp_path / "cache").content_digest()
    with pytest.raises(ConfigError) as err:
        provenance.check_unchanged(study, {"dataset.digest": after})
    assert f"(dataset.digest: {before!r} -> {after!r}); its trials would not be" in str(err.value)


@pytest.mark.slow
def test_the_drift_check_refuses_a_rerun_and_a_refit_after_an_in_place_edit(tmp_path):
    tree = _tree(tmp_path / "tree", n=4)
    root = tmp_path / "runs"
    command = ["dataset=imagefolder", f"dataset.path={tree}", "study.name=kept", *TINY]
    first = run_here(root, *command, "search.n_trials=1")
    assert first.returncode == 0, first.stderr[-2000:]
    trials = _finished_trials(root / "optuna.db")
    assert trials == 1
    for i in range(4):  # the test images of one class, replaced by others of the same size
        _overwrite_in_place(tree / "test" / "cat" / f"{i}.png", seed=100 + i)
    for extra in ([], ["mode=refit"]):
        out = run_here(root, *command, *extra)
        assert out.returncode == 2, (extra, out.stderr[-2000:])
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, out.stderr[-2000:]
        assert "study.name='kept' was created with another configuration" in errors[0]
        assert "(dataset.digest: '" in errors[0]
        assert "Traceback" not in out.stderr
    assert _finished_trials(root / "optuna.db") == trials  # nothing the study held is lost


def _finished_trials(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')"
        ).fetchone()[0]


# ------------------------------------------------------- finding 4: splits that differ


def _idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_idx(root: Path, train_size: int, test_size: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = MNIST_FILES[split]
        _idx(root / images, rng.integers(0, 255, (20, size, size)))
        _idx(root / labels, np.arange(20) % 10)
    return root


class _Pairs(torch.utils.data.Dataset):
    """Random (uint8 image, label) pairs, with a ``classes`` list."""

    def __init__(self, size: int, classes: list[str], n: int = 8, channels: int = 3) -> None:
        g = torch.Generator().manual_seed(size)
        self.images = torch.randint(0, 255, (n, channels, size, size), generator=g).byte()
        self.targets = [i % len(classes) for i in range(n)]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def sized_pairs(train_size: int = 8, test_size: int = 8, test_classes=("a", "b")):
    """A ``dataset=custom`` factory: train and test of the sizes and classes given."""
    return _Pairs(train_size, ["a", "b"]), _Pairs(test_size, list(test_classes))


class TrainFlagSet(_Pairs):
    """A torchvision-style class taking ``train=``, whose test images are 12×12."""

    classes: ClassVar[list[str]] = ["a", "b"]

    def __init__(self, train: bool = True) -> None:
        super().__init__(8 if train else 12, self.classes)


def _custom(**args) -> dict:
    return {
        "kind": "custom",
        "name": "mine",
        "_target_": f"{HERE}.sized_pairs",
        "args": args,
        "num_workers": 0,
    }


SHAPE_CASES = {
    "imagefolder in memory": (lambda t: _imagefolder(_tree(t), in_memory=True), "path"),
    "imagefolder streamed": (lambda t: _imagefolder(_tree(t), in_memory=False), "path"),
    "cifar10 tree": (lambda t: {**_imagefolder(_tree(t)), "kind": "cifar10"}, "path"),
    "mnist tree": (lambda t: {**_imagefolder(_tree(t)), "kind": "mnist"}, "path"),
    "custom factory": (lambda t: _custom(test_size=12), "target"),
    "torchvision class": (
        lambda t: {
            "kind": "torchvision",
            "name": "trainflagset",
            "_target_": f"{HERE}.TrainFlagSet",
            "num_workers": 0,
        },
        "target",
    ),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_train_and_test_of_other_sizes_are_refused_at_load(tmp_path, case):
    make, names = SHAPE_CASES[case]
    tree = tmp_path / "tree"
    settings = make(tree)
    if names == "path":  # rewrite the tree: train 8×8, test 12×12
        import shutil

        shutil.rmtree(tree)
        _tree(tree, sizes=(8, 12))
    with pytest.raises(DatasetError) as err:
        load_dataset(settings, cache_dir=tmp_path / "cache")
    message = str(err.value)
    channels = 3  # (mnist: the tree's RGB files, dataset.channels being unset)
    where = (
        f"dataset.path={str(tree.resolve())!r}"
        if names == "path"
        else f"dataset._target_={settings['_target_']}"
    )
    assert message.startswith(f"{where}: the train images are {channels}×8×8 (C×H×W)")
    assert f"but the test images {channels}×12×12" in message
    assert "allowed: one shape for both splits (set dataset.image_size=8 to resize both)" in message
    assert "\n" not in message


def test_mnist_idx_files_of_other_sizes_are_refused_at_load(tmp_path):
    folder = _mnist_idx(tmp_path / "mnist", 8, 12)
    with pytest.raises(DatasetError) as err:
        load_dataset({"kind": "mnist", "name": "mnist", "path": str(folder)})
    assert str(err.value) == (
        f"dataset.path={str(folder)!r}: the train images are 1×8×8 (C×H×W) but the test "
        "images 1×12×12; allowed: one shape for both splits (set dataset.image_size=8 to "
        "resize both)"
    )


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_grayscale_train_and_colour_test_images_are_refused_at_load(tmp_path, in_memory):
    tree = _tree(tmp_path / "tree", modes=("L", "RGB"))
    with pytest.raises(DatasetError) as err:
        load_dataset(_imagefolder(tree, in_memory=in_memory))
    assert str(err.value) == (
        f"dataset.path={str(tree)!r}: the train images are 1×8×8 (C×H×W) but the test images "
        "3×8×8; allowed: one shape for both splits (set dataset.channels=1 to convert both)"
    )
    ds = load_dataset(_imagefolder(tree, in_memory=in_memory, channels=1))  # the fix works
    assert ds.input_shape == (1, 8, 8)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_imagefolder_splits_with_other_class_folders_are_refused_at_load(tmp_path, in_memory):
    tree = _tree(tmp_path / "tree", classes=(("cat", "dog"), ("cat", "emu")))
    with pytest.raises(DatasetError) as err:
        load_dataset(_imagefolder(tree, in_memory=in_memory))
    assert str(err.value) == (
        f"dataset.path={str(tree)!r}: the train and test splits have different classes "
        "(only in train: ['dog'], only in test: ['emu']); allowed: the same classes in both "
        "(an ImageFolder tree: the same class folders under train/ and test/)"
    )


@pytest.mark.parametrize(
    ("test_classes", "found"),
    [(("a", "c"), "['a', 'c']"), (("b", "a"), "['b', 'a']")],
    ids=["other", "reordered"],
)
def test_user_splits_with_other_class_lists_are_refused_at_load(test_classes, found):
    with pytest.raises(DatasetError) as err:
        load_dataset(_custom(test_classes=list(test_classes)))
    assert str(err.value) == (
        f"dataset._target_={HERE}.sized_pairs: the train split's classes ['a', 'b'] differ "
        f"from the test split's {found}; allowed: the same classes, in the same order, in "
        "both (label i must name one class in train and test)"
    )


def test_a_size_mismatch_stops_the_command_before_any_trial(tmp_path):
    tree = _tree(tmp_path / "tree", sizes=(8, 12))
    root = tmp_path / "runs"
    out = run_here(root, "dataset=imagefolder", f"dataset.path={tree}", *TINY, premade_store=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [
        f"error: dataset.path={str(tree)!r}: the train images are 3×8×8 (C×H×W) but the "
        "test images 3×12×12; allowed: one shape for both splits (set dataset.image_size=8 "
        "to resize both)"
    ], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (root / "optuna.db").exists() and not (root / "mlflow.db").exists()


# ------------------------------------------------- streamed files changed during a run


def test_streamed_images_that_changed_shape_since_the_load_are_refused(tmp_path):
    tree = _tree(tmp_path / "tree", sizes=(8, 12))
    same = sorted(str(p) for p in (tree / "test").rglob("*.png"))  # all 12×12
    mixed = [*sorted(str(p) for p in (tree / "train").rglob("*.png"))[:2], *same[:2]]
    labels = torch.zeros(len(same), dtype=torch.long)
    for paths, fragment in ((same, "a streamed image is now 3×12×12"), (mixed, "different")):
        split = StreamedSplit(FileDecoder(paths, 3, None), labels[: len(paths)], (3, 8, 8), 0)
        batches = StreamBatches(split, None, batch_size=4, mean=[0.5] * 3, std=[0.25] * 3)
        with pytest.raises(DatasetError, match=fragment):
            list(batches)
