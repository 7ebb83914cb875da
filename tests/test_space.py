import optuna
import pytest
from omegaconf import OmegaConf

from dtp_search.search.config import ConfigError
from dtp_search.search.space import apply, parse_space, sample


def _cfg(policy_space=None, search_space=None):
    return OmegaConf.create(
        {
            "train": {"epochs": 4, "lr": 0.1},
            "policy": {
                "name": "agp",
                "final_sparsity": 0.9,
                "end_epoch": "${train.epochs}",
                "scope": "global",
                "space": policy_space or {},
            },
            "search": {"space": search_space or {}},
        }
    )


def test_space_is_sampled_by_optuna_and_written_into_the_trial_config():
    cfg = _cfg(
        {
            "final_sparsity": {"type": "float", "low": 0.5, "high": 0.9},
            "scope": {"type": "categorical", "choices": ["global", "layer"]},
        },
        {
            "train.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
            "train.epochs": {"type": "int", "low": 2, "high": 6},
        },
    )
    space = parse_space(cfg)
    assert [d.key for d in space.dimensions] == [
        "train.lr",
        "train.epochs",
        "policy.final_sparsity",
        "policy.scope",
    ]
    trial = optuna.create_study().ask()
    policy, params = sample(trial, space)
    assert policy == "agp"
    tcfg = apply(cfg, params)
    assert tcfg.policy.final_sparsity == params["policy.final_sparsity"]
    assert tcfg.policy.end_epoch == params["train.epochs"]  # interpolation follows the sample
    assert cfg.policy.final_sparsity == 0.9  # the base config is untouched
    assert set(trial.params) == set(params)


@pytest.mark.parametrize(
    ("space", "fragment"),
    [
        ({"final_sparsity": {"type": "float", "low": 0.9, "high": 0.5}}, "empty range"),
        ({"final_sparsity": {"type": "gaussian", "low": 0, "high": 1}}, "allowed"),
        ({"final_sparsity": {"type": "float", "low": 0, "high": 1, "log": True}}, "low > 0"),
        ({"scope": {"type": "categorical", "choices": []}}, "choices"),
        ({"sparsity_goal": {"type": "float", "low": 0, "high": 1}}, "not a key"),
        ({"final_sparsity": {"type": "float", "low": 0, "hi": 1}}, "unknown fields"),
    ],
)
def test_bad_spaces_are_named(space, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_space(_cfg(space))


def _choice_cfg():
    return OmegaConf.create(
        {
            "train": {"epochs": 4},
            "policy": {
                "name": "choice",
                "choices": ["agp", "constant"],
                "options": {
                    "agp": {
                        "name": "agp",
                        "final_sparsity": 0.9,
                        "end_epoch": "${train.epochs}",
                        "space": {"final_sparsity": {"type": "float", "low": 0.5, "high": 0.9}},
                    },
                    "constant": {
                        "name": "constant",
                        "theta": 0.1,
                        "space": {"theta": {"type": "float", "low": 0.01, "high": 0.2}},
                    },
                    "dense": {"name": "dense", "space": {}},
                },
            },
            "search": {"space": {}},
        }
    )


def test_choice_samples_the_policy_then_only_its_own_conditional_space():
    cfg = _choice_cfg()
    space = parse_space(cfg)
    assert space.choices == ("agp", "constant")  # options not in choices are not searched
    study = optuna.create_study()
    seen = set()
    for _ in range(12):
        trial = study.ask()
        policy, params = sample(trial, space)
        seen.add(policy)
        tcfg = apply(cfg, params, policy)
        assert tcfg.policy.name == policy and "options" not in tcfg.policy
        expected = {
            "agp": {"policy", "agp.final_sparsity"},
            "constant": {"policy", "constant.theta"},
        }
        assert set(trial.params) == expected[policy]
        key = "final_sparsity" if policy == "agp" else "theta"
        assert tcfg.policy[key] == params[f"policy.{key}"]
        if policy == "agp":
            assert tcfg.policy.end_epoch == 4  # interpolations still resolve after the move
        study.tell(trial, 0.0)
    assert seen == {"agp", "constant"}


@pytest.mark.parametrize(
    ("choices", "fragment"), [(["agp", "nope"], "policy.choices"), ([], "policy.choices")]
)
def test_bad_policy_choices_are_named(choices, fragment):
    cfg = _choice_cfg()
    cfg.policy.choices = choices
    with pytest.raises(ConfigError, match=fragment):
        parse_space(cfg)


# ------------------------------------------------------------- keys set by hand


def test_a_searched_key_set_on_the_command_line_is_fixed_and_said():
    from dtp_search.search.space import fix_set_keys

    cfg = _cfg(
        {
            "final_sparsity": {"type": "float", "low": 0.5, "high": 0.9},
            "scope": {"type": "categorical", "choices": ["global", "layer"]},
        },
        {"train.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}},
    )
    lines = fix_set_keys(cfg, ["policy=agp", "policy.final_sparsity=0.75", "train.lr=0.05"])
    assert [d.key for d in parse_space(cfg).dimensions] == ["policy.scope"]
    assert lines == [
        "train.lr=0.1 is set on the command line: fixed, not searched "
        "(its space float [0.001, 0.3, log] in search.space is dropped)",
        "policy.final_sparsity=0.9 is set on the command line: fixed, not searched "
        "(its space float [0.5, 0.9] in policy.space is dropped)",
    ]
    # Keys that are not searched, and a group override, leave the space alone.
    assert fix_set_keys(cfg, ["policy=agp", "train.epochs=3"]) == []


def test_a_key_set_with_its_space_node_on_one_command_line_is_refused():
    from dtp_search.search.space import fix_set_keys

    cfg = _cfg({"final_sparsity": {"type": "float", "low": 0.5, "high": 0.9}})
    with pytest.raises(ConfigError, match=r"policy.final_sparsity=0.8 and policy.space= are both"):
        fix_set_keys(
            cfg,
            ["policy.final_sparsity=0.8", "policy.space={final_sparsity: {type: float}}"],
        )


def test_policy_choice_fixes_a_key_of_one_option():
    from dtp_search.search.space import fix_set_keys

    cfg = OmegaConf.create(
        {
            "search": {"space": {}},
            "policy": {
                "name": "choice",
                "choices": ["agp", "constant"],
                "options": {
                    "agp": {
                        "name": "agp",
                        "final_sparsity": 0.9,
                        "space": {"final_sparsity": {"type": "float", "low": 0.5, "high": 0.95}},
                    },
                    "constant": {
                        "name": "constant",
                        "theta": 0.02,
                        "space": {
                            "theta": {"type": "float", "low": 1e-3, "high": 0.2, "log": True}
                        },
                    },
                },
            },
        }
    )
    (line,) = fix_set_keys(cfg, ["policy.options.constant.theta=0.05"])
    assert line.startswith("policy.options.constant.theta=0.02 is set on the command line")
    space = parse_space(cfg)
    assert [d.param for d in space.dimensions] == ["agp.final_sparsity"]


@pytest.mark.slow
def test_cli_policy_theta_set_by_hand_holds_in_every_trial_and_a_rerun_without_it_is_refused(
    tmp_path,
):
    from inprocess import run_here

    root = tmp_path / "runs"
    common = [
        "study.name=fixed",
        "policy=constant",
        "search.n_trials=2",
        "cv.folds=2",
        "train.epochs=1",
        "train.finetune_epochs=0",
        "front.points=2",
        "console.progress=false",
        "refit.enabled=false",
    ]
    proc = run_here(root, *common, "policy.theta=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "policy.theta=0.05 is set on the command line: fixed, not searched "
        "(its space float [0.001, 0.2, log] in policy.space is dropped)" in proc.stdout
    )
    study = optuna.load_study(study_name="fixed", storage=f"sqlite:///{root}/optuna.db")
    assert len(study.trials) == 2
    for t in study.trials:
        assert "policy.theta" not in t.params and "policy.start_epoch" in t.params
        assert t.user_attrs["config"]["policy"]["theta"] == 0.05
    # The same study without the fixed value would search θ again: a changed definition.
    proc = run_here(root, *common, "search.n_trials=3")
    assert proc.returncode == 2
    assert "policy.theta: 0.05 -> 0.02" in proc.stderr, proc.stderr
    assert "policy.space.theta.type: (absent) -> 'float'" in proc.stderr


def test_a_sampled_value_out_of_its_keys_range_ends_the_trial_with_the_typed_message(tmp_path):
    """The trial's config, sampled values in, goes through the run's own checker."""
    from inprocess import TINY, run_here

    root = tmp_path / "runs"
    proc = run_here(
        root,
        *TINY,
        "study.name=momentum",
        "+search.space={train.momentum: {type: float, low: 1.5, high: 2.0}}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="momentum", storage=f"sqlite:///{root}/optuna.db")
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["prune_reason"] == (
            f"invalid sampled config: train.momentum={t.params['train.momentum']!r} is not "
            "allowed; allowed: a number in [0, 1)"
        )
