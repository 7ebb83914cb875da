import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dtp_search.pruning import (
    AGPThreshold,
    ConstantThreshold,
    DynamicPruner,
    LayerView,
    ScheduledThreshold,
    StdScaledThreshold,
    WeightMask,
    build_policy,
    quantile_threshold,
)


def _layers(*tensors):
    out = []
    for i, w in enumerate(tensors):
        w = torch.as_tensor(w, dtype=torch.float32)
        out.append(LayerView(f"l{i}", w, w.abs(), WeightMask(w.shape)))
    return out


def test_constant_prunes_strictly_below_theta():
    (layer,) = _layers([-0.3, -0.1, 0.05, 0.1, 0.5])
    theta = ConstantThreshold(0.1).update_masks([layer], epoch=0)
    assert theta == {"l0": 0.1}
    assert layer.mask.mask.tolist() == [1, 1, 0, 1, 1]  # |w| = 0.1 is kept, 0.05 pruned


def test_std_scaled_uses_population_std_of_each_layer():
    a, b = _layers([-2.0, -1.0, 0.0, 1.0, 2.0], [0.5, -0.5, 0.5, -0.5])
    theta = StdScaledThreshold(q=1.0).update_masks([a, b], epoch=0)
    assert theta["l0"] == pytest.approx(math.sqrt(2.0))
    assert theta["l1"] == pytest.approx(0.5)
    assert a.mask.mask.tolist() == [1, 0, 0, 0, 1]
    assert b.mask.mask.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(("shape", "epoch", "expected"), [
    ("linear", 0.0, 0.1), ("linear", 2.0, 0.1), ("linear", 4.0, 0.3), ("linear", 6.0, 0.5),
    ("linear", 9.0, 0.5), ("cubic", 4.0, 0.1 + 0.4 * (1 - 0.5 ** 3)), ("cubic", 3.0, 0.1 + 0.4 * (1 - 0.75 ** 3)),
])
def test_scheduled_threshold_ramp(shape, epoch, expected):
    p = ScheduledThreshold(0.1, 0.5, start_epoch=2, end_epoch=6, shape=shape)
    assert p.theta(epoch) == pytest.approx(expected)
    assert p.final_epoch() == 6


def test_agp_target_follows_the_cubic_schedule():
    p = AGPThreshold(0.8, initial_sparsity=0.2, start_epoch=1, end_epoch=5)
    assert p.target_sparsity(0) == pytest.approx(0.2)
    assert p.target_sparsity(1) == pytest.approx(0.2)
    assert p.target_sparsity(3) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5 ** 3)
    assert p.target_sparsity(5) == pytest.approx(0.8)
    assert p.target_sparsity(50) == pytest.approx(0.8)


def test_agp_global_and_layer_scopes():
    a = torch.arange(1.0, 11.0)  # 1..10
    b = torch.arange(11.0, 21.0) / 100  # 0.11..0.20, all smaller than a
    p = AGPThreshold(0.5, start_epoch=0, end_epoch=0, scope="global")
    la, lb = _layers(a, b)
    p.update_masks([la, lb], epoch=1)
    assert int(la.mask.mask.sum()) == 10 and int(lb.mask.mask.sum()) == 0  # b's weights all go
    p = AGPThreshold(0.5, start_epoch=0, end_epoch=0, scope="layer")
    la, lb = _layers(a, b)
    p.update_masks([la, lb], epoch=1)
    assert int(la.mask.mask.sum()) == 5 and int(lb.mask.mask.sum()) == 5


def test_quantile_threshold_prunes_exactly_k():
    s = torch.randperm(1000).float()
    for frac in (0.0, 0.1, 0.5, 0.999):
        theta = quantile_threshold(s, frac)
        assert int((s < theta).sum()) == math.floor(frac * 1000 + 1e-9)
    assert quantile_threshold(s, 1.0) == math.inf


def test_global_magnitude_masks_match_torch_prune_global_unstructured():
    torch.manual_seed(1)
    ours = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    ref = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    ref.load_state_dict(ours.state_dict())
    pruner = DynamicPruner(ours, AGPThreshold(0.7, start_epoch=0, end_epoch=0, scope="global"))
    pruner.update(epoch=1.0)
    prune.global_unstructured([(ref[0], "weight"), (ref[2], "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.7)
    assert torch.equal(pruner.masks["0"].bool_mask, ref[0].weight_mask.bool())
    assert torch.equal(pruner.masks["2"].bool_mask, ref[2].weight_mask.bool())


def test_masks_only_tighten_for_threshold_policies():
    lin = nn.Linear(50, 50)
    pruner = DynamicPruner(lin, ConstantThreshold(0.05, start_epoch=0, update_every=1))
    pruner.update(0)
    before = pruner.masks[""].bool_mask.clone()
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(100)  # pruned weights grow in the dense copy
    pruner.update(1)
    assert not (pruner.masks[""].bool_mask & ~before).any()  # ... but score |w ⊙ m| = 0 keeps them pruned


def test_pruner_respects_update_grid_and_start_epoch():
    pruner = DynamicPruner(nn.Linear(4, 4), ConstantThreshold(0.1, start_epoch=2, update_every=5))
    assert pruner.step(5, epoch=1.0) is None  # before start
    assert pruner.step(7, epoch=2.5) is None  # off the grid
    assert pruner.step(10, epoch=2.5) == {"": 0.1}


@pytest.mark.parametrize(("name", "params"), [
    ("constant", {"theta": -1}), ("std_scaled", {"q": -0.5}),
    ("scheduled", {"theta_start": 0, "theta_end": 1, "end_epoch": 1, "start_epoch": 3}),
    ("scheduled", {"theta_start": 0, "theta_end": 1, "end_epoch": 4, "shape": "square"}),
    ("agp", {"final_sparsity": 1.0, "end_epoch": 3}), ("agp", {"final_sparsity": 0.5, "end_epoch": 3, "scope": "net"}),
    ("nope", {}),
])
def test_invalid_policy_parameters_are_rejected(name, params):
    with pytest.raises(ValueError):
        build_policy(name, params)
