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
    trace_units,
)

CIFAR = (3, 32, 32)


def _model(arch, **kw):
    return build_model(OmegaConf.create({"arch": arch, **kw}), CIFAR, 10)


def test_trace_finds_removable_units_and_excludes_classifier_and_residual_outputs():
    groups = trace_units(_model("resnet20"), torch.zeros(1, *CIFAR))
    prunable = {n for n, g in groups.items() if g is not None}
    assert prunable == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    g = groups["layer2.0.conv1"]
    assert g.norms == ["layer2.0.bn1"] and [c.name for c in g.consumers] == ["layer2.0.conv2"]
    groups = trace_units(_model("simple_cnn"), torch.zeros(1, *CIFAR))
    assert groups["classifier.4"] is None  # the output layer
    (c,) = groups["features.3"].consumers  # conv2 -> flatten (16×5×5) -> fc1
    assert c.name == "classifier.0" and c.factor == 25


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
