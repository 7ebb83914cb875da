"""A study knows its own configuration: the defining keys, the drift check on resume, and
each trial's own config for refit (dtp_search.search.provenance)."""

from __future__ import annotations

import optuna
import pytest
from hydra import compose, initialize_config_dir

from dtp_search.__main__ import CONFIG_DIR
from dtp_search.search import provenance
from dtp_search.search.config import ConfigError, loggable, register_resolvers
from dtp_search.search.refit import trial_config
from dtp_search.search.space import parse_space
from dtp_search.settings import TrainSettings, from_mapping


def _cfg(*overrides: str):
    register_resolvers()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/dtp-provenance", *overrides])


def test_defining_config_keeps_what_defines_a_study_and_drops_where_it_runs():
    flat = provenance.defining_config(_cfg(), "abc")
    assert flat["policy.name"] == "agp" and flat["train.epochs"] == 15
    assert flat["dataset.digest"] == "abc" and "cv.folds" in flat and "seed" in flat
    assert flat["search.objectives"] == ["accuracy", "sparsity"]
    for key in flat:
        assert not key.startswith(
            ("paths.", "study.", "tracking.", "console.", "search.sampler", "search.n_trials")
        ), key
    assert "train.eval_batch_size" not in flat and "train.compile" not in flat
    # The data's location is not part of it; its content (the digest) is.
    other = provenance.defining_config(_cfg("dataset=cifar10", "dataset.path=/a"), "d")
    assert other == provenance.defining_config(_cfg("dataset=cifar10", "dataset.path=/b"), "d")


def test_changes_lists_differences_names_first_and_honours_allowed_prefixes():
    old = {"policy.name": "agp", "policy.final_sparsity": 0.9, "train.epochs": 15}
    new = {"policy.name": "splicing", "policy.c": 1.0, "train.epochs": 10}
    diff = provenance.changes(old, new)
    assert next(iter(diff)) == "policy.name"
    assert diff["policy.c"] == ("(absent)", 1.0) and diff["train.epochs"] == (15, 10)
    assert set(provenance.changes(old, new, ["policy"])) == {"train.epochs"}
    assert provenance.changes(old, new, ["policy", "train.epochs"]) == {}
    assert provenance.changes(old, new, ["train.ep"]) != {}  # prefixes are whole keys


def test_a_resume_with_another_configuration_is_refused_unless_allowed(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path}/s.db", study_name="s", directions=["maximize", "maximize"]
    )
    first = provenance.defining_config(_cfg(), "abc")
    assert provenance.check_unchanged(study, first) == {}  # nothing stored yet
    provenance.record_study(study, first, {})
    assert provenance.check_unchanged(study, first) == {}
    changed = provenance.defining_config(_cfg("policy=splicing"), "abc")
    with pytest.raises(
        ConfigError,
        match=r"policy.name: 'agp' -> 'splicing'.*"
        r"study.allow_changes=\[policy\]",
    ):
        provenance.check_unchanged(study, changed)
    allowed = provenance.check_unchanged(study, changed, ["policy"])
    provenance.record_study(study, changed, allowed)
    assert study.user_attrs["config"] == changed
    assert study.user_attrs["config_changes"] == [sorted(allowed)]
    with pytest.raises(ConfigError, match=r"dataset.digest: 'abc' -> 'xyz'"):
        provenance.check_unchanged(
            study, provenance.defining_config(_cfg("policy=splicing"), "xyz")
        )


def test_refit_rebuilds_a_trial_from_its_own_config():
    old = _cfg("policy=agp", "train.epochs=3", "policy.final_sparsity=0.8")
    trial = optuna.trial.create_trial(values=[0.9, 0.8], user_attrs={"config": loggable(old)})
    today = _cfg("policy=splicing", "train.epochs=20", "paths.root=/tmp/elsewhere")
    tcfg = trial_config(today, parse_space(today), trial)
    assert tcfg.policy.name == "agp" and tcfg.policy.final_sparsity == 0.8
    assert tcfg.train.epochs == 3
    assert tcfg.paths.root == "/tmp/elsewhere"  # where it runs is today's


def test_one_set_of_training_defaults():
    """conf/config.yaml's ``train`` node and TrainSettings' defaults are the same values."""
    assert from_mapping(TrainSettings, _cfg().train, "train") == TrainSettings()


def test_a_setting_added_since_the_study_was_stored_changes_nothing_at_its_default():
    from dtp_search.search.provenance import changes

    current = {"train.epochs": 15, "train.l1_start_epoch": 0, "policy.exclude_classifier": False}
    stored = {"train.epochs": 15}  # written before those keys existed
    assert changes(stored, current) == {}
    moved = {**current, "train.l1_start_epoch": 3}
    assert changes(stored, moved) == {"train.l1_start_epoch": ("(absent)", 3)}
    # issue 28's keys at their defaults: distillation off, one k-fold draw, allocation
    # null (follows scope)
    added = {"train.distill.alpha": 0.0, "cv.repeats": 1, "policy.allocation": None}
    assert changes(stored, {**current, **added}) == {}
    assert changes(stored, {**current, "policy.allocation": "erk"}) == {
        "policy.allocation": ("(absent)", "erk")
    }


@pytest.mark.parametrize(
    ("change", "same_key"),
    [
        ("train.amp=false", True),  # how it runs: the drift check lets it through
        ("train.eval_batch_size=64", True),
        ("policy.space.final_sparsity.high=0.9", True),  # the space, not the trial's values
        ("train.lr=0.05", False),  # what it trains: refused by the drift check
        ("policy.final_sparsity=0.5", False),
        ("cv.folds=5", False),
    ],
)
def test_the_checkpoint_key_and_the_drift_check_agree(change, same_key):
    """A trial's checkpoint survives exactly the changes the drift check lets through
    unasked: before, changing train.amp passed the check but silently discarded it."""
    before, after = _cfg(), _cfg(change)
    spaces = ("policy.space", "search.space")
    refused = {
        k
        for k in provenance.changes(
            provenance.defining_config(before, "d"), provenance.defining_config(after, "d")
        )
        if not k.startswith(spaces)
    }
    assert (not refused) == same_key
    assert (provenance.trial_key(before, "d") == provenance.trial_key(after, "d")) == same_key
    # The data's content is in the key, its location is not.
    assert provenance.trial_key(before, "d") != provenance.trial_key(before, "e")
