"""FidelityRung on hand-made rungs (dtp_search.search.fidelity), and wired into a digits study."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from dtp_search.search.fidelity import POINT_ATTR, RUNG_ATTR, FidelityRung, RungDecision

optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCH = 2
# Rung points (accuracy, sparsity) of trials 0..5, both maximised. Layers: trials 0, 1, 2
# are the rung's front; 3 is dominated by 0 only; 4 and 5 by 3 (and more).
RUNG = [(0.90, 0.50), (0.80, 0.70), (0.60, 0.85), (0.85, 0.45), (0.50, 0.40), (0.40, 0.30)]


def make_study(
    points: Sequence[Sequence[float]],
    epoch: int = EPOCH,
    directions: Sequence[str] = ("maximize", "maximize"),
    state: TrialState = TrialState.PRUNED,
) -> optuna.Study:
    """A study whose trials 0.. carry ``points`` as their rung points (at ``epoch``)."""
    study = optuna.create_study(directions=list(directions))
    for a, s in points:
        values = None if state != TrialState.COMPLETE else [a, s]
        study.add_trial(
            create_trial(
                state=state,
                values=values,
                user_attrs={POINT_ATTR: {"epoch": epoch, "accuracy": a, "sparsity": s}},
            )
        )
    return study


def check(
    study: optuna.Study,
    accuracy: float,
    sparsity: float,
    rung: FidelityRung | None = None,
    epoch: int = EPOCH,
    objectives: Sequence[str] = ("accuracy", "sparsity"),
) -> RungDecision:
    rung = rung or FidelityRung(eta=3, n_startup_trials=5)
    return rung.check(study, 99, epoch, accuracy, sparsity, objectives)


def test_a_point_on_the_rungs_front_goes_on_whatever_eta() -> None:
    d = check(make_study(RUNG), 0.95, 0.20, FidelityRung(eta=100, n_startup_trials=0))
    assert d.promoted and d.position == 0 and d.dominated_by is None


def test_position_counts_the_better_layers_and_the_quota_is_a_third() -> None:
    # (0.55, 0.44): dominated by 0, 1, 2 (layer 0) and 3 (layer 1); it dominates 4 and 5.
    d = check(make_study(RUNG), 0.55, 0.44)
    assert (d.position, d.size, d.quota) == (4, 7, 3)
    assert not d.promoted
    assert "position 4 of 7" in d.reason and "stopped" in d.reason


def test_names_the_trial_that_dominates_by_the_most() -> None:
    d = check(make_study(RUNG), 0.55, 0.44)
    # improvements: trial 0: .35+.06, 1: .25+.26, 2: .05+.41, 3: .30+.01 -> trial 1
    assert d.dominated_by == 1
    assert "dominated most by trial 1" in d.reason


def test_second_layer_goes_on_when_the_quota_reaches_past_the_front() -> None:
    # Layer 1 behind a front of one: position 1 < quota ceil(3/2) = 2.
    study = make_study([(0.9, 0.9), (0.5, 0.5)])
    d = check(study, 0.8, 0.8, FidelityRung(eta=2, n_startup_trials=0))
    assert d.promoted and d.position == 1 and d.dominated_by == 0


def test_quota_is_at_least_one() -> None:
    study = make_study([(0.9, 0.9)])
    d = check(study, 0.1, 0.1, FidelityRung(eta=50, n_startup_trials=0))
    assert d.quota == 1 and d.position == 1 and not d.promoted


def test_everyone_goes_on_during_start_up() -> None:
    study = make_study(RUNG[:4])
    d = check(study, 0.1, 0.1, FidelityRung(n_startup_trials=5))
    assert d.promoted and "start-up (4 of 5" in d.reason
    assert not check(study, 0.1, 0.1, FidelityRung(n_startup_trials=4)).promoted


def test_points_of_another_rung_epoch_are_left_out() -> None:
    study = make_study(RUNG, epoch=3)
    d = check(study, 0.1, 0.1, FidelityRung(n_startup_trials=1), epoch=EPOCH)
    assert d.promoted and d.size == 1


@pytest.mark.parametrize("state", [TrialState.PRUNED, TrialState.COMPLETE, TrialState.RUNNING])
def test_rung_points_count_in_every_trial_state(state: TrialState) -> None:
    study = make_study(RUNG, state=state)
    assert check(study, 0.55, 0.44).size == len(RUNG) + 1


def test_the_trial_never_counts_itself() -> None:
    study = make_study(RUNG)
    d = FidelityRung(n_startup_trials=0).check(study, 0, EPOCH, 0.1, 0.1)
    assert d.size == len(RUNG)  # trial 0's own stored point is not another trial's


def test_minimize_directions() -> None:
    # Minimising sparsity: (0.55, 0.44) is beaten only by points at least as accurate
    # and at most as sparse: none (trial 3 is sparser, 0.45; trial 4 less accurate).
    study = make_study(RUNG, directions=("maximize", "minimize"))
    d = check(study, 0.55, 0.44)
    assert d.dominated_by is None and d.promoted


def test_single_objective_ranks_by_that_objective() -> None:
    study = make_study(RUNG, directions=("maximize",))
    d = check(study, 0.82, 0.0, objectives=["accuracy"])
    assert (d.position, d.size, d.quota) == (2, 7, 3) and d.promoted
    assert not check(study, 0.7, 0.0, objectives=["accuracy"]).promoted


def test_not_finite_point_is_stopped() -> None:
    d = check(make_study(RUNG), float("nan"), 0.5, FidelityRung(n_startup_trials=0))
    assert not d.promoted and "not finite" in d.reason


def test_rung_epoch_defaults_to_a_third_of_the_pruning_phase() -> None:
    assert FidelityRung().rung_epoch(15) == 5
    assert FidelityRung().rung_epoch(10) == 4
    assert FidelityRung().rung_epoch(1) == 1
    assert FidelityRung(epoch=7).rung_epoch(15) == 7


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"epoch": 0}, "epoch"),
        ({"epoch": 1.5}, "epoch"),
        ({"eta": 1.0}, "eta"),
        ({"eta": float("inf")}, "eta"),
        ({"n_startup_trials": -1}, "n_startup_trials"),
    ],
)
def test_bad_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        FidelityRung(**kwargs)


def test_objectives_must_match_the_study() -> None:
    with pytest.raises(ValueError, match="objectives"):
        check(make_study(RUNG), 0.5, 0.5, objectives=["accuracy"])


def test_a_rung_past_the_last_epoch_is_a_config_error(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    from dtp_search.__main__ import CONFIG_DIR
    from dtp_search.search.config import ConfigError, make_fidelity, settings_of

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"paths.root={tmp_path}",
                "search.fidelity.enabled=true",
                "search.fidelity.epoch=4",
                "train.epochs=3",
                "train.finetune_epochs=1",
            ],
        )
    with pytest.raises(
        ConfigError,
        match=r"search.fidelity.epoch=4 is not allowed; allowed: "
        r"an integer in \[1, 3\]",
    ):
        make_fidelity(settings_of(cfg))


def test_a_digits_study_stops_trials_at_the_rung(tmp_path) -> None:
    """The rung wired into a real study: random pruning at sampled sparsities spreads the
    rung points, so once the start-up is over some trial ranks outside the top half and
    ends PRUNED at the rung (fold 0, epoch 1 of 3), with the rung it reached recorded in
    Optuna and on its MLflow run; the promoted ones run all their folds."""
    import mlflow
    from inprocess import study_here

    argv = [
        f"paths.root={tmp_path}",
        "policy=random",
        "early_stop=none",
        "search.fidelity.enabled=true",
        "search.fidelity.epoch=1",
        "search.fidelity.eta=2",
        "search.fidelity.n_startup_trials=2",
        "search.n_trials=8",
        "cv.folds=2",
        "train.epochs=2",
        "train.finetune_epochs=1",
        "front.points=0",
        "console.progress=false",
        "refit.enabled=false",
        "threads=1",
        "seed=3",
    ]
    cfg, study = study_here(argv)
    trials = study.get_trials(deepcopy=False)
    assert all(
        POINT_ATTR in t.user_attrs and t.user_attrs[POINT_ATTR]["epoch"] == 1 for t in trials
    )
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    assert stopped, [(t.number, t.user_attrs[POINT_ATTR]) for t in trials]
    assert all(
        t.user_attrs[RUNG_ATTR] == 0 and "at the fidelity rung" in t.user_attrs["prune_reason"]
        for t in stopped
    )
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(t.user_attrs[RUNG_ATTR] == 1 for t in complete)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(stopped[0].user_attrs["mlflow_run_id"])
    assert run.data.tags["dtp_search.rung"] == "0"
    assert run.data.tags["prune_reason"] == stopped[0].user_attrs["prune_reason"]
    # Stopped in fold 0 at the rung: no epoch of fold 1 was logged.
    assert "fold_1/val_accuracy" not in run.data.metrics
