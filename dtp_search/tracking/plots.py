"""The figures a study logs: a run's accuracy-versus-x front, the study's Pareto front over
every trial's, and the per-layer sparsity of refit models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from dtp_search.pruning.front import FrontPoint
from dtp_search.tracking.front_axis import AXIS_LABELS, front_x, row_key


def legend(ax: Any, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` where something on ``ax`` has a label. A figure drawn before
    anything is there to show (a study interrupted before its first trial completes)
    would otherwise print matplotlib's "No artists with labels found" warning on the
    user's console."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_trial_front(
    fronts: dict[int, list[FrontPoint]],
    title: str,
    split: str = "validation",
    axis: str = "sparsity",
) -> Figure:
    """Accuracy versus ``axis`` (:func:`front_x`) for each fold: updates during training,
    final model, sweep; points without a value of ``axis`` (updates, against a cost) are
    left out. ``split="test"`` (a refit: one model, scored on the test split) labels it so."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, pts in sorted(fronts.items()):
        c = colors[k % len(colors)]
        who = "refit" if split == "test" else f"fold {k}"
        pts = [p for p in pts if front_x(p, axis) is not None]
        upd = [p for p in pts if p.source == "update"]
        tail = sorted(
            (p for p in pts if p.source in ("final", "sweep")), key=lambda p: front_x(p, axis)
        )
        if upd:
            ax.scatter(
                [front_x(p, axis) for p in upd],
                [p.accuracy for p in upd],
                s=10,
                color=c,
                alpha=0.35,
                label=f"{who}: mask updates",
            )
        if tail:
            ax.plot(
                [front_x(p, axis) for p in tail],
                [p.accuracy for p in tail],
                "-o",
                ms=3,
                color=c,
                label=f"{who}: one-shot sweep from the final masks",
            )
            final = [p for p in tail if p.source == "final"]
            if final:
                ax.scatter(
                    [front_x(final[0], axis)],
                    [final[0].accuracy],
                    marker="*",
                    s=120,
                    color=c,
                    edgecolor="k",
                    zorder=5,
                    label=f"{who}: final model",
                )
        base = [p for p in pts if p.source == "checkpoint"]
        if base:  # the trained network the study started from, not pruned (refit)
            ax.scatter(
                [front_x(base[0], axis)],
                [base[0].accuracy],
                marker="D",
                s=60,
                color="k",
                zorder=6,
                label="checkpoint, not pruned",
            )
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_pareto(
    rows: list[dict[str, Any]],
    trial_fronts: dict[int, list[tuple[float, float]]],
    title: str,
    policies: dict[int, str] | None = None,
    floored: Iterable[int] = (),
    axis: str = "sparsity",
) -> Figure:
    """The study's Pareto-optimal trials over every trial's (CV ``axis``, CV accuracy) —
    ``axis`` is the study's second objective: sparsity (maximised) or a cost (minimised)
    — trials coloured by policy when the study used more than one; trials that end with a
    layer held at the ``min_keep`` floor (``floored``) are crossed out in red."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    policies = policies or {}
    names = sorted({policies.get(n, "") for n in trial_fronts})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    for i, name in enumerate(names):
        pts = [p for n, ps in trial_fronts.items() if policies.get(n, "") == name for p in ps]
        single = len(names) == 1
        ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            s=14 if single else 24,
            color="0.6" if single else colors[i % len(colors)],
            marker="o" if single else markers[(i // len(colors)) % len(markers)],
            alpha=0.6 if single else 0.75,
            label=("all trials" if single else name) + (f" ({name})" if single and name else ""),
        )
    held = [p for n in floored for p in trial_fronts.get(n, [])]
    if held:
        ax.scatter(
            [p[0] for p in held],
            [p[1] for p in held],
            marker="x",
            s=60,
            color="tab:red",
            zorder=4,
            label="ends with a layer at the min_keep floor",
        )
    x = row_key(axis)
    pareto = sorted(rows, key=lambda r: r[x])
    if pareto:
        # Attainment boundary: between two Pareto points the best reachable accuracy is
        # that of the sparser one, so each step takes the value on its right ("pre");
        # against a cost (lower is better) that of the cheaper one, on its left ("post").
        ax.step(
            [r[x] for r in pareto],
            [r["accuracy"] for r in pareto],
            "-",
            where="pre" if axis == "sparsity" else "post",
            color="k",
            alpha=0.45,
        )
        # Hollow rings, so that the policy colour of the trial underneath stays visible.
        ax.errorbar(
            [r[x] for r in pareto],
            [r["accuracy"] for r in pareto],
            yerr=[r.get("accuracy_std", 0.0) for r in pareto],
            fmt="o",
            color="k",
            mfc="none",
            ms=9,
            capsize=3,
            label="Pareto-optimal trials (± fold std)",
        )
        # Neighbouring labels alternate above and below their ring, so close points stay legible.
        for i, r in enumerate(pareto):
            ax.annotate(
                str(r["trial"]),
                (r[x], r["accuracy"]),
                fontsize=7,
                xytext=(4, 5) if i % 2 == 0 else (4, -11),
                textcoords="offset points",
            )
    ax.set_xlabel("CV sparsity" if axis == "sparsity" else f"CV {AXIS_LABELS.get(axis, axis)}")
    ax.set_ylabel("CV accuracy")
    ax.set_title(f"Pareto front — {title}", fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_layer_sparsity(models: dict[int, dict[str, float]], title: str) -> Figure:
    """Per-layer sparsity as grouped bars, one group per layer, one bar per model (trial)."""
    layers = list(next(iter(models.values()), {}))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(layers) + 2), 3.8), dpi=110)
    width = 0.8 / max(len(models), 1)
    for i, (trial, ls) in enumerate(sorted(models.items())):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [ls.get(name, 0.0) for name in layers], width=width, label=f"trial {trial}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(models) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
