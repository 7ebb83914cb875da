"""Bad input gets a one-line error naming the key, the value and what is allowed, exit
status 2, no traceback — before any training, and with the study's stores untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["cv.folds=2", "train.epochs=1", "train.finetune_epochs=0", "front.points=2",
        "console.progress=false", "refit.enabled=false", "search.n_trials=1"]

# (overrides, fragment the one-line message must contain)
CASES = [
    (["model=foo"], "model='foo' is not a known model; allowed: ['lenet300'"),
    (["dataset=foo"], "dataset='foo' is not a known dataset; allowed:"),
    (["policy=agpp"], "policy='agpp' is not a known policy; allowed: ['agp'"),
    (["search=bogus"], "search='bogus' is not a known search; allowed: ['nsga2'"),
    (["pruner=bogus"], "pruner='bogus' is not a known pruner; allowed: ['median'"),
    (["+experiment=cifarr"], "experiment='cifarr' is not a known experiment"),
    (["trian.epochs=3"], "Could not override 'trian.epochs'"),
    (["train.epochs=[1"], "cannot read the override 'train.epochs=[1'"),
    (["~nokey"], "'nokey' does not exist"),
    (["cv.folds=1"], "cv.folds=1 is not allowed; need >= 2"),
    (["cv.folds=500"], "cv.folds=500 exceeds the smallest class"),
    (["search.n_trials=0"], "search.n_trials=0 is not allowed; need >= 1"),
    (["search.objectives=[speed]"], "search.objectives=['speed'] is not allowed"),
    (["search.directions=[up,down]"], "search.directions=['up', 'down'] must give one of"),
    (["search.min_sparsity=1.5"], "search.min_sparsity=1.5 is not allowed; allowed: null or a number in [0, 1)"),
    (["study.storage=redis://localhost/0"], "allowed schemes: ['sqlite', 'postgresql'"),
    (["study.workers=2"], "study.workers=2 with study.storage="),
    (["study.workers=0"], "study.workers=0 is not allowed"),
    (["refit.top_k=0"], "refit.top_k=0 is not allowed"),
    (["refit.register=maybe"], "refit.register='maybe' is not allowed; allowed: true, false"),
    (["mode=bogus"], "mode='bogus' is not allowed; allowed:"),
    (["policy.final_sparsity=1.5"], "policy: final_sparsity must be in [0, 1), got 1.5"),
    (["model=lenet5", "model.padding=[0,0]"], "model=lenet5: model=lenet5 cannot take 8×8 inputs"),
    (["dataset=cifar10", "dataset.path=/nonexistent/cifar"], "dataset.path='/nonexistent/cifar' does not exist"),
    (["dataset=imagefolder"], "dataset.path is required for dataset=imagefolder"),
    (["train.optimizer=lbfgs"], "train.optimizer='lbfgs' is not allowed; allowed: ['sgd', 'adam']"),
    (["train.epochs=abc"], "train.epochs='abc' is not allowed; allowed: an integer >= 0"),
    (["train.lr=-1"], "train.lr=-1 is not allowed; allowed: a number > 0"),
    (["train.momentum=1.5"], "train.momentum=1.5 is not allowed; allowed: a number in [0.0, 1.0)"),
    (["paths.root=/proc/dtp-nope"], "paths.root='/proc/dtp-nope' cannot be written"),
    (["study.name=nan"], "study.name=nan is not allowed; allowed: a non-empty text"),
    (["+search.space={train.lr: {type: float, low: 0.1, high: 0.01}}"],
     "search space key 'train.lr': empty range low=0.1 > high=0.01"),
    (["+search.space={train.lr: {type: bogus}}"],
     "search space key 'train.lr': type='bogus' is not allowed; allowed: ['float', 'int', 'categorical']"),
    (["policy=constant", "policy.theta=-0.1"], "policy: theta must be >= 0, got -0.1"),
    (["front.update_samples=0"], "front.update_samples=0 is not allowed; allowed: null or an integer >= 1"),
    (["front.max_sparsity=1.5"], "front.max_sparsity=1.5 is not allowed; allowed: a number in (0, 1)"),
    (["policy.on_collapse=fail"], "on_collapse='fail' is not allowed; allowed: ['restore', 'prune', 'penalize']"),
    (["policy.min_keep=2.5"], "min_keep=2.5 is not allowed; allowed: a fraction in [0, 1) or a whole count"),
]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    """A folder whose study already holds one finished trial."""
    root = tmp_path_factory.mktemp("bad") / "runs"
    proc = subprocess.run([sys.executable, "-m", "dtp_search", f"paths.root={root}",
                           "study.name=kept", *TINY], capture_output=True, text=True,
                          cwd=root.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "fragment"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(study_root, overrides, fragment):
    stores = [study_root / "optuna.db", study_root / "mlflow.db"]
    before = [_digest(p) for p in stores]
    root = [] if any(o.startswith("paths.root=") for o in overrides) else [f"paths.root={study_root}"]
    proc = subprocess.run([sys.executable, "-m", "dtp_search", *root, "study.name=kept", *TINY,
                           *overrides], capture_output=True, text=True, cwd=study_root.parent,
                          timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [_digest(p) for p in stores] == before  # byte for byte
