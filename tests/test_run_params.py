"""A run's MLflow params: at most 40 for every built-in model and policy, the inert keys
left to config.yaml, the sampled keys always kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dtp_search.__main__ import CONFIG_DIR
from dtp_search.search import space as search_space
from dtp_search.search.params import MAX_PARAMS, run_params

MODELS = sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml") if p.stem != "custom")


@pytest.fixture(scope="module")
def configs():
    """``(model, policy) → trial config``: every built-in model composed once with
    ``policy=choice``, whose options hold every built-in policy (agp_channel too)."""
    out = {}
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for model in MODELS:
            cfg = compose("config", overrides=[f"model={model}", "policy=choice"])
            for policy in cfg.policy.options:
                out[model, policy] = search_space.apply(cfg, {}, policy)
    return out


def test_every_built_in_model_and_policy_logs_at_most_40_params(configs):
    policies = {p for _, p in configs}
    assert len(MODELS) >= 6 and {"agp", "feedback", "splicing", "agp_channel"} <= policies
    counts = {key: len(run_params(cfg)) for key, cfg in configs.items()}
    over = {key: n for key, n in counts.items() if n > MAX_PARAMS}
    assert not over, over
    # and the trial's own settings are there, not cut away
    params = run_params(configs["simple_cnn", "feedback"])
    for key in ("seed", "model.name", "policy.name", "policy.step", "train.lr", "cv.folds"):
        assert key in params, key


def test_inert_keys_go_unless_sampled_and_active_ones_stay(configs):
    cfg = configs["lenet300", "agp"]
    params = run_params(cfg)
    # no L1 penalty: its start and reach say nothing; weight granularity: no rounding
    for key in ("train.l1_start_epoch", "train.l1_bias", "policy.round_to", "policy.band"):
        assert key not in params, key
    assert params["train.l1"] == 0.0
    active = OmegaConf.merge(
        cfg, {"train": {"l1": 1e-5, "optimizer": "adam"}, "policy": {"granularity": "channel"}}
    )
    params = run_params(active)
    assert {"train.l1_start_epoch", "train.l1_bias", "policy.round_to"} <= set(params)
    assert "train.momentum" not in params and "train.nesterov" not in params
    assert "policy.band" in run_params(cfg, sampled=["policy.band"])


def test_a_config_with_more_keys_is_cut_to_40_keeping_the_sampled(configs, caplog):
    cfg = OmegaConf.merge(
        configs["simple_cnn", "feedback"],
        {"policy": {f"extra_{i}": i for i in range(40)}, "train": {"l1": 1e-5}},
    )
    params = run_params(cfg, sampled=["policy.extra_9", "policy.step"])
    assert len(params) == MAX_PARAMS
    assert params["policy.extra_9"] == 9 and "policy.step" in params
    # keys at their schema default went first (train.l1_bias = False is one), then the rest
    assert "train.l1_bias" not in params and params["train.l1"] == 1e-5
    assert "config.yaml" in caplog.text
