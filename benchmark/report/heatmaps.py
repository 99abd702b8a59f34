"""Heatmaps of an experiment's grid (Table 4's tau x nu, Fig. 7's T_L x T_U) as one figure.

One row of panels per metric: ours, then (where the paper has values) the paper's on the same
colour scale and a diverging "ours - paper" panel centred on 0. A scale never spans less than
``MIN_SPAN_DIGITS`` units of the shown last digit, so cells that print the same number get
nearly the same colour. Cells without a value are hatched and labelled "failed" (every run of
the cell failed, diverged or ran out of memory) or "missing" (no record yet), and the legend
says which is which. Title: the experiment, then subjects, model, evaluation and runs per cell.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.patches import Patch, Rectangle

from benchmark.report.display import axis_label
from benchmark.report.figures import save
from benchmark.report.tables import METRICS, number, pivot

MIN_SPAN_DIGITS = 20  # a colour scale spans at least 20 units of the last printed digit
EMPTY = {
    "failed": ("#bbbbbb", "//"),
    "missing": ("white", ".."),
    "not in paper": ("#eeeeee", ""),
}  # face, hatch
EXPLAINED = {
    "failed": "every run of the cell failed (see table.md)",
    "missing": "no record yet",
    "not in paper": "the paper has no value for this cell",
}


def cell_states(report) -> pd.DataFrame:
    """Per grid cell: ok (some run succeeded), failed (runs exist, none succeeded) or missing."""
    table = report.table.assign(
        cell_state=[
            "ok" if ok else ("missing" if set(states.split(", ")) <= {"", f"{n} missing"} else "failed")
            for ok, n, states in zip(report.table["ok"], report.table["runs"], report.table["not_ok"])
        ]
    )
    return pivot(table, report.spec["grid"], "cell_state")


def color_range(values: list[np.ndarray], digits: int | None) -> tuple[float, float]:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    span = MIN_SPAN_DIGITS * 10.0 ** -(digits if digits is not None else 3)
    if high - low < span:
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
    return low, high


def subtitle(report) -> str:
    runs = report.runs
    subjects = ", ".join(dict.fromkeys(runs["subject"].astype(str)))
    models = ", ".join(sorted(runs["model"].dropna().astype(str).unique())) if "model" in runs else "?"
    evals = ", ".join(sorted(runs["eval"].dropna().astype(str).unique())) if "eval" in runs else "?"
    per_cell = sorted(set(report.table["runs"]))
    return (
        f"subjects: {subjects}  |  model: {models or '?'}  |  eval: {evals or '?'}  |  "
        f"runs per cell: {', '.join(map(str, per_cell))}"
    )


def draw_panel(ax, grid: pd.DataFrame, states: pd.DataFrame, cmap, norm, digits, signed=False):
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if math.isnan(v):
            state = states.iat[i, j] if states is not None else "not in paper"
            state = state if state in EMPTY else "not in paper"
            face, hatch = EMPTY[state]
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, hatch=hatch, edgecolor="#555555", lw=0)
            )
            ax.text(j, i, state, ha="center", va="center", fontsize=7, color="black",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
            continue
        r, g, b, _ = cmap(norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, number(v, digits, signed=signed), ha="center", va="center", fontsize=7,
                color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
    return image


def heatmap(report, out_dir) -> list:
    spec, grid_spec = report.spec, report.spec["grid"]
    metrics = list(report.grids)
    with_paper = [f"{m}_paper" in report.table and report.table[f"{m}_paper"].notna().any() for m in metrics]
    columns = 3 if any(with_paper) else len(metrics)
    rows = len(metrics) if any(with_paper) else 1
    cells = report.grids[metrics[0]].shape
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(columns * (1.6 + 0.75 * cells[1]), 1.2 + rows * (0.9 + 0.42 * cells[0])),
        squeeze=False,
        layout="constrained",
    )
    states = cell_states(report)
    for k, metric in enumerate(metrics):
        digits, label = METRICS[metric].digits, METRICS[metric].label
        ours = report.grids[metric]
        panels = [(ours, label + " (ours)")]
        if with_paper[k]:
            paper = pivot(report.table, grid_spec, f"{metric}_paper")
            panels.append((paper, label + " (paper)"))
        low, high = color_range([p.to_numpy(dtype=float) for p, _ in panels], digits)
        norm = Normalize(low, high)
        place = [axes[k, i] for i in range(3)] if any(with_paper) else [axes[0, k]]
        for ax, (grid, title) in zip(place, panels):
            image = draw_panel(
                ax, grid, states if grid is ours else None, plt.get_cmap("viridis"), norm, digits
            )
            ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=place[: len(panels)], shrink=0.85)
        if with_paper[k]:
            diff = pivot(report.table, grid_spec, f"{metric}_diff")
            bound = np.nanmax(np.abs(diff.to_numpy(dtype=float)), initial=0.0)
            bound = max(bound, MIN_SPAN_DIGITS / 2 * 10.0 ** -(digits or 3))
            diverging = Normalize(-bound, bound)
            no_paper = states.where(states != "ok", "not in paper")  # ours is there: the paper's is not
            image = draw_panel(
                place[2], diff, no_paper, plt.get_cmap("RdBu_r"), diverging, digits, signed=True
            )
            place[2].set_title(f"{label}: ours − paper", fontsize=9)
            fig.colorbar(image, ax=place[2], shrink=0.85)
        elif any(with_paper):
            for ax in place[1:]:
                ax.axis("off")
    for ax in axes.flat:
        if ax.axison:
            ax.set_xlabel(axis_label(grid_spec["columns"]))
            ax.set_ylabel(axis_label(grid_spec["index"]))
    fig.suptitle(f"{spec.get('title', report.name)}\n{subtitle(report)}", fontsize=9)
    shown = [s for s in EMPTY if s != "not in paper" or any(with_paper)]
    handles = [
        Patch(facecolor=EMPTY[s][0], hatch=EMPTY[s][1], edgecolor="#555555", label=f"{s}: {EXPLAINED[s]}")
        for s in shown
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(shown), fontsize=7, frameon=False)
    return save(fig, out_dir / "heatmap", layout=False)
