"""Structured (neuron/channel) masks and the compact export."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dtp_search.models import build_model
from dtp_search.pruning import (
    AGPThreshold,
    ConstantThreshold,
    DynamicPruner,
    compact_model,
    count_parameters,
    sparsity,
    trace_channels,
)

CIFAR = (3, 32, 32)


def _model(arch, **kw):
    return build_model(OmegaConf.create({"arch": arch, **kw}), CIFAR, 10)


def test_trace_couples_the_residual_stream_and_keeps_the_classifier():
    groups = {g.name: g for g in trace_channels(_model("resnet20"), torch.zeros(1, *CIFAR)).groups}
    stem = groups["conv1"]  # the stem and every block's second conv write one stream
    assert stem.producers == ["conv1"] + [
        f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)
    ]
    assert stem.size == 16 and "fc" in stem.columns and "layer3.2.conv1" in stem.columns
    # Option-A shortcuts: stage-1 channel j is stage-2 channel 8 + j and stage-3 channel
    # 24 + j; the zero channels a shortcut adds form groups of their own.
    assert stem.rows["layer2.0.conv2"].flatten().tolist() == list(range(8, 24))
    assert stem.rows["layer3.0.conv2"].flatten().tolist() == list(range(24, 40))
    assert (
        groups["layer2.0.conv2"].size == 16 and "layer2.0.shortcut" in groups["layer2.0.conv2"].pads
    )
    assert groups["layer3.0.conv2"].size == 32
    assert groups["layer2.0.conv1"].producers == ["layer2.0.conv1"]
    assert groups["layer2.0.conv1"].norms.keys() == {"layer2.0.bn1"}
    assert not any("fc" in g.rows for g in groups.values())  # the output keeps its units
    cnn = {g.name: g for g in trace_channels(_model("simple_cnn"), torch.zeros(1, *CIFAR)).groups}
    assert "classifier.4" not in cnn
    cols = cnn["features.3"].columns["classifier.0"]  # conv2 -> flatten (16×5×5) -> fc1
    assert cols.shape == (16, 25) and cols[1].tolist() == list(range(25, 50))


def test_channel_pruning_thins_the_resnet_residual_stream_and_the_compact_net_is_exact():
    torch.manual_seed(0)
    model = _model("resnet20")
    x = torch.randn(4, *CIFAR)
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), granularity="channel", min_keep=1, example_input=x[:1]
    )
    pruner.write({v.name: torch.rand(v.keep.numel()) > 0.4 for v in pruner.layer_views()})
    model.eval()
    compact = compact_model(model, x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-4, rtol=1e-4)
    stream = int(next(v.keep for v in pruner.layer_views() if v.name == "conv1").sum())
    assert compact.conv1.out_channels == stream < 16
    assert compact.layer1[0].conv2.out_channels == stream
    assert compact.fc.in_features < 64
    assert compact.layer2[0].shortcut.front + compact.layer2[0].shortcut.back + stream == (
        compact.layer2[0].conv2.out_channels
    )


def test_neuron_masks_zero_the_row_its_bias_and_the_next_layers_columns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = DynamicPruner(
        net,
        ConstantThreshold(0.0),
        granularity="neuron",
        min_keep=0,
        example_input=torch.zeros(1, 6),
    )
    assert pruner.layer_names == ["0"]
    pruner.write({"0": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)})
    assert (net[0].weight[[1, 4]] == 0).all() and (net[0].bias[[1, 4]] == 0).all()
    assert (net[2].weight[:, [1, 4]] == 0).all() and (net[2].weight[:, [0, 2]] != 0).all()
    assert sparsity(net) == pytest.approx((2 * 6 + 2 * 3) / (48 + 24))


CASES = [
    ("mlp", {"hidden": [64, 32]}, "neuron"),
    ("simple_cnn", {}, "channel"),
    ("simple_cnn", {}, "neuron"),
    ("vgg", {"widths": [16, 16, "M", 32, "M"]}, "channel"),
    ("resnet20", {}, "channel"),
]


@pytest.mark.parametrize(("arch", "kw", "granularity"), CASES)
def test_compact_model_is_smaller_and_computes_the_same_function(arch, kw, granularity):
    torch.manual_seed(0)
    model = _model(arch, **kw)
    x = torch.randn(8, *CIFAR)
    pruner = DynamicPruner(
        model,
        AGPThreshold(0.5, end_epoch=0, scope="layer"),
        granularity=granularity,
        example_input=x[:1],
    )
    pruner.update(1.0)
    model.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for _ in range(3):
            model(torch.randn(16, *CIFAR))
    model.eval()
    compact = compact_model(model, x[:1]).eval()
    with torch.no_grad():
        expected, got = model(x), compact(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)
    dense = count_parameters(_model(arch, **kw))
    assert count_parameters(compact) < 0.85 * dense
    assert not any(
        isinstance(m, nn.utils.parametrize.ParametrizationList) for m in compact.modules()
    )
    # Masked-model sparsity counts exactly the weights the compact model drops
    # (biases and norms aside).
    kept = sum(m.weight.numel() for m in compact.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    total = sum(
        m.weight.numel()
        for m in _model(arch, **kw).modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    assert 1 - kept / total == pytest.approx(sparsity(model), abs=1e-6)


def test_round_to_keeps_a_multiple_of_units_in_every_group():
    torch.manual_seed(0)
    model = _model("resnet20")
    pruner = DynamicPruner(
        model,
        ConstantThreshold(0.0),
        granularity="channel",
        min_keep=1,
        example_input=torch.zeros(1, *CIFAR),
        round_to=8,
    )
    pruner.write({v.name: torch.rand(v.keep.numel()) > 0.7 for v in pruner.layer_views()})
    for view in pruner.layer_views():
        kept = int(view.keep.sum())
        assert kept % 8 == 0 or kept == view.keep.numel(), (view.name, kept)
    with pytest.raises(ValueError, match="round_to"):
        DynamicPruner(_model("resnet20"), ConstantThreshold(0.0), round_to=0)


def test_a_recovering_policy_turns_a_whole_group_back_on():
    torch.manual_seed(0)
    model = _model("resnet20")
    policy = AGPThreshold(0.5, end_epoch=1, recover=True)
    pruner = DynamicPruner(
        model, policy, granularity="channel", min_keep=1, example_input=torch.zeros(1, *CIFAR)
    )
    off = torch.zeros(16, dtype=torch.bool)
    off[0] = True
    pruner.write({"conv1": off})
    assert (model.layer2[1].conv2.weight[8 + 1] == 0).all()  # stream channel 1 in stage 2
    assert (model.layer3[0].conv1.weight[:, 8 + 1] == 0).all()  # and its consumers' columns
    assert (model.layer3[1].conv1.weight[:, 24 + 1] == 0).all()
    pruner.write({"conv1": torch.ones(16, dtype=torch.bool)})
    assert pruner.recovered == 15
    assert (model.layer2[1].conv2.weight[8 + 1] != 0).any()
