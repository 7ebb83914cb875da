import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dtp_search.pruning import (
    Activation,
    AGPThreshold,
    ConstantThreshold,
    DenseBaseline,
    DynamicPruner,
    FeedbackThreshold,
    LayerCollapse,
    LayerView,
    OneShotGlobal,
    RandomBaseline,
    ScheduledThreshold,
    SoftThreshold,
    SplicingThreshold,
    StdScaledThreshold,
    Taylor,
    WeightMask,
    build_policy,
    quantile_threshold,
)


def _layers(*tensors):
    out = []
    for i, w in enumerate(tensors):
        w = torch.as_tensor(w, dtype=torch.float32)
        out.append(
            LayerView(
                f"l{i}", w, w.abs(), torch.ones(w.shape, dtype=torch.bool), WeightMask(w.shape)
            )
        )
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


@pytest.mark.parametrize(
    ("shape", "epoch", "expected"),
    [
        ("linear", 0.0, 0.1),
        ("linear", 2.0, 0.1),
        ("linear", 4.0, 0.3),
        ("linear", 6.0, 0.5),
        ("linear", 9.0, 0.5),
        ("cubic", 4.0, 0.1 + 0.4 * (1 - 0.5**3)),
        ("cubic", 3.0, 0.1 + 0.4 * (1 - 0.75**3)),
    ],
)
def test_scheduled_threshold_ramp(shape, epoch, expected):
    p = ScheduledThreshold(0.1, 0.5, start_epoch=2, end_epoch=6, shape=shape)
    assert p.theta(epoch) == pytest.approx(expected)
    assert p.final_epoch() == 6


def test_agp_target_follows_the_cubic_schedule():
    p = AGPThreshold(0.8, initial_sparsity=0.2, start_epoch=1, end_epoch=5)
    assert p.target_sparsity(0) == pytest.approx(0.2)
    assert p.target_sparsity(1) == pytest.approx(0.2)
    assert p.target_sparsity(3) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3)
    assert p.target_sparsity(5) == pytest.approx(0.8)
    assert p.target_sparsity(50) == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["scheduled", "agp", "feedback"])
def test_a_window_that_ends_before_it_starts_is_one_step_at_the_start(name):
    params = {
        "scheduled": {"theta_start": 0.1, "theta_end": 0.5},
        "agp": {"final_sparsity": 0.8},
        "feedback": {},
    }[name]
    p = build_policy(name, {**params, "start_epoch": 3, "end_epoch": 1})
    assert p.end_epoch == p.final_epoch() == 3
    if name == "scheduled":
        assert p.theta(2.9) == pytest.approx(0.1) and p.theta(3.0) == pytest.approx(0.5)
    if name == "agp":
        assert p.target_sparsity(2.9) == 0.0 and p.target_sparsity(3.0) == pytest.approx(0.8)


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
    prune.global_unstructured(
        [(ref[0], "weight"), (ref[2], "weight")], pruning_method=prune.L1Unstructured, amount=0.7
    )
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
    assert not (
        pruner.masks[""].bool_mask & ~before
    ).any()  # ... but score |w ⊙ m| = 0 keeps them pruned


def test_pruner_respects_update_grid_and_start_epoch():
    pruner = DynamicPruner(nn.Linear(4, 4), ConstantThreshold(0.1, start_epoch=2, update_every=5))
    assert pruner.step(5, epoch=1.0) is None  # before start
    assert pruner.step(7, epoch=2.5) is None  # off the grid
    assert pruner.step(10, epoch=2.5) == {"": 0.1}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("constant", {"theta": -1}),
        ("std_scaled", {"q": -0.5}),
        ("scheduled", {"theta_start": 0, "theta_end": 1, "end_epoch": 4, "shape": "square"}),
        ("agp", {"final_sparsity": 1.0, "end_epoch": 3}),
        ("agp", {"final_sparsity": 0.5, "end_epoch": 3, "scope": "net"}),
        ("nope", {}),
    ],
)
def test_invalid_policy_parameters_are_rejected(name, params):
    with pytest.raises(ValueError):
        build_policy(name, params)


# --- weighted quantile ---------------------------------------------------------------


def test_weighted_quantile_prunes_by_weight_not_by_count():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    weights = torch.tensor([10.0, 1.0, 1.0, 8.0])  # 20 weights in 4 units
    assert quantile_threshold(scores, 0.5, weights) == pytest.approx(0.2)  # only unit 0 fits in 10
    assert quantile_threshold(scores, 0.6, weights) == pytest.approx(0.4)  # units 0-2: 12 weights
    assert quantile_threshold(scores, 0.0, weights) == 0.0
    assert quantile_threshold(scores, 1.0, weights) == math.inf


# --- feedback ------------------------------------------------------------------------


def _feedback(accuracies, **kw):
    p = FeedbackThreshold(step=0.5, tolerance=0.01, backoff=0.5, start_epoch=0, **kw)
    it = iter(accuracies)
    p.feedback = lambda: next(it)
    return p


def test_feedback_raises_the_sparsity_target_while_accuracy_holds():
    p = _feedback([0.90, 0.91, 0.905])
    (layer,) = _layers(torch.arange(1.0, 101.0))
    for expected in (0.5, 0.75, 0.875):  # density halves at every accepted update
        p.update_masks([layer], epoch=1)
        assert p.value == pytest.approx(expected)
        assert int((~layer.mask.bool_mask).sum()) == math.floor(expected * 100)
    assert p.best == pytest.approx(0.91) and p.backoffs == 0


def test_feedback_backs_off_and_restores_the_last_accepted_masks():
    p = _feedback([0.90, 0.90, 0.80, 0.90])
    (layer,) = _layers(torch.arange(1.0, 101.0))
    p.update_masks([layer], epoch=1)  # accept dense (0.90), target 0.5
    p.update_masks([layer], epoch=1)  # accept 50 % (0.90), target 0.75
    assert int(layer.mask.mask.sum()) == 25
    p.update_masks([layer], epoch=1)  # 0.80 < 0.90 - 0.01: back off
    assert p.backoffs == 1 and p.step == pytest.approx(0.25)
    assert p.value == pytest.approx(0.5)  # back to the last accepted target
    assert int(layer.mask.mask.sum()) == 50  # ... and its masks
    p.update_masks([layer], epoch=1)  # accepted again: raise by the smaller step
    assert p.value == pytest.approx(1 - 0.5 * 0.75)


def test_feedback_without_restore_keeps_masks_and_theta_target_multiplies():
    p = _feedback([0.9, 0.9, 0.5], restore=False, target="theta", theta_start=2.0)
    (layer,) = _layers(torch.arange(1.0, 11.0))
    p.update_masks([layer], epoch=1)
    assert p.value == pytest.approx(3.0) and int(layer.mask.mask.sum()) == 8  # 3..10 kept
    p.update_masks([layer], epoch=1)
    assert p.value == pytest.approx(4.5)
    kept = int(layer.mask.mask.sum())
    p.update_masks([layer], epoch=1)  # drop: nothing restored, target back to 3.0
    assert int(layer.mask.mask.sum()) == kept and p.value == pytest.approx(3.0)


def test_feedback_stops_raising_after_end_epoch():
    p = _feedback([0.9] * 5, end_epoch=2)
    (layer,) = _layers(torch.arange(1.0, 101.0))
    p.update_masks([layer], epoch=1)
    p.update_masks([layer], epoch=3)
    assert p.value == pytest.approx(0.5)


# --- splicing ------------------------------------------------------------------------


def test_splicing_thresholds_and_hysteresis():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 1.0])
    p = SplicingThreshold(c=0.0, start_epoch=0)
    (layer,) = _layers(w)
    theta = p.update_masks([layer], epoch=0)
    t = float(w.mean())  # c = 0: t = mean |w| = 0.4; a = 0.36, b = 0.44
    assert theta["l0"] == pytest.approx(t)
    assert layer.mask.mask.tolist() == [0, 0, 0, 1, 1]  # 0.4 >= a stays on
    # 0.3 -> 0.4 (between a and b): stays pruned; 0.4 -> 0.38 (between): stays kept;
    # 0.2 -> 0.9 (above b): spliced back; 1.0 -> 0.05 (below a): pruned.
    w2 = torch.tensor([0.1, 0.9, 0.4, 0.38, 0.05])
    layer2 = LayerView("l0", w2, w2, layer.mask.bool_mask, layer.mask)
    t2 = float(w2.mean())
    assert 0.9 * t2 < 0.4 < 1.1 * t2 and 0.9 * t2 < 0.38 < 1.1 * t2
    p.update_masks([layer2], epoch=1)
    assert layer.mask.mask.tolist() == [0, 1, 0, 1, 0]


def test_splicing_recovers_a_pruned_weight_through_the_straight_through_mask():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    pruner = DynamicPruner(lin, SplicingThreshold(c=0.5, start_epoch=0), min_keep=0)
    pruner.update(0)
    mask = pruner.masks[""]
    assert mask.straight_through
    i = int(torch.nonzero(~mask.bool_mask.flatten())[0])
    w = lin.parametrizations.weight.original
    # The pruned weight still receives the loss gradient ...
    x = torch.randn(16, 8)
    lin(x).sum().backward()
    assert w.grad.flatten()[i] != 0
    # ... and once its magnitude is pushed past b it is spliced back.
    with torch.no_grad():
        w.view(-1)[i] = 10.0
    pruner.update(1)
    assert mask.bool_mask.flatten()[i]


def _simulate_splicing(stats: str, steps: int = 3000) -> tuple[list[int], list[float]]:
    """Masks of one layer over ``steps`` updates under training-like dynamics: the kept
    weights grow, the larger ones faster (they carry the layer), and the pruned ones decay
    (weight decay, no loss gradient through the mask). Returns kept counts and thresholds."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4000, generator=g) * 0.05
    keep = torch.ones_like(w, dtype=torch.bool)
    policy = SplicingThreshold(1.0, stats=stats, gamma=0.0, update_every=1)
    kept, thetas = [], []
    for k in range(1, steps + 1):
        scale = w[keep].abs().mean() if keep.any() else 1.0
        w = torch.where(keep, w * (1 + 2e-3 * w.abs() / scale), w * (1 - 1e-3))
        view = LayerView("l", w * keep, w.abs(), keep, WeightMask(w.shape))
        keeps, theta = policy.masks([view], k / 100)
        keep = keeps["l"]
        kept.append(int(keep.sum()))
        thetas.append(theta["l"])
    return kept, thetas


def test_splicing_running_statistics_run_away_and_frozen_ones_hold():
    """The regression of a DNS runaway: with per-update statistics, t = μ + cσ grows with
    the surviving weights and, over thousands of updates, empties the layer; with the
    statistics frozen at the first update (DNS's own rule) the layer settles."""
    kept, thetas = _simulate_splicing("running")
    assert kept[-1] <= 4  # 4,000 weights: the layer is gone
    assert thetas[-1] > 100 * thetas[0]
    kept, thetas = _simulate_splicing("frozen")
    assert len(set(thetas)) == 1  # t taken once
    assert 0.15 * 4000 < kept[-1] < 0.25 * 4000
    assert kept[-1] > 0.95 * kept[499]  # settled: no more than slow drift after 500 updates


def test_splicing_frozen_statistics_survive_a_checkpoint():
    (layer,) = _layers([0.1, 0.2, 0.3, 0.4, 1.0])
    p = SplicingThreshold(c=0.0, start_epoch=0)
    t = p.update_masks([layer], epoch=0)["l0"]
    q = SplicingThreshold(c=0.0, start_epoch=0)
    q.load_state_dict(p.state_dict())
    (bigger,) = _layers([1.0, 2.0, 3.0, 4.0, 10.0])
    assert q.thresholds([bigger], epoch=1) == {"l0": t}
    assert SplicingThreshold(c=0.0, stats="running").thresholds([bigger], 1)["l0"] == 4.0


def test_splicing_rejects_bad_stats_and_recover_false():
    with pytest.raises(ValueError, match=r"stats must be one of \['frozen', 'running'\]"):
        SplicingThreshold(stats="sometimes")
    with pytest.raises(ValueError, match="recover must be true for splicing"):
        SplicingThreshold(recover=False)


# --- recovery for every threshold policy -------------------------------------------------

RECOVERING = {
    "constant": lambda: ConstantThreshold(0.4, recover=True, start_epoch=0),
    "std_scaled": lambda: StdScaledThreshold(1.0, recover=True, start_epoch=0),
    "scheduled": lambda: ScheduledThreshold(0.4, 0.4, end_epoch=0, recover=True),
    "agp": lambda: AGPThreshold(0.6, end_epoch=0, recover=True),
}


@pytest.mark.parametrize("name", sorted(RECOVERING))
def test_recover_gives_a_hysteresis_band_around_theta(name):
    policy = RECOVERING[name]()
    assert policy.recovers and policy.band == 0.1
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])  # dense scores
    keep = torch.tensor([True, False, False, True, True])
    view = LayerView("l", w * keep, w, keep, WeightMask(w.shape))
    theta = policy.thresholds([view], 0.0)["l"]
    keeps, _ = policy.masks([view], 0.0)
    expected = (w >= 1.1 * theta) | (keep & (w >= 0.9 * theta))
    assert keeps["l"].tolist() == expected.tolist()
    # Between (1 - β)θ and (1 + β)θ a unit keeps its state; the final masks drop the band.
    final, theta_final = policy.final_masks([view])
    assert final["l"].tolist() == (w >= theta_final["l"]).tolist()


def test_recover_brings_back_a_weight_that_grows_past_the_band():
    (layer,) = _layers([0.1, 0.2, 0.3, 0.5, 1.0])
    p = ConstantThreshold(0.4, recover=True, start_epoch=0)
    p.update_masks([layer], epoch=0)
    assert layer.mask.mask.tolist() == [0, 0, 0, 1, 1]
    dense = torch.tensor([0.1, 0.43, 0.45, 0.37, 1.0])  # 0.43 in the band, 0.45 over it
    view = LayerView("l0", dense * layer.keep, dense, layer.keep, layer.mask)
    p.update_masks([view], epoch=1)
    assert layer.mask.mask.tolist() == [0, 0, 1, 1, 1]  # 0.37 in the band stays kept


def test_feedback_recovers_with_the_band():
    p = FeedbackThreshold(step=0.5, recover=True, start_epoch=0, target="theta", theta_start=0.4)
    p.feedback = lambda: 1.0
    w = torch.tensor([0.1, 0.41, 0.5, 0.7])
    keep = torch.tensor([True, False, True, True])
    view = LayerView("l", w * keep, w, keep, WeightMask(w.shape))
    keeps, theta = p.masks([view], 1.0)
    assert theta["l"] == pytest.approx(0.6)  # raised by δ = 0.5
    assert keeps["l"].tolist() == [False, False, False, True]  # 0.5 < 0.9·0.6 = 0.54


@pytest.mark.parametrize("name", ["dense", "oneshot_global", "random", "soft_threshold"])
def test_recover_is_refused_by_policies_that_cannot_recover(name):
    params = {"oneshot_global": {"amount": 0.5}, "random": {"sparsity": 0.5}}.get(name, {})
    with pytest.raises(
        ValueError,
        match=f"recover=true is not supported by policy {name}; "
        r"allowed with: \['constant', 'std_scaled'",
    ):
        build_policy(name, {**params, "recover": True})
    with pytest.raises(ValueError, match=r"band must be in \[0, 1\)"):
        build_policy("agp", {"final_sparsity": 0.5, "end_epoch": 2, "band": 1.5})


def test_pruner_counts_recovered_units_and_trains_pruned_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    pruner = DynamicPruner(lin, AGPThreshold(0.75, end_epoch=0, recover=True), min_keep=0)
    pruner.update(1.0)
    mask = pruner.masks[""]
    assert mask.straight_through and pruner.recovered == 0
    w = lin.parametrizations.weight.original
    pruned = (~mask.bool_mask).nonzero()[:3]
    with torch.no_grad():  # three pruned weights grow past the band; three kept ones shrink
        for i, j in pruned:
            w[i, j] = 10.0
        for i, j in mask.bool_mask.nonzero()[:3]:
            w[i, j] = 0.0
    pruner.update(2.0)
    assert pruner.recovered == 3
    assert all(mask.bool_mask[i, j] for i, j in pruned)
    pruner.finalize()
    assert not mask.straight_through  # fine-tuning trains the survivors only
    assert pruner.sparsity() == pytest.approx(0.75)  # the band is gone: the target exactly


def test_splicing_update_probability_decays_and_stops():
    p = SplicingThreshold(c=1.0, gamma=0.1, power=1.0, iter_stop=100)
    assert p.update_probability(0) == 1.0
    assert p.update_probability(10) == pytest.approx(0.5)
    assert p.update_probability(100) == 0.0
    hits = sum(p.should_update(s, 1.0) for s in range(1, 2001))
    assert 0 < hits < 100


# --- soft threshold (STR) --------------------------------------------------------------


def test_soft_threshold_shrinks_weights_and_hardens_into_a_mask():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.2, 0.01, -0.03]]))
    policy = SoftThreshold(s_init=math.log(0.05 / 0.95))  # sigmoid(s) = 0.05
    pruner = DynamicPruner(lin, policy, min_keep=0)
    expected = [0.45, -0.15, 0.0, 0.0]
    assert lin.weight.detach().flatten().tolist() == pytest.approx(expected)
    assert pruner.sparsity() == 0.5
    (group,) = pruner.param_groups()
    assert group["weight_decay"] == policy.threshold_decay and group["params"][0].requires_grad
    lin.weight.sum().backward()  # the threshold is trainable
    assert group["params"][0].grad is not None
    pruner.finalize()
    assert lin.weight.detach().flatten().tolist() == pytest.approx(expected)
    assert pruner.masks[""].mask.flatten().tolist() == [1, 1, 0, 0]
    assert not group["params"][0].requires_grad


def test_soft_threshold_min_keep_restores_raw_weights_not_zeros():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.2, 0.01, -0.03]]))
    pruner = DynamicPruner(lin, SoftThreshold(s_init=math.log(0.3 / 0.7)), min_keep=3)
    pruner.finalize()  # g = 0.3 lets only 0.5 through; the floor keeps -0.2 and -0.03 too
    assert lin.weight.detach().flatten().tolist() == pytest.approx([0.2, -0.2, 0.0, -0.03])
    assert pruner.masks[""].mask.flatten().tolist() == [1, 1, 0, 1]


# --- baselines -----------------------------------------------------------------------


def test_oneshot_global_is_torch_global_unstructured_after_dense_training():
    torch.manual_seed(2)
    ours = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    ref = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    ref.load_state_dict(ours.state_dict())
    pruner = DynamicPruner(ours, OneShotGlobal(0.8), min_keep=0)
    assert not any(pruner.policy.should_update(s, 5.0) for s in range(1, 100))  # dense phase
    pruner.finalize()
    prune.global_unstructured(
        [(ref[0], "weight"), (ref[2], "weight")], pruning_method=prune.L1Unstructured, amount=0.8
    )
    assert torch.equal(pruner.masks["0"].bool_mask, ref[0].weight_mask.bool())
    assert torch.equal(pruner.masks["2"].bool_mask, ref[2].weight_mask.bool())


def test_random_baseline_prunes_each_layer_once_at_the_given_fraction():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    pruner = DynamicPruner(net, RandomBaseline(0.6, start_epoch=0, update_every=1), min_keep=0)
    assert pruner.step(1, 0.1) is not None
    first = {k: m.mask.clone() for k, m in pruner.masks.items()}
    assert (first["0"] == 0).sum() == 360 and (first["2"] == 0).sum() == 180
    assert pruner.step(2, 0.2) is None  # fixed afterwards
    pruner.finalize()
    assert all(torch.equal(first[k], m.mask) for k, m in pruner.masks.items())


def test_dense_baseline_never_prunes():
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    pruner = DynamicPruner(net, DenseBaseline())
    assert all(pruner.step(s, 9.0) is None for s in range(1, 50))
    pruner.finalize()
    assert pruner.sparsity() == 0.0


# --- criteria and safety ---------------------------------------------------------------


def test_taylor_score_is_a_moving_average_of_weight_times_gradient():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    crit = Taylor(beta=0.5)
    DynamicPruner(lin, ConstantThreshold(0.0), crit)
    w = lin.parametrizations.weight.original
    for x in (torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[3.0, 0.0, -1.0]])):
        w.grad = None
        lin(x).sum().backward()  # dL/dw = x
        crit.observe()
    # step 1: |w·x| = [1, 2, 0.5]; step 2: [3, 0, 0.5]; EMA(0.5) = [2, 1, 0.5]
    assert crit.scores("").flatten().tolist() == pytest.approx([2.0, 1.0, 0.5])


@pytest.mark.parametrize(("min_keep", "kept"), [(0.1, 10), (3, 3)])
def test_min_keep_protects_every_layer(min_keep, kept):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    pruner = DynamicPruner(net, ConstantThreshold(1e9), min_keep=min_keep)
    pruner.update(0)
    for name in ("0", "2"):
        mask = pruner.masks[name].bool_mask
        assert int(mask.sum()) == kept
        # the largest-magnitude weights are the ones kept
        w = net[int(name)].parametrizations.weight.original.abs()
        assert float(w[mask].min()) >= float(w[~mask].max())
    assert pruner.restored == {"0": 1, "2": 1}


def test_a_decision_under_min_keep_raises_when_on_collapse_is_prune():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 10))
    with torch.no_grad():  # layer 0 is small: a threshold of 0.3 leaves it 0 of 1000 weights
        net[0].weight.mul_(1e-3)
        net[2].weight.fill_(1.0)
    pruner = DynamicPruner(net, ConstantThreshold(0.3), min_keep=0.01, on_collapse="prune")
    with pytest.raises(
        LayerCollapse,
        match=r"layer 0 with 0 of 1000 weights at epoch 1\.50 "
        r"\(min_keep allows no fewer than 10\)",
    ) as info:
        pruner.update(1.5)
    assert (info.value.layer, info.value.kept, info.value.minimum) == ("0", 0, 10)
    # Within the floor nothing is raised: layer 2 keeps all of its weights.
    ok = DynamicPruner(
        nn.Sequential(nn.Linear(10, 10)), ConstantThreshold(0.0), on_collapse="prune"
    )
    ok.update(0)
    assert ok.restored == {}


def test_an_emptied_layer_raises_without_a_floor_to_restore():
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    pruner = DynamicPruner(net, ConstantThreshold(1e9), min_keep=0)
    with pytest.raises(LayerCollapse, match=r"0 of 100 weights in the final masks \(min_keep=0\)"):
        pruner.finalize()
    # Structured units are named as such.
    net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    pruner = DynamicPruner(
        net,
        ConstantThreshold(1e9),
        granularity="neuron",
        min_keep=2,
        on_collapse="prune",
        example_input=torch.zeros(1, 10),
    )
    with pytest.raises(LayerCollapse, match="0 of 10 neurons"):
        pruner.update(0)


def test_bad_granularity_and_min_keep_are_rejected():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="granularity"):
        DynamicPruner(
            net, OneShotGlobal(0.5), granularity="neuron", example_input=torch.zeros(1, 4)
        )
    with pytest.raises(ValueError, match="min_keep"):
        DynamicPruner(net, ConstantThreshold(0.1), min_keep=2.5)
    with pytest.raises(
        ValueError,
        match=r"on_collapse='fail' is not allowed; "
        r"allowed: \['restore', 'prune', 'penalize'\]",
    ):
        DynamicPruner(net, ConstantThreshold(0.1), on_collapse="fail")
    with pytest.raises(ValueError, match="allowed"):
        DynamicPruner(net, ConstantThreshold(0.1), Activation(), granularity="weight")


def test_a_tie_across_the_cut_is_pruned_whole_not_kept():
    """Scores tied at the quantile: θ at the tie would keep all of it (with per-step
    gradient scores, the pruned weights and many live ones score 0, and θ = 0 keeps
    every weight: a pruning run fell from 0.89 to 0 sparsity). θ moves past the tie."""
    from dtp_search.pruning.policies import quantile_threshold

    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    theta = quantile_threshold(scores, 0.3)  # k = 2 inside the tie of four zeros
    assert theta > 0 and int((scores < theta).sum()) == 4
    assert quantile_threshold(scores, 0.5) == 1.0  # cut between distinct scores: exact
    weighted = quantile_threshold(scores, 0.3, weights=torch.ones(8))
    assert weighted > 0 and int((scores < weighted).sum()) == 4
