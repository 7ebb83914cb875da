"""End-to-end runs of ``python -m dtp_search`` on tiny budgets.

The first run of the resume test and the killed run are real processes (``run_cli``); the
others take the command line's path in this process (``inprocess.run_here``), which spares
each the start-up of a new interpreter."""

import contextlib
import subprocess
from pathlib import Path

import forkserver
import optuna
import pandas as pd
import pytest
from inprocess import run_here
from mlflow.tracking import MlflowClient

from dtp_search.tracking import view_key

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=1",
    "front.points=8",
    "policy.update_every=5",
    "console.progress=false",
]
# Without policy.* keys, for commands that pick other policies.
TINIEST = [
    "cv.folds=2",
    "train.epochs=2",
    "train.finetune_epochs=1",
    "front.points=4",
    "console.progress=false",
]


def run_cli(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return forkserver.run(
        [f"paths.root={root}", *overrides],
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _runs(root: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dtp_search.role") == "study"]
    children = [r for r in runs if r.data.tags.get("dtp_search.role") == "trial"]
    return client, parents, children


@pytest.mark.slow
def test_study_runs_then_resumes_to_the_requested_total(tmp_path):
    root = tmp_path / "runs"
    first = run_cli(root, "study.name=s", "search.n_trials=2", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        "Pareto-optimal trials" in first.stdout and "mlflow ui --backend-store-uri" in first.stdout
    )
    _, parents, _ = _runs(root, "s")
    parent_id = parents[0].info.run_id

    second = run_here(root, "study.name=s", "search.n_trials=3", *TINY)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{root}/optuna.db")
    finished = study.get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    assert len(study.trials) == 3 and len(finished) == 3
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3  # the default space fits this budget: nothing pruned
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # no replayed samples

    client, parents, children = _runs(root, "s")
    assert len(parents) == 1 and parents[0].info.run_id == parent_id  # reused, not duplicated
    assert len(children) == 3
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"front.json", "front.png"} <= arts
        assert child.data.params["policy.name"] == "agp"
        # The trial's own configuration, lean: sampled keys named once in a tag, not
        # repeated as sampled.*; no console, path or store keys; the rest in config.yaml.
        params = child.data.params
        assert child.data.tags["dtp_search.sampled"] == ",".join(
            sorted(
                [
                    "policy.final_sparsity",
                    "policy.scope",
                    "policy.start_epoch",
                    "policy.end_epoch",
                    "policy.recover",
                ]
            )
        )
        # at most 40 (tests/test_run_params.py holds every built-in model x policy to it)
        assert len(params) <= 40 and not any(
            k.startswith(("sampled.", "console.", "paths.", "tracking.", "study.")) for k in params
        )
        assert (
            "config.yaml" in arts
            and child.data.tags["mlflow.source.name"] == "python -m dtp_search"
        )
        (dataset,) = child.inputs.dataset_inputs
        assert dataset.dataset.name == "digits" and '"train": 1437' in dataset.dataset.profile
        # The front as a metric history at step = 1000 * sparsity (MLflow overlays these).
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "front/accuracy")]
        assert steps == sorted(steps) and steps[-1] == 995 and len(steps) >= 8
        # ... beside its x, the sparsity itself at the same steps (the charts' x axis)
        xs = client.get_metric_history(child.info.run_id, "front/sparsity")
        assert [m.step for m in xs] == steps
        assert all(abs(1000 * m.value - m.step) <= 0.5 for m in xs)
        assert child.data.tags["mlflow.loggedImages"] == "True"  # the image grid's "front"
        history = client.get_metric_history(child.info.run_id, "fold_0/val_accuracy")
        assert [m.step for m in history] == [1, 2, 3]
        for key in ("loss", "sparsity", "threshold"):
            assert client.get_metric_history(child.info.run_id, f"fold_1/{key}")
        assert (
            0 < child.data.metrics["cv_accuracy"] <= 1 and child.data.metrics["cv_sparsity"] > 0.4
        )
    # (client.load_table would search the *global* tracking URI, so read the file itself)
    assert '"type": "table"' in children[0].data.tags["mlflow.loggedArtifacts"]
    front = pd.read_json(
        client.download_artifacts(children[0].info.run_id, "front.json", str(tmp_path)),
        orient="split",
    )
    assert len(front[front.source == "sweep"]) >= 8 * 2 and front.sparsity.max() >= 0.99
    parent_arts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"pareto_front.json", "pareto_front.png"} <= parent_arts
    assert (
        '"pareto_front.json", "type": "table"'
        in client.get_run(parent_id).data.tags["mlflow.loggedArtifacts"]
    )
    exp = client.get_experiment(parents[0].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    key = view_key("s")
    assert f"mlflow.sharedViewState.{key}" in exp.tags
    assert (
        f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={key}"
    ) in first.stdout

    third = run_here(root, "study.name=s", "search.n_trials=3", *TINY)  # already complete
    assert third.returncode == 0
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{root}/optuna.db").trials) == 3
    assert len(_runs(root, "s")[2]) == 3


POLICIES = [
    "dense",
    "oneshot_global",
    "random",
    "constant",
    "std_scaled",
    "scheduled",
    "agp",
    "feedback",
    "splicing",
    "soft_threshold",
]


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_from_the_cli(tmp_path, policy):
    root = tmp_path / "runs"
    # (no refit: the policy is what differs here; test_refit and the choice study below
    # refit trained networks)
    res = run_here(root, f"policy={policy}", "search.n_trials=1", "refit.enabled=false", *TINIEST)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(
        study_name=f"digits-lenet300-{policy}", storage=f"sqlite:///{root}/optuna.db"
    )
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    accuracy, sparsity = trial.values
    assert accuracy > 0.3
    assert sparsity == 0.0 if policy == "dense" else sparsity > 0.0
    _, (_parent,), (child,) = _runs(root, f"digits-lenet300-{policy}")
    assert child.data.tags["policy"] == policy == child.data.params["policy.name"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["constant", "std_scaled", "scheduled", "agp", "feedback"])
def test_every_threshold_policy_recovers_from_the_cli(tmp_path, policy):
    root = tmp_path / "runs"
    res = run_here(
        root,
        f"policy={policy}",
        "policy.recover=true",
        "~policy.space.recover",
        "policy.start_epoch=0",
        "policy.update_every=2",
        "search.n_trials=1",
        "refit.enabled=false",
        *TINIEST,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(
        study_name=f"digits-lenet300-{policy}", storage=f"sqlite:///{root}/optuna.db"
    )
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial.values[0] > 0.3 and trial.values[1] > 0.0
    client, _, (child,) = _runs(root, f"digits-lenet300-{policy}")
    assert child.data.params["policy.recover"] == "True"
    # Weights spliced back, per epoch: logged for every fold and as the mean curve.
    history = client.get_metric_history(child.info.run_id, "fold_0/recovered")
    assert [m.step for m in history] == [1, 2, 3] and history[-1].value == 0  # masks frozen
    assert client.get_metric_history(child.info.run_id, "recovered")


@pytest.mark.slow
def test_policy_searched_as_a_choice_across_all_policies(tmp_path):
    root = tmp_path / "runs"
    res = run_here(
        root, "policy=choice", "study.name=mix", "search=random", "search.n_trials=6", *TINIEST
    )
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="mix", storage=f"sqlite:///{root}/optuna.db")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 6
    used = {t.params["policy"] for t in trials}
    assert len(used) >= 3 and used <= set(POLICIES)
    for t in trials:  # only the chosen policy's conditional sub-space is sampled
        assert {k.split(".")[0] for k in t.params if k != "policy"} <= {t.params["policy"]}
    client, (parent,), children = _runs(root, "mix")
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["policy"] == t.params["policy"] == run.data.params["policy.name"]
        assert "policy.options.agp.final_sparsity" not in run.data.params  # only the trial's policy
    pareto = pd.read_json(
        client.download_artifacts(parent.info.run_id, "pareto_front.json", str(tmp_path)),
        orient="split",
    )
    assert set(pareto.policy) <= used and len(pareto) >= 1


@pytest.mark.slow
@pytest.mark.cifar
def test_cifar_experiment_runs_offline_on_the_local_copy(tmp_path, cifar10_dir):
    root = tmp_path / "runs"
    res = run_here(
        root,
        "+experiment=cifar",
        f"dataset.path={cifar10_dir}",
        "search.n_trials=1",
        "dataset.train_limit=600",
        "dataset.test_limit=100",
        "train.batch_size=64",
        "train.epochs=2",
        *TINY,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(
        study_name="cifar10-simple_cnn-agp", storage=f"sqlite:///{root}/optuna.db"
    )
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial.values[1] > 0.4  # sparsity reached


@pytest.mark.slow
def test_a_killed_run_is_resumed_and_its_trial_retried(tmp_path):
    """SIGKILL mid-trial, rerun the same command: the stale trial is failed by Optuna's
    heartbeat and retried with the same parameters; its MLflow run ends FAILED."""
    import signal
    import sqlite3
    import time

    root = tmp_path / "runs"
    args = [
        "study.name=k",
        "search.n_trials=2",
        "cv.folds=2",
        "train.epochs=60",
        "train.finetune_epochs=1",
        "search.heartbeat_interval=1",
        "search.grace_period=2",
        "console.progress=false",
    ]
    proc = forkserver.popen(
        [f"paths.root={root}", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    running = 0
    while time.time() < deadline and not running:
        time.sleep(0.5)
        if (root / "optuna.db").exists():
            with (
                sqlite3.connect(root / "optuna.db") as db,
                contextlib.suppress(sqlite3.OperationalError),
            ):
                running = db.execute(
                    "select count(*) from trials where state='RUNNING'"
                ).fetchone()[0]
    assert running, "no trial started"
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the grace period

    # A shorter rerun, so that the retry is quick: a change the study must be told of.
    rerun = run_here(
        root, *args[:3], "train.epochs=2", *args[4:], "study.allow_changes=[train.epochs,policy]"
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{root}/optuna.db")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retried and retried[0].params == failed.params
    _, _, children = _runs(root, "k")
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert by_number[failed.number].info.status == "FAILED"
    assert all(c.info.status != "RUNNING" for c in children)


@pytest.mark.slow
def test_single_objective_study_stops_hopeless_trials_after_a_fold(tmp_path):
    root = tmp_path / "runs"
    # Accuracy under a sparsity constraint; final sparsities up to 0.999 make some trials
    # hopeless, and the median pruner (one trial to start from) stops them after fold 0.
    proc = run_here(
        root,
        "study.name=single",
        "search.n_trials=8",
        "search.objectives=[accuracy]",
        "search.directions=[maximize]",
        "search.min_sparsity=0.6",
        "search.early_stop.n_startup_trials=1",
        "refit.enabled=false",
        "policy.space.final_sparsity.high=0.999",
        "cv.folds=3",
        *TINY[1:],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="single", storage=f"sqlite:///{root}/optuna.db")
    states = [t.state for t in study.trials]
    assert len(study.trials) == 8
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states
    for t in pruned:
        assert t.user_attrs["prune_reason"].startswith("stopped by MedianPruner after fold")
        assert len(t.intermediate_values) < 3  # it did not run every fold
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete and all(set(t.constraints) == {"min_sparsity"} for t in complete)
    assert all(sorted(t.intermediate_values) == [0, 1, 2] for t in complete)
    feasible = [t for t in complete if t.constraints["min_sparsity"] <= 0]
    if feasible:
        assert study.best_trial.number in {t.number for t in feasible}
