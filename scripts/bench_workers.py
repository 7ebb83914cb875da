"""Wall time of one study run by 1 process and by several, side by side in one run.

Set-ups (same study config, fresh stores each):

* ``sqlite``   — the single-user default, one process;
* ``journal``  — ``study.workers=N`` on this machine (JournalStorage file);
* ``postgres`` — N independent processes (as on N machines) on a throwaway PostgreSQL
  cluster, logging to a throwaway ``mlflow server`` — the servers of tests/servers.py.

Each set-up is checked as it ends: exactly ``n_trials`` COMPLETE trials, one MLflow run per
trial. Usage::

    python scripts/bench_workers.py --workers 2 --n-trials 8 --epochs 10
    python scripts/bench_workers.py --smoke   # checks the script: sqlite and journal, 2 trials
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _cli
import optuna
from _cli import dtp_search
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import mlflow_server, postgres_cluster

BUDGET = [
    "train.finetune_epochs=1",
    "front.points=4",
    "policy.update_every=5",
    "console.progress=false",
    "refit.top_k=1",
]
# --smoke: the tests' tiny budget (tests/inprocess.py TINY), no refit.
SMOKE = [
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
]


def launch(root: Path, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return _cli.start([f"paths.root={root}", *args], root, f)


def run_alone(root: Path, name: str, args: list[str]) -> float:
    """Wall seconds of one ``python -m dtp_search`` that runs the study by itself."""
    start = time.perf_counter()
    done = dtp_search([f"paths.root={root}", *args], cwd=root, log=root / f"{name}-0.log")
    if done.returncode != 0:
        sys.exit(f"{name}: the process failed:\n{done.output[-3000:]}")
    return time.perf_counter() - start


def run(root: Path, name: str, processes: int, args: list[str]) -> float:
    """Wall seconds of ``processes`` concurrent ``python -m dtp_search`` processes (one
    with ``study.workers=N`` starts its workers from its own command line, as Hydra
    parsed it: a process of its own, always)."""
    logs = [root / f"{name}-{i}.log" for i in range(processes)]
    start = time.perf_counter()
    procs = [launch(root, args, log) for log in logs]
    for p, log in zip(procs, logs, strict=True):
        if p.wait() != 0:
            sys.exit(f"{name}: a process failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def check(
    storage: str | optuna.storages.BaseStorage, tracking: str, study_name: str, n_trials: int
) -> str:
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = Counter(t.state.name for t in study.trials)
    workers = len({t.user_attrs.get("worker") for t in study.trials})
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    roles = Counter(r.data.tags.get("dtp_search.role") for r in runs)
    assert states == {"COMPLETE": n_trials}, states
    assert roles["trial"] == n_trials and roles["study"] == 1, roles
    seconds = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials)
    return (
        f"{states['COMPLETE']} COMPLETE by {workers} worker(s), median trial "
        f"{seconds[len(seconds) // 2]:.1f} s; MLflow runs: {dict(sorted(roles.items()))}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--n-trials", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=2, help="train.epochs of each fold")
    ap.add_argument("--folds", type=int, default=2, help="cv.folds")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: 2 one-epoch trials, 2 workers, no PostgreSQL set-up",
    )
    a = ap.parse_args()
    if a.smoke:
        a.workers, a.n_trials, a.epochs, a.folds = 2, 2, 1, 2
    n = a.workers
    common = [
        f"search.n_trials={a.n_trials}",
        f"train.epochs={a.epochs}",
        f"cv.folds={a.folds}",
        *(SMOKE if a.smoke else BUDGET),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="dtp-bench-workers-") as tmp:
        tmp = Path(tmp)
        root = tmp / "sqlite"
        root.mkdir()
        t = run_alone(root, "sqlite", ["study.name=bench", *common])
        results.append(
            (
                "sqlite, 1 process",
                t,
                check(
                    f"sqlite:///{root}/optuna.db",
                    f"sqlite:///{root}/mlflow.db",
                    "bench",
                    a.n_trials,
                ),
            )
        )

        root = tmp / "journal"
        root.mkdir()
        t = run(
            root,
            "journal",
            1,
            [
                "study.name=bench",
                f"study.workers={n}",
                f"study.storage=journal://{root}/optuna.log",
                *common,
            ],
        )
        results.append(
            (
                f"journal, study.workers={n}",
                t,
                check(
                    journal(root / "optuna.log"), f"sqlite:///{root}/mlflow.db", "bench", a.n_trials
                ),
            )
        )

        if a.smoke:  # (it needs PostgreSQL's binaries and a minute to start its servers)
            print("smoke run: the postgres set-up is left out")
        if not a.smoke:
            root = tmp / "postgres"
            root.mkdir()
            (root / "artifacts").mkdir()
            with postgres_cluster() as pg:
                pg = pg.replace("postgresql://", "postgresql+psycopg://")
                with mlflow_server(f"{pg}/mlflow", root / "artifacts") as tracking:
                    storage = f"{pg}/optuna"
                    # Independent processes on one machine share its cores, as
                    # study.workers does for its own workers (torch would oversubscribe).
                    threads = max(1, (os.cpu_count() or 1) // n)
                    t = run(
                        root,
                        "postgres",
                        n,
                        [
                            "study.name=bench",
                            f"study.storage={storage}",
                            f"tracking.uri={tracking}",
                            f"threads={threads}",
                            *common,
                        ],
                    )
                    results.append(
                        (
                            f"postgres + mlflow server, {n} processes",
                            t,
                            check(storage, tracking, "bench", a.n_trials),
                        )
                    )

    base = results[0][1]
    print(
        f"\ndigits, lenet300, agp; {a.n_trials} trials of {a.folds} folds x {a.epochs}+{0 if a.smoke else 1} "
        f"epochs; {n} workers where several; {os.cpu_count()} CPU cores\n"
    )
    print("| set-up | wall time | vs sqlite, 1 process | check |\n| --- | ---: | ---: | --- |")
    for name, t, note in results:
        print(f"| {name} | {t:.1f} s | {base / t:.2f}x | {note} |")


if __name__ == "__main__":
    main()
