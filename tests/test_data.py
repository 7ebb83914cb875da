import pickle

import numpy as np
import pytest
import torch
from images import tree_with_a_bad_file
from omegaconf import OmegaConf
from PIL import Image

from dtp_search.data import (
    DatasetError,
    Split,
    TensorBatches,
    load_dataset,
    load_imagefolder,
    random_crop_flip,
)
from dtp_search.data import imagefolder as imagefolder_mod


def test_digits_is_uint8_with_a_fixed_stratified_split():
    cfg = OmegaConf.create({"kind": "digits", "name": "digits"})
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 360
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.test.images, b.test.images)
    assert torch.bincount(a.test.labels).min() >= 35  # every class in the test split


def test_random_crop_flip_is_a_per_sample_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shapes = set()
    for i in range(len(x)):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        windows += [w.flip(-1) for w in windows]
        match = [j for j, w in enumerate(windows) if torch.equal(out[i], w)]
        assert match, f"sample {i} is not a crop/flip of its padded image"
        shapes.add(match[0])
    assert len(shapes) > 10  # offsets really differ between samples


def test_tensor_batches_cover_the_fold_once_and_normalise():
    split = Split(
        torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).repeat(1, 1, 2, 2), torch.arange(20)
    )
    idx = np.array([1, 3, 5, 7, 9, 11, 13])
    batches = TensorBatches(split, idx, batch_size=3, mean=[0.5], std=[0.25], shuffle=True)
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == idx.tolist() and len(batches) == 3
    x, y = next(iter(TensorBatches(split, idx, batch_size=7, mean=[0.5], std=[0.25])))
    assert torch.allclose(x[:, 0, 0, 0], (y.float() / 255 - 0.5) / 0.25)


def test_subsample_keeps_class_shares_within_the_given_indices():
    labels = torch.arange(300) % 3  # three classes, 100 each
    split = Split(torch.zeros(300, 1, 2, 2, dtype=torch.uint8), labels)
    idx = np.arange(0, 300, 2)  # 150 indices, 50 per class
    batches = TensorBatches(split, idx, batch_size=16, mean=[0.0], std=[1.0])
    sub = batches.subsample(30)
    picked = sub.indices.numpy()
    assert sub.num_samples == 30 and set(picked) <= set(idx)
    assert np.bincount(labels[picked].numpy()).tolist() == [10, 10, 10]
    assert torch.equal(sub.subsample(30).indices, sub.indices)  # already small enough: itself
    assert batches.subsample(500) is batches and batches.num_samples == 150


def _write_tree(root, n_per_class=6, size=(10, 10), mode="RGB"):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "emu"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                shape = (*size, 3) if mode == "RGB" else size
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png"
                )


def test_imagefolder_decodes_caches_and_invalidates(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    split, classes = load_imagefolder(tmp_path / "tree" / "train", cache_dir=cache)
    assert classes == ["cat", "dog", "emu"] and split.images.shape == (18, 3, 10, 10)
    ref = np.asarray(Image.open(tmp_path / "tree/train/dog/0.png"))
    assert torch.equal(split.images[6].permute(1, 2, 0), torch.from_numpy(ref))
    assert len(list(cache.glob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(imagefolder_mod, "decode_all", boom)
    again, _ = load_imagefolder(tmp_path / "tree" / "train", cache_dir=cache)
    assert torch.equal(again.images, split.images)
    monkeypatch.undo()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "tree/train/emu/new.png")
    grown, _ = load_imagefolder(tmp_path / "tree" / "train", cache_dir=cache)
    assert len(grown) == 19  # the new file changed the key


@pytest.mark.parametrize("channels", [None, 3])
def test_a_corrupt_image_is_named_and_nothing_is_cached(tmp_path, channels):
    bad = tree_with_a_bad_file(tmp_path / "tree")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        load_imagefolder(tmp_path / "tree" / "train", channels=channels, cache_dir=cache)
    msg = str(err.value)
    assert f"cannot decode the image {bad} (" in msg and "dataset.skip_bad_files=true" in msg
    assert "\n" not in msg and ".cpp" not in msg  # torchvision's source location is left out
    assert not list(cache.glob("*.pt"))


def test_skip_bad_files_leaves_them_out_with_one_warning_also_from_the_cache(tmp_path, caplog):
    bad = tree_with_a_bad_file(tmp_path / "tree")
    cache = tmp_path / "cache"
    cfg = OmegaConf.create(
        {
            "kind": "imagefolder",
            "name": "t",
            "path": str(tmp_path / "tree"),
            "channels": None,
            "skip_bad_files": True,
        }
    )
    for _ in range(2):  # decoded, then read from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="dtp_search.data.decode"):
            ds = load_dataset(cfg, cache_dir=cache)
        assert len(ds.train) == 8 and len(ds.test) == 8 and ds.input_shape == (3, 10, 10)
        assert torch.bincount(ds.train.labels).tolist() == [4, 4]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "skipped 1 unreadable file(s)" in warnings[0]
        assert str(bad) in warnings[0] and "\n" not in warnings[0]
    assert len(list(cache.glob("*.pt"))) == 2  # train and test
    # A strict load does not take the lenient one's cache entry.
    with pytest.raises(DatasetError, match="cannot decode the image"):
        load_dataset(OmegaConf.merge(cfg, {"skip_bad_files": False}), cache_dir=cache)


def test_a_class_with_only_unreadable_files_is_an_error(tmp_path):
    tree_with_a_bad_file(tmp_path / "tree")
    for f in (tmp_path / "tree" / "train" / "dog").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"\['dog'\] under .* hold no readable image"):
        load_imagefolder(tmp_path / "tree" / "train", skip_bad_files=True)


def test_imagefolder_dataset_detects_grayscale(tmp_path):
    _write_tree(tmp_path / "g", mode="L")
    cfg = OmegaConf.create(
        {
            "kind": "imagefolder",
            "name": "g",
            "path": str(tmp_path / "g"),
            "channels": None,
            "mean": None,
            "std": None,
        }
    )
    ds = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert ds.input_shape == (1, 10, 10) and ds.num_classes == 3 and len(ds.mean) == 1


def test_missing_imagefolder_path_says_what_to_do(tmp_path):
    cfg = OmegaConf.create({"kind": "cifar10", "name": "c", "path": str(tmp_path / "nope")})
    with pytest.raises(DatasetError, match=r"dataset\.path"):
        load_dataset(cfg)


def test_cifar10_imagefolder_copy_with_a_subset(cifar10_dir, tmp_path):
    cfg = OmegaConf.create(
        {
            "kind": "cifar10",
            "name": "cifar10",
            "path": str(cifar10_dir),
            "channels": 3,
            "train_limit": 200,
            "test_limit": 50,
            "mean": [0.49, 0.48, 0.45],
            "std": [0.25, 0.24, 0.26],
            "augment": True,
        }
    )
    ds = load_dataset(cfg, cache_dir=tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) == 200 and len(ds.test) == 50
    assert torch.bincount(ds.train.labels).tolist() == [20] * 10


def test_torchvision_cifar10_download_path_on_local_images(cifar10_dir, tmp_path, monkeypatch):
    """The online path (torchvision's CIFAR10) fed with batches built from the local copy.

    Files in torchvision's pickle layout are written from a few local images, and the
    md5 check is patched out; everything else is torchvision's own code, no network.
    """
    import torchvision.datasets.cifar as tv_cifar

    classes = sorted(p.name for p in (cifar10_dir / "train").iterdir())
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    def batch(split, n):
        imgs, labels = [], []
        for c, name in enumerate(classes):
            for f in sorted((cifar10_dir / split / name).iterdir())[:n]:
                imgs.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1))
                labels.append(c)
        return {"data": np.stack(imgs), "labels": labels}

    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch("train", 2), fh)
    with open(base / "test_batch", "wb") as fh:
        pickle.dump(batch("test", 3), fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": classes}, fh)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    cfg = OmegaConf.create(
        {
            "kind": "cifar10",
            "name": "cifar10",
            "path": None,
            "root": str(tmp_path),
            "download": True,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        }
    )
    ds = load_dataset(cfg)
    assert ds.train.images.shape == (100, 3, 32, 32) and len(ds.test) == 30
    assert ds.classes == classes


def test_torchvision_cifar10_missing_without_download_is_a_clear_error(tmp_path):
    cfg = OmegaConf.create(
        {
            "kind": "cifar10",
            "name": "cifar10",
            "path": None,
            "root": str(tmp_path),
            "download": False,
        }
    )
    with pytest.raises(DatasetError, match=r"dataset\.path"):
        load_dataset(cfg)


def test_a_failed_cifar10_download_says_why_and_points_at_dataset_path(tmp_path, monkeypatch):
    """Without network: torchvision's download URL is pointed at a port nobody listens on."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:1/cifar-10-python.tar.gz")
    monkeypatch.setenv("no_proxy", "*")  # straight to 127.0.0.1:1, whatever proxy is set
    cfg = OmegaConf.create(
        {
            "kind": "cifar10",
            "name": "cifar10",
            "path": None,
            "root": str(tmp_path / "data"),
            "download": True,
        }
    )
    with pytest.raises(DatasetError) as err:
        load_dataset(cfg)
    msg = str(err.value)
    assert "downloading CIFAR-10 into dataset.root=" in msg and "failed (Connection refused)" in msg
    assert "dataset.path=/path/to/cifar10" in msg and "train/" in msg and "test/" in msg


def test_channels_last_batches_hold_the_same_values():
    split = Split(torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4)
    kw = {
        "batch_size": 16,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "shuffle": True,
        "augment": True,
        "crop_padding": 2,
        "seed": 3,
    }
    plain = list(TensorBatches(split, None, **kw))
    nhwc = list(TensorBatches(split, None, channels_last=True, **kw))
    for (xa, ya), (xb, yb) in zip(plain, nhwc, strict=True):
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
