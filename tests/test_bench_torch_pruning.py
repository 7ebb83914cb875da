"""scripts/bench_torch_pruning.py: Torch-Pruning's handling of ResNet-20's option-A shortcut
(the customized pruner prunes exactly the channel-masked network). The benchmark's smoke
run is in tests/test_scripts.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

from dtp_search.models import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_torch_pruning.py"


def _bench():
    if str(SCRIPT.parent) not in sys.path:  # (where the script finds its _cli, as when run)
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_torch_pruning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_torch_pruning_with_the_shortcut_pruner_removes_exactly_the_masked_channels(ratio):
    bench = _bench()
    model = build_model({"arch": "resnet20"}, (3, 32, 32), 10)
    example = torch.zeros(1, 3, 32, 32)
    assert bench.check_structural(model, example, ratio) < 1e-5
    pruned = bench.prune_once(model, example, ratio)
    w = bench.widths(pruned)
    # The residual stream is thinned in every stage, through the shortcuts' mappings.
    assert w["layer3.0.conv2"] < 64 and w["layer1.0.conv1"] < 16
    pad = pruned.layer3[0].shortcut
    assert pad.front + w["layer2.2.conv2"] + pad.back == w["layer3.0.conv2"]
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torch_pruning_alone_mis_prunes_the_shortcut():
    bench = _bench()
    model = build_model({"arch": "resnet20"}, (3, 32, 32), 10)
    example = torch.zeros(1, 3, 32, 32)
    try:
        diff = bench.check_structural(model, example, 0.5, fix_shortcut=False)
    except RuntimeError:  # the pruned network does not even run
        return
    assert diff > 1e-3


def test_the_pruning_ratio_meets_the_flops_target():
    bench = _bench()
    model = build_model({"arch": "resnet20"}, (3, 32, 32), 10)
    example = torch.zeros(1, 3, 32, 32)
    ratio, fraction = bench.ratio_for(model, example, 0.5)
    dense = bench.count_flops(model, (3, 32, 32))
    pruned = bench.count_flops(bench.prune_once(model, example, ratio), (3, 32, 32))
    assert pruned / dense == pytest.approx(fraction) and 0.4 < fraction <= 0.5
