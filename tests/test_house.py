"""Housekeeping of a run: what it leaves beside the stores, and which warnings it lets out."""

from __future__ import annotations

import warnings

import optuna
import pytest
from inprocess import TINY, run_here
from omegaconf import OmegaConf
from optuna.exceptions import ExperimentalWarning

from dtp_search.search.space import SPACE_ATTR, parse_space, pin_derived
from dtp_search.storage import LOCK_DIR, StudyLock


def test_runs_keep_their_lock_files_in_one_folder_and_reuse_them(tmp_path):
    root = tmp_path / "runs"
    for name in ("a", "b"):
        assert run_here(root, *TINY, f"study.name={name}").returncode == 0
    assert not list(root.glob("*.lock"))  # nothing beside the stores
    locks = sorted(p.name for p in (root / LOCK_DIR).iterdir())
    assert len(locks) >= 4  # (both studies' admission and parent-run locks at least)
    assert all(n.startswith("optuna.db.") and n.endswith(".lock") for n in locks)
    # Study a's locks, taken again, are the files its run left: the folder does not grow.
    for purpose in ("admit", "mlflow-parent"):
        with StudyLock(f"sqlite:///{root}/optuna.db", "a", purpose):
            pass
    assert sorted(p.name for p in (root / LOCK_DIR).iterdir()) == locks


def _space_cfg(epochs: int, high: object = "${train.epochs}"):
    return OmegaConf.create(
        {
            "train": {"epochs": epochs},
            "policy": {
                "name": "agp",
                "end_epoch": "${train.epochs}",
                "final_sparsity": 0.9,
                "space": {
                    "end_epoch": {"type": "int", "low": 1, "high": high},
                    "final_sparsity": {"type": "float", "low": 0.5, "high": 0.9},
                },
            },
            "search": {"space": {}},
        }
    )


def _high(space, param: str = "policy.end_epoch") -> float:
    return next(d.high for d in space.dimensions if d.param == param)


def test_a_bound_from_another_key_is_pinned_to_the_one_the_study_began_with():
    study = optuna.create_study()
    first = pin_derived(study, parse_space(_space_cfg(2)))
    assert _high(first) == 2
    assert set(study.user_attrs[SPACE_ATTR]) == {"policy.end_epoch", "policy.final_sparsity"}
    later = parse_space(_space_cfg(3))
    assert [d.derived for d in later.dimensions] == [True, False]
    assert _high(pin_derived(study, later)) == 2  # the stored bound, not today's 3
    # A bound written out in full is what the user asked for: not pinned.
    assert _high(pin_derived(study, parse_space(_space_cfg(3, high=5)))) == 5


def test_a_study_made_before_the_stored_space_pins_to_its_trials_distributions():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_int("policy.end_epoch", 1, 2), n_trials=1)
    assert _high(pin_derived(study, parse_space(_space_cfg(4)), record=False)) == 2
    assert SPACE_ATTR not in study.user_attrs  # record=False (a worker) only reads


def test_a_rerun_with_more_epochs_samples_the_distribution_the_study_began_with(tmp_path):
    root = tmp_path / "runs"
    common = (*TINY, "study.name=s")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_here(root, *common, "train.epochs=2").returncode == 0
        # (the fixed policy.end_epoch follows train.epochs, and so does the spec's
        # resolved value: the drift check asks for both to be allowed)
        allow = "study.allow_changes=[train.epochs,policy.end_epoch,policy.space.end_epoch.high]"
        again = run_here(root, *common, "train.epochs=3", "search.n_trials=3", allow)
        assert again.returncode == 0, again.stderr
    assert not [w for w in caught if "Inconsistent parameter values" in str(w.message)]
    # Heartbeats, metric names, TPE's group: experimental in Optuna, used on purpose, and
    # silenced where they are used (execute() no longer hides every such warning).
    assert not [w for w in caught if issubclass(w.category, ExperimentalWarning)]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{root}/optuna.db")
    ends = [t.distributions["policy.end_epoch"] for t in study.trials]
    assert len(ends) == 3 and {d.high for d in ends} == {2}


def test_a_runtime_warning_from_dtp_search_fails_the_test_that_meets_it():
    """pyproject's filter: dtp_search's own RuntimeWarnings are errors, others' are not."""
    with pytest.raises(RuntimeWarning):
        warnings.warn_explicit("x", RuntimeWarning, "space.py", 1, module="dtp_search.search.space")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("y", RuntimeWarning, "other.py", 1, module="dtp_searchlike")
    assert len(caught) == 1
