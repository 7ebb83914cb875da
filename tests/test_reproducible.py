"""The same seed and config give the same trials on CPU, bit for bit: sampled parameters,
objective values and per-epoch losses.

The two studies run in two processes: a fresh ``python -m dtp_search`` and this one, which
has run other tests before (another hash seed, other state in torch's and NumPy's
generators), through the command line's path (``inprocess.run_here``)."""

import forkserver
import optuna
import pytest
from inprocess import run_here

ARGS = [
    "study.name=repro",
    "search.n_trials=3",
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=1",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
    "seed=7",
]


@pytest.mark.slow
def test_same_seed_same_trials(tmp_path):
    studies = []
    for name in ("a", "b"):
        root = tmp_path / name
        if name == "a":
            proc = forkserver.run(
                [f"paths.root={root}", *ARGS],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
        else:
            proc = run_here(root, *ARGS, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        studies.append(optuna.load_study(study_name="repro", storage=f"sqlite:///{root}/optuna.db"))
    a, b = (sorted(s.trials, key=lambda t: t.number) for s in studies)
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.values for t in a] == [t.values for t in b]  # exact, not approximate
    assert [t.user_attrs["cv_accuracy_std"] for t in a] == [
        t.user_attrs["cv_accuracy_std"] for t in b
    ]
