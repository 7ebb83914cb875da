"""ParetoFoldStop on hand-made fronts (dtp_search.search.early_stop)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import forkserver
import hydra.utils
import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState, create_trial

from dtp_search.search.early_stop import ParetoFoldStop, StopDecision

REPO = Path(__file__).resolve().parents[1]

# (accuracy, sparsity) of trials 0..4, both maximised. Trials 0, 1 and 2 are the front.
FRONT = [(0.95, 0.90), (0.90, 0.93), (0.80, 0.99), (0.70, 0.50), (0.60, 0.40)]

# Margins of the defaults (z=2, accuracy_std=0.02, sparsity_std=0.005) with K=5 and
# fold-to-fold spreads below the priors: z * std * sqrt((K-k)/(K*k)).
ACC_MARGIN = {1: 0.04 * math.sqrt(4 / 5), 2: 0.04 * math.sqrt(3 / 10)}  # 0.0358, 0.0219
SPARSITY_MARGIN = {1: 0.01 * math.sqrt(4 / 5), 2: 0.01 * math.sqrt(3 / 10)}  # 0.0089, 0.0055

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(
    points: Sequence[Sequence[float]],
    directions: Sequence[str] = ("maximize", "maximize"),
    constraints: dict[int, dict[str, float]] | None = None,
) -> optuna.Study:
    """A study whose COMPLETE trials 0.. have ``points`` as values."""
    study = optuna.create_study(directions=list(directions))
    for i, p in enumerate(points):
        study.add_trial(create_trial(values=list(p), constraints=(constraints or {}).get(i)))
    return study


def check(
    study: optuna.Study,
    accuracies: Sequence[float],
    sparsities: Sequence[float],
    folds: int = 5,
    stop: ParetoFoldStop | None = None,
    objectives: Sequence[str] = ("accuracy", "sparsity"),
) -> StopDecision | None:
    stop = stop or ParetoFoldStop()
    return stop.check(study, 99, folds, accuracies, sparsities, objectives)


def test_dominated_point_stops_naming_the_dominating_trial() -> None:
    study = make_study(FRONT)
    # optimistic (0.8719, 0.8055): dominated by trials 0 (by 0.173) and 1 (by 0.153)
    decision = check(study, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None
    assert decision.dominated_by == 0
    assert decision.reason == (
        "dominated after 2 of 5 folds by trial 0: accuracy 0.9500, sparsity 0.9000 "
        "vs optimistic accuracy 0.8500+0.0219, sparsity 0.8000+0.0055"
    )


def test_names_the_trial_that_dominates_by_the_most_ties_to_the_lowest_number() -> None:
    # Trial 5 dominates the same point by more than trial 0; trial 6 repeats trial 5.
    study = make_study([*FRONT, (0.97, 0.95), (0.97, 0.95)])
    decision = check(study, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 5
    # Of the first five, only trial 2 (0.80, 0.99) beats a sparse, inaccurate point in
    # both objectives; trial 5 beats it by more.
    decision = check(make_study(FRONT), [0.75, 0.75], [0.94, 0.94])
    assert decision is not None and decision.dominated_by == 2
    decision = check(study, [0.75, 0.75], [0.94, 0.94])
    assert decision is not None and decision.dominated_by == 5


@pytest.mark.parametrize(
    ("accuracies", "sparsities"),
    [
        ([0.92, 0.92], [0.92, 0.92]),  # between trials 0 and 1
        ([0.96, 0.96], [0.50, 0.50]),  # most accurate of all
        ([0.50, 0.50], [0.995, 0.995]),  # sparsest of all
    ],
)
def test_point_not_dominated_continues(accuracies: list[float], sparsities: list[float]) -> None:
    assert check(make_study(FRONT), accuracies, sparsities) is None


def test_margin_shrinks_with_the_folds_seen() -> None:
    study = make_study(FRONT)
    # After one fold: 0.92 + 0.0358 = 0.9558 beats trial 0's 0.95, so it continues ...
    assert 0.92 + ACC_MARGIN[1] > 0.95
    assert check(study, [0.92], [0.89]) is None
    # ... after two equal folds the margin is 0.0219: 0.9419 < 0.95, dominated by trial 0.
    assert 0.92 + ACC_MARGIN[2] < 0.95 and 0.89 + SPARSITY_MARGIN[2] < 0.90
    decision = check(study, [0.92, 0.92], [0.89, 0.89])
    assert decision is not None and decision.dominated_by == 0
    assert decision.reason.startswith("dominated after 2 of 5 folds by trial 0")


def test_spread_between_folds_widens_the_margin() -> None:
    # Same mean 0.92 as above, but folds 0.88 and 0.96 (std 0.057 > prior 0.02): the
    # margin 2 * 0.057 * sqrt(3/10) = 0.062 keeps it alive.
    assert check(make_study(FRONT), [0.88, 0.96], [0.89, 0.89]) is None


def test_margin_floor_applies_to_accuracy() -> None:
    # z=0 leaves only the floor: 0.946 + 0.005 = 0.951 > 0.95 survives, 0.944 does not.
    stop = ParetoFoldStop(z=0.0, min_margin=0.005)
    study = make_study(FRONT)
    assert check(study, [0.946] * 4, [0.89] * 4, stop=stop) is None
    decision = check(study, [0.944] * 4, [0.89] * 4, stop=stop)
    assert decision is not None and decision.dominated_by == 0


def test_no_stop_before_n_startup_trials_are_complete() -> None:
    study = make_study(FRONT[:4])
    # Pruned, failed and running trials do not count toward the start-up.
    study.add_trial(create_trial(state=TrialState.PRUNED))
    study.add_trial(create_trial(state=TrialState.FAIL))
    study.add_trial(create_trial(state=TrialState.RUNNING))
    assert check(study, [0.5], [0.5]) is None
    study.add_trial(create_trial(values=list(FRONT[4])))
    decision = check(study, [0.5], [0.5])
    assert decision is not None and decision.dominated_by == 0
    assert check(study, [0.5], [0.5], stop=ParetoFoldStop(n_startup_trials=8)) is None
    assert check(study, [0.5], [0.5], stop=ParetoFoldStop(n_startup_trials=0)) is not None


def test_infeasible_trials_do_not_dominate() -> None:
    # Trial 0 broke a constraint (> 0): the point is dominated by trial 1 instead.
    study = make_study(FRONT, constraints={0: {"min_sparsity": 0.1}, 1: {"min_keep_floor": 0.0}})
    decision = check(study, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 1
    # Only trial 0 dominates this one, so nothing does.
    assert check(study, [0.92, 0.92], [0.80, 0.80]) is None
    # Infeasible trials still count toward the start-up: 5 complete, one feasible.
    study = make_study(FRONT, constraints={i: {"min_keep_floor": 1.0} for i in range(1, 5)})
    decision = check(study, [0.5], [0.5])
    assert decision is not None and decision.dominated_by == 0


def test_infeasible_in_optunas_old_list_format() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.add_trial(create_trial(values=[0.99, 0.99], system_attrs={"constraints": [0.0, 0.5]}))
    for p in FRONT[1:]:
        study.add_trial(create_trial(values=list(p)))
    decision = check(study, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 1


def test_trials_without_finite_values_do_not_dominate() -> None:
    # (Optuna refuses NaN values for a COMPLETE trial; infinities get through.)
    study = make_study([(0.99, math.inf), (math.inf, 0.99), *FRONT[1:]])
    decision = check(study, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 2  # FRONT[1]


def test_minimize_directions() -> None:
    # accuracy maximised, the second objective minimised: lower is better there.
    study = make_study(
        [(0.95, 0.10), (0.90, 0.05), (0.50, 0.50), (0.40, 0.60), (0.30, 0.70)],
        directions=("maximize", "minimize"),
    )
    # optimistic (0.9219, 0.2 - 0.0055): trial 0 is more accurate and lower.
    decision = check(study, [0.90, 0.90], [0.20, 0.20])
    assert decision is not None and decision.dominated_by == 0
    assert "sparsity 0.2000-0.0055" in decision.reason
    # Lower than every finished trial: not dominated.
    assert check(study, [0.90, 0.90], [0.03, 0.03]) is None
    # Both minimised: trial 1 (0.90, 0.05) is lower in both than (0.97 - 0.02, 0.2 - 0.005).
    study = make_study(
        [(0.95, 0.10), (0.90, 0.05), (0.99, 0.99), (0.98, 0.98), (0.97, 0.97)],
        directions=("minimize", "minimize"),
    )
    decision = check(study, [0.97, 0.97], [0.20, 0.20])
    assert decision is not None and decision.dominated_by == 1


@pytest.mark.parametrize(
    ("objective", "direction", "values", "continues", "stops"),
    [
        ("accuracy", "maximize", [0.95, 0.90, 0.80, 0.70, 0.60], 0.94, 0.85),
        ("sparsity", "minimize", [0.10, 0.20, 0.30, 0.40, 0.50], 0.105, 0.15),
    ],
)
def test_single_objective_is_dominated_on_that_objective(
    objective: str, direction: str, values: list[float], continues: float, stops: float
) -> None:
    study = make_study([[v] for v in values], directions=[direction])
    other = [0.0, 0.0]  # the objective that is not in the study is ignored
    fold = {"accuracy": lambda v: ([v, v], other), "sparsity": lambda v: (other, [v, v])}
    assert check(study, *fold[objective](continues), objectives=[objective]) is None
    decision = check(study, *fold[objective](stops), objectives=[objective])
    assert decision is not None and decision.dominated_by == 0
    assert decision.reason.startswith(f"dominated after 2 of 5 folds by trial 0: {objective} ")


def test_equal_is_not_dominated() -> None:
    # Without margins a point equal to a finished one is not strictly worse anywhere.
    stop = ParetoFoldStop(z=0.0, min_margin=0.0, sparsity_std=0.0)
    assert check(make_study(FRONT), [0.95, 0.95], [0.90, 0.90], stop=stop) is None
    single = make_study([[v] for v in (0.95, 0.9, 0.8, 0.7, 0.6)], directions=["maximize"])
    assert check(single, [0.95], [0.0], stop=stop, objectives=["accuracy"]) is None


def test_last_fold_never_stops() -> None:
    study = make_study(FRONT)
    assert check(study, [0.1, 0.1], [0.1, 0.1], folds=3) is not None
    assert check(study, [0.1, 0.1, 0.1], [0.1, 0.1, 0.1], folds=3) is None
    assert check(study, [0.1], [0.1], folds=1) is None
    assert check(study, [], [], folds=3) is None


def test_diverged_fold_is_left_to_the_trial() -> None:
    assert check(make_study(FRONT), [math.nan], [0.5]) is None


def test_the_current_trial_never_dominates_itself() -> None:
    study = make_study(FRONT)
    stop = ParetoFoldStop()
    decision = stop.check(study, 0, 5, [0.85, 0.85], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 1


def test_front_is_read_from_the_shared_storage_on_every_call(tmp_path: Path) -> None:
    # Two workers on one journal file; one ParetoFoldStop object serves both.
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    def worker() -> optuna.Study:
        storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
        return optuna.create_study(
            study_name="s",
            storage=storage,
            directions=["maximize", "maximize"],
            load_if_exists=True,
        )

    a, b = worker(), worker()
    stop = ParetoFoldStop()
    for p in FRONT[1:]:
        a.add_trial(create_trial(values=list(p)))
    assert stop.check(b, 99, 5, [0.92, 0.92], [0.80, 0.80]) is None  # only 4 complete
    a.add_trial(create_trial(values=list(FRONT[0])))  # worker a finishes trial 4
    decision = stop.check(b, 99, 5, [0.92, 0.92], [0.80, 0.80])
    assert decision is not None and decision.dominated_by == 4


def test_bad_arguments() -> None:
    study = make_study(FRONT)
    with pytest.raises(ValueError, match="accuracies"):
        check(study, [0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="direction"):
        check(study, [0.5], [0.5], objectives=["accuracy"])
    with pytest.raises(ValueError, match="one of"):
        check(study, [0.5], [0.5], objectives=["accuracy", "loss"])
    with pytest.raises(ValueError, match="n_startup_trials"):
        ParetoFoldStop(n_startup_trials=-1)
    with pytest.raises(ValueError, match="z"):
        ParetoFoldStop(z=-1.0)
    with pytest.raises(ValueError, match="accuracy_std"):
        ParetoFoldStop(accuracy_std=math.nan)


def test_yaml_instantiates_and_is_inert_as_the_study_pruner() -> None:
    node = OmegaConf.load(REPO / "conf" / "early_stop" / "pareto.yaml")
    assert (
        (REPO / "conf" / "early_stop" / "pareto.yaml")
        .read_text()
        .startswith("# @package search.early_stop\n")
    )
    stop = hydra.utils.instantiate(node)
    assert isinstance(stop, ParetoFoldStop) and isinstance(stop, optuna.pruners.BasePruner)
    assert stop.n_startup_trials == 5
    # As the pruner of a single-objective study it never prunes on the Optuna path.
    study = optuna.create_study(direction="maximize", pruner=stop)

    def objective(trial: optuna.Trial) -> float:
        for step in range(3):
            trial.report(-float(trial.number), step)
            assert not trial.should_prune()
        return -float(trial.number)

    study.optimize(objective, n_trials=8)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # And a two-objective study accepts it as its pruner.
    optuna.create_study(directions=["maximize", "maximize"], pruner=stop)


def test_a_digits_study_stops_a_dominated_trial_early(tmp_path):
    """The rule wired into a real two-objective study: random pruning at sampled
    sparsities gives points that earlier trials dominate; a stopped trial is PRUNED with
    the dominating trial in its reason, in Optuna and on its MLflow run."""
    import mlflow
    from inprocess import study_here

    argv = [
        f"paths.root={tmp_path}",
        "policy=choice",
        "policy.choices=[agp,random]",
        "early_stop=pareto",
        "search.early_stop.n_startup_trials=3",
        "search.n_trials=10",
        "cv.folds=3",
        "train.epochs=2",
        "train.finetune_epochs=0",
        "front.points=2",
        "console.progress=false",
        "refit.enabled=false",
        "threads=1",
        "seed=1",
    ]
    cfg, study = study_here(argv)
    stopped = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert stopped, [(t.number, t.values) for t in study.trials]
    t = stopped[0]
    assert f"by trial {t.user_attrs['dominated_by']}:" in t.user_attrs["prune_reason"]
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(t.user_attrs["mlflow_run_id"])
    assert run.data.tags["prune_reason"] == t.user_attrs["prune_reason"]
    assert run.data.tags["dtp_search.dominated_by"] == str(t.user_attrs["dominated_by"])


@pytest.mark.slow
def test_two_workers_on_postgres_stop_trials_against_the_shared_front(tmp_path):
    """study.workers=2 on one PostgreSQL study with early_stop=pareto: both workers run
    trials, and a stopped trial names a COMPLETE trial of the shared storage (whichever
    worker ran it) as the one that dominates it."""
    from servers import postgres_cluster

    with postgres_cluster() as pg:
        storage = pg.replace("postgresql://", "postgresql+psycopg://") + "/optuna"
        argv = [
            f"paths.root={tmp_path / 'runs'}",
            f"study.storage={storage}",
            "study.workers=2",
            "study.name=shared-pareto",
            "policy=choice",
            "policy.choices=[agp,random]",
            "early_stop=pareto",
            "search.early_stop.n_startup_trials=3",
            "search.n_trials=10",
            "cv.folds=3",
            "train.epochs=2",
            "train.finetune_epochs=0",
            "front.points=2",
            "console.progress=false",
            "refit.enabled=false",
            "threads=1",
            "seed=1",
        ]
        proc = forkserver.run(
            argv,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        study = optuna.load_study(study_name="shared-pareto", storage=storage)
        trials = {t.number: t for t in study.trials}
    assert len({t.user_attrs["worker"] for t in trials.values()}) == 2
    stopped = [t for t in trials.values() if t.state == TrialState.PRUNED]
    assert stopped, [(t.number, t.state, t.values) for t in trials.values()]
    for t in stopped:
        winner = trials[t.user_attrs["dominated_by"]]
        assert winner.state == TrialState.COMPLETE
        assert f"by trial {winner.number}:" in t.user_attrs["prune_reason"]
