"""policy.allocation (global | uniform | erk | lamp) on hand-made layers, and through the
quantile policies (agp, oneshot_global)."""

import math

import pytest
import torch

from dtp_search.pruning import AGPThreshold, LayerView, OneShotGlobal, build_policy
from dtp_search.pruning.masks import WeightMask
from dtp_search.pruning.policies.allocation import allocate, erk_densities, lamp_scores
from dtp_search.pruning.policies.quantile import global_threshold


def _layers(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=g) * (i + 1)  # later layers: larger weights
        keep = torch.ones(shape, dtype=torch.bool)
        out.append(LayerView(f"l{i}", w, w.abs(), keep, WeightMask(w.shape)))
    return out


def _sparsities(layers, theta):
    return [float((layer.score < theta[layer.name]).float().mean()) for layer in layers]


def _total(layers, theta):
    pruned = sum(int((layer.score < theta[layer.name]).sum()) for layer in layers)
    return pruned / sum(layer.score.numel() for layer in layers)


def test_global_is_todays_single_threshold():
    layers = _layers((20, 30), (10, 20))
    theta = allocate(layers, 0.7, "global")
    assert set(theta.values()) == {global_threshold(layers, 0.7)}
    old = AGPThreshold(0.7, end_epoch=1).thresholds(layers, 5.0)  # scope=global, no allocation
    assert old == theta


def test_uniform_gives_every_layer_the_same_sparsity():
    layers = _layers((20, 30), (10, 20), (4, 3, 3, 3))
    theta = allocate(layers, 0.6, "uniform")
    assert _sparsities(layers, theta) == pytest.approx([0.6] * 3, abs=1 / 108)
    # scope=layer (the older spelling) is uniform
    assert AGPThreshold(0.6, end_epoch=1, scope="layer").thresholds(layers, 5.0) == theta


def test_erk_densities_follow_the_formula_scaled_to_the_target():
    # Linear (n_out, n_in): density ∝ (n_in + n_out)/(n_in·n_out)
    shapes = [(100, 200), (10, 100)]
    d = erk_densities(shapes, 0.9)
    raw = [(200 + 100) / (200 * 100), (100 + 10) / (100 * 10)]
    eps = 0.1 * (20000 + 1000) / (raw[0] * 20000 + raw[1] * 1000)
    assert d == pytest.approx([eps * raw[0], eps * raw[1]])
    assert d[0] * 20000 + d[1] * 1000 == pytest.approx(0.1 * 21000)
    # conv (n_out, n_in, k_h, k_w): (n_out + n_in + k_h + k_w)/(n_out·n_in·k_h·k_w)
    conv = erk_densities([(16, 8, 3, 3), (32, 16, 3, 3)], 0.8)
    ratio = (16 + 8 + 6) / (16 * 8 * 9) / ((32 + 16 + 6) / (32 * 16 * 9))
    assert conv[0] / conv[1] == pytest.approx(ratio)


def test_erk_clamps_a_layer_that_would_exceed_density_one_and_resolves_the_scale():
    # the tiny layer's raw density is far above the others': at 50 % it would need d > 1
    shapes = [(1000, 1000), (2, 2)]
    d = erk_densities(shapes, 0.5)
    assert d[1] == 1.0
    assert d[0] * 1_000_000 + 4 == pytest.approx(0.5 * 1_000_004)
    layers = _layers((200, 300), (2, 3))
    theta = allocate(layers, 0.5, "erk")
    assert _sparsities(layers, theta)[1] == 0.0
    assert _total(layers, theta) == pytest.approx(0.5, abs=1e-3)


def test_lamp_scores_match_the_definition_and_keep_every_layers_largest_weight():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    # ascending |w|: 0.5, 1, 2, 3 → LAMP = w²/Σ_{v≥u} w_v²
    want = {0.5: 0.25 / 14.25, 1.0: 1 / 14.0, 2.0: 4 / 13.0, 3.0: 1.0}
    got = lamp_scores(w.abs())
    assert got.tolist() == pytest.approx([want[abs(float(v))] for v in w])
    layers = _layers((50, 40), (5, 4), (30, 3, 3, 3))
    theta = allocate(layers, 0.98, "lamp")
    for layer in layers:
        kept = layer.score >= theta[layer.name]
        assert kept.any() and kept.view(-1)[layer.score.argmax()]
    assert _total(layers, theta) == pytest.approx(0.98, abs=5e-3)
    # while one global magnitude threshold empties the small-weight layer
    assert _sparsities(layers, allocate(layers, 0.98, "global"))[0] == 1.0


def test_allocation_through_agp_and_oneshot_and_its_checks():
    layers = _layers((40, 30), (10, 40))
    for name in ("uniform", "erk", "lamp"):
        agp = AGPThreshold(0.8, end_epoch=1, scope="layer", allocation=name)  # supersedes scope
        assert agp.thresholds(layers, 2.0) == allocate(layers, 0.8, name)
        one = OneShotGlobal(0.8, allocation=name)
        keeps, _ = one.masks(layers, 1.0)
        pruned = sum(int((~k).sum()) for k in keeps.values())
        assert pruned / 1600 == pytest.approx(0.8, abs=0.01)
    for bad in (
        lambda: build_policy("agp", {"final_sparsity": 0.5, "end_epoch": 1, "allocation": "x"}),
        lambda: build_policy("oneshot_global", {"amount": 0.5, "allocation": "erk2"}),
    ):
        with pytest.raises(ValueError, match="allocation must be one of"):
            bad()
    assert math.isinf(allocate(_layers((3, 3)), 1.0, "uniform")["l0"])
