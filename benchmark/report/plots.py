"""The report's figures, each as PDF (vector, for the paper) and PNG, drawn from a built
``benchmark.report.tables.Report``. Methods keep one display name and colour (benchmark.report.display).

- ``heatmap``: every metric over the experiment's grid in one figure (benchmark.report.heatmaps).
- ``memory_breakdown``: ZOODiP Fig. 1a: stacked bars of training memory per method (weights by
  dtype, gradients, optimizer state, activations, other: the record's ``breakdown_*_bytes``),
  for the methods ``report.breakdown_rows`` names (the paper's five) or every row.
- ``memory_vs_score``: ZOODiP Fig. 1b: training memory against CLIP-I and CLIP-T, ours filled
  with 95 % CI error bars, the paper's hollow, each labelled by its method without collisions.
- ``versus_rows``: every metric against the one row value (Hollowed Net Fig. 5: fraction removed),
  mean with its 95 % CI band.
- ``istar_histogram``: ZOODiP Fig. 8: the Subspace Gradient's kept share i*/tau at every
  recomputation, one histogram per subject.
- ``gallery``: the qualitative figure (ZOODiP Fig. S4): per row and subject, one finished run's
  first image of each of its first ``GALLERY_PROMPTS`` prompts.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmark.memory.profiling import CATEGORIES  # noqa: E402
from benchmark.report import heatmaps  # noqa: E402
from benchmark.report.display import axis_label, method_color, method_name, value_label  # noqa: E402
from benchmark.report.figures import save  # noqa: E402
from benchmark.report.tables import METRICS, row_keys  # noqa: E402


def row_labels(report) -> list[str]:
    rows = report.spec["rows"]
    return [
        ", ".join(value_label(r, v) for r, v in zip(rows, values))
        for values in report.table[rows].itertuples(index=False)
    ]


def breakdown_gb(report) -> pd.DataFrame:
    """Mean bytes per memory category and table row over the runs that succeeded, in GB; empty
    when no record has a breakdown (e.g. an older record)."""
    runs = report.runs[report.runs["state"] == "ok"]
    columns = [f"breakdown_{c}_bytes" for c in CATEGORIES if f"breakdown_{c}_bytes" in runs]
    if not columns or runs[columns].isna().all().all():
        return pd.DataFrame()
    label_of = dict(zip(row_keys(report.table, report.spec["rows"]), row_labels(report)))
    keys = [label_of[k] for k in row_keys(runs, report.spec["rows"])]
    means = runs[columns].apply(pd.to_numeric, errors="coerce").groupby(keys, sort=False).mean() / 1e9
    means.columns = [c.removeprefix("breakdown_").removesuffix("_bytes") for c in columns]
    return means.reindex(row_labels(report)).loc[:, lambda f: f.fillna(0).sum() > 0]


def memory_breakdown(report, out_dir: Path) -> list[Path]:
    parts = breakdown_gb(report)
    shown = report.spec.get("breakdown_rows") or list(report.table["method"])
    keys = [k for k in shown if k in set(report.table["method"])]
    labels = [method_name(k) for k in keys]
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(keys), 3.6))
    if parts.empty:  # no breakdown recorded: the total alone
        totals = report.table.set_index("method")["memory_gb"].reindex(keys).fillna(0)
        ax.bar(labels, totals, color="grey", label="total (no breakdown recorded)")
    else:
        parts = parts.reindex(labels)
        bottom = np.zeros(len(parts))
        colors = plt.get_cmap("tab10")
        for i, name in enumerate(parts.columns):
            values = parts[name].fillna(0).to_numpy()
            ax.bar(labels, values, bottom=bottom, label=name.replace("_", " "), color=colors(i))
            bottom += values
    finished = report.table.set_index("method")["ok"].reindex(keys).fillna(0)
    for i, ok in enumerate(finished):  # a method without a finished run: said, not an empty slot
        if ok == 0:
            ax.text(i, 0, "no finished run", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_ylabel("training memory (GB)")
    ax.set_title("Memory breakdown (batch 1)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.tick_params(axis="x", rotation=20)
    return save(fig, out_dir / "memory_breakdown")


def place_labels(ax, points: list[tuple[float, float, str, str]]) -> None:
    """Label each (x, y, text, colour) next to its point, trying offsets around it until the
    label overlaps no point and no label placed before (greedy, in display coordinates)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    inside = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer)] if (legend := ax.get_legend()) else []
    offsets = [(dx * r, dy * r) for r in (6, 14, 24, 36) for dx, dy in
               ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1.3), (0, -1.3))]  # fmt: skip
    for x, y, text, color in points:
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                                color=color, ha="left" if dx >= 0 else "right",
                                va="bottom" if dy >= 0 else "top")  # fmt: skip
            box = label.get_window_extent(renderer).expanded(1.05, 1.15)
            hits_point = any(box.contains(*c) for c in centres)
            within = (
                inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            )
            if within and not hits_point and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                break
            label.remove()
        else:  # nowhere free: the first offset, drawn anyway
            ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=7, color=color)


def memory_vs_score(report, out_dir: Path) -> list[Path]:
    table = report.table
    scores = [m for m in ("clip_i", "clip_t") if m in table]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], scores):
        points = []
        for entry in table.to_dict("records"):
            name, color = method_name(entry["method"]), method_color(entry["method"])
            x, y = entry["memory_gb"], entry[metric]
            if not (math.isnan(x) or math.isnan(y)):
                low, high = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
                err = None if math.isnan(low) else [[y - low], [high - y]]
                ax.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3, ms=5)
                points.append((x, y, name, color))
            px, py = entry.get("memory_gb_paper", math.nan), entry.get(f"{metric}_paper", math.nan)
            if not (math.isnan(px) or math.isnan(py)):
                ax.scatter(px, py, facecolors="none", edgecolors=color, s=30)
                points.append((px, py, f"{name} (paper)", color))
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.12)  # room for the labels inside the axes
        ax.set_xlabel("training memory (GB, log scale)")
        ax.set_ylabel(METRICS[metric].label)
        ax.plot([], [], "o", color="grey", label="ours (95 % CI where n ≥ 5)")
        ax.scatter([], [], facecolors="none", edgecolors="grey", label="paper")
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        place_labels(ax, points)
    return save(fig, out_dir / "memory_vs_score", layout=False)


def versus_rows(report, out_dir: Path) -> list[Path]:
    (axis,) = report.spec["rows"]
    table = report.table.sort_values(axis)
    x = pd.to_numeric(table[axis], errors="coerce")
    metrics = report.spec["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.plot(x, table[metric], marker="o")
        ax.fill_between(x, table[f"{metric}_ci_low"], table[f"{metric}_ci_high"], alpha=0.25)
        ax.set_xlabel(axis_label(axis))
        ax.set_title(METRICS[metric].label)
    return save(fig, out_dir / f"versus_{axis.replace('.', '_')}")


def istar_histogram(report, out_dir: Path) -> list[Path]:
    """ZOODiP Fig. 8 from the records' ``sg_kept_ratios`` (one value per SG recomputation)."""
    runs = report.runs[report.runs["state"] == "ok"]
    ratios = {
        subject: [r for lists in group.get("sg_kept_ratios", []) if isinstance(lists, list) for r in lists]
        for subject, group in runs.groupby("subject", sort=False)
    }
    fig, axes = plt.subplots(1, max(len(ratios), 1), figsize=(3.4 * max(len(ratios), 1), 2.8), squeeze=False)
    taus = sorted(set(pd.to_numeric(runs.get("method.tau", pd.Series(dtype=float))).dropna().astype(int)))
    nus = sorted(set(pd.to_numeric(runs.get("method.nu", pd.Series(dtype=float))).dropna()))
    methods = runs["method"].dropna() if "method" in runs else []
    color = method_color(methods.iloc[0]) if len(methods) else None
    for ax, (subject, values) in zip(axes[0], ratios.items()):
        if values:
            ax.hist(values, bins=np.linspace(0, 1, 21), color=color, edgecolor="white")
        else:
            ax.text(
                0.5, 0.5, "no SG recomputation recorded", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_xlim(0, 1)
        ax.set_xlabel(r"$i^*/\tau$ (share of directions kept)")
        ax.set_ylabel("recomputations")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{subject}: {len(values)} recomputations", fontsize=9)
    fig.suptitle(
        rf"{report.spec.get('title', report.name)}  ($\tau$ = {', '.join(map(str, taus))}, "
        rf"$\nu$ = {', '.join(f'{n:g}' for n in nus)})", fontsize=9,
    )  # fmt: skip
    return save(fig, out_dir / "istar_histogram")


GALLERY_PROMPTS = 4


def gallery(report, out_dir: Path) -> list[Path]:
    from PIL import Image

    rows = report.spec["rows"]
    done = report.runs[report.runs["state"] == "ok"].drop_duplicates([*rows, "subject"])
    if done.empty:
        return []
    fig, axes = plt.subplots(
        len(done), GALLERY_PROMPTS, figsize=(2.2 * GALLERY_PROMPTS, 2.3 * len(done)), squeeze=False
    )
    for ax_row, (_, run) in zip(axes, done.iterrows()):
        label = ", ".join(str(run[k]) for k in rows) + f"\n{run['subject']}"
        for p, ax in enumerate(ax_row):
            path = Path(run["path"]) / "images" / f"p{p:02d}_000.png"
            if path.exists():
                ax.imshow(Image.open(path).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel(label, fontsize=8)
    return save(fig, out_dir / "gallery")


FIGURES = {
    "gallery": gallery,
    "heatmap": heatmaps.heatmap,
    "memory_breakdown": memory_breakdown,
    "memory_vs_score": memory_vs_score,
    "versus_rows": versus_rows,
    "istar_histogram": istar_histogram,
}


def draw(report, out_dir: Path) -> list[Path]:
    unknown = [f for f in report.spec.get("figures", []) if f not in FIGURES]
    if unknown:
        raise SystemExit(f"report.figures {unknown} unknown; choose from: {', '.join(FIGURES)}")
    return [path for name in report.spec.get("figures", []) for path in FIGURES[name](report, out_dir)]
