"""The run descriptions dtp_search writes: MLflow's ``mlflow.note.content`` tag, the markdown
a run's Overview shows under *Description*. A refit run's says how to load its model, with
its own run id and the tracking URI filled in; the study run's lists the Pareto refits
(run, test accuracy, sparsity), each a link to its run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dtp_search.redaction import mask_urls

NOTE_TAG = "mlflow.note.content"
# Keeps the UI in its model-training view (it reads this from the URL, else the browser's
# own remembered choice, and falls back to its GenAI pages).
TRAINING_VIEW = "workflowType=machine_learning"


def load_snippet(run_id: str, tracking_uri: str) -> str:
    """The two lines that load refit run ``run_id``'s pruned network (its sparse export
    ``model/pruned.pt``, read with ``weights_only=True``) as an ``nn.Module`` in eval mode;
    a password in ``tracking_uri`` is masked (``***``: the reader fills in their own)."""
    return (
        "from dtp_search import load_pruned\n"
        f"model = load_pruned({run_id!r}, tracking_uri={mask_urls(tracking_uri)!r})"
    )


def run_link(experiment_id: str, run_id: str) -> str:
    """The UI's page of a run, relative to the UI (``#/experiments/<id>/runs/<run>``), in the
    model-training view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def refit_note(
    run_id: str,
    tracking_uri: str,
    *,
    trial: int,
    test_accuracy: float,
    sparsity: float,
    model_uri: str | None = None,
) -> str:
    """A refit run's description: what it is, its figures, and how to load its model."""
    uri = mask_urls(tracking_uri)
    lines = [
        f"**Refit of trial {trial}** on the whole training split, scored once on the test "
        f"split: test accuracy **{test_accuracy:.4f}** at sparsity **{sparsity:.4f}**.",
        "",
        "Load the pruned network (`torch.nn.Module`, eval mode; the export is read with "
        "`weights_only=True`):",
        "",
        "```python",
        load_snippet(run_id, tracking_uri),
        "```",
    ]
    if model_uri:
        lines += [
            "",
            f"or the MLflow model `{model_uri}` (pickled; needs dtp_search installed):",
            "",
            "```python",
            f"import mlflow; mlflow.set_tracking_uri({uri!r})",
            f"model = mlflow.pytorch.load_model({model_uri!r})",
            "```",
        ]
    return "\n".join(lines)


def study_note(
    experiment_id: str, refits: Mapping[str, Mapping[str, Any]], tracking_uri: str
) -> str:
    """The study run's description: its refits (``trial → {run_id, test_accuracy,
    sparsity}``, the study's ``refit`` record) as a markdown table, most accurate first,
    each run a link to its page, and how to load one."""
    rows = sorted(refits.items(), key=lambda kv: -float(kv[1].get("test_accuracy", 0.0)))
    table = [
        "| refit run | trial | test accuracy | sparsity |",
        "|---|---:|---:|---:|",
        *(
            f"| [{r['run_id']}]({run_link(experiment_id, r['run_id'])}) | {n} "
            f"| {float(r['test_accuracy']):.4f} | {float(r['sparsity']):.4f} |"
            for n, r in rows
        ),
    ]
    head = "**Pareto-optimal trials, refitted** on the whole training split and tested once:"
    if not rows:
        return head + "\n\nnone yet."
    best = rows[0][1]["run_id"]
    return "\n".join(
        [
            head,
            "",
            *table,
            "",
            "Load one (here the most accurate):",
            "",
            "```python",
            load_snippet(best, tracking_uri),
            "```",
        ]
    )
