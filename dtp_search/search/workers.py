"""``study.workers=N``: N worker processes on this machine share one study.

Each worker is the same ``python -m dtp_search`` command (same overrides, so the same
composed config) with ``study.workers=1``, its share of the CPU threads, one GPU when
several are visible, and :data:`WORKER_ENV` set so that it only
searches. Processes rather than threads: a trial holds the GIL for its whole Python
training loop, and a process that dies takes only its own trial with it (the others
retry it). This process watches the study's progress, then refits and reports once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from dtp_search.errors import StorageUnavailable
from dtp_search.interrupts import request_stop, stop_if_requested, stop_now
from dtp_search.settings import Settings
from dtp_search.tracking.console import Console
from dtp_search.tracking.results import FINISHED

log = logging.getLogger(__name__)

# Set in the processes that ``study.workers=N`` starts: they search only; the launching
# process refits and reports once they are done.
WORKER_ENV = "DTP_SEARCH_WORKER"


def _overrides() -> list[str]:
    """The command line's overrides, as Hydra parsed them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _gpus() -> list[str]:
    """Visible GPU ids (from CUDA_VISIBLE_DEVICES when set), without initialising CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_commands(
    settings: Settings, overrides: list[str], log_dir: Path
) -> list[tuple[list[str], dict[str, str], Path]]:
    """``(argv, environment, log file)`` for each of the ``study.workers`` processes."""
    n = settings.study.workers
    total_threads = settings.threads or os.cpu_count() or 1
    threads = max(1, total_threads // n)
    gpus = _gpus() if str(settings.device) in ("auto", "cuda") else []
    keep = [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~")
        not in ("study.workers", "threads", "console.progress", "hydra.run.dir")
    ]
    out = []
    for i in range(n):
        env = dict(os.environ, **{WORKER_ENV: str(i)})
        if len(gpus) > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        argv = [
            sys.executable,
            "-m",
            "dtp_search",
            *keep,
            "study.workers=1",
            f"threads={threads}",
            "console.progress=false",
            f"hydra.run.dir={log_dir / f'worker-{i}'}",
        ]
        out.append((argv, env, log_dir / f"worker-{i}.log"))
    return out


def run_workers(settings: Settings, study: optuna.Study, target: int, console: Console) -> bool:
    """Start the workers, show the study's progress, wait for them; True when the study
    holds ``target`` finished trials."""
    log_dir = (
        Path(settings.paths.root)
        / "workers"
        / f"{settings.study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = worker_commands(settings, _overrides(), log_dir)
    console.out.print(f"  {len(commands)} workers, logs in {log_dir}", soft_wrap=True)
    procs: list[tuple[subprocess.Popen, Path]] = []

    def on_sigterm(signum: int, frame: object) -> None:
        # At once (not at the next poll): a scheduler's SIGTERM is followed by SIGKILL.
        # An interrupt like Ctrl-C: exit status 130, the parent run KILLED.
        request_stop(signal.Signals(signum).name)
        stop_now()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for argv, env, log_file in commands:
            with open(log_file, "wb") as f:
                procs.append(
                    (subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT), log_file)
                )
        finished = lambda: sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))  # noqa: E731
        with console.trials(target, finished()) as advance:
            while any(p.poll() is None for p, _ in procs):
                time.sleep(1.0)
                stop_if_requested()  # Ctrl-C here (see dtp_search.__main__)
                try:
                    trials = study.get_trials(deepcopy=False)
                except StorageUnavailable:
                    # The workers meet the same outage and decide for themselves (each
                    # ends with its own error line); the progress waits for them.
                    continue
                done = [t for t in trials if t.state.is_finished()]
                if done:
                    advance(
                        max(done, key=lambda t: t.datetime_complete or t.datetime_start), finished()
                    )
    except BaseException:
        # Ctrl-C reaches the workers through the terminal's process group; SIGTERM and
        # other exits are passed on here, so no worker outlives this process.
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    for i, (p, log_file) in enumerate(procs):
        if p.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
            log.warning(
                "worker %d exited with %d; last lines of %s:\n%s",
                i,
                p.returncode,
                log_file,
                "\n".join(tail),
            )
    done = finished()
    if done < target:
        log.warning("the workers stopped with %d/%d finished trials", done, target)
    return done >= target
