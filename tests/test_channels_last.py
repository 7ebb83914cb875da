"""Conv nets train channels-last (NHWC) by default: every policy must cope with scores and
masks in that memory format (flattening, min_keep protection, torch.nn.utils.prune)."""

import pytest
import torch
from omegaconf import OmegaConf

from dtp_search.data import load_dataset
from dtp_search.models import build_model
from dtp_search.search.config import build_pruner
from dtp_search.settings import FrontSettings, TrainSettings
from dtp_search.training import cross_validate

POLICIES = {
    "oneshot_global": {"name": "oneshot_global", "amount": 0.9},
    "agp": {
        "name": "agp",
        "final_sparsity": 0.95,
        "end_epoch": 3,
        "update_every": 5,
        "min_keep": 0.5,
    },  # min_keep above what the target leaves: protection kicks in
    "agp_channel": {
        "name": "agp",
        "final_sparsity": 0.5,
        "end_epoch": 3,
        "update_every": 5,
        "granularity": "channel",
        "scope": "layer",
    },
    "splicing": {"name": "splicing", "c": 0.5, "update_every": 5},
    "soft_threshold": {"name": "soft_threshold", "s_init": -3.0},
    "random": {"name": "random", "sparsity": 0.5},
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_trains_a_channels_last_conv_net(policy):
    ds = load_dataset(OmegaConf.create({"kind": "digits", "name": "digits"}))
    model_cfg = OmegaConf.create(
        {"arch": "lenet5", "conv": [6, 16], "fc": [32, 16], "kernel_size": 5, "padding": [2, 2]}
    )
    example = torch.zeros(1, *ds.input_shape)
    results = {}
    for channels_last in (False, True):
        settings = TrainSettings(
            epochs=3, finetune_epochs=1, batch_size=32, channels_last=channels_last
        )
        results[channels_last] = cross_validate(
            ds,
            folds=2,
            seed=0,
            make_model=lambda: build_model(model_cfg, ds.input_shape, 10),
            make_pruner=lambda m: build_pruner(m, OmegaConf.create(POLICIES[policy]), example),
            settings=settings,
            front=FrontSettings(points=2),
        )
    # Same training, another memory layout: the same masks up to float reordering.
    assert results[True].sparsity == pytest.approx(results[False].sparsity, abs=0.02)
    assert results[True].accuracy == pytest.approx(results[False].accuracy, abs=0.05)
