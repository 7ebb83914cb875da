"""``model=custom``: the user's own network, by ``_target_``, with keyword arguments, the
class count passed in, its output checked, and ``model.checkpoint``: trials and the refit
start from trained weights, the checkpoint is measured unpruned once, and a resume with
other weights is refused. Networks come from tests/user_nets.py, "the user's package"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from inprocess import isolated, run_here
from mlflow.tracking import MlflowClient
from user_nets import PatchAttention, TinyConvNet

from dtp_search.data import TensorBatches, load_dataset
from dtp_search.errors import ConfigError
from dtp_search.models import apply_checkpoint, build_custom, load_checkpoint, start_model
from dtp_search.models.export import load_pruned
from dtp_search.training import evaluate

TINY = ["cv.folds=2", "front.points=2", "console.progress=false", "search.n_trials=1"]
CUSTOM = ["model=custom", "model._target_=user_nets.TinyConvNet", "+model.width=12"]


def _custom(target: str, **args) -> dict:
    return {"name": "n", "arch": "custom", "_target_": target, **args}


def test_keys_are_keyword_arguments_and_the_class_count_is_passed():
    net = build_custom(_custom("user_nets.TinyConvNet", width=4), num_classes=7)
    assert isinstance(net, TinyConvNet) and net.head.out_features == 7
    assert net.stem[0].out_channels == 4
    # torchvision's builders take num_classes through **kwargs
    resnet = build_custom(_custom("torchvision.models.resnet18"), num_classes=3)
    assert resnet.fc.out_features == 3
    # a set num_classes wins; a factory without the argument does not get it
    assert build_custom(_custom("user_nets.TinyConvNet", num_classes=5), 7).head.out_features == 5
    assert build_custom(_custom("user_nets.no_class_count"), 7)[1].out_features == 10


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("user_nets_nowhere.Net", "cannot be imported (No module named 'user_nets_nowhere')"),
        ("user_nets.Nowhere", "cannot be imported (module 'user_nets' has no attribute 'Nowhere')"),
        ("user_nets.broken", "raised RuntimeError: width must be even"),
        ("user_nets.not_a_module", "returned a str; allowed: a callable that returns an nn.Module"),
    ],
)
def test_factories_that_cannot_build_a_network_are_named(target, fragment):
    with pytest.raises(ConfigError, match=r"model\._target_=") as err:
        build_custom(_custom(target), 10)
    assert fragment in str(err.value) and target in str(err.value)


def _trained_checkpoint(path: Path, width: int = 12, epochs: int = 20) -> float:
    """Train a TinyConvNet on digits the way a user would (plain PyTorch, own loop), save
    its state_dict wrapped as {"state_dict": ...}; return its test accuracy."""
    ds = load_dataset({"kind": "digits", "name": "digits"})
    torch.manual_seed(0)
    net = TinyConvNet(num_classes=10, width=width)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    train = TensorBatches(ds.train, None, batch_size=64, mean=ds.mean, std=ds.std, shuffle=True)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    torch.save({"state_dict": net.state_dict(), "epoch": epochs}, path)
    test = TensorBatches(ds.test, None, batch_size=1024, mean=ds.mean, std=ds.std)
    return evaluate(net, test)


def test_checkpoint_formats_and_misfits(tmp_path):
    net = TinyConvNet(10, width=6)
    for name, blob in (
        ("plain", net.state_dict()),
        ("wrapped", {"model": net.state_dict()}),
        ("parallel", {f"module.{k}": v for k, v in net.state_dict().items()}),
    ):
        torch.save(blob, tmp_path / name)
        other = TinyConvNet(10, width=6)
        apply_checkpoint(other, load_checkpoint(tmp_path / name), name)
        assert all(
            torch.equal(a, b)
            for a, b in zip(other.state_dict().values(), net.state_dict().values(), strict=True)
        )
    with pytest.raises(
        ConfigError,
        match=r"does not fit the network \(.*shape mismatches "
        r"\(checkpoint vs network\): stem.0.weight \[6, 1, 3, 3\] vs \[8, 1, 3, 3\]",
    ):
        apply_checkpoint(TinyConvNet(10, width=8), load_checkpoint(tmp_path / "plain"), "plain")
    with pytest.raises(ConfigError, match=r"missing keys: .*unexpected keys: "):
        apply_checkpoint(PatchAttention(10), load_checkpoint(tmp_path / "plain"), "plain")
    torch.save([1, 2, 3], tmp_path / "list")
    with pytest.raises(ConfigError, match="holds no state_dict"):
        load_checkpoint(tmp_path / "list")
    (tmp_path / "junk").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        load_checkpoint(tmp_path / "junk")
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.slow
def test_a_custom_network_from_a_checkpoint_end_to_end(tmp_path):
    ckpt = tmp_path / "digits_tiny.pt"
    trained = _trained_checkpoint(ckpt)
    assert trained > 0.8  # a really trained network (chance is 0.1)
    root = tmp_path / "runs"
    # policy=dense with a learning rate too small to move anything: the folds score the
    # checkpoint itself, so a trial that started from it is plain to see.
    start = [
        *CUSTOM,
        f"model.checkpoint={ckpt}",
        "policy=dense",
        "train.epochs=0",
        "train.finetune_epochs=1",
        "train.lr=1e-7",
        *TINY,
    ]
    first = run_here(root, *start)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(
        study_name="digits-TinyConvNet-dense", storage=f"sqlite:///{root}/optuna.db"
    )
    (trial,) = study.trials
    assert trial.user_attrs["cv_accuracy"] > 0.6  # from scratch this is ~0.1
    assert study.user_attrs["config"]["model.width"] == 12
    assert "model.checkpoint_digest" in study.user_attrs["config"]
    assert "model.checkpoint" not in study.user_attrs["config"]  # a location, not a definition
    baseline = study.user_attrs["checkpoint_baseline"]
    assert baseline["test_accuracy"] == pytest.approx(trained, abs=1e-6)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == study.study_name]
    (refit,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dtp_search.role` = 'refit'"
    )
    parent_id = refit.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.metrics["checkpoint_test_accuracy"] == pytest.approx(
        trained
    )
    assert refit.data.metrics["checkpoint_test_accuracy"] == pytest.approx(trained)
    # (a learning rate of 1e-7 moves no weight, but an epoch in training mode refreshes
    # the batch-norm statistics: close to the checkpoint, not equal)
    assert refit.data.metrics["test_accuracy"] > 0.6
    front = client.download_artifacts(refit.info.run_id, "front.json", str(tmp_path))
    assert '"checkpoint"' in Path(front).read_text()

    # The refit's models reload as the user's own class with the same outputs.
    import mlflow.pytorch

    with isolated():
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        reloaded = mlflow.pytorch.load_model(refit.data.tags["dtp_search.model_uri"])
    sparse = load_pruned(refit.info.run_id, tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert type(reloaded) is TinyConvNet and type(sparse) is TinyConvNet
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), sparse(x), atol=1e-6)

    # The same weights elsewhere resume the study; other weights are refused, naming the digest.
    moved = tmp_path / "elsewhere.pt"
    shutil.copyfile(ckpt, moved)
    again = run_here(root, *[a.replace(str(ckpt), str(moved)) for a in start])
    assert again.returncode == 0, again.stderr[-3000:]
    other = tmp_path / "other.pt"
    _trained_checkpoint(other, epochs=1)
    before = (root / "optuna.db").read_bytes()
    drift = run_here(root, *[a.replace(str(ckpt), str(other)) for a in start])
    assert drift.returncode == 2
    assert "model.checkpoint_digest: '" in drift.stderr and "study.allow_changes" in drift.stderr
    assert (root / "optuna.db").read_bytes() == before


def test_start_model_loads_the_checkpoint_for_built_in_networks_too(tmp_path):
    cfg = {"name": "mlp", "arch": "mlp", "hidden": [16]}
    net = start_model(cfg, (1, 8, 8), 10)
    torch.save(net.state_dict(), tmp_path / "mlp.pt")
    again = start_model({**cfg, "checkpoint": str(tmp_path / "mlp.pt")}, (1, 8, 8), 10)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype("float32"))
    assert torch.equal(net(x), again(x))


FAKE = [
    "dataset=torchvision",
    "dataset._target_=torchvision.datasets.FakeData",
    "+dataset.size=96",
    "+dataset.args.image_size=[3,32,32]",
    "+dataset.num_classes=3",
    "dataset.test_fraction=0.25",
]
ONE_EPOCH = ["train.epochs=1", "train.finetune_epochs=1", "train.batch_size=16", *TINY]


def _refit_run(root: Path, study_name: str):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == study_name]
    (refit,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dtp_search.role` = 'refit'"
    )
    return client, refit


def _reloads_as(root: Path, refit, cls: type) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The refit's MLflow model and its sparse export, reloaded: both the user's class."""
    import mlflow.pytorch

    with isolated():
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        pickled = mlflow.pytorch.load_model(refit.data.tags["dtp_search.model_uri"]).eval()
    sparse = load_pruned(refit.info.run_id, tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert type(pickled) is cls and type(sparse) is cls
    return pickled, sparse


@pytest.mark.slow
def test_a_torchvision_network_with_depthwise_convolutions_end_to_end(tmp_path):
    """torchvision's MobileNetV3 (depthwise and grouped convolutions, squeeze-excitation,
    hard-swish) on torchvision's FakeData, through the command line; the refit's model
    reloads as MobileNetV3 and scores the logged test accuracy on the test split."""
    from torchvision.models import MobileNetV3

    root = tmp_path / "runs"
    run = run_here(
        root,
        "model=custom",
        "model._target_=torchvision.models.mobilenet_v3_small",
        "policy.final_sparsity=0.6",
        "~policy.space.final_sparsity",
        *FAKE,
        *ONE_EPOCH,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _, refit = _refit_run(root, "fakedata-mobilenet_v3_small-agp")
    pickled, sparse = _reloads_as(root, refit, MobileNetV3)
    ds = load_dataset(
        {
            "kind": "torchvision",
            "name": "fakedata",
            "_target_": "torchvision.datasets.FakeData",
            "test_fraction": 0.25,
            "args": {"size": 96, "image_size": [3, 32, 32], "num_classes": 3},
        }
    )
    test = TensorBatches(
        ds.test, None, batch_size=64, mean=sparse.dtp_config["mean"], std=sparse.dtp_config["std"]
    )
    # (the refit scored channels-last tensors: a near tie may flip one prediction)
    one = 1.01 / len(ds.test)
    assert evaluate(sparse, test) == pytest.approx(refit.data.metrics["test_accuracy"], abs=one)
    assert evaluate(pickled, test) == pytest.approx(refit.data.metrics["test_accuracy"], abs=one)
    depthwise = [
        n for n, m in sparse.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
    ]
    assert depthwise and any((sparse.get_submodule(n).weight == 0).any() for n in depthwise)
    assert refit.data.metrics["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert refit.data.metrics["flops_effective"] < refit.data.metrics["flops_dense"]


@pytest.mark.slow
def test_a_network_with_multi_head_attention_end_to_end(tmp_path):
    """The user's transformer block (tests/user_nets.py) on digits: the attention's input
    and output projections are pruned, selected by name; the refit reloads as the user's
    class with the same outputs from both exports."""
    root = tmp_path / "runs"
    run = run_here(
        root,
        "model=custom",
        "model._target_=user_nets.PatchAttention",
        "policy.layers.include=[attn.*]",
        "policy.final_sparsity=0.5",
        "~policy.space.final_sparsity",
        *ONE_EPOCH,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    client, refit = _refit_run(root, "digits-PatchAttention-agp")
    layers = json.loads(
        Path(
            client.download_artifacts(refit.info.run_id, "layer_sparsity.json", str(tmp_path))
        ).read_text()
    )
    selected = {"attn.in_proj", "attn.out_proj"}
    assert selected < set(layers) and {"patches", "mix", "classifier"} <= set(layers)
    assert all(v > 0.2 if name in selected else v == 0 for name, v in layers.items())
    pickled, sparse = _reloads_as(root, refit, PatchAttention)
    assert (sparse.attn.in_proj_weight == 0).float().mean() > 0.2
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pickled(x), sparse(x), atol=1e-6)
