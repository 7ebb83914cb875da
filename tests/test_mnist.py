"""dataset=mnist: IDX files (plain, gzipped, torchvision's layout), an ImageFolder copy,
torchvision's MNIST on local files, the errors, and one tiny study from the CLI."""

import gzip
import struct
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from inprocess import run_here
from omegaconf import OmegaConf
from PIL import Image

from dtp_search.data import (
    IDX_IMAGES,
    IDX_LABELS,
    DatasetError,
    channel_stats,
    load_dataset,
    read_idx,
)

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 40, "test": 20}  # 4 and 2 per class, 10 classes


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file: big-endian magic, big-endian uint32 sizes, then the bytes (gzipped for .gz)."""
    blob = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as fh:
        fh.write(blob)


def write_mnist(folder: Path, gz: bool = False, seed: int = 0) -> dict[str, tuple]:
    """The four IDX files of a tiny MNIST under ``folder``; returns split → (images, labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (image_name, label_name) in FILES.items():
        n = SIZES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{image_name}{ext}", images, IDX_IMAGES)
        write_idx(folder / f"{label_name}{ext}", labels, IDX_LABELS)
        out[split] = (images, labels)
    return out


def mnist_cfg(**kw):
    base = OmegaConf.load(REPO / "conf" / "dataset" / "mnist.yaml")
    base.root = None  # ${paths.data_dir} has nothing to resolve against here
    return OmegaConf.merge(base, kw)


@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision_raw"])
def test_idx_files_load_as_uint8_splits(tmp_path, layout):
    folder = (
        tmp_path / "mnist" / "MNIST" / "raw" if layout == "torchvision_raw" else tmp_path / "mnist"
    )
    ref = write_mnist(folder, gz=layout != "plain")
    ds = load_dataset(mnist_cfg(path=str(tmp_path / "mnist")), cache_dir=tmp_path / "cache")
    assert ds.train.images.dtype == torch.uint8 and ds.input_shape == (1, 28, 28)
    assert ds.train.images.shape == (40, 1, 28, 28) and ds.test.images.shape == (20, 1, 28, 28)
    for split in ("train", "test"):
        got = getattr(ds, split)
        assert torch.equal(got.images[:, 0], torch.from_numpy(ref[split][0]))
        assert got.labels.dtype == torch.int64
        assert got.labels.tolist() == ref[split][1].tolist()
    assert ds.num_classes == 10 and ds.classes[0] == "0 - zero"  # torchvision's names
    assert ds.mean == pytest.approx((0.1307,)) and ds.std == pytest.approx((0.3081,))
    assert not ds.augment
    assert not (tmp_path / "cache").exists()  # IDX files are read directly, not cached


def test_stats_are_computed_on_the_training_split_when_null(tmp_path):
    write_mnist(tmp_path / "m", gz=True)
    ds = load_dataset(mnist_cfg(path=str(tmp_path / "m"), mean=None, std=None))
    mean, std = channel_stats(ds.train.images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    assert ds.mean[0] == pytest.approx(127.5 / 255, abs=0.01)  # uniform random pixels


def test_limits_take_stratified_subsets(tmp_path):
    write_mnist(tmp_path / "m")
    ds = load_dataset(mnist_cfg(path=str(tmp_path / "m"), train_limit=20, test_limit=10))
    assert len(ds.train) == 20 and len(ds.test) == 10
    assert torch.bincount(ds.train.labels).tolist() == [2] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1] * 10


def test_three_channels_and_a_resize(tmp_path):
    write_mnist(tmp_path / "m")
    ds = load_dataset(mnist_cfg(path=str(tmp_path / "m"), channels=3, image_size=32))
    assert ds.input_shape == (3, 32, 32) and ds.train.images.is_contiguous()
    assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])


def test_read_idx_checks_the_magic_number_and_the_size(tmp_path):
    labels = tmp_path / "labels.gz"
    write_idx(labels, np.arange(5, dtype=np.uint8), IDX_LABELS)
    assert read_idx(labels, IDX_LABELS).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DatasetError) as err:
        read_idx(labels, IDX_IMAGES)
    msg = str(err.value)
    assert f"{labels} is not an MNIST image file" in msg and "0x00000801" in msg
    assert "expected 0x00000803" in msg and "\n" not in msg
    truncated = tmp_path / "short"
    truncated.write_bytes(struct.pack(">IIII", IDX_IMAGES, 3, 28, 28) + bytes(100))
    with pytest.raises(DatasetError, match=r"holds 100 bytes after its header.*3×28×28"):
        read_idx(truncated, IDX_IMAGES)
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match=r"cannot read the MNIST label file .*x\.gz"):
        read_idx(not_gzip, IDX_LABELS)


def test_swapped_files_are_a_bad_magic_error(tmp_path):
    write_mnist(tmp_path / "m")
    train_images = tmp_path / "m" / "train-images-idx3-ubyte"
    write_idx(train_images, np.zeros(40, np.uint8), IDX_LABELS)  # a label file by that name
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte is not an MNIST image file"):
        load_dataset(mnist_cfg(path=str(tmp_path / "m")))


def test_image_and_label_counts_must_match(tmp_path):
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8), IDX_LABELS)
    with pytest.raises(DatasetError) as err:
        load_dataset(mnist_cfg(path=str(tmp_path / "m")))
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte holds 20 images" in msg
    assert "t10k-labels-idx1-ubyte holds 19 labels" in msg and "\n" not in msg


def test_a_missing_idx_file_is_named_with_the_alternatives(tmp_path):
    write_mnist(tmp_path / "m", gz=True)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(mnist_cfg(path=str(tmp_path / "m")))
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz) is missing from" in msg
    assert str(tmp_path / "m") in msg and "ImageFolder tree" in msg
    assert "dataset.download=true" in msg and "\n" not in msg


def test_a_folder_with_neither_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset(mnist_cfg(path=str(tmp_path / "empty")))
    msg = str(err.value)
    assert "holds neither MNIST's IDX files (train-images-idx3-ubyte" in msg
    assert str(tmp_path / "empty" / "MNIST" / "raw") in msg and "train/<class>/*" in msg
    assert "download MNIST with torchvision" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match=r"dataset\.path='.*nope' does not exist"):
        load_dataset(mnist_cfg(path=str(tmp_path / "nope")))


def test_an_imagefolder_copy_is_read_as_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for digit in ("0", "1", "2"):
            d = tmp_path / "tree" / split / digit
            d.mkdir(parents=True)
            for i in range(n):  # RGB files: channels=1 still reads them as one gray channel
                img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    ds = load_dataset(mnist_cfg(path=str(tmp_path / "tree")), cache_dir=tmp_path / "cache")
    assert ds.train.images.shape == (12, 1, 28, 28) and ds.test.images.shape == (6, 1, 28, 28)
    assert ds.classes == ["0", "1", "2"] and torch.bincount(ds.train.labels).tolist() == [4] * 3
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # decoded once, cached


def test_torchvision_mnist_on_files_already_in_its_root(tmp_path):
    """The online path: torchvision's MNIST finds its raw files and downloads nothing."""
    ref = write_mnist(tmp_path / "data" / "MNIST" / "raw")
    ds = load_dataset(mnist_cfg(root=str(tmp_path / "data"), download=True, train_limit=30))
    assert ds.train.images.shape == (30, 1, 28, 28) and ds.test.images.shape == (20, 1, 28, 28)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(ref["test"][0]))
    assert ds.classes[9] == "9 - nine"


def test_missing_without_download_is_a_one_line_error(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(mnist_cfg(root=str(tmp_path / "data"), download=False))
    msg = str(err.value)
    assert f"MNIST not found under dataset.root={str(tmp_path / 'data')!r}" in msg
    assert "dataset.download=true" in msg and "dataset.path=/path/to/mnist" in msg
    assert "\n" not in msg


def test_a_failed_download_says_why_and_points_at_dataset_path(tmp_path, monkeypatch):
    """Without network: torchvision's mirrors are pointed at a port nobody listens on."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:1/", "http://127.0.0.1:1/mirror2/"])
    monkeypatch.setenv("no_proxy", "*")  # straight to 127.0.0.1:1, whatever proxy is set
    with pytest.raises(DatasetError) as err:
        load_dataset(mnist_cfg(root=str(tmp_path / "data"), download=True))
    msg = str(err.value)
    assert "dataset=mnist: downloading MNIST into dataset.root=" in msg
    assert "failed (Connection refused);" in msg  # both mirrors' reason, said once
    assert "dataset.path=/path/to/mnist" in msg and "train-images-idx3-ubyte" in msg
    assert "\n" not in msg


def test_a_timeout_during_the_download_is_a_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def stalled(*a, **k):
        raise TimeoutError("timed out")  # not a URLError: torchvision's mirror loop lets it through

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", stalled)
    with pytest.raises(DatasetError, match=r"downloading MNIST into .* failed \(timed out\)"):
        load_dataset(mnist_cfg(root=str(tmp_path / "data"), download=True))


def test_a_study_runs_on_idx_files_from_the_cli(tmp_path):
    write_mnist(tmp_path / "idx", gz=True)
    root = tmp_path / "runs"
    overrides = [
        "dataset=mnist",
        f"dataset.path={tmp_path / 'idx'}",
        "search.n_trials=1",
        "cv.folds=2",
        "train.epochs=2",
        "train.finetune_epochs=1",
        "front.points=4",
        "refit.enabled=false",
        "console.progress=false",
    ]
    res = run_here(root, *overrides, cwd=tmp_path)  # the command line's path, in this process
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(
        study_name="mnist-lenet300-agp", storage=f"sqlite:///{root}/optuna.db"
    )
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert 0.0 <= trial.values[0] <= 1.0 and trial.values[1] > 0.0
