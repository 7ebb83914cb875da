"""The L1 penalty's schedule (train.l1_start_epoch) and reach (train.l1_bias) in
prune_and_train: one plain-SGD step per epoch on a tiny MLP, so that every difference
between two runs is the penalty's own -lr·λ·sign(·) term."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dtp_search.data import TensorBatches, load_dataset
from dtp_search.models import build_model
from dtp_search.pruning import ConstantThreshold, DynamicPruner
from dtp_search.pruning.masks import LayerSelection
from dtp_search.settings import FrontSettings, TrainSettings
from dtp_search.training import prune_and_train

LR, L1 = 0.5, 0.01


@pytest.fixture(scope="module")
def ds():
    return load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))


def _run(ds, epochs: int, **settings):
    """(model, history, per-epoch copies of the parameters) of one seeded run whose
    masks never change (the threshold policy starts after the run)."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"arch": "mlp", "hidden": [8]}), ds.input_shape, 10)
    # net.1 is pruned (masked), the classifier net.3 stays dense.
    pruner = DynamicPruner(
        model,
        ConstantThreshold(0.0, start_epoch=100),
        min_keep=0,
        layers=LayerSelection(exclude_classifier=True),
    )
    assert list(pruner.masks) == ["net.1"]
    train = TensorBatches(ds.train, np.arange(64), batch_size=64, mean=ds.mean, std=ds.std)
    snapshots = [_params(model)]
    s = TrainSettings(
        epochs=epochs,
        finetune_epochs=0,
        lr=LR,
        momentum=0.0,
        weight_decay=0.0,
        lr_schedule="constant",
        **settings,
    )
    result = prune_and_train(
        model,
        pruner,
        train,
        train,
        s,
        front=FrontSettings(points=0),
        on_epoch=lambda r: snapshots.append(_params(model)),
    )
    return result.history, snapshots


def _params(model) -> dict[str, torch.Tensor]:
    layers = {
        "w1": model.net[1].weight,
        "b1": model.net[1].bias,
        "w3": model.net[3].weight,
        "b3": model.net[3].bias,
    }
    return {k: v.detach().clone() for k, v in layers.items()}


def test_l1_penalty_is_absent_before_l1_start_epoch_and_present_from_it(ds):
    plain, plain_w = _run(ds, 3)
    late, late_w = _run(ds, 3, l1=L1, l1_start_epoch=2)
    early, _ = _run(ds, 3, l1=L1)
    # Epochs with 0-based index 0 and 1: plain CE, bit for bit the unpenalised run.
    assert [r.loss for r in late[:2]] == [r.loss for r in plain[:2]]
    assert all(late_w[i][k].equal(plain_w[i][k]) for i in range(3) for k in plain_w[i])
    # Epoch index 2: the loss adds λ·Σ|W ⊙ M| of the pruned layer only (here M = 1) …
    before = plain_w[2]["w1"]
    assert late[2].loss - plain[2].loss == pytest.approx(L1 * before.abs().sum().item(), rel=1e-4)
    # … and SGD's step adds -lr·λ·sign(W) to the pruned layer's weights, nothing else.
    diff = late_w[3]["w1"] - plain_w[3]["w1"]
    assert torch.allclose(diff, -LR * L1 * torch.sign(before), atol=1e-6)
    assert late_w[3]["w3"].equal(plain_w[3]["w3"]) and late_w[3]["b1"].equal(plain_w[3]["b1"])
    # l1_start_epoch=0 penalises from the first epoch on.
    init = plain_w[0]["w1"]
    assert early[0].loss - plain[0].loss == pytest.approx(L1 * init.abs().sum().item(), rel=1e-4)


def test_l1_bias_shrinks_the_pruned_layers_biases(ds):
    _, without = _run(ds, 1, l1=L1)
    _, with_bias = _run(ds, 1, l1=L1, l1_bias=True)
    b0 = without[0]["b1"]
    diff = with_bias[1]["b1"] - without[1]["b1"]
    assert torch.allclose(diff, -LR * L1 * torch.sign(b0), atol=1e-6)
    assert with_bias[1]["b1"].abs().sum() < without[1]["b1"].abs().sum()
    # The weights' penalty is the same either way; the dense classifier is not penalised.
    assert torch.allclose(with_bias[1]["w1"], without[1]["w1"], atol=1e-7)
    assert with_bias[1]["b3"].equal(without[1]["b3"]) and with_bias[1]["w3"].equal(without[1]["w3"])


def test_cv_repeats_trains_folds_times_repeats_folds_each_repeat_covering_the_split(ds):
    from dtp_search.training import FoldHooks, cross_validate

    started = []
    hooks = FoldHooks(on_fold_start=started.append)
    model_cfg = OmegaConf.create({"arch": "mlp", "hidden": [8]})

    def make_pruner(m):
        return DynamicPruner(m, ConstantThreshold(0.0, start_epoch=100), min_keep=0)

    result = cross_validate(
        ds,
        folds=2,
        repeats=3,
        seed=0,
        make_model=lambda: build_model(model_cfg, ds.input_shape, 10),
        make_pruner=make_pruner,
        settings=TrainSettings(epochs=1, finetune_epochs=0, batch_size=256),
        front=FrontSettings(points=0),
        hooks=hooks,
    )
    assert started == list(range(6)) and len(result.folds) == 6
    # repeats=1 is StratifiedKFold(shuffle=True) itself: the studies made before keep their folds
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold

    y = ds.train.labels.numpy()
    x = np.zeros(len(y))
    old = [v.tolist() for _, v in StratifiedKFold(2, shuffle=True, random_state=0).split(x, y)]
    new = RepeatedStratifiedKFold(n_splits=2, n_repeats=3, random_state=0).split(x, y)
    new = [v.tolist() for _, v in new]
    assert new[:2] == old and new[2:4] != old
    assert all(sorted(new[r] + new[r + 1]) == list(range(len(y))) for r in (0, 2, 4))
