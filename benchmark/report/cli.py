"""`python -m benchmark.report experiment=<name> [overrides]`: a report's files written.

``write_report`` writes a built report (benchmark.report.tables) to its folder: table.md,
table.tex (benchmark.report.latex), table.csv, the figures (benchmark.report.plots) and the
gallery page (benchmark.report.gallery). The recovery experiment has its own layout
(benchmark.report.recovery).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from benchmark.config import flat, not_in_run_key
from benchmark.report import gallery, plots
from benchmark.report import latex as tex_tables
from benchmark.report import recovery as recovery_report
from benchmark.report.predicted import predicted_section
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
    if report.spec.get("predicted"):
        md += predicted_section(
            report.spec, list(dict.fromkeys(str(r.value("method.name")) for r in report.planned))
        )
    bad = failures(report)
    md += ["## Runs without a result", ""]
    md += [markdown(bad), ""] if len(bad) else ["None: every run succeeded.", ""]
    paths = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv"]
    write_text_atomic(paths[0], "\n".join(md))
    write_text_atomic(paths[1], "\n".join(tex))
    tables = [report.table] + ([report.reference.table] if report.reference is not None else [])
    write_text_atomic(paths[2], pd.concat(tables, ignore_index=True).to_csv(index=False))
    paths += plots.draw(report, out_dir)
    written = []
    if gallery.has_images(report):
        paths.append(gallery.write_gallery(report))
        written.append(out_dir / gallery.THUMBS)
    remove_stale(out_dir, paths + written)
    report.files = paths
    return paths


MANIFEST = ".report-files"  # what the folder's last report wrote, one relative path a line


def remove_stale(out_dir: Path, produced: Sequence[Path]) -> None:
    """Remove what an earlier report wrote into ``out_dir`` and this one no longer does (say a
    gallery of runs that have since failed), so no file in the folder is out of date."""
    manifest = out_dir / MANIFEST
    now = {str(p.relative_to(out_dir)) for p in produced}
    before = set(manifest.read_text().splitlines()) if manifest.exists() else set()
    before |= {"gallery.html", gallery.THUMBS}  # written by reports older than the manifest
    for name in sorted(before - now):
        stale = out_dir / name
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    write_text_atomic(manifest, "".join(f"{name}\n" for name in sorted(now)))


def summary(report: Report, most: int = 10) -> list[str]:
    """The terminal's account of the runs: counts by state, then each run without a result with
    its path (at most ``most``), and for a missing run whose method and subject have runs under
    other settings, the settings that differ."""
    runs = report.runs
    counts = Counter(runs["state"])
    lines = [f"runs: {len(runs)} planned: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    bad = runs[runs["state"] != "ok"]
    for _, run in bad.head(most).iterrows():
        error = run.get("error")
        why = f": {error}" if isinstance(error, str) and error else ""
        lines.append(f"  {run['state']}: {run['path']}{why}")
        if run["state"] == "missing":
            lines += [f"    {line}" for line in other_settings(Path(run["path"]), report)]
    if len(bad) > most:
        lines.append(f"  ... and {len(bad) - most} more (table.md lists every one)")
    return lines


def other_settings(run_dir: Path, report: Report) -> list[str]:
    """For a missing run: the nearest run of the same method and subject (fewest differing
    settings, from its config.yaml) and what differs."""
    planned = next((r.config for r in report.planned if r.run_dir == run_dir), None)
    if planned is None or not run_dir.parent.is_dir():
        return []
    nearest = None
    for other in sorted(run_dir.parent.iterdir()):
        if other == run_dir or not (other / "config.yaml").is_file():
            continue
        there = flat(OmegaConf.to_container(OmegaConf.load(other / "config.yaml"), resolve=True))
        differ = sorted(
            k for k in set(there) | set(planned) if not not_in_run_key(k) and there.get(k) != planned.get(k)
        )
        if nearest is None or len(differ) < len(nearest[2]):
            nearest = (other, there, differ)
    if nearest is None:
        return []
    other, there, differ = nearest
    shown = ", ".join(f"{k}={planned.get(k)!r} (there {there.get(k)!r})" for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    return [f"the nearest run of this method and subject, {other.name}, differs in {shown}{more}"]


USAGE = """\
python -m benchmark.report experiment=<name> [key=value ...]
  The tables (Markdown, LaTeX, CSV), figures and gallery of an experiment's sweep, from the
  records its runs left under paths.results, into <paths.results>/<name>/ (a narrowed report,
  say subject=dog6, or another data.root: a folder of its own). Missing and failed runs are
  counted and listed, never run. Takes the sweep's arguments; data.root may be left out.
  Exit status: 0 written, 2 bad input (one line per bad value).
"""


def main(argv: Sequence[str]) -> int:
    """Exit 2 on bad input (every bad value listed, one line each), 0 otherwise."""
    if {"--help", "-h"} & set(argv):
        print(USAGE, end="")
        return 0
    argv = [a for a in argv if a not in ("-m", "--multirun")]  # the sweep's own command line works too
    try:
        if OmegaConf.select(primary_config(argv), "report.kind") == "recovery":  # its own layout
            return recovery_report.main(argv)
        report = build_report(argv)
    except InvalidSweep as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 2
    for path in write_report(report):
        print(path)
    print("\n".join(summary(report)))
    return 0
