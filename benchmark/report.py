"""`python -m benchmark.report experiment=<name> [overrides]`: one paper table or figure from the records.

The experiment (conf/experiment/<name>.yaml) names its sweep and, under `report:`, its layout:

    rows: [method]                 # config values that make one row (the sweep's other axes,
                                   # subjects and seeds, are averaged over)
    metrics: [clip_t, clip_i]      # names in METRICS below
    paper: table1                  # results/paper/table1.csv, matched on the rows' values; or null
    grid: {index: .., columns: ..} # optional: also draw each metric as a grid (and a heatmap)
    figures: [heatmap]             # optional: benchmark.plots.FIGURES

The report plans the sweep exactly as `python -m benchmark -m experiment=<name> [overrides]`
runs it (benchmark.sweep), so it reads only that sweep's records, and a run that failed or has
no record yet is counted and listed, never dropped. Each row gives our mean over its runs that
succeeded, a 95 % bootstrap confidence interval over subjects (and seeds within a subject), the
paper's value and our difference to it. Written to <paths.results>/<name>/: table.md,
table.tex, table.csv (one row per table row, every number unrounded) and the figures' PNGs.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from benchmark.records import CorruptRecord, load_records
from benchmark.sweep import InvalidSweep, JobProblem, PlannedRun, plan_sweep, primary_config

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
# The Mem. column: the first of these a record has. NVML's process peak is the papers'
# nvidia-smi figure; CUDA's peak reserved memory including the model load comes closest where
# NVML cannot see the process. A predicted peak (benchmark.memory_estimate) or, on a CPU, the
# profiler's peak of live tensors (the breakdown's total) only where nothing was measured on a GPU.
MEMORY_FIELDS = (
    "nvml_process_peak_bytes", "peak_reserved_with_load_bytes", "peak_reserved_bytes",
    "predicted_peak_bytes", "breakdown_peak_bytes",
)  # fmt: skip


@dataclass(frozen=True)
class Metric:
    label: str
    per_run: Callable[[pd.DataFrame], pd.Series]  # one value per record, NaN where unmeasured
    digits: int | None  # decimals shown; None: 4 significant digits (the CSV keeps every digit)


def record_field(name: str, scale: float = 1.0) -> Callable[[pd.DataFrame], pd.Series]:
    def values(records: pd.DataFrame) -> pd.Series:
        if name not in records:
            return pd.Series(np.nan, index=records.index)
        return pd.to_numeric(records[name], errors="coerce") * scale

    return values


def memory_source(records: pd.DataFrame) -> pd.Series:
    """Per record, the first of MEMORY_FIELDS it has a value for (None: none)."""
    source = pd.Series(None, index=records.index, dtype=object)
    for name in MEMORY_FIELDS:
        source = source.where(source.notna() | record_field(name)(records).isna(), name)
    return source


def memory_bytes(records: pd.DataFrame) -> pd.Series:
    out = pd.Series(np.nan, index=records.index)
    for name in MEMORY_FIELDS:
        out = out.fillna(record_field(name)(records))
    return out


METRICS: dict[str, Metric] = {
    "memory_gb": Metric("Mem. (GB)", lambda r: memory_bytes(r) / 1e9, 2),
    "storage_mb": Metric("Stor. (MB)", record_field("artifact_bytes", 1e-6), None),  # paper: MB = 1e6 bytes
    "clip_t": Metric("CLIP-T", record_field("clip_t"), 3),
    "clip_i": Metric("CLIP-I", record_field("clip_i"), 3),
    "dino": Metric("DINO", record_field("dino"), 3),
    "dino_inter": Metric("DINO-inter", record_field("dino_inter"), 3),
    "it_per_s": Metric("Speed (it/s)", record_field("it_per_s"), 2),
    "train_minutes": Metric("Time (min)", record_field("train_seconds", 1 / 60), 1),
}


# -- statistics ---------------------------------------------------------------------------


def bootstrap_ci(values_by_subject: Sequence[Sequence[float]], level: float = CI_LEVEL, seed: int = 0):
    """Percentile bootstrap CI of the mean: resample subjects with replacement, then each chosen
    subject's seeds with replacement. (nan, nan) with fewer than two values."""
    groups = [np.asarray(g, dtype=float) for g in values_by_subject if len(g)]
    if sum(len(g) for g in groups) < 2:
        return math.nan, math.nan
    counts = np.array([len(g) for g in groups])
    padded = np.zeros((len(groups), counts.max()))
    for i, g in enumerate(groups):
        padded[i, : len(g)] = g
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, len(groups), (BOOTSTRAP_RESAMPLES, len(groups)))
    n_seeds = counts[subjects][..., None]  # (B, S, 1)
    seeds = (rng.random((*subjects.shape, counts.max())) * n_seeds).astype(int)
    picked = padded[subjects[..., None], seeds]
    used = np.arange(counts.max()) < n_seeds  # a subject with fewer seeds draws only as many
    means = (picked * used).sum(axis=(1, 2)) / used.sum(axis=(1, 2))
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def canonical(value: Any) -> str:
    """One spelling per value, to match a record's value with the paper CSV's: 1e-3 == 0.001,
    True == "true", missing == ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


# -- the report ---------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    spec: dict[str, Any]
    out_dir: Path  # <paths.results>/<name>
    runs: pd.DataFrame  # one row per planned run: its row values, state, metric values, path
    table: pd.DataFrame  # one row per table row: means, CIs, paper values, differences, counts
    grids: dict[str, pd.DataFrame] = field(default_factory=dict)  # metric -> index x columns of means
    files: list[Path] = field(default_factory=list)


def bad_input(message: str) -> InvalidSweep:
    return InvalidSweep([JobProblem((), message)], 1)


def experiment_name(arguments: Sequence[str]) -> str:
    names = [a.split("=", 1)[1] for a in arguments if a.startswith("experiment=")]
    if len(names) != 1:
        options = sorted(
            p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml")
        )
        raise bad_input(f"name one experiment: experiment=<{' | '.join(options)}>")
    return names[0]


def report_spec(cfg: DictConfig, name: str) -> dict[str, Any]:
    spec = OmegaConf.to_container(cfg.report, resolve=True) if cfg.get("report") else None
    if not spec or not spec.get("rows") or not spec.get("metrics"):
        raise bad_input(f"conf/experiment/{name}.yaml has no report.rows / report.metrics")
    unknown = [m for m in spec["metrics"] if m not in METRICS]
    if unknown:
        raise bad_input(f"report.metrics {unknown} unknown; choose from: {', '.join(METRICS)}")
    return spec


def runs_frame(planned: Sequence[PlannedRun], rows: Sequence[str], results_dir: Path) -> pd.DataFrame:
    """One row per planned run: row values (from its config), subject, seed, state, record fields."""
    by_dir = records_by_dir(results_dir)
    out = []
    for run in planned:
        record = by_dir.get(str(run.run_dir.resolve()), {})
        state = record.get("status", "missing")
        out.append(
            {**record, **{key: run.value(key) for key in rows}, "subject": run.value("subject"),
             "seed": run.value("seed"), "state": state, "path": str(run.run_dir)}
        )  # fmt: skip
    frame = pd.DataFrame(out)
    if frame.empty:
        raise SystemExit("the sweep has no runs")
    return frame


def records_by_dir(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Each record by its run directory; a corrupt one as state "corrupt" with its reason, listed
    among the runs without a result rather than stopping the report."""
    corrupt: list[CorruptRecord] = []
    records = load_records(results_dir, corrupt)
    by_dir = {str(Path(p).resolve()): r for p, r in zip(records["path"], records.to_dict("records"))}
    for e in corrupt:
        by_dir[str(e.path.parent.resolve())] = {"status": "corrupt", "error": str(e)}
    return by_dir


def row_keys(frame: pd.DataFrame, rows: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(canonical(v) for v in values) for values in frame[list(rows)].itertuples(index=False)]


def load_paper(name: str | None, rows: Sequence[str]) -> dict[tuple[str, ...], dict[str, str]] | None:
    """The paper's rows by their canonical row key; None when the experiment has no paper values."""
    if not name:
        return None
    path = PAPER_DIR / f"{name}.csv"
    paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [r for r in rows if r not in paper.columns]
    if missing:
        raise SystemExit(f"{path} lacks the row columns {missing}")
    return dict(zip(row_keys(paper, rows), paper.to_dict("records")))


def summarize(runs: pd.DataFrame, spec: dict[str, Any], paper: dict | None) -> pd.DataFrame:
    rows = spec["rows"]
    keys = row_keys(runs, rows)
    ok = runs["state"] == "ok"
    values = {m: METRICS[m].per_run(runs) for m in spec["metrics"]}
    table = []
    for key in dict.fromkeys(keys):  # the sweep's order
        member = pd.Series([k == key for k in keys], index=runs.index)
        first = runs[member].iloc[0]
        entry: dict[str, Any] = {r: first[r] for r in rows}
        for m in spec["metrics"]:
            good = member & ok & values[m].notna()
            by_subject = [g.to_numpy() for _, g in values[m][good].groupby(runs["subject"][good], sort=False)]
            entry[m] = float(values[m][good].mean()) if good.any() else math.nan
            entry[f"{m}_ci_low"], entry[f"{m}_ci_high"] = bootstrap_ci(by_subject)
            if paper is not None:
                reported = paper.get(key, {}).get(m, "")
                entry[f"{m}_paper"] = float(reported) if reported != "" else math.nan
                entry[f"{m}_diff"] = entry[m] - entry[f"{m}_paper"]
        states = Counter(runs["state"][member])
        entry["runs"] = int(member.sum())
        entry["ok"] = states.pop("ok", 0)
        entry["not_ok"] = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        if paper is not None:
            entry["paper_source"] = paper.get(key, {}).get("source", "")
        table.append(entry)
    return pd.DataFrame(table)


def pivot(table: pd.DataFrame, grid: dict[str, str], values: str) -> pd.DataFrame:
    """``values`` as a grid, rows and columns in the sweep's order."""
    out = table.pivot_table(
        index=grid["index"], columns=grid["columns"], values=values, aggfunc="first", dropna=False
    )
    return out.reindex(index=table[grid["index"]].unique(), columns=table[grid["columns"]].unique())


def grids(table: pd.DataFrame, spec: dict[str, Any]) -> dict[str, pd.DataFrame]:
    return {m: pivot(table, spec["grid"], m) for m in spec["metrics"]} if spec.get("grid") else {}


def build_report(arguments: Sequence[str]) -> Report:
    """Plan the sweep of `python -m benchmark -m <arguments>`, read its records, and summarize."""
    name = experiment_name(arguments)
    cfg = primary_config(arguments)
    spec = report_spec(cfg, name)
    results = Path(cfg.paths.results)
    runs = runs_frame(plan_sweep(arguments), spec["rows"], results)
    table = summarize(runs, spec, load_paper(spec.get("paper"), spec["rows"]))
    return Report(name, spec, results / name, runs, table, grids(table, spec))


# -- writing ------------------------------------------------------------------------------


def number(value: Any, digits: int | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, ("+" if signed else "") + (".4g" if digits is None else f".{digits}f"))


def display_table(report: Report) -> pd.DataFrame:
    """The table as strings: our mean [95 % CI], the paper's value, our difference to it, run counts."""
    has_paper = any(c.endswith("_paper") for c in report.table.columns)
    out = pd.DataFrame({r: [canonical(v) or "—" for v in report.table[r]] for r in report.spec["rows"]})
    t = report.table
    for m in report.spec["metrics"]:
        label, digits = METRICS[m].label, METRICS[m].digits
        out[label] = [
            number(v, digits) + ("" if math.isnan(lo) else f" [{number(lo, digits)}, {number(hi, digits)}]")
            for v, lo, hi in zip(t[m], t[f"{m}_ci_low"], t[f"{m}_ci_high"])
        ]
        if has_paper:
            out[f"{label} paper"] = [number(v, digits) for v in t[f"{m}_paper"]]
            out[f"{label} Δ"] = [number(v, digits, signed=True) for v in t[f"{m}_diff"]]
    out["runs ok"] = [f"{ok}/{n}" for ok, n in zip(report.table["ok"], report.table["runs"])]
    out["not ok"] = report.table["not_ok"].replace("", "—")
    return out


def display_grid(report: Report, metric: str) -> pd.DataFrame:
    """A grid's cells as 'ours' or 'ours (paper)'."""
    digits, grid = METRICS[metric].digits, report.grids[metric]
    cells = grid.map(lambda v: number(v, digits))
    if f"{metric}_paper" in report.table:
        paper = pivot(report.table, report.spec["grid"], f"{metric}_paper")
        cells = cells + paper.map(lambda v: f" ({number(v, digits)})")
    return cells


def grid_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """A grid as a plain table: first column the index values, headed 'index \\ columns'."""
    corner = f"{cells.index.name} \\ {cells.columns.name}"
    return cells.rename_axis(index=corner, columns=None).reset_index()


def markdown(frame: pd.DataFrame) -> str:
    cells = [[str(c).replace("|", "\\|") for c in frame.columns]] + [
        [str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(frame.columns))
    return "\n".join(lines)


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "—": "--",
}  # fmt: skip


def latex_escape(text: Any) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex(frame: pd.DataFrame, caption: str) -> str:
    head = " & ".join(latex_escape(c) for c in frame.columns) + r" \\"
    body = [" & ".join(latex_escape(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    return "\n".join(
        [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", r"\small",
         rf"\begin{{tabular}}{{{'l' * len(frame.columns)}}}", r"\toprule", head, r"\midrule", *body,
         r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    )  # fmt: skip


def provenance(report: Report) -> list[str]:
    runs, spec = report.runs, report.spec
    states = Counter(runs["state"])
    lines = [
        f"Runs: {len(runs)} planned; " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ".",
        f"Mean over the runs that succeeded; {int(CI_LEVEL * 100)} % CI: percentile bootstrap "
        f"({BOOTSTRAP_RESAMPLES} resamples) over subjects, and seeds within a subject.",
    ]
    models = sorted(runs["model"].dropna().unique()) if "model" in runs else []
    evals = sorted(runs["eval"].dropna().unique()) if "eval" in runs else []
    if models:
        lines.append(f"Model: {', '.join(models)}; evaluation protocol: {', '.join(evals)}.")
    if spec.get("paper") and (set(models) - {"sd15"} or set(evals) - {"zoodip"}):
        lines.append("Not the papers' setting (SD1.5, eval=zoodip): the paper column is for reference only.")
    if "memory_gb" in spec["metrics"]:
        sources = Counter(memory_source(runs[runs["state"] == "ok"]).dropna())
        used = ", ".join(f"{name} ({n} runs)" for name, n in sources.items()) or "none recorded"
        lines.append(f"Mem. (GB = 1e9 bytes) from: {used}.")
    if spec.get("paper"):
        lines.append(f"Paper values: results/paper/{spec['paper']}.csv (source per row in table.csv).")
    return lines


def failures(report: Report) -> pd.DataFrame:
    bad = report.runs[report.runs["state"] != "ok"]
    columns = [*report.spec["rows"], "subject", "seed", "state", "error", "path"]
    bad = bad.reindex(columns=columns).astype(object)
    return bad.where(bad.notna(), "")


def write_report(report: Report) -> list[Path]:
    from benchmark import plots  # here: plots imports this module

    out_dir = report.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    title = report.spec.get("title", report.name)
    shown = display_table(report)
    md = [f"# {title}", "", *provenance(report), ""]
    tex = [
        f"% {title}: python -m benchmark.report experiment={report.name} (needs booktabs)",
        latex(shown, title),
    ]
    for metric in report.grids:
        cells = display_grid(report, metric)
        label = METRICS[metric].label
        shown_as = "ours (paper)" if f"{metric}_paper" in report.table else "ours"
        md += [f"## {label}: {cells.index.name} (rows) x {cells.columns.name} (columns), {shown_as}", "",
               markdown(grid_frame(cells)), ""]  # fmt: skip
        tex.append(latex(grid_frame(cells), f"{title}: {label}"))
    md += ["## All rows", "", markdown(shown), ""]
    bad = failures(report)
    md += ["## Runs without a result", ""]
    md += [markdown(bad), ""] if len(bad) else ["None: every run succeeded.", ""]
    paths = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv"]
    paths[0].write_text("\n".join(md))
    paths[1].write_text("\n".join(tex))
    report.table.to_csv(paths[2], index=False)
    paths += plots.draw(report, out_dir)
    report.files = paths
    return paths


def main(argv: Sequence[str]) -> int:
    """Exit 2 on bad input (every bad value listed, one line each), 0 otherwise."""
    try:
        report = build_report(argv)
    except InvalidSweep as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 2
    for path in write_report(report):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
