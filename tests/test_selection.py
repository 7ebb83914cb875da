"""refit.select=one_se and the front's margins in standard errors, on hand-made trial
records (in-memory Optuna studies: no training)."""

import math

import optuna
import pytest

from dtp_search.tracking import records
from dtp_search.tracking.results import chosen_trials, pareto_rows
from dtp_search.tracking.selection import add_margins, one_se, standard_error


def _row(trial, acc, std, sparsity, folds=4):
    return {
        "trial": trial,
        "accuracy": acc,
        "accuracy_std": std,
        "sparsity": sparsity,
        "folds": folds,
    }


def test_standard_error_is_the_fold_spread_over_root_n():
    assert standard_error(_row(0, 0.9, 0.02, 0.5, folds=4)) == pytest.approx(0.01)
    assert standard_error(_row(0, 0.9, 0.03, 0.5, folds=None), folds=9) == pytest.approx(0.01)
    assert math.isnan(standard_error(_row(0, 0.9, 0.03, 0.5, folds=None)))


def test_margins_are_the_gap_to_the_next_less_accurate_trial_in_its_own_se():
    rows = [_row(0, 0.80, 0.02, 0.9), _row(1, 0.85, 0.04, 0.8), _row(2, 0.86, 0.02, 0.7)]
    add_margins(rows)
    by = {r["trial"]: r["margin_se"] for r in rows}
    assert by[2] == pytest.approx((0.86 - 0.85) / 0.01)  # SE 0.02/√4
    assert by[1] == pytest.approx((0.85 - 0.80) / 0.02)
    assert math.isnan(by[0])  # the least accurate: no next one


def test_one_se_single_objective_takes_the_sparsest_within_one_se_of_the_best():
    rows = [
        _row(0, 0.700, 0.020, 0.950),  # best; SE = 0.01
        _row(1, 0.692, 0.010, 0.952),  # within one SE of the best
        _row(2, 0.691, 0.010, 0.958),  # within, and sparsest of those
        _row(3, 0.680, 0.010, 0.990),  # sparser still, but 2 SE below the best
    ]
    assert [r["trial"] for r in one_se(rows, "sparsity", single=True)] == [2]
    # an SE of 0 (identical folds) keeps the best itself
    tight = [_row(0, 0.7, 0.0, 0.95), _row(1, 0.699, 0.0, 0.99)]
    assert [r["trial"] for r in one_se(tight, "sparsity", single=True)] == [0]


def test_one_se_on_a_front_gives_the_sparsest_trial_of_each_bin():
    # SE 0.01 everywhere: bins {0.90, 0.895, 0.892} and {0.85, 0.845}, {0.70}
    front = [
        _row(0, 0.900, 0.02, 0.50),
        _row(1, 0.895, 0.02, 0.60),
        _row(2, 0.892, 0.02, 0.70),
        _row(3, 0.850, 0.02, 0.80),
        _row(4, 0.845, 0.02, 0.85),
        _row(5, 0.700, 0.02, 0.95),
    ]
    assert [r["trial"] for r in one_se(front, "sparsity", single=False)] == [2, 4, 5]
    # on a cost axis the "sparsest" is the cheapest
    costs = [dict(r, cv_flops=1 - r["sparsity"]) for r in front]
    assert [r["trial"] for r in one_se(costs, "flops", single=False)] == [2, 4, 5]


def _study(directions, trials):
    study = optuna.create_study(directions=directions)
    for values, acc, std, sparsity in trials:
        study.add_trial(
            optuna.trial.create_trial(
                values=values,
                user_attrs={
                    records.CV_ACCURACY: acc,
                    records.CV_ACCURACY_STD: std,
                    records.CV_SPARSITY: sparsity,
                    records.CV_FOLDS: 4,
                },
            )
        )
    return study


def test_chosen_trials_select_one_se_single_and_multi_objective():
    single = _study(
        ["maximize"],
        [([0.70], 0.70, 0.02, 0.95), ([0.695], 0.695, 0.02, 0.97), ([0.65], 0.65, 0.02, 0.99)],
    )
    assert [t.number for t in chosen_trials(single, None)] == [0]
    assert [t.number for t in chosen_trials(single, None, select="one_se")] == [1]
    multi = _study(
        ["maximize", "maximize"],
        [
            ([0.90, 0.5], 0.90, 0.02, 0.5),
            ([0.895, 0.6], 0.895, 0.02, 0.6),
            ([0.80, 0.9], 0.80, 0.02, 0.9),
        ],
    )
    assert [t.number for t in chosen_trials(multi, None)] == [0, 1, 2]
    assert [t.number for t in chosen_trials(multi, None, select="one_se")] == [1, 2]
    assert [t.number for t in chosen_trials(multi, 1, select="one_se")] == [1]
    rows = {r["trial"]: r for r in pareto_rows(multi)}
    assert rows[0]["margin_se"] == pytest.approx(0.5) and rows[1]["margin_se"] == pytest.approx(9.5)
