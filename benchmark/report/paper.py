"""`python -m benchmark.report.paper [results=results]`: every report's tables and figures in one PDF.

Collects <results>/<report>/table.tex and each figure's PDF into <results>/pdf/paper.tex (a
two-column article, the layout the tables are made to fit) and compiles it with pdflatex
(Debian: texlive-latex-base + texlive-latex-recommended; `.ci/setup.d/10-report-tools.sh`).
`nox -s paper` runs it after the reports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmark.report.latex import PREAMBLE
from methods.common.atomic import write_text_atomic

OUT_NAME = "pdf"  # <results>/pdf/paper.tex (results/paper/ holds the papers' numbers)

HEAD = rf"""\documentclass[twocolumn,10pt]{{article}}
\usepackage[margin=0.75in]{{geometry}}
\usepackage{{graphicx}}
{PREAMBLE}
\title{{Benchmark report: tables and figures}}
\date{{}}
\begin{{document}}
\maketitle
"""


def report_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("*/table.tex") if p.parent.name != OUT_NAME)


def figure(pdf: Path, out_dir: Path) -> str:
    caption = f"{pdf.parent.name}: {pdf.stem}".replace("_", r"\_")
    path = Path("..") / pdf.relative_to(out_dir.parent)
    return "\n".join([
        r"\begin{figure*}[p]", r"\centering",
        rf"\includegraphics[width=\textwidth,height=0.8\textheight,keepaspectratio]{{{path.as_posix()}}}",
        rf"\caption{{{caption}}}", r"\end{figure*}", "",
    ])  # fmt: skip


def paper_tex(results: Path, out_dir: Path) -> str:
    parts = [HEAD]
    for directory in report_dirs(results):
        name = directory.name.replace("_", r"\_")
        parts += [rf"\section*{{{name}}}", (directory / "table.tex").read_text(), r"\clearpage"]
        parts += [figure(pdf, out_dir) for pdf in sorted(directory.glob("*.pdf"))]
    return "\n".join([*parts, r"\end{document}", ""])


def compile_pdf(tex: Path) -> Path:
    """pdflatex ``tex`` in its folder; the log's last lines on failure."""
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
        cwd=tex.parent, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"pdflatex failed on {tex}:\n" + "\n".join(done.stdout.splitlines()[-25:]))
    return tex.with_suffix(".pdf")


def main(argv: list[str]) -> int:
    results = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("results=")), "results"))
    if not report_dirs(results):
        print(
            f"error: results={results}: no report there (*/table.tex); run python -m benchmark.report",
            file=sys.stderr,
        )
        return 2
    if shutil.which("pdflatex") is None:
        print("error: pdflatex not found; install it: bash .ci/setup.d/10-report-tools.sh", file=sys.stderr)
        return 2
    out_dir = results / OUT_NAME
    tex = out_dir / "paper.tex"
    write_text_atomic(tex, paper_tex(results, out_dir))
    print(compile_pdf(tex))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
