"""Console output: progress bars for trials and epochs, and the final Pareto table (rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dtp_search.redaction import mask_urls
from dtp_search.results import pareto_rows
from dtp_search.settings import COST_OBJECTIVES, Settings
from dtp_search.storage import mask_url


class Console:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.out = RichConsole(stderr=False, highlight=False)
        self._progress: Progress | None = None

    def header(self, settings: Settings, study: Any, done: int, target: int, device: Any) -> None:
        verb = "resuming" if done or study.trials else "starting"
        self.out.print(
            f"[bold]dtp_search[/] {verb} study [cyan]{settings.study.name}[/] "
            f"({done}/{target} complete) · policy={settings.policy['name']} "
            f"model={settings.model.name} dataset={settings.dataset.name} "
            f"folds={settings.cv.folds} device={device}"
        )
        self.out.print(f"  optuna storage: {mask_url(settings.study.storage)}", soft_wrap=True)
        self.out.print(f"  mlflow store:   {mask_url(settings.tracking.uri)}", soft_wrap=True)

    @contextlib.contextmanager
    def trials(self, target: int, done: int) -> Iterator[Callable[[Any, int], None]]:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.out,
            disable=not self.enabled,
            transient=False,
        )
        self._progress = progress
        task = progress.add_task("trials", total=target, completed=done, info="")
        with progress:

            def advance(frozen: Any, finished: int) -> None:
                """Show the last trial; ``finished``: trials that count toward the target."""
                values = (
                    "" if frozen.values is None else " ".join(f"{v:.4f}" for v in frozen.values)
                )
                progress.update(
                    task,
                    completed=min(finished, target),
                    info=f"last: #{frozen.number} {frozen.state.name} {values}",
                )

            yield advance
        self._progress = None

    @contextlib.contextmanager
    def folds(
        self, n_folds: int, n_epochs: int, trial: int
    ) -> Iterator[Callable[[int, Any], None]]:
        progress = self._progress
        if progress is None:
            yield lambda fold, rec: None
            return
        task = progress.add_task(f"  trial {trial} epochs", total=n_folds * n_epochs, info="")

        def update(fold: int, rec: Any) -> None:
            progress.update(
                task,
                advance=1,
                info=f"fold {fold} ep {rec.epoch} loss {rec.loss:.3f} "
                f"acc {rec.val_accuracy:.3f} sp {rec.sparsity:.3f}",
            )

        try:
            yield update
        finally:
            progress.remove_task(task)

    def summary(self, study: Any, settings: Settings, ui_command: str) -> None:
        rows = pareto_rows(study)
        table = Table(title=f"Pareto-optimal trials — {settings.study.name}", show_lines=False)
        # The costs the trials measured (search.objectives, search.max_flops): the
        # fractions of the dense network's FLOPs, parameters, latency.
        costs = [c for c in COST_OBJECTIVES if any(f"cv_{c}" in r for r in rows)]
        numeric = ("trial", "CV accuracy", "sparsity", *costs, "test accuracy")
        for col in (
            "trial",
            "policy",
            "sampled values",
            "CV accuracy",
            "sparsity",
            *costs,
            "test accuracy",
        ):
            table.add_column(col, justify="right" if col in numeric else "left")
        for r in rows:
            test = r.get("test_accuracy", float("nan"))
            table.add_row(
                str(r["trial"]),
                r["policy"],
                r["params"],
                f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
                f"{r['sparsity']:.4f} ± {r['sparsity_std']:.4f}",
                *(
                    f"{r.get(f'cv_{c}', float('nan')):.4f} ± {r.get(f'cv_{c}_std', 0.0):.4f}"
                    for c in costs
                ),
                "—" if test != test else f"{test:.4f}",
            )
        self.out.print(table)
        self.out.print("Browse the study in MLflow:")
        # An http tracking URI may carry user:password@ (MLflow's basic auth).
        self.out.print(f"  {mask_urls(ui_command)}", soft_wrap=True)
