"""FLOPs, parameters and latency of the compacted network as search objectives: the cost
measures of the pruning core (dtp_search/pruning/cost.py), their settings, the search
layer that takes them (early stop, fidelity rung, Pareto rows) and two tiny studies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from inprocess import run_here
from optuna.trial import create_trial
from test_cli import TINY, _runs
from torch import nn

from dtp_search.__main__ import CONFIG_DIR
from dtp_search.pruning import (
    COSTS,
    ConstantThreshold,
    CostMeter,
    DynamicPruner,
    count_flops,
    median_latency_ms,
    structural_cost,
)
from dtp_search.search.config import (
    ConfigError,
    build_pruner,
    check_config,
    register_resolvers,
    settings_of,
)
from dtp_search.search.early_stop import ParetoFoldStop
from dtp_search.search.fidelity import POINT_ATTR, FidelityRung
from dtp_search.settings import COST_OBJECTIVES, cost_measures, front_axis
from dtp_search.tracking.results import pareto_rows, study_axis

register_resolvers()
optuna.logging.set_verbosity(optuna.logging.WARNING)


def chain(c1: int = 16, c2: int = 32) -> nn.Module:
    """Conv-BN-ReLU-Conv-ReLU-pool-Linear: channel pruning compacts it today."""
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, 10),
    ).eval()


X = torch.zeros(1, 3, 8, 8)


# ------------------------------------------------------------------ pruning/cost.py


def test_weight_level_sparsity_saves_no_flops_and_no_parameters():
    model = chain()
    pruner = DynamicPruner(model, ConstantThreshold(0.0), granularity="weight")
    pruner.tighten_globally(0.9)
    assert pruner.sparsity() == pytest.approx(0.9, abs=0.01)
    cost = structural_cost(model, X)
    assert cost.flops == 1.0 and cost.params == 1.0
    assert cost.flops_dense == count_flops(chain(), X)
    # The meter says the same without compacting anything (weight masks remove no unit).
    meter = CostMeter(COSTS, X, batch=torch.randn(4, 3, 8, 8), structured=False)
    assert meter.measure(model) == {"flops": 1.0, "params": 1.0, "latency": 1.0}


def test_zeroed_channels_are_removed_and_counted_exactly():
    torch.manual_seed(0)
    model = chain()
    pruner = DynamicPruner(
        model, ConstantThreshold(0.0), granularity="channel", min_keep=1, example_input=X
    )
    # Half of the first conv's 16 filters go (rows, bias and BN entries: the unit emits 0).
    first = pruner.layer_names[0]
    pruner.write({first: torch.arange(16) % 2 == 0})
    cost = structural_cost(model, X)
    # The compacted network is the chain with 8 channels after the first conv.
    assert cost.flops_dense == count_flops(chain(), X)
    assert cost.flops_compact == count_flops(chain(c1=8), X)
    assert cost.params_compact == sum(p.numel() for p in chain(c1=8).parameters())
    assert 0 < cost.flops < 1 and 0 < cost.params < 1
    meter = CostMeter(["flops", "params"], X)
    assert meter.measure(model) == {"flops": cost.flops, "params": cost.params}
    assert meter.measure(model, only=["flops"]) == {"flops": cost.flops}


def test_median_latency_is_a_positive_time_and_leaves_the_mode_alone():
    model = chain().train()
    ms = median_latency_ms(model, torch.randn(8, 3, 8, 8), warmup=1, repeats=3)
    assert isinstance(ms, float) and ms > 0 and math.isfinite(ms)
    assert model.training
    meter = CostMeter(["latency"], X, batch=torch.randn(8, 3, 8, 8), warmup=1, repeats=3)
    (latency,) = meter.measure(chain(), remeasure_dense=True).values()
    assert latency > 0 and math.isfinite(latency)
    with pytest.raises(ValueError, match="batch"):
        CostMeter(["latency"], X)
    with pytest.raises(ValueError, match="unknown cost"):
        CostMeter(["energy"], X)


def test_the_objective_names_agree_with_the_core():
    assert COST_OBJECTIVES == COSTS


# ------------------------------------------------------------------ settings


def _cfg(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/dtp-objectives", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["search.objectives=[accuracy,speed]"],
            "search.objectives=['accuracy', 'speed'] is not allowed; allowed: a non-empty "
            "list of ['accuracy', 'sparsity', 'flops', 'params', 'latency']",
        ),
        (
            ["search.objectives=[accuracy,flops]"],
            "search.directions=['maximize', 'maximize'] is not allowed with "
            "search.objectives=['accuracy', 'flops']; allowed: "
            "search.directions=[maximize,minimize]",
        ),
        (
            ["search.objectives=[accuracy,latency]", "search.directions=[minimize,minimize]"],
            "allowed: search.directions=[maximize,minimize]",
        ),
        (
            ["search.objectives=[flops,flops]", "search.directions=[minimize,minimize]"],
            "search.objectives=['flops', 'flops'] is not allowed; allowed: each of",
        ),
        (
            ["search.objectives=[accuracy,params]", "search.directions=[maximize]"],
            "search.directions=['maximize'] must give one of ['maximize', 'minimize'] per "
            "objective ['accuracy', 'params']",
        ),
        (
            ["search.max_flops=1.5"],
            "search.max_flops=1.5 is not allowed; allowed: null or a number in (0, 1)",
        ),
        (
            ["export.batch_size=0"],
            "export.batch_size=0 is not allowed; allowed: an integer >= 1",
        ),
        (["policy.round_to=0"], "policy: round_to=0 is not allowed; allowed: an integer >= 1"),
    ],
)
def test_bad_objectives_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(*overrides))
    assert message in str(err.value)


def test_costs_the_settings_ask_for():
    s = settings_of(_cfg()).search
    assert cost_measures(s) == () and front_axis(s.objectives) == "sparsity"
    s = settings_of(
        _cfg("search.objectives=[accuracy,flops]", "search.directions=[maximize,minimize]")
    ).search
    assert cost_measures(s) == ("flops", "params") and front_axis(s.objectives) == "flops"
    assert cost_measures({"objectives": ["accuracy"], "max_flops": 0.5}) == ("flops", "params")
    assert cost_measures({"objectives": ["accuracy", "latency"]}) == ("latency",)
    cfg = _cfg("policy.round_to=8")
    assert settings_of(cfg).policy["round_to"] == 8
    assert build_pruner(chain(), cfg.policy, X).round_to == 8  # passed to DynamicPruner


# ------------------------------------------------------------------ the search layer


def _study(points, directions=("maximize", "minimize"), objectives=("accuracy", "flops")):
    study = optuna.create_study(directions=list(directions))
    study.set_user_attr("objectives", list(objectives))
    for acc, cost in points:
        study.add_trial(
            create_trial(
                values=[acc, cost],
                user_attrs={
                    "cv_accuracy": acc,
                    "cv_sparsity": 0.5,
                    f"cv_{objectives[1]}": cost,
                    POINT_ATTR: {"epoch": 2, "accuracy": acc, objectives[1]: cost},
                },
            )
        )
    return study


def test_pareto_fold_stop_and_rung_judge_a_cost_minimised():
    study = _study([(0.95, 0.30), (0.90, 0.20), (0.80, 0.10), (0.5, 0.9), (0.4, 0.95)])
    stop = ParetoFoldStop()
    objectives = ["accuracy", "flops"]
    # Less accurate than trials 0 and 1 and dearer, even when optimistic: stopped, by
    # trial 1, which beats it by the most (0.028 + 0.295 against 0.078 + 0.195).
    decision = stop.check(
        study, 99, 5, [0.85, 0.85], [0.5, 0.5], objectives, costs={"flops": [0.5, 0.5]}
    )
    assert decision is not None and decision.dominated_by == 1
    assert "flops 0.5000-" in decision.reason  # minimised: the margin goes down
    # Cheaper than every finished trial: not dominated.
    kept = stop.check(
        study, 99, 5, [0.85, 0.85], [0.5, 0.5], objectives, costs={"flops": [0.05, 0.05]}
    )
    assert kept is None
    with pytest.raises(ValueError, match="flops"):
        stop.check(study, 99, 5, [0.85], [0.5], objectives)
    rung = FidelityRung(epoch=2, n_startup_trials=0)
    assert not rung.check(study, 99, 2, 0.3, 0.5, objectives, costs={"flops": 0.99}).promoted
    assert rung.check(study, 99, 2, 0.96, 0.5, objectives, costs={"flops": 0.05}).promoted
    with pytest.raises(ValueError, match="flops"):
        rung.check(study, 99, 2, 0.96, 0.5, objectives)


def test_pareto_rows_lie_on_the_cost_axis():
    study = _study([(0.95, 0.30), (0.90, 0.20), (0.80, 0.10), (0.85, 0.25)])
    assert study_axis(study) == "flops"
    rows = pareto_rows(study)
    assert [r["trial"] for r in rows] == [2, 1, 0]  # cheapest first; trial 3 is dominated
    assert [r["cv_flops"] for r in rows] == [0.10, 0.20, 0.30]
    assert all(r["params"] == "" for r in rows)  # "params" stays the sampled values


# ------------------------------------------------------------------ two tiny studies


@pytest.mark.slow
def test_a_study_of_accuracy_against_flops_with_channel_pruning(tmp_path):
    root = tmp_path / "runs"
    proc = run_here(
        root,
        "study.name=flops",
        "search.n_trials=1",
        "search.objectives=[accuracy,flops]",
        "search.directions=[maximize,minimize]",
        "model=lenet5",
        "model.padding=[2,2]",
        "policy.granularity=channel",
        "policy.space.final_sparsity.low=0.4",
        "policy.space.final_sparsity.high=0.6",
        "front.points=3",
        "dataset.train_limit=400",
        "dataset.test_limit=200",
        *TINY[:3],
        *TINY[4:],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flops" in proc.stdout  # the console's Pareto table has the column
    study = optuna.load_study(study_name="flops", storage=f"sqlite:///{root}/optuna.db")
    (trial,) = study.trials
    flops = trial.user_attrs["cv_flops"]
    assert trial.values == [trial.user_attrs["cv_accuracy"], flops]
    assert 0 < flops < 1 and 0 < trial.user_attrs["cv_params"] < 1  # whole channels went
    # The report's faint front: [flops, accuracy] points of fold 0.
    assert all(0 < x <= 1 for x, _ in trial.user_attrs["front"])

    client, (parent,), (child,) = _runs(root, "flops")
    m = child.data.metrics
    assert m["cv_flops"] == pytest.approx(flops) and "cv_flops_std" in m
    steps = [p.step for p in client.get_metric_history(child.info.run_id, "front/accuracy")]
    assert round(1000 * flops) in steps or any(abs(s - 1000 * flops) <= 1 for s in steps)
    # the charts' x: the FLOPs fraction itself, at the same steps
    xs = client.get_metric_history(child.info.run_id, "front/flops")
    assert [p.step for p in xs] == steps and all(0 < p.value <= 1 for p in xs)
    front = client.download_artifacts(child.info.run_id, "front.json", str(tmp_path))
    assert "flops" in json.loads(Path(front).read_text())["columns"]
    refit = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`dtp_search.role` = 'refit'"
    )[0].data.metrics
    assert 0 < refit["flops_fraction"] < 1
    assert refit["flops_compact"] == pytest.approx(refit["flops_fraction"] * refit["flops_dense"])
    assert refit["latency_ms_dense"] > 0 and refit["latency_ms_compact"] > 0
    assert refit["latency_fraction"] == pytest.approx(
        refit["latency_ms_compact"] / refit["latency_ms_dense"]
    )
    assert refit["cv_flops"] == pytest.approx(flops)


@pytest.mark.slow
def test_max_flops_makes_weight_level_trials_infeasible(tmp_path):
    root = tmp_path / "runs"
    proc = run_here(
        root,
        "study.name=maxflops",
        "search.n_trials=1",
        "search.objectives=[accuracy]",
        "search.directions=[maximize]",
        "search.max_flops=0.9",
        "refit.enabled=false",
        "dataset.train_limit=600",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="maxflops", storage=f"sqlite:///{root}/optuna.db")
    (trial,) = study.trials
    # Weight-level sparsity leaves every unit in place: dense kernels compute all FLOPs.
    assert trial.user_attrs["cv_sparsity"] > 0.3
    assert trial.user_attrs["cv_flops"] == 1.0
    assert trial.constraints == {"max_flops": pytest.approx(0.1)}  # infeasible: > 0
