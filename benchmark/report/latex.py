"""The report's tables as LaTeX a paper can \\input: booktabs, a two-column paper's full width
(`table*` with a `tabular*` of \\textwidth), display names, the papers' columns.

Each row is ours (mean ± half the 95 % CI; with fewer than 5 subjects the count n instead; a
constant alone), followed, where the paper has one, by an italic grey "paper" line holding the
paper's values under ours. Preamble needs: booktabs, xcolor, amssymb (`PREAMBLE`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from benchmark.report.display import AXES, axis_label, gradient_free, quantization
from benchmark.report.tables import (
    CI_LEVEL,
    FEWER_SUBJECTS_MARK,
    METRICS,
    MIN_UNITS_FOR_CI,
    Report,
    latex_escape,
    number,
    ours_cell,
    row_name,
)

PREAMBLE = r"\usepackage{booktabs}\usepackage{xcolor}\usepackage{amssymb}"
UNITS = {"memory_gb": "Mem. (GB)", "storage_mb": "Storage (MB)"}  # the papers' column heads


def metric_head(metric: str) -> str:
    return latex_escape(UNITS.get(metric, METRICS[metric].label))


def ours(entry: dict[str, Any], metric: str) -> str:
    return ours_cell(
        entry, metric, interval=r"{{\scriptsize$\pm${half}}}", count=r"{{\scriptsize\,(n={n})}}"
    ).replace("—", "--")


def method_columns(report: Report) -> bool:
    """Table 1's Quant. and Grad-free columns: for tables whose rows are methods."""
    return report.spec["rows"] == ["method"]


def row_cells(report: Report, entry: dict[str, Any], runs: pd.DataFrame) -> list[str]:
    cells = [latex_escape(row_name(report, entry)).replace(FEWER_SUBJECTS_MARK, r"$^\dagger$")]
    if method_columns(report):
        first = runs[runs["method"] == entry["method"]].iloc[0].to_dict() if "method" in runs else {}
        cells.append(quantization(first) or "--")
        cells.append(r"$\checkmark$" if gradient_free(entry["method"]) else "--")
    return cells + [ours(entry, m) for m in report.spec["metrics"]]


def paper_cells(report: Report, entry: dict[str, Any]) -> list[str] | None:
    values = [entry.get(f"{m}_paper", math.nan) for m in report.spec["metrics"]]
    if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    blank = ["", ""] if method_columns(report) else []
    shown = [number(v, METRICS[m].digits).replace("—", "--") for m, v in zip(report.spec["metrics"], values)]
    return [r"\quad paper", *blank, *shown]


def grey(cells: list[str]) -> str:
    return " & ".join(rf"\textcolor{{gray}}{{\textit{{{c}}}}}" if c else "" for c in cells) + r" \\"


def table_tex(report: Report, reference: Report | None = None) -> str:
    """The main table; ``reference``: the "Real images" upper bound, below a rule."""
    rows = report.spec["rows"]
    head = [", ".join(axis_label(r) if r in AXES else latex_escape(axis_label(r)) for r in rows)]
    if method_columns(report):
        head += ["Quant.", "Grad-free"]
    head += [metric_head(m) for m in report.spec["metrics"]]
    body = []
    for part in (report, reference):
        if part is None:
            continue
        if part is reference:
            body.append(r"\midrule")
        for entry in part.table.to_dict("records"):
            body.append(" & ".join(row_cells(part, entry, part.runs)) + r" \\")
            paper = paper_cells(part, entry)
            if paper:
                body.append(grey(paper))
    align = "l" + "c" * (len(head) - 1)
    return "\n".join(
        [r"\begin{table*}[t]", r"\centering", r"\footnotesize", r"\setlength{\tabcolsep}{3pt}",
         rf"\caption{{{caption(report)}}}",
         rf"\begin{{tabular*}}{{\textwidth}}{{@{{\extracolsep{{\fill}}}}{align}@{{}}}}", r"\toprule",
         " & ".join(head) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular*}",
         rf"\label{{tab:{report.name}}}", r"\end{table*}", ""]
    )  # fmt: skip


def caption(report: Report) -> str:
    table = report.table
    text = latex_escape(report.spec.get("title", report.name)) + ". "
    text += (
        rf"Ours: mean over subjects $\pm$ half the {int(CI_LEVEL * 100)}\,\% bootstrap CI; "
        rf"(n=$k$): fewer than {MIN_UNITS_FOR_CI} subjects, no CI. "
    )
    if any(c.endswith("_paper") for c in table.columns):
        text += r"\textcolor{gray}{\textit{Grey}}: the paper's value. "
    if table["fewer_subjects"].any():
        text += r"$^\dagger$Fewer subjects than the other rows (failed or missing runs). "
    models = sorted(report.runs["model"].dropna().unique()) if "model" in report.runs else []
    if models:
        text += "Model: " + latex_escape(", ".join(models)) + "."
    return text


def grid_tex(report: Report, metric: str, cells: pd.DataFrame) -> str:
    """One metric over the experiment's grid (e.g. Table 4's tau x nu), cells 'ours (paper)'."""
    grid = report.spec["grid"]
    corner = f"{axis_label(grid['index'])} \\textbackslash{{}} {axis_label(grid['columns'])}"
    head = " & ".join([corner, *(latex_escape(c) for c in cells.columns)]) + r" \\"
    body = [
        " & ".join([latex_escape(i), *(latex_escape(v).replace("—", "--") for v in row)]) + r" \\"
        for i, row in zip(cells.index, cells.itertuples(index=False))
    ]
    shown_as = "ours (paper)" if f"{metric}_paper" in report.table else "ours"
    title = latex_escape(report.spec.get("title", report.name))
    return "\n".join(
        [r"\begin{table}[t]", r"\centering", r"\footnotesize",
         rf"\caption{{{title}: {latex_escape(METRICS[metric].label)}, {shown_as}.}}",
         rf"\begin{{tabular}}{{l{'c' * len(cells.columns)}}}", r"\toprule", head, r"\midrule", *body,
         r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    )  # fmt: skip
