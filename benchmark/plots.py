"""The report's figures (PNG), drawn from a built ``benchmark.report.Report``.

- ``heatmap``: each metric over the experiment's grid (Table 4's tau x nu, Fig. 7's T_L x T_U).
- ``memory_breakdown``: ZOODiP Fig. 1a: stacked bars of training memory per row (weights by
  dtype, gradients, optimizer state, activations, other: the record's ``breakdown_*_bytes``).
- ``memory_vs_score``: ZOODiP Fig. 1b: training memory against CLIP-I and CLIP-T, ours filled,
  the paper's hollow.
- ``versus_rows``: every metric against the one row value (Hollowed Net Fig. 5: fraction removed),
  mean with its 95 % CI band.
- ``gallery``: the qualitative figure (ZOODiP Fig. S4): per row and subject, one finished run's
  first image of each of its first ``GALLERY_PROMPTS`` prompts.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmark.profiling import CATEGORIES  # noqa: E402
from benchmark.report import METRICS, number, row_keys  # noqa: E402


def row_labels(report) -> list[str]:
    rows = report.spec["rows"]
    return [", ".join(str(v) for v in values) for values in report.table[rows].itertuples(index=False)]


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(report, out_dir: Path) -> list[Path]:
    paths = []
    for metric, grid in report.grids.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.6 * grid.shape[0]))
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
        middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
        for (i, j), v in np.ndenumerate(values):
            text = "n/a" if math.isnan(v) else number(v, METRICS[metric].digits)
            dark = math.isnan(v) or v < middle  # viridis is dark at its low end
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=8)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_xlabel(str(grid.columns.name))
        ax.set_ylabel(str(grid.index.name))
        ax.set_title(METRICS[metric].label)
        fig.colorbar(image, ax=ax)
        paths.append(save(fig, out_dir / f"heatmap_{metric}.png"))
    return paths


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
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(report.table), 4))
    labels = row_labels(report)
    if parts.empty:  # no breakdown recorded: the total alone
        ax.bar(
            labels, report.table["memory_gb"].fillna(0), color="grey", label="total (no breakdown recorded)"
        )
    else:
        bottom = np.zeros(len(parts))
        for name in parts.columns:
            values = parts[name].fillna(0).to_numpy()
            ax.bar(labels, values, bottom=bottom, label=name)
            bottom += values
    ax.set_ylabel("training memory (GB)")
    ax.set_title("Memory breakdown")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", rotation=30)
    return [save(fig, out_dir / "memory_breakdown.png")]


def memory_vs_score(report, out_dir: Path) -> list[Path]:
    table, labels = report.table, row_labels(report)
    scores = [m for m in ("clip_i", "clip_t") if m in table]
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 4), squeeze=False)
    for ax, metric in zip(axes[0], scores):
        ax.scatter(table["memory_gb"], table[metric], label="ours")
        if f"{metric}_paper" in table and "memory_gb_paper" in table:
            ax.scatter(
                table["memory_gb_paper"],
                table[f"{metric}_paper"],
                facecolors="none",
                edgecolors="k",
                label="paper",
            )
        for kind, suffix in (("ours", ""), ("paper", "_paper")):
            xs, ys = table.get(f"memory_gb{suffix}"), table.get(f"{metric}{suffix}")
            if xs is None or ys is None:
                continue
            for x, y, label in zip(xs, ys, labels):
                if not (math.isnan(x) or math.isnan(y)):
                    color = "black" if kind == "ours" else "grey"
                    ax.annotate(
                        label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points", color=color
                    )
        ax.set_xlabel("training memory (GB)")
        ax.set_ylabel(metric.replace("_", "-").upper())
        ax.legend(fontsize=7)
    return [save(fig, out_dir / "memory_vs_score.png")]


def versus_rows(report, out_dir: Path) -> list[Path]:
    (axis,) = report.spec["rows"]
    table = report.table.sort_values(axis)
    x = pd.to_numeric(table[axis], errors="coerce")
    metrics = report.spec["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.plot(x, table[metric], marker="o")
        ax.fill_between(x, table[f"{metric}_ci_low"], table[f"{metric}_ci_high"], alpha=0.25)
        ax.set_xlabel(axis)
        ax.set_title(METRICS[metric].label)
    return [save(fig, out_dir / f"versus_{axis.replace('.', '_')}.png")]


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
    return [save(fig, out_dir / "gallery.png")]


FIGURES = {
    "gallery": gallery,
    "heatmap": heatmap,
    "memory_breakdown": memory_breakdown,
    "memory_vs_score": memory_vs_score,
    "versus_rows": versus_rows,
}


def draw(report, out_dir: Path) -> list[Path]:
    unknown = [f for f in report.spec.get("figures", []) if f not in FIGURES]
    if unknown:
        raise SystemExit(f"report.figures {unknown} unknown; choose from: {', '.join(FIGURES)}")
    return [path for name in report.spec.get("figures", []) for path in FIGURES[name](report, out_dir)]
