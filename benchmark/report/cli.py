"""`python -m benchmark.report experiment=<name> [overrides]`: a report's files written.

``write_report`` writes a built report (benchmark.report.tables) to its folder: table.md,
table.tex (benchmark.report.latex), table.csv, the figures (benchmark.report.plots) and the
gallery page (benchmark.report.gallery). The recovery experiment has its own layout
(benchmark.recovery.report).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from benchmark.recovery import report as recovery_report
from benchmark.report import gallery, plots
from benchmark.report import latex as tex_tables
from benchmark.report.tables import (
    METRICS,
    Report,
    build_report,
    display_grid,
    display_table,
    failures,
    grid_frame,
    markdown,
    provenance,
)
from benchmark.sweep.plan import InvalidSweep, primary_config
from methods.common.atomic import write_text_atomic


def write_report(report: Report) -> list[Path]:
    out_dir = report.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    title = report.spec.get("title", report.name)
    shown = display_table(report)
    if report.reference is not None:
        reference = display_table(report.reference)
        if len(reference.columns) == len(shown.columns):
            shown = pd.concat([shown, reference.set_axis(shown.columns, axis=1)], ignore_index=True)
    md = [f"# {title}", "", *provenance(report), ""]
    tex = [
        f"% {title}: python -m benchmark.report experiment={report.name}",
        f"% preamble: {tex_tables.PREAMBLE}",
        tex_tables.table_tex(report, report.reference),
    ]
    for metric in report.grids:
        cells = display_grid(report, metric)
        label = METRICS[metric].label
        shown_as = "ours (paper)" if f"{metric}_paper" in report.table else "ours"
        md += [f"## {label}: {cells.index.name} (rows) x {cells.columns.name} (columns), {shown_as}", "",
               markdown(grid_frame(cells)), ""]  # fmt: skip
        tex.append(tex_tables.grid_tex(report, metric, cells))
    md += ["## All rows", "", markdown(shown), ""]
    bad = failures(report)
    md += ["## Runs without a result", ""]
    md += [markdown(bad), ""] if len(bad) else ["None: every run succeeded.", ""]
    paths = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv"]
    write_text_atomic(paths[0], "\n".join(md))
    write_text_atomic(paths[1], "\n".join(tex))
    tables = [report.table] + ([report.reference.table] if report.reference is not None else [])
    write_text_atomic(paths[2], pd.concat(tables, ignore_index=True).to_csv(index=False))
    paths += plots.draw(report, out_dir)
    if gallery.has_images(report):
        paths.append(gallery.write_gallery(report))
    report.files = paths
    return paths


def main(argv: Sequence[str]) -> int:
    """Exit 2 on bad input (every bad value listed, one line each), 0 otherwise."""
    try:
        if OmegaConf.select(primary_config(argv), "report.kind") == "recovery":  # its own layout
            return recovery_report.main(argv)
        report = build_report(argv)
    except InvalidSweep as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 2
    for path in write_report(report):
        print(path)
    return 0
