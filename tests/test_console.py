"""The Pareto table ``python -m dtp_search`` prints at the end, at a default terminal's 80
columns and at 200: every sampled key with its full value on one line, no cell cut with
"…", no line wider than the terminal; and no MLflow INFO line among the run's output."""

from __future__ import annotations

import logging
import types

import optuna
import pytest
from inprocess import TINY, run_here
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from dtp_search.tracking.console import Console

SPACE = {
    "policy.final_sparsity": FloatDistribution(0.0, 1.0),
    "policy.scope": CategoricalDistribution(["global", "layer"]),
    "policy.start_epoch": IntDistribution(0, 20),
    "policy.end_epoch": IntDistribution(0, 20),
    "policy.recover": CategoricalDistribution([True, False]),
    "train.lr": FloatDistribution(1e-5, 1.0, log=True),
}


def _study(costs: tuple[str, ...]) -> optuna.Study:
    """Three non-dominated trials of the longest policy name, every kind of sampled value,
    the measured ``costs``, and a refit test accuracy for one of them."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["accuracy", "sparsity"])
    study.set_user_attr("refit", {"1": {"test_accuracy": 0.8123}})
    for n, (acc, sp) in enumerate([(0.9123, 0.5), (0.8, 0.7345), (0.6, 0.95)]):
        params = {
            "policy.final_sparsity": sp + 0.0123456,
            "policy.scope": ["global", "layer"][n % 2],
            "policy.start_epoch": 3 + n,
            "policy.end_epoch": 12,
            "policy.recover": bool(n % 2),
            "train.lr": 0.000123456789 * (n + 1),
        }
        attrs = {"policy": "oneshot_global", "cv_accuracy": acc, "cv_accuracy_std": 0.0111}
        attrs |= {"cv_sparsity": sp, "cv_sparsity_std": 0.0022}
        for c in costs:
            attrs |= {f"cv_{c}": 1 - sp, f"cv_{c}_std": 0.0033}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=SPACE, values=[acc, sp], user_attrs=attrs
            )
        )
    return study


def _pairs(study: optuna.Study) -> list[str]:
    """Every trial's sampled values as the table shows them."""
    return [p for t in study.trials for p in _pairs_of(t)]


def _table(text: str) -> list[str]:
    """The lines of the Pareto table in a run's output."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Pareto-optimal trials"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("Browse the study in MLflow"))
    return lines[start:end]


def _assert_fits(lines: list[str], pairs: list[str], width: int) -> None:
    assert all(len(ln) <= width for ln in lines), "\n".join(lines)
    assert not any("…" in ln for ln in lines), "\n".join(lines)
    assert not any(ln != ln.rstrip() for ln in lines), "trailing blanks"
    for pair in pairs:  # whole, on one line, a word of its own
        assert any(pair in ln.replace(",", " ").split() for ln in lines), (pair, lines)


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("costs", [(), ("flops",), ("flops", "params", "latency")])
def test_pareto_table_shows_every_sampled_value_in_full(monkeypatch, width, costs):
    monkeypatch.setenv("COLUMNS", str(width))  # what rich reads for the terminal's width
    study = _study(costs)
    console = Console()
    with console.out.capture() as captured:
        name = types.SimpleNamespace(name="digits-lenet300-oneshot_global")
        console.summary(study, types.SimpleNamespace(study=name), "mlflow ui")
    lines = _table(captured.get())
    _assert_fits(lines, _pairs(study), width)
    rows = [ln for ln in lines if ln.lstrip().split(" ")[0] in {"0", "1", "2"}]
    assert len(rows) == 3
    assert all("oneshot_global" in ln for ln in rows)
    assert "0.8123" in rows[1] and "—" in rows[0] and "—" in rows[2]  # refit or not
    if width == 200 or not costs:
        # one line per trial, all its numbers on it; its sampled values beneath it
        # (at 80 columns a cost column and the Δ/SE column put "±std" beneath)
        for ln, acc in zip(rows, ("0.9123", "0.8000", "0.6000"), strict=True):
            assert acc in ln and ln.count("±") == 2 + len(costs), ln
        spaced = width == 200 or not costs  # " ± " while it fits, "±" to fit 80 columns
        assert ("0.9123 ± 0.0111" in rows[0]) == spaced, rows[0]
        assert ("0.9123±0.0111" in rows[0]) != spaced, rows[0]
    else:  # too many columns for 80: each value's "±std" on the line beneath it
        assert "0.9123" in rows[0] and "±0.0111" in lines[lines.index(rows[0]) + 1]
    if width == 200:  # each trial's sampled values on the one line beneath it
        for n, row in enumerate(rows):
            beneath = lines[lines.index(row) + 1].strip().split(", ")
            assert set(_pairs_of(study.trials[n])) == set(beneath), beneath


@pytest.mark.slow
def test_run_prints_the_table_at_80_columns_without_mlflow_info(tmp_path, monkeypatch):
    """The command itself: a fresh MLflow store (whose creation MLflow logs at INFO) and a
    policy with several sampled keys, at 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    res = run_here(tmp_path / "runs", *TINY, "policy=agp", premade_store=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "INFO mlflow" not in res.stdout + res.stderr
    assert "Creating initial MLflow database tables" not in res.stdout + res.stderr
    # quieted to WARNING, not silenced
    assert logging.getLogger("mlflow.store.db.utils").isEnabledFor(logging.WARNING)
    study = optuna.load_study(
        study_name="digits-lenet300-agp", storage=f"sqlite:///{tmp_path}/runs/optuna.db"
    )
    front = {int(ln.split()[0]) for ln in _table(res.stdout) if ln[:5].strip().isdigit()}
    assert front and {"final_sparsity", "start_epoch"} <= {
        k.split(".")[-1] for t in study.trials for k in t.params
    }
    pairs = [p for t in study.trials if t.number in front for p in _pairs_of(t)]
    _assert_fits(_table(res.stdout), pairs, 80)


def _pairs_of(trial: optuna.trial.FrozenTrial) -> list[str]:
    """``trial``'s sampled values as the table shows them: ``key=value``, floats to four
    significant digits."""
    return [
        f"{key.split('.')[-1]}={f'{v:.4g}' if isinstance(v, float) else v}"
        for key, v in trial.params.items()
    ]
