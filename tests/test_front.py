import itertools

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from dtp_search.data import TensorBatches, load_dataset
from dtp_search.models import build_model
from dtp_search.pruning import AGPThreshold, DynamicPruner, pareto_mask, sparsity
from dtp_search.pruning.front import one_shot_sweep, sweep_targets
from dtp_search.settings import FrontSettings, TrainSettings
from dtp_search.training import FoldHooks, cross_validate, prune_and_train


def test_sweep_targets_rise_to_the_cap():
    t = sweep_targets(0.5, 10, 0.995)
    assert len(t) == 10 and all(b > a for a, b in itertools.pairwise(t))
    assert t[0] > 0.5 and abs(t[-1] - 0.995) < 1e-9


def test_one_shot_sweep_restores_masks_and_reaches_99_percent():
    net = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    pruner = DynamicPruner(net, AGPThreshold(0.5, end_epoch=1), min_keep=0)
    calls = []
    points = one_shot_sweep(pruner, lambda m: calls.append(sparsity(m)) or 0.5, n_points=8)
    assert len(points) == 8 and points[-1].sparsity >= 0.99
    assert [p.sparsity for p in points] == sorted(p.sparsity for p in points)
    assert sparsity(net) == 0.0  # restored


def test_each_sweep_point_records_the_global_threshold_it_cut_at():
    """tighten_globally returns its θ: a sweep point's threshold is that θ, rising with it."""
    net = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    pruner = DynamicPruner(net, AGPThreshold(0.5, end_epoch=1), min_keep=0)
    points = one_shot_sweep(pruner, lambda m: 0.5, n_points=4)
    thetas = [p.threshold for p in points]
    assert all(isinstance(t, float) and t > 0 for t in thetas)
    assert thetas == sorted(thetas)


def test_pareto_mask():
    v = np.array([[0.9, 0.5], [0.8, 0.6], [0.7, 0.4], [0.9, 0.5]])
    assert pareto_mask(v).tolist() == [True, True, False, True]


def _digits():
    return load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))


def test_prune_and_train_records_a_front_and_meets_the_target():
    ds = _digits()
    model = build_model(OmegaConf.create({"arch": "mlp", "hidden": [64]}), ds.input_shape, 10)
    pruner = DynamicPruner(model, AGPThreshold(0.8, start_epoch=1, end_epoch=3, update_every=5))
    idx = np.arange(len(ds.train))
    train = TensorBatches(
        ds.train, idx[:1000], batch_size=64, mean=ds.mean, std=ds.std, shuffle=True
    )
    val = TensorBatches(ds.train, idx[1000:], batch_size=512, mean=ds.mean, std=ds.std)
    res = prune_and_train(
        model, pruner, train, val, TrainSettings(epochs=4, finetune_epochs=1, lr=0.1)
    )
    sources = [p.source for p in res.front]
    assert (
        sources.count("update") >= 3 and sources.count("final") == 1 and sources.count("sweep") >= 8
    )
    assert max(p.sparsity for p in res.front) >= 0.99
    assert abs(res.sparsity - 0.8) < 0.01 and res.accuracy > 0.8
    assert [r.epoch for r in res.history] == [1, 2, 3, 4, 5]
    assert res.history[-1].phase == "finetune"
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.all(first.weight[first.parametrizations.weight[0].mask == 0] == 0)


def test_cross_validate_uses_stratified_folds_of_the_training_split_only():
    ds = _digits()
    seen = []
    res = cross_validate(
        ds,
        folds=3,
        seed=0,
        make_model=lambda: build_model(
            OmegaConf.create({"arch": "mlp", "hidden": [32]}), ds.input_shape, 10
        ),
        make_pruner=lambda m: DynamicPruner(m, AGPThreshold(0.5, start_epoch=0, end_epoch=1)),
        settings=TrainSettings(epochs=1, finetune_epochs=0),
        front=FrontSettings(points=8),
        hooks=FoldHooks(on_fold_end=lambda k, r: seen.append(k)),
    )
    assert seen == [0, 1, 2] and len(res.folds) == 3
    assert 0 <= res.accuracy_std < 0.2 and abs(res.sparsity - 0.5) < 0.01


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read during cross-validation ({name})")

    def __len__(self):
        raise AssertionError("the test split was read during cross-validation (len)")


def test_cross_validation_never_reads_the_test_split():
    ds = _digits()
    ds.test = _Untouchable()
    res = cross_validate(
        ds,
        folds=2,
        seed=0,
        make_model=lambda: build_model(
            OmegaConf.create({"arch": "mlp", "hidden": [16]}), ds.input_shape, 10
        ),
        make_pruner=lambda m: DynamicPruner(m, AGPThreshold(0.5, start_epoch=0, end_epoch=1)),
        settings=TrainSettings(epochs=1, finetune_epochs=0),
        front=FrontSettings(points=8),
    )
    assert len(res.folds) == 2


def test_pruning_core_imports_neither_optuna_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, dtp_search.pruning, dtp_search.training, dtp_search.data, dtp_search.models; "
        "bad = [m for m in ('optuna', 'mlflow') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_feedback_reads_a_slice_of_the_training_part_never_the_validation_part(monkeypatch):
    from sklearn.model_selection import StratifiedKFold

    from dtp_search.pruning import FeedbackThreshold
    from dtp_search.training import batching

    ds = _digits()
    calls = []
    real_evaluate = batching.evaluate

    def spy(model, batches):
        calls.append(set(batches.indices.tolist()))
        return real_evaluate(model, batches)

    monkeypatch.setattr(batching, "evaluate", spy)  # attach_feedback's
    feedback_sets = []

    def make_pruner(m):
        policy = FeedbackThreshold(step=0.3, start_epoch=0, update_every=5, holdout=0.1)
        pruner = DynamicPruner(m, policy)
        wrapped = policy.__class__.masks

        def masks(layers, epoch, _p=policy):
            n = len(calls)
            out = wrapped(_p, layers, epoch)
            feedback_sets.extend(calls[n:])  # the evaluate() calls made by the policy itself
            return out

        policy.masks = masks
        return pruner

    res = cross_validate(
        ds,
        folds=2,
        seed=0,
        make_model=lambda: build_model(
            OmegaConf.create({"arch": "mlp", "hidden": [32]}), ds.input_shape, 10
        ),
        make_pruner=make_pruner,
        settings=TrainSettings(epochs=2, finetune_epochs=0),
        front=FrontSettings(points=2),
    )
    folds = list(
        StratifiedKFold(2, shuffle=True, random_state=0).split(
            np.zeros(len(ds.train.labels)), ds.train.labels.numpy()
        )
    )
    assert feedback_sets and res.sparsity > 0.3
    for seen in feedback_sets:
        fold = next(k for k, (tr, _) in enumerate(folds) if seen <= set(tr.tolist()))
        assert not seen & set(folds[fold][1].tolist())  # never the validation part
        assert abs(len(seen) - 0.1 * len(folds[fold][0])) <= 10  # a ~10 % slice


def test_l1_penalty_adds_lr_times_lambda_times_sign_to_one_sgd_step():
    from dtp_search.pruning import ConstantThreshold

    ds = _digits()
    idx = np.arange(64)
    results = {}
    for l1 in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_model(OmegaConf.create({"arch": "mlp", "hidden": [8]}), ds.input_shape, 10)
        start = model.net[1].weight.detach().clone()
        pruner = DynamicPruner(model, ConstantThreshold(0.0, start_epoch=100), min_keep=0)
        train = TensorBatches(ds.train, idx, batch_size=64, mean=ds.mean, std=ds.std)
        settings = TrainSettings(
            epochs=1, finetune_epochs=0, lr=0.5, momentum=0.0, weight_decay=0.0, l1=l1
        )
        prune_and_train(model, pruner, train, train, settings, front=FrontSettings(points=1))
        results[l1] = model.net[1].weight.detach()
    assert torch.allclose(results[0.01] - results[0.0], -0.5 * 0.01 * torch.sign(start), atol=1e-6)


def test_activation_criterion_is_a_running_mean_of_absolute_outputs():
    from dtp_search.pruning import Activation, ConstantThreshold

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    crit = Activation(beta=0.5)
    DynamicPruner(
        net, ConstantThreshold(0.0), crit, granularity="neuron", example_input=torch.zeros(1, 4)
    )
    xs = [torch.randn(5, 4), torch.randn(5, 4)]
    outs = []
    for x in xs:
        net(x)
        with torch.no_grad():  # the layer's output without calling it (that would record)
            outs.append(nn.functional.linear(x, net[0].weight, net[0].bias).abs().mean(0))
    net.eval()
    net(torch.randn(5, 4))  # eval-mode batches are not recorded
    assert torch.allclose(crit.unit_scores("0"), 0.5 * outs[0] + 0.5 * outs[1], atol=1e-6)


def test_l1_starts_at_its_epoch_and_reaches_biases_only_when_asked():
    """train.l1_start_epoch: the first epochs train as without L1 (same weights, bit for
    bit); train.l1_bias: the penalty shrinks the biases too."""
    from dtp_search.pruning import build_policy

    ds = _digits()
    idx = np.arange(len(ds.train))

    def train(**kw):
        torch.manual_seed(0)
        model = build_model({"arch": "mlp", "hidden": [16]}, ds.input_shape, 10)
        pruner = DynamicPruner(model, build_policy("dense", {}))
        tr = TensorBatches(
            ds.train, idx[:600], batch_size=64, mean=ds.mean, std=ds.std, shuffle=True
        )
        va = TensorBatches(ds.train, idx[600:900], batch_size=256, mean=ds.mean, std=ds.std)
        prune_and_train(model, pruner, tr, va, TrainSettings(lr=0.05, finetune_epochs=0, **kw))
        return model

    def norm(model, kind):
        return float(sum(p.abs().sum() for n, p in model.named_parameters() if kind in n))

    late, early = train(epochs=1, l1=0.05, l1_start_epoch=1), train(epochs=1)
    for a, b in zip(late.state_dict().values(), early.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the only epoch comes before the penalty starts
    plain, weights = train(epochs=2), train(epochs=2, l1=0.05)
    biases = train(epochs=2, l1=0.05, l1_bias=True)
    assert norm(weights, "weight") < norm(plain, "weight")
    assert norm(biases, "bias") < norm(weights, "bias")
