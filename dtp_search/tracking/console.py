"""Console output: progress bars for trials and epochs, and the final Pareto table (rich)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.cells import cell_len
from rich.console import Console as RichConsole
from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dtp_search.redaction import mask_urls
from dtp_search.settings import COST_OBJECTIVES, Settings
from dtp_search.storage import mask_url
from dtp_search.tracking import records
from dtp_search.tracking.results import pareto_rows


class Console:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.out = RichConsole(stderr=False, highlight=False)
        self._progress: Progress | None = None

    def header(self, settings: Settings, study: Any, done: int, target: int, device: Any) -> None:
        verb = "resuming" if done or study.trials else "starting"
        n = settings.cv.repeats
        repeats = f"x{n} repeats" if n > 1 else ""
        self.out.print(
            f"[bold]dtp_search[/] {verb} study [cyan]{settings.study.name}[/] "
            f"({done}/{target} complete) · policy={settings.policy['name']} "
            f"model={settings.model.name} dataset={settings.dataset.name} "
            f"folds={settings.cv.folds}{repeats} device={device}"
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
        """Print the study's Pareto-optimal trials and how to browse them in MLflow.

        One line per trial (number, policy, CV accuracy ± std, sparsity ± std, each
        measured cost, the margin over the next trial in standard errors, test accuracy
        where refit) with its sampled values beneath it,
        wrapped at word boundaries: at 80 columns (a default terminal, CI logs) a table
        cell for the sampled values would be cut to ``final_sparsi…``, which is what the
        user came for. No cell is ever cut with an ellipsis: where the numbers do not fit
        on one line they lose their spaces round "±", then put "±std" beneath."""
        rows = pareto_rows(study)
        # The costs the trials measured (search.objectives, search.max_flops): the
        # fractions of the dense network's FLOPs, parameters, latency.
        costs = [c for c in COST_OBJECTIVES if any(records.cv(c) in r for r in rows)]
        # Δ/SE: the accuracy over the next less accurate trial in units of this one's
        # standard error (tracking/selection.py); under 1 the difference is noise.
        headers = ["trial", "policy", "CV accuracy", "sparsity", *costs, "Δ/SE", "test accuracy"]

        def cells(pm: str) -> list[list[str]]:
            return [
                [
                    str(r["trial"]),
                    r["policy"],
                    f"{r['accuracy']:.4f}{pm}{r['accuracy_std']:.4f}",
                    f"{r['sparsity']:.4f}{pm}{r['sparsity_std']:.4f}",
                    *(
                        f"{r.get(records.cv(c), float('nan')):.4f}{pm}{r.get(records.cv_std(c), 0.0):.4f}"
                        for c in costs
                    ),
                    _margin(r.get("margin_se", float("nan"))),
                    _or_dash(r.get("test_accuracy", float("nan"))),
                ]
                for r in rows
            ]

        # Every trial is a grid of its own (rich tables have no cell spanning a row, which
        # the sampled values need), with the same fixed column widths so that the grids'
        # columns line up. A header may wrap at its space ("test / accuracy"). The widest
        # layout that fits the terminal: every number on one line ("0.9123 ± 0.0100"),
        # else without the spaces round "±", else the "±std" beneath each value.
        for pm, longest in ((" ± ", cell_len), ("±", cell_len), ("\n±", _widest_line)):
            table = cells(pm)
            widths = [
                max([longest(row[i]) for row in table] + [_longest_word(h)])
                for i, h in enumerate(headers)
            ]
            if sum(widths) + _GAP * (len(widths) - 1) <= self.out.width:
                break
        indent = widths[0] + _GAP
        parts: list[Any] = [
            Text(f"Pareto-optimal trials — {settings.study.name}", style="bold"),
            *self._line(headers, widths, style="bold", vertical="bottom"),
        ]
        for r, row in zip(rows, table, strict=True):
            parts += self._line(row, widths)
            # Wrapped here, not in a padded renderable: rich would pad every line with
            # spaces to the widest one, trailing blanks in every log.
            params = Text(r["params"]).wrap(
                self.out, max(self.out.width - indent, 1), overflow="fold"
            )
            for line in params:
                line.rstrip()  # (the space after a comma where the line breaks)
                parts.append(Text(" " * indent) + line)
        if not rows:
            parts.append(Text("(no complete trial)", style="dim"))
        else:
            for line in Text(_MARGIN_NOTE, style="dim").wrap(self.out, self.out.width):
                line.rstrip()
                parts.append(line)
        self.out.print(Group(*parts))
        self.out.print("Browse the study in MLflow:")
        # An http tracking URI may carry user:password@ (MLflow's basic auth).
        self.out.print(f"  {mask_urls(ui_command)}", soft_wrap=True)

    def _line(
        self, cells: list[str], widths: list[int], style: str = "", vertical: str = "top"
    ) -> list[Text]:
        """One row of the Pareto table, as its lines: the trial number and numbers
        right-aligned (digits line up), the policy left-aligned; the header's one-word
        titles ``vertical="bottom"``, on the line of a wrapped title's last word."""
        grid = Table.grid(padding=(0, _GAP, 0, 0))
        for i, width in enumerate(widths):
            grid.add_column(
                justify="left" if i == 1 else "right",
                vertical=vertical,
                width=width,
                overflow="fold",
                style=style,
            )
        grid.add_row(*cells)
        # A wrapped cell pads its neighbours' lines with blanks; none left trailing.
        lines = []
        for segments in self.out.render_lines(grid, self.out.options, pad=False):
            line = Text.assemble(*((seg.text, seg.style) for seg in segments if not seg.control))
            line.rstrip()
            lines.append(line)
        return lines


_MARGIN_NOTE = (
    "Δ/SE: CV accuracy over the next less accurate trial, in this trial's standard errors "
    "(cv std / √(folds·repeats)); under 1 the difference is noise."
)
# Spaces between the Pareto table's columns.
_GAP = 2


def _widest_line(text: str) -> int:
    """The width of ``text``'s widest line (a value over its "±std")."""
    return max(cell_len(line) for line in text.split("\n"))


def _longest_word(text: str) -> int:
    """The width of ``text``'s longest word: the narrowest column that wraps a header at
    its spaces without cutting a word."""
    return max((cell_len(w) for w in text.split()), default=0)


def _margin(value: float) -> str:
    """A Pareto trial's margin over the next one in standard errors, "—" where none."""
    return "—" if value != value else "∞" if value == float("inf") else f"{value:.1f}"


def _or_dash(value: float) -> str:
    """A test accuracy, or "—" for a trial that was not refit (NaN)."""
    return "—" if value != value else f"{value:.4f}"
