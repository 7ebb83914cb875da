"""The study report: one self-contained ``report.html`` on the study's parent MLflow run.

It holds the Pareto table (CV and test accuracy, sparsity, the costs the trials measured,
measures of the refit models), the Pareto front — against the study's second objective,
sparsity or a cost — over every trial's own front (drawn faintly) with the baselines marked,
the per-layer sparsity of each refit model, and Optuna's optimisation-history and
parameter-importance plots (``optuna.visualization.matplotlib``). Figures are embedded as
base64 PNGs, so the file opens anywhere without the MLflow server.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState

from dtp_search.settings import COST_OBJECTIVES
from dtp_search.tracking import notes, records
from dtp_search.tracking.front_axis import AXIS_LABELS, row_key
from dtp_search.tracking.plots import legend, plot_layer_sparsity, plot_pareto
from dtp_search.tracking.results import pareto_rows, study_axis, trial_points
from dtp_search.tracking.study_run import StudyTracker

log = logging.getLogger(__name__)

BASELINES = ("dense", "oneshot_global")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def pareto_figure(study: optuna.Study, rows: list[dict[str, Any]]):
    """Pareto front of the trials' CV results over every trial's own (fold-0) front, both
    against the study's axis (:func:`~dtp_search.tracking.results.study_axis`)."""
    axis = study_axis(study)
    complete, points, policies, floored = trial_points(study, axis)
    fig = plot_pareto(rows, points, study.study_name, policies, floored, axis=axis)
    ax = fig.axes[0]
    for t in complete:
        front = t.user_attrs.get(records.FRONT) or []
        if front:
            ax.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                "-",
                color="0.5",
                alpha=0.15,
                lw=0.8,
                zorder=0,
                label="_nolegend_",
            )
    # Zoomed to the trials' own CV points: the faint per-trial fronts fall to chance at
    # their sparse end and would otherwise squeeze the Pareto points into a thin strip.
    accs = [p[1] for ps in points.values() for p in ps if not math.isnan(p[1])]
    if accs:
        lo, hi = min(accs), max(accs)
        pad = max(0.02, 0.08 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    for marker, name in zip(("X", "P"), BASELINES, strict=True):
        base = [t for t in complete if policies[t.number] == name]
        if base:
            ax.scatter(
                [points[t.number][0][0] for t in base],
                [points[t.number][0][1] for t in base],
                marker=marker,
                s=90,
                color="k",
                zorder=6,
                label=f"baseline: {name}",
            )
    legend(ax, fontsize=7, loc="lower left")
    return fig


def _optuna_figures(study: optuna.Study) -> dict[str, str]:
    """Optuna's own history and importance plots, one of each per objective; a plot Optuna
    cannot draw yet (e.g. importances from too few trials) is skipped."""
    from optuna.visualization import matplotlib as ovm

    names = study.user_attrs.get(records.OBJECTIVES) or [
        f"objective {i}" for i in range(len(study.directions))
    ]
    out = {}
    for title, fn in (
        ("Optimisation history", ovm.plot_optimization_history),
        ("Parameter importances", ovm.plot_param_importances),
    ):
        for i, name in enumerate(names):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn(study, target=lambda t, i=i: t.values[i], target_name=name)
                out[f"{title} ({name})"] = _png(ax.figure)
            except Exception as exc:
                log.info("skipped %s (%s): %s", title, name, exc)
    return out


def _count(v: float) -> str:
    """A count or size with thousands separators (24,180), a small quantity with 4 digits."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def build_report(
    study: optuna.Study,
    rows: list[dict[str, Any]],
    refits: dict[str, dict[str, Any]],
    tracking_uri: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The HTML report and the figures in it (``name → matplotlib figure``, not yet closed).
    Each refit's MLflow run id is in the table; with ``tracking_uri`` the report also shows
    how to load the most accurate refit's model."""
    figures = {"pareto": pareto_figure(study, rows)}
    layers = {int(n): r["layer_sparsity"] for n, r in refits.items() if r.get("layer_sparsity")}
    if layers:
        figures["layer_sparsity"] = plot_layer_sparsity(
            layers, "per-layer sparsity of the refit models"
        )
    images = {k: _png(f) for k, f in figures.items()}
    images.update(_optuna_figures(study))

    # The costs the trials measured (fractions of the dense network's), as CV columns.
    costs = [c for c in COST_OBJECTIVES if any(records.cv(c) in r for r in rows)]
    # Refits measured before the compacted network's FLOPs were: no column without them.
    with_compact = any(
        "flops_compact" in refits.get(str(r["trial"]), {}).get("measures", {}) for r in rows
    )
    cols = [
        "trial",
        "policy",
        "params",
        "CV accuracy",
        "CV sparsity",
        *(f"CV {c} (compact / dense)" for c in costs),
        "refit run",
        "test accuracy",
        "test sparsity",
        "non-zero / params",
        "FLOPs effective / dense",
        *(["FLOPs compact / dense"] if with_compact else []),
        "export bytes sparse / dense",
        "latency ms compact / dense",
    ]
    # Latency is measured for compact (neuron/channel) exports only: no column without one.
    with_latency = any(
        "latency_ms_compact" in refits.get(str(r["trial"]), {}).get("measures", {}) for r in rows
    )
    if not with_latency:
        cols = cols[:-1]
    body = []
    for r in rows:
        ref = refits.get(str(r["trial"]), {})
        m = ref.get("measures", {})

        def ratio(a: str, b: str, m=m, fmt=_count) -> str:
            return f"{fmt(m[a])} / {fmt(m[b])}" if a in m and b in m else "—"

        cells = [
            r["trial"],
            r["policy"],
            r["params"],
            f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
            f"{r['sparsity']:.4f} ± {r['sparsity_std']:.4f}",
            *(
                f"{r[records.cv(c)]:.4f} ± {r.get(records.cv_std(c), 0.0):.4f}"
                if records.cv(c) in r
                else "—"
                for c in costs
            ),
            ref.get("run_id", "—"),
            f"{ref['test_accuracy']:.4f}" if "test_accuracy" in ref else "—",
            f"{ref['sparsity']:.4f}" if "sparsity" in ref else "—",
            ratio("nonzero_params", "params"),
            ratio("flops_effective", "flops_dense"),
            *([ratio("flops_compact", "flops_dense")] if with_compact else []),
            ratio("file_bytes_sparse", "file_bytes_dense"),
        ]
        if with_latency:
            cells.append(ratio("latency_ms_compact", "latency_ms_dense", fmt=lambda v: f"{v:.2f}"))
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    table = (
        "<table><tr>"
        + "".join(f"<th>{c}</th>" for c in cols)
        + "</tr>"
        + "".join(body)
        + "</table>"
    )
    imgs = "".join(
        f"<h2>{html.escape(k.replace('_', ' '))}</h2>"
        f"<img alt='{html.escape(k)}' src='data:image/png;base64,{v}'/>"
        for k, v in images.items()
    )
    ran = [r for r in refits.values() if "run_id" in r and "test_accuracy" in r]
    loading = (
        ""
        if not (ran and tracking_uri)
        else "<p>Load a refit model (here the most accurate; any refit run id of the table "
        "works):</p><pre>"
        + html.escape(
            notes.load_snippet(max(ran, key=lambda r: r["test_accuracy"])["run_id"], tracking_uri)
        )
        + "</pre>"
    )
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    base = study.user_attrs.get(records.CHECKPOINT_BASELINE)
    baseline = (
        ""
        if base is None
        else f"<p>The trained checkpoint the study started from, <b>not pruned</b>: test "
        f"accuracy {base['test_accuracy']:.4f} at sparsity {base['sparsity']:.4f}.</p>"
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8">
<title>dtp_search report — {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
img{{max-width:100%}}</style></head><body>
<h1>dtp_search report — {html.escape(study.study_name)}</h1>
<p>{n_complete} complete trials; {len(rows)} Pareto-optimal (cross-validated on the training
split). Test accuracy comes from one evaluation of each refit model, trained on the whole
training split.</p>{baseline}
<h2>Pareto-optimal trials</h2>{table}{loading}{imgs}</body></html>"""
    return doc, figures


def log_report(study: optuna.Study, tracker: StudyTracker) -> str:
    """Build the report and log it (with its figures) on the study's parent run."""
    rows = pareto_rows(study)
    refits = study.user_attrs.get(records.REFIT, {})
    doc, figures = build_report(study, rows, refits, tracker.tracking_uri)
    tracker.client.log_text(tracker.parent_run_id, doc, "report.html")
    # The study run's Overview: its refits, each a link to its run, and how to load one.
    note = notes.study_note(tracker.experiment_id, refits, tracker.tracking_uri)
    tracker.client.set_tag(tracker.parent_run_id, notes.NOTE_TAG, note)
    for name, fig in figures.items():
        if name != "pareto":  # pareto_front.png is logged by refresh_pareto
            tracker.client.log_figure(tracker.parent_run_id, fig, f"{name}.png")
        plt.close(fig)
    return doc


def plot_comparison(fronts: dict[str, list[dict[str, Any]]], axis: str = "sparsity"):
    """Pareto fronts (CV ``axis``, CV accuracy) of several studies overlaid; ``axis`` is
    their second objective, sparsity or a cost."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    key = row_key(axis)
    for name, rows in fronts.items():
        rows = sorted(rows, key=lambda r: r[key])
        xs, ys = [r[key] for r in rows], [r["accuracy"] for r in rows]
        where = "pre" if axis == "sparsity" else "post"
        (line,) = ax.step(xs, ys, "-", where=where, alpha=0.7)
        ax.errorbar(
            xs,
            ys,
            yerr=[r.get("accuracy_std", 0.0) for r in rows],
            fmt="o",
            color=line.get_color(),
            capsize=2,
            ms=4,
            label=f"{name} ({len(rows)})",
        )
    ax.set_xlabel("CV sparsity" if axis == "sparsity" else f"CV {AXIS_LABELS.get(axis, axis)}")
    ax.set_ylabel("CV accuracy")
    ax.set_title("Pareto fronts compared", fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def compare_studies(storage: Any, names: list[str], out_dir: str) -> str:
    """Overlay the Pareto fronts of the studies ``names``; returns the PNG's path. Raises
    ``ValueError`` when their axes (second objectives: sparsity, flops, ...) differ."""
    studies = {n: optuna.load_study(study_name=n, storage=storage) for n in names}
    axes = {n: study_axis(s) for n, s in studies.items()}
    if len(set(axes.values())) > 1:
        raise ValueError(
            f"the studies' fronts lie on different axes ({axes}); compare studies with the "
            "same second objective"
        )
    fronts = {n: pareto_rows(s) for n, s in studies.items()}
    path = Path(out_dir) / f"compare-{'-vs-'.join(names)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_comparison(fronts, axis=next(iter(axes.values()), "sparsity"))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)
