"""Every reference-experiment preset (conf/experiment/ref_*.yaml) runs a study on a tiny
budget: the preset's own recipe, model, policy and space, with fewer images, folds,
epochs and trials. The path is the command line's (override check, compose, run_study),
in this process (from an empty MLflow store, ``inprocess.premake_store``)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from images import tiny_cifar_tree
from inprocess import premake_store
from test_mnist import write_mnist

from dtp_search.__main__ import CONFIG_DIR, check_overrides
from dtp_search.search.study import run_study

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("ref_*.yaml"))
TINY = [
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "search.n_trials=2",
    "threads=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preset-data")
    write_mnist(root / "mnist")
    return {"cifar10": tiny_cifar_tree(root / "cifar10"), "mnist": root / "mnist"}


def test_every_reference_experiment_has_a_preset():
    assert PRESETS == [
        "ref_cifar_l1",
        "ref_cifar_post",
        "ref_cifar_pre",
        "ref_criteria",
        "ref_granularity",
        "ref_mnist_mlp",
        "ref_mnist_recover",
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_runs_a_study_on_a_tiny_budget(preset, data, tmp_path):
    kind = "mnist" if "mnist" in preset else "cifar10"
    argv = [f"+experiment={preset}", f"paths.root={tmp_path}", f"dataset.path={data[kind]}", *TINY]
    if preset == "ref_cifar_l1":
        argv.append("train.l1_start_epoch=1")  # the L1 phase starts inside the tiny budget
    assert check_overrides(argv) is None
    premake_store(tmp_path)
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv)
    study = run_study(cfg)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2 and all(t.state != optuna.trial.TrialState.FAIL for t in finished)
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all("cv_accuracy" in t.user_attrs for t in complete)
    if preset in (
        "ref_cifar_pre",
        "ref_cifar_post",
        "ref_mnist_mlp",
        "ref_mnist_recover",
        "ref_cifar_l1",
    ):
        assert {p for t in complete for p in t.params} >= {"policy.theta"}
