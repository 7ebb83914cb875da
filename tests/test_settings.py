"""The typed schema (dtp_search/settings/): its rules, their one-line messages, and
that the YAML files and the dataclasses describe the same keys with the same defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hydra import compose, initialize_config_dir

from dtp_search.__main__ import CONFIG_DIR
from dtp_search.search.config import ConfigError, register_resolvers, settings_of
from dtp_search.settings import (
    Settings,
    TrainSettings,
    allowed,
    check,
    field_owner,
    rule,
    text_fields,
)

register_resolvers()


def _cfg(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/dtp-settings", *overrides])


@dataclass
class _Example:
    n: int = rule(1, low=1)
    seed: int = rule(0, low=0, high=10)
    f: float | None = rule(None, low=0, high=1)
    lr: float = rule(0.1, above=0)
    kind: str = rule("a", choices=("a", "b"))
    tags: list[str] = rule(["a"], choices=("a", "b"), each=True)  # noqa: RUF009
    flag: bool = True


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("n", 0, "an integer >= 1"),
        ("seed", 10, "an integer in [0, 9]"),
        ("f", 1.0, "null or a number in [0, 1)"),
        ("f", float("nan"), "null or a number in [0, 1)"),
        ("lr", 0.0, "a number > 0"),
        ("kind", "c", "['a', 'b']"),
        ("tags", [], "a non-empty list of ['a', 'b']"),
        ("tags", ["a", "c"], "a non-empty list of ['a', 'b']"),
    ],
)
def test_a_broken_rule_names_the_key_the_value_and_what_is_allowed(key, value, words):
    obj = dataclasses.replace(_Example(), **{key: value})
    with pytest.raises(ValueError) as err:
        check(obj, "x.")
    shown = repr(list(value)) if isinstance(value, list) else repr(value)
    assert str(err.value) == f"x.{key}={shown} is not allowed; allowed: {words}"


def test_values_inside_the_rules_pass():
    check(_Example(f=0.5, kind="b", tags=["b", "a"]))
    assert allowed(_Example, "flag") == "true, false"


def test_the_default_config_is_every_schema_key_and_nothing_else():
    settings = settings_of(_cfg())  # no unknown key, every rule holds
    assert isinstance(settings, Settings) and isinstance(settings.train, TrainSettings)
    # The YAML holds the schema's defaults, so there is one set of them.
    assert settings.train == TrainSettings()
    assert settings.search.n_trials == Settings().search.n_trials


def test_every_group_option_composes_into_the_schema():
    for override in (
        "dataset=cifar10",
        "model=vgg",
        "model=resnet20",
        "model=lenet5",
        "policy=choice",
        "policy=splicing",
        "search=nsga2",
        "early_stop=none",
        "+experiment=cifar",
    ):
        settings_of(_cfg(override))


def test_a_key_the_schema_does_not_have_is_refused_even_when_appended():
    with pytest.raises(ConfigError, match=r"train\.foo is not a setting; allowed keys of train: "):
        settings_of(_cfg("+train.foo=1"))


def test_a_missing_value_is_named():
    with pytest.raises(ConfigError, match=r"tracking\.uri is required \(it is \?\?\?\)"):
        settings_of(_cfg("tracking.uri=???"))


def test_field_owner_and_text_fields():
    assert field_owner("train.lr") == (TrainSettings, "lr")
    assert field_owner("policy.theta") is None and field_owner("train.nope") is None
    assert "study.name" in text_fields() and "seed" not in text_fields()
