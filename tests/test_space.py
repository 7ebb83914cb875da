import optuna
import pytest
from omegaconf import OmegaConf

from dtp_search.config import ConfigError
from dtp_search.space import apply, parse_space, sample


def _cfg(policy_space=None, search_space=None):
    return OmegaConf.create({
        "train": {"epochs": 4, "lr": 0.1},
        "policy": {"name": "agp", "final_sparsity": 0.9, "end_epoch": "${train.epochs}",
                   "scope": "global", "space": policy_space or {}},
        "search": {"space": search_space or {}},
    })


def test_space_is_sampled_by_optuna_and_written_into_the_trial_config():
    cfg = _cfg({"final_sparsity": {"type": "float", "low": 0.5, "high": 0.9},
                "scope": {"type": "categorical", "choices": ["global", "layer"]}},
               {"train.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
                "train.epochs": {"type": "int", "low": 2, "high": 6}})
    dims = parse_space(cfg)
    assert [d.key for d in dims] == ["policy.final_sparsity", "policy.scope", "train.lr", "train.epochs"]
    trial = optuna.create_study().ask()
    params = sample(trial, dims)
    tcfg = apply(cfg, params)
    assert tcfg.policy.final_sparsity == params["policy.final_sparsity"]
    assert tcfg.policy.end_epoch == params["train.epochs"]  # interpolation follows the sample
    assert cfg.policy.final_sparsity == 0.9  # the base config is untouched
    assert set(trial.params) == set(params)


@pytest.mark.parametrize(("space", "fragment"), [
    ({"final_sparsity": {"type": "float", "low": 0.9, "high": 0.5}}, "empty range"),
    ({"final_sparsity": {"type": "gaussian", "low": 0, "high": 1}}, "allowed"),
    ({"final_sparsity": {"type": "float", "low": 0, "high": 1, "log": True}}, "low > 0"),
    ({"scope": {"type": "categorical", "choices": []}}, "choices"),
    ({"sparsity_goal": {"type": "float", "low": 0, "high": 1}}, "not a key"),
    ({"final_sparsity": {"type": "float", "low": 0, "hi": 1}}, "unknown fields"),
])
def test_bad_spaces_are_named(space, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_space(_cfg(space))
