"""The user's own data (dataset=torchvision, dataset=custom) and data larger than memory
(dataset.in_memory: streamed splits that train exactly as in-memory ones)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from images import tiny_cifar_tree, tree_with_a_bad_file
from inprocess import run_here
from PIL import Image

from dtp_search.data import DatasetError, Split, StreamedSplit, load_dataset
from dtp_search.settings import TrainSettings
from dtp_search.training import eval_batches, train_batches

REPO = Path(__file__).resolve().parents[1]
HERE = __name__  # the module's import name, for dataset._target_
FAKE = {
    "kind": "torchvision",
    "name": "fakedata",
    "_target_": "torchvision.datasets.FakeData",
    "size": 60,
    "num_classes": 3,
    "args": {"image_size": [3, 10, 10]},
    "num_workers": 0,
}


# --------------------------------------------------------------- small datasets of our own


class TinyTrainSet(torch.utils.data.Dataset):
    """A torchvision-style class taking ``train=``: 8×8 grayscale PIL images, ``classes``
    and ``targets``; remembers the arguments it was built with."""

    classes: ClassVar[list[str]] = ["zero", "one", "two"]
    built: ClassVar[list[dict]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False, n: int = 12) -> None:
        TinyTrainSet.built.append({"root": root, "train": train, "download": download})
        if root == "missing":
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        self.targets = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i], mode="L"), self.targets[i]


class TinySplitSet(torch.utils.data.Dataset):
    """A class taking ``split=``: float tensors in [0, 1], no ``targets`` (labels from a
    pass) and no ``classes`` (the count from the labels)."""

    def __init__(self, split: str = "train") -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 12 if split == "train" else 6
        self.images = torch.rand(n, 3, 6, 6, generator=g)
        self.labels = [torch.tensor(i % 4) for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class Pairs(torch.utils.data.Dataset):
    """Map-style (image, label) pairs from lists (a custom factory's splits)."""

    def __init__(self, images, labels, classes=None) -> None:
        self.images, self.labels = images, labels
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _pil(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def pil_factory(n: int = 12, size: int = 8, test_size: int | None = None):
    """Custom factory: RGB PIL images, labels 0..2 and a ``classes`` attribute."""
    labels = [i % 3 for i in range(n)]
    return (
        Pairs(_pil(n, size, 0), labels, ["a", "b", "c"]),
        Pairs(_pil(6, test_size or size, 1), [i % 3 for i in range(6)], ["a", "b", "c"]),
    )


def tensor_factory(label_offset: int = 0):
    """Custom factory: uint8 tensor images, numpy labels, no ``classes`` (4 from labels)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = [np.int64(i % 4) for i in range(16)]
    test_y = [np.int64(i % 4) for i in range(8)]
    test_y[5] = np.int64(label_offset + 5) if label_offset else test_y[5]
    return Pairs(list(x), y), Pairs(list(x[:8]), test_y)


def labelled_beyond_classes():
    """Custom factory whose ``classes`` name 3 classes while a label says 7."""
    train, test = pil_factory()
    test.labels = [0, 1, 2, 7, 0, 1]
    return train, test


def three_things():
    train, test = pil_factory()
    return train, test, test


def _custom(target: str, **extra) -> dict:
    return {
        "kind": "custom",
        "name": target.rpartition(".")[2].lower(),
        "_target_": target,
        "num_workers": 0,
        **extra,
    }


# ----------------------------------------------------------------------- torchvision kind


def test_a_class_with_train_builds_both_splits_with_root_and_download(tmp_path):
    TinyTrainSet.built.clear()
    ds = load_dataset(
        {
            "kind": "torchvision",
            "name": "tinytrainset",
            "_target_": f"{HERE}.TinyTrainSet",
            "root": str(tmp_path),
            "download": False,
            "args": {"n": 9},
        }
    )
    assert [b["train"] for b in TinyTrainSet.built] == [True, False]
    assert all(b["root"] == str(tmp_path) and b["download"] is False for b in TinyTrainSet.built)
    assert ds.classes == ["zero", "one", "two"] and ds.input_shape == (1, 8, 8)
    assert isinstance(ds.train, Split) and ds.train.images.dtype == torch.uint8
    ref = TinyTrainSet(str(tmp_path), train=False, n=9)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(ref.data))
    assert ds.test.labels.tolist() == ref.targets


def test_a_class_with_split_quantises_float_tensors_and_reads_labels_in_one_pass():
    ds = load_dataset(
        {
            "kind": "torchvision",
            "name": "tinysplitset",
            "_target_": f"{HERE}.TinySplitSet",
            "num_workers": 1,
        }
    )
    ref = TinySplitSet("test")
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert ds.classes == ["0", "1", "2", "3"]  # no classes attribute: from the labels
    assert torch.equal(ds.test.images, ref.images.mul(255).round().to(torch.uint8))
    assert ds.test.labels.tolist() == [i % 4 for i in range(6)]


def test_fakedata_holds_out_a_fixed_stratified_test_split():
    a, b = load_dataset(FAKE), load_dataset({**FAKE, "in_memory": False})
    assert len(a.train) == 48 and len(a.test) == 12 and a.input_shape == (3, 10, 10)
    assert a.classes == ["0", "1", "2"]
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.labels, b.test.labels)
    assert a.content_digest() == b.content_digest()
    other = load_dataset({**FAKE, "split_seed": 1})
    assert not torch.equal(other.test.images, a.test.images)
    assert (
        sorted(torch.bincount(a.test.labels).tolist())
        == sorted(torch.bincount(a.test.labels).tolist())
        and torch.bincount(a.test.labels).min() >= 3
    )


# ----------------------------------------------------------------------------- custom kind


def test_a_custom_factory_of_pil_images_with_classes_and_extra_arguments():
    ds = load_dataset(_custom(f"{HERE}.pil_factory", args={"n": 9}, channels=1, image_size=4))
    assert ds.classes == ["a", "b", "c"] and len(ds.train) == 9 and ds.input_shape == (1, 4, 4)
    assert ds.name == "pil_factory"


def test_a_custom_factory_of_uint8_tensors_counts_classes_from_labels():
    ds = load_dataset(_custom(f"{HERE}.tensor_factory", train_limit=8))
    train, _ = tensor_factory()
    assert ds.classes == ["0", "1", "2", "3"] and len(ds.train) == 8
    assert torch.bincount(ds.train.labels).tolist() == [2, 2, 2, 2]  # stratified
    assert torch.equal(ds.test.images[0], train.images[0])


# ------------------------------------------------------------------------- refused input


@pytest.mark.parametrize(
    ("settings", "fragments"),
    [
        (
            _custom(f"{HERE}.three_things"),
            [
                f"dataset._target_={HERE}.three_things returned a tuple of 3",
                "allowed: (train, test), two map-style datasets of (image, label)",
            ],
        ),
        (
            _custom(f"{HERE}.labelled_beyond_classes"),
            ["the test split holds the label 7", "allowed: 0..2"],
        ),
        (
            _custom(f"{HERE}.tensor_factory", args={"label_offset": -10}),
            ["the test split holds the label -5", "allowed: 0..3"],
        ),
        (
            _custom(f"{HERE}.no_such_factory"),
            [
                f"dataset._target_='{HERE}.no_such_factory' cannot be imported",
                "allowed: a dotted path",
            ],
        ),
        (
            {**FAKE, "_target_": "torchvision.datasets.NoSuchSet", "name": "x"},
            ["dataset._target_='torchvision.datasets.NoSuchSet' cannot be imported"],
        ),
        (
            {
                "kind": "torchvision",
                "name": "tinytrainset",
                "_target_": f"{HERE}.TinyTrainSet",
                "root": "missing",
            },
            [f"dataset._target_={HERE}.TinyTrainSet raised RuntimeError: Dataset not found"],
        ),
        (
            {"kind": "digits", "name": "fashionmnist"},
            [
                "dataset.name='fashionmnist' names another dataset than dataset=digits loads",
                "allowed: any name that is not another dataset's, e.g. dataset.name=digits",
            ],
        ),
        (
            {**FAKE, "name": "cifar10"},
            [
                "dataset.name='cifar10' names another dataset than dataset=torchvision "
                "(torchvision.datasets.FakeData)",
                "e.g. dataset.name=fakedata",
            ],
        ),
        (
            _custom(f"{HERE}.pil_factory", args={"test_size": 12}),
            [
                "the train images are 3×8×8 (C×H×W) but the test images 3×12×12",
                "dataset.image_size",
            ],
        ),
    ],
)
def test_refused_data_is_one_dataset_error_naming_what_is_wrong(settings, fragments):
    with pytest.raises(DatasetError) as err:
        load_dataset(settings)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_names_of_user_data_and_of_matching_kinds_are_free():
    assert (
        load_dataset({"kind": "digits", "name": "my-digits", "train_limit": 50}).name == "my-digits"
    )
    assert load_dataset(_custom(f"{HERE}.tensor_factory", name="mnist")).name == "mnist"


def test_an_imagefolder_tree_whose_test_images_differ_in_size_is_refused(tmp_path):
    for split, size in (("train", 8), ("test", 12)):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i, img in enumerate(_pil(2, size, len(c))):
                img.save(d / f"{i}.png")
    for in_memory in (True, False):
        with pytest.raises(DatasetError, match=r"train images are 3×8×8 .* test images 3×12×12"):
            load_dataset(
                {
                    "kind": "imagefolder",
                    "name": "t",
                    "path": str(tmp_path),
                    "in_memory": in_memory,
                    "num_workers": 0,
                }
            )
    ds = load_dataset({"kind": "imagefolder", "name": "t", "path": str(tmp_path), "image_size": 8})
    assert ds.input_shape == (3, 8, 8)


def test_a_bad_item_or_float_outside_0_1_is_named():
    bad = Pairs([torch.full((3, 4, 4), 2.0)] * 4, [0, 1, 0, 1])
    with pytest.raises(
        DatasetError, match=r"train item 0: its float image holds values in \[2, 2\]"
    ):
        _load_pairs(bad, bad)
    with pytest.raises(DatasetError, match=r"train item 0 has the label 0.5; allowed: integers"):
        _load_pairs(Pairs([torch.zeros(3, 4, 4)] * 2, [0.5, 1]), bad)


_PAIRS: tuple = ()


def pairs_factory():
    return _PAIRS


def _load_pairs(train, test):
    global _PAIRS
    _PAIRS = (train, test)
    return load_dataset(_custom(f"{HERE}.pairs_factory"))


# ------------------------------------------------------------------ streamed = in memory


def _batches_equal(a, b) -> int:
    n = 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        n += 1
    return n


@pytest.mark.parametrize("channels_last", [False, True])
def test_streamed_batches_equal_in_memory_batches_with_augmentation(channels_last):
    kw = dict(FAKE, augment=True, crop_padding=2, num_workers=2)
    mem, stream = load_dataset({**kw, "in_memory": True}), load_dataset({**kw, "in_memory": False})
    assert isinstance(stream.train, StreamedSplit) and isinstance(mem.train, Split)
    assert stream.mean == mem.mean and stream.std == mem.std
    assert stream.content_digest() == mem.content_digest() and stream.input_shape == mem.input_shape
    s = TrainSettings(batch_size=7, eval_batch_size=10, channels_last=channels_last)
    idx = np.arange(1, len(mem.train), 2)
    a, b = train_batches(mem, idx, s, 5, "cpu"), train_batches(stream, idx, s, 5, "cpu")
    assert type(b).__name__ == "StreamBatches" and len(a) == len(b) == 3  # drop_last
    for _ in range(2):  # the generator carries over between epochs on both
        assert _batches_equal(a, b) == 3
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert _batches_equal(a.subsample(14, 3), b.subsample(14, 3)) == 2
    ta = eval_batches(mem, mem.test, np.arange(len(mem.test)), s, "cpu")
    tb = eval_batches(stream, stream.test, np.arange(len(stream.test)), s, "cpu")
    assert _batches_equal(ta, tb) == 2 and tb.num_samples == 12


def test_a_streamed_imagefolder_tree_trains_as_in_memory_and_digests_alike(tmp_path):
    tree = tiny_cifar_tree(tmp_path / "tree", train=4, test=2)
    kw = {
        "kind": "imagefolder",
        "name": "t",
        "path": str(tree),
        "image_size": 12,
        "augment": True,
        "num_workers": 1,
    }
    mem = load_dataset({**kw, "in_memory": True}, cache_dir=tmp_path / "cache")
    stream = load_dataset({**kw, "in_memory": False}, cache_dir=tmp_path / "cache")
    again = load_dataset({**kw, "in_memory": False}, cache_dir=tmp_path / "cache")  # scan cached
    assert list((tmp_path / "cache").glob("scan-*.json"))
    assert mem.content_digest() == stream.content_digest() == again.content_digest()
    assert mem.mean == stream.mean == again.mean and mem.classes == stream.classes
    s = TrainSettings(batch_size=8, eval_batch_size=16)
    idx = np.arange(len(mem.train))
    assert (
        _batches_equal(
            train_batches(mem, idx, s, 0, "cpu"), train_batches(stream, idx, s, 0, "cpu")
        )
        == 5
    )


def test_a_streamed_tree_with_a_bad_file_stops_or_leaves_it_out(tmp_path, caplog):
    bad = tree_with_a_bad_file(tmp_path / "tree")
    kw = {
        "kind": "imagefolder",
        "name": "t",
        "path": str(tmp_path / "tree"),
        "in_memory": False,
        "num_workers": 0,
    }
    with pytest.raises(DatasetError, match=f"cannot decode the image {bad}"):
        load_dataset(kw)
    with caplog.at_level("WARNING", logger="dtp_search.data.decode"):
        ds = load_dataset({**kw, "skip_bad_files": True})
    mem = load_dataset({**kw, "skip_bad_files": True, "in_memory": True})
    assert isinstance(ds.train, StreamedSplit) and len(ds.train) == len(mem.train) == 8
    assert ds.content_digest() == mem.content_digest()
    assert "skipped 1 unreadable file(s)" in caplog.text


def test_auto_streams_what_does_not_fit_the_memory_limit(tmp_path):
    tree = tiny_cifar_tree(tmp_path / "tree", train=3, test=1)  # 30 + 10 images of 3 KiB
    kw = {"kind": "imagefolder", "name": "t", "path": str(tree), "num_workers": 0}
    tiny = load_dataset({**kw, "memory_limit": 1e-6})
    assert isinstance(tiny.train, StreamedSplit) and isinstance(tiny.test, StreamedSplit)
    assert tiny.input_shape == (3, 32, 32) and not hasattr(tiny.train, "images")
    # Room for the test split (30 KiB) but not the training split (90 KiB): train streams.
    part = load_dataset({**kw, "memory_limit": 60 * 1024 / 2**30})
    assert isinstance(part.train, StreamedSplit) and isinstance(part.test, Split)
    roomy = load_dataset(kw)  # a quarter of the RAM
    assert isinstance(roomy.train, Split) and isinstance(roomy.test, Split)
    assert tiny.content_digest() == part.content_digest() == roomy.content_digest()
    user = load_dataset({**FAKE, "memory_limit": 1e-6})
    assert isinstance(user.train, StreamedSplit)


@pytest.mark.slow
def test_a_study_on_a_streamed_imagefolder_tree(tmp_path):
    tree = tiny_cifar_tree(tmp_path / "tree", train=4, test=2)
    proc = run_here(
        tmp_path / "run",
        "dataset=imagefolder",
        f"dataset.path={tree}",
        "dataset.in_memory=false",
        "dataset.num_workers=1",
        "dataset.image_size=8",
        "model=mlp",
        "cv.folds=2",
        "train.epochs=1",
        "train.finetune_epochs=0",
        "train.batch_size=8",
        "front.points=2",
        "console.progress=false",
        "refit.enabled=false",
        "search.n_trials=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
