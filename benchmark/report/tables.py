"""A report built from the records: one paper table or figure (the command: benchmark.report.cli).

The experiment (conf/experiment/<name>.yaml) names its sweep and, under `report:`, its layout:

    rows: [method]                 # config values that make one row (the sweep's other axes,
                                   # subjects and seeds, are averaged over)
    metrics: [clip_t, clip_i]      # names in METRICS below
    paper: table1                  # results/paper/table1.csv, matched on the rows' values; or null
    grid: {index: .., columns: ..} # optional: also draw each metric as a grid (and a heatmap)
    figures: [heatmap]             # optional: benchmark.report.plots.FIGURES

The report plans the sweep exactly as `python -m benchmark -m experiment=<name> [overrides]`
runs it (benchmark.sweep.plan), so it reads only that sweep's records, and a run that failed or has
no record yet is counted and listed, never dropped. Each row gives our mean over its runs that
succeeded, a 95 % bootstrap confidence interval over subjects (and seeds within a subject), the
paper's value and our difference to it. Written to <paths.results>/<name>/: table.md,
table.tex, table.csv (one row per table row, every number unrounded) and the figures' PNGs.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from benchmark.config import NOT_IN_RUN_KEY
from benchmark.datasets import DREAMBOOTH
from benchmark.records import CorruptRecord, load_records
from benchmark.sweep.plan import InvalidSweep, JobProblem, PlannedRun, plan_sweep, primary_config

PAPER_DIR = Path(__file__).resolve().parents[2] / "results" / "paper"
CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
# Below this many subjects (or seeds, for a one-subject experiment) a percentile bootstrap
# interval is the sample's own min..max, not a confidence interval: the table shows n instead.
MIN_UNITS_FOR_CI = 5
# The Mem. column: the first of these a record has. NVML's process peak is the papers'
# nvidia-smi figure; CUDA's peak reserved memory including the model load comes closest where
# NVML cannot see the process. A predicted peak (benchmark.memory.estimate) or, on a CPU, the
# profiler's peak of live tensors (the breakdown's total) only where nothing was measured on a GPU.
# Config values a row shows even before its runs have records (Table 1's Quant. column)
PLANNED_FIELDS = ("method.quantize", "method.bits")
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
    # experiment=recovery (its own report: benchmark/report/recovery.py)
    "recovery_gap": Metric("gap L_init - L_teacher", record_field("recovery_gap"), 5),
    "recovery_gap_closed": Metric("gap closed", record_field("recovery_gap_closed"), 3),
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
    reference: Report | None = None  # Table 1's "Real images" upper bound (report.reference: real)
    planned: list[PlannedRun] = field(default_factory=list, repr=False)  # the runs, as the sweep plans them


def bad_input(message: str) -> InvalidSweep:
    return InvalidSweep([JobProblem((), message)], 1)


def experiment_name(arguments: Sequence[str]) -> str:
    names = [a.split("=", 1)[1] for a in arguments if a.startswith("experiment=")]
    if len(names) != 1:
        options = sorted(
            p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("*.yaml")
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
            {**{key: run.value(key) for key in PLANNED_FIELDS}, **record,
             **{key: run.value(key) for key in rows}, "subject": run.value("subject"),
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
            # the units the interval resamples: subjects, or the seeds of a single subject
            units = len(by_subject) if len(by_subject) > 1 else int(good.sum())
            constant = values[m][good].nunique() == 1  # e.g. storage: the same bytes for every subject
            entry[f"{m}_n"] = units
            entry[f"{m}_constant"] = bool(constant and units > 1)
            confident = units >= MIN_UNITS_FOR_CI and not constant
            entry[f"{m}_ci_low"], entry[f"{m}_ci_high"] = (
                bootstrap_ci(by_subject) if confident else (math.nan,) * 2
            )
            if paper is not None:
                reported = paper.get(key, {}).get(m, "")
                entry[f"{m}_paper"] = float(reported) if reported != "" else math.nan
                entry[f"{m}_diff"] = entry[m] - entry[f"{m}_paper"]
        states = Counter(runs["state"][member])
        entry["runs"] = int(member.sum())
        entry["ok"] = states.pop("ok", 0)
        entry["not_ok"] = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        entry["subjects_ok"] = runs["subject"][member & ok].nunique()
        if paper is not None:
            entry["paper_source"] = paper.get(key, {}).get("source", "")
        table.append(entry)
    out = pd.DataFrame(table)
    # a row averaged over fewer subjects than the others (failed or missing runs): marked in the table
    out["fewer_subjects"] = out["subjects_ok"] < out["subjects_ok"].max()
    return out


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
    planned = plan_sweep(arguments)
    runs = runs_frame(planned, spec["rows"], results)
    table = summarize(runs, spec, load_paper(spec.get("paper"), spec["rows"]))
    out_dir = report_dir(results, name, arguments)
    report = Report(name, spec, out_dir, runs, table, grids(table, spec), planned=planned)
    report.reference = reference_report(arguments, spec, results, out_dir)
    return report


REAL_PAPER = "dreambooth_real"  # results/paper/dreambooth_real.csv: the DreamBooth paper's row


def reference_report(arguments: Sequence[str], spec: dict[str, Any], results: Path, out_dir: Path):
    """The upper bound (`report.reference: real`): each subject's real images scored against each
    other, the records of `python -m benchmark -m <arguments> mode=real`; None if not asked for."""
    if spec.get("reference") != "real":
        return None
    real_args = [a for a in arguments if not a.startswith("mode=")] + ["mode=real"]
    planned = list({r.run_dir: r for r in plan_sweep(real_args)}.values())  # one per subject
    runs = runs_frame(planned, [], results).drop(columns=list(PLANNED_FIELDS)).assign(method="real")
    real_spec = {**spec, "rows": ["method"], "paper": REAL_PAPER, "grid": None}
    table = summarize(runs, real_spec, load_paper(REAL_PAPER, ["method"]))
    return Report("real", real_spec, out_dir, runs, table)


# -- writing ------------------------------------------------------------------------------


def number(value: Any, digits: int | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, ("+" if signed else "") + (".4g" if digits is None else f".{digits}f"))


def ours_cell(
    entry: dict[str, Any], metric: str, interval: str = " [{low}, {high}]", count: str = " (n={n})"
) -> str:
    """Our mean with its CI; with too few subjects (or seeds) for a CI, n instead; a constant alone."""
    digits = METRICS[metric].digits
    text = number(entry[metric], digits)
    low, high = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
    if not math.isnan(low):
        return text + interval.format(low=number(low, digits), high=number(high, digits),
                                      half=number((high - low) / 2, digits))  # fmt: skip
    if math.isnan(entry[metric]) or entry[f"{metric}_constant"] or entry[f"{metric}_n"] >= MIN_UNITS_FOR_CI:
        return text
    return text + count.format(n=entry[f"{metric}_n"])


FEWER_SUBJECTS_MARK = "†"
BEYOND_PAPERS_MARK = "‡"


def row_name(report: Report, entry: dict[str, Any]) -> str:
    """The row's values as a reader sees them (display names), marked when it has fewer subjects."""
    from benchmark.report.display import beyond_papers, value_label

    text = ", ".join(value_label(r, entry[r]) for r in report.spec["rows"])
    if "method" in report.spec["rows"] and beyond_papers(entry["method"]):
        text += f" {BEYOND_PAPERS_MARK}"
    return text + (f" {FEWER_SUBJECTS_MARK}" if entry.get("fewer_subjects") else "")


def display_table(report: Report) -> pd.DataFrame:
    """The table as strings: our mean [95 % CI] (or n), the paper's value, our difference, run counts."""
    from benchmark.report.display import axis_label

    has_paper = any(c.endswith("_paper") for c in report.table.columns)
    entries = report.table.to_dict("records")
    heading = ", ".join(axis_label(r, text=True) for r in report.spec["rows"])
    out = pd.DataFrame({heading: [row_name(report, e) for e in entries]})
    for m in report.spec["metrics"]:
        label, digits = METRICS[m].label, METRICS[m].digits
        out[label] = [ours_cell(e, m) for e in entries]
        if has_paper:
            out[f"{label} paper"] = [number(e[f"{m}_paper"], digits) for e in entries]
            out[f"{label} Δ"] = [number(e[f"{m}_diff"], digits, signed=True) for e in entries]
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
    from benchmark.report.display import axis_label

    grid_spec = report.spec["grid"]
    return cells.rename_axis(
        index=axis_label(grid_spec["index"], text=True), columns=axis_label(grid_spec["columns"], text=True)
    )


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


def papers_setting() -> dict[str, str]:
    """The model and evaluation protocol of the papers' tables: conf/config.yaml's defaults."""
    defaults = primary_config([])
    return {"model": defaults.model.name, "eval": defaults.eval.name}


def provenance(report: Report) -> list[str]:
    from benchmark.report.display import beyond_papers

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
    named = sorted(runs["dataset"].dropna().unique()) if "dataset" in runs else []
    lines.append(f"Dataset: {', '.join(named) or DREAMBOOTH}.")
    papers = papers_setting()
    if spec.get("paper") and (set(models) - {papers["model"]} or set(evals) - {papers["eval"]}):
        lines.append(
            f"Not the papers' setting (model={papers['model']}, eval={papers['eval']}): "
            "the paper column is for reference only."
        )
    if "memory_gb" in spec["metrics"]:
        sources = Counter(memory_source(runs[runs["state"] == "ok"]).dropna())
        used = ", ".join(f"{name} ({n} runs)" for name, n in sources.items()) or "none recorded"
        lines.append(f"Mem. (GB = 1e9 bytes) from: {used}.")
    if spec.get("paper"):
        lines.append(f"Paper values: results/paper/{spec['paper']}.csv (source per row in table.csv).")
    metric_n = [c for c in report.table.columns if c.endswith("_n")]
    if metric_n and (report.table[metric_n] < MIN_UNITS_FOR_CI).to_numpy().any():
        lines.append(
            f"(n=k): fewer than {MIN_UNITS_FOR_CI} subjects (or seeds) behind the mean: no confidence "
            "interval is given, k values are averaged."
        )
    if "method" in spec["rows"] and any(beyond_papers(m) for m in report.table["method"]):
        lines.append(
            f"{BEYOND_PAPERS_MARK}: a method beyond the papers (no paper value), at its documented defaults."
        )
    if report.table["fewer_subjects"].any():
        most = int(report.table["subjects_ok"].max())
        lines.append(
            f"{FEWER_SUBJECTS_MARK}: averaged over fewer subjects than the other rows (of {most}): "
            "runs failed or missing, see below; not comparable with the other rows."
        )
    lines += image_sets(runs)
    lines += [f"Warning: {line}" for line in flat_axes(report)]
    return lines


def image_sets(runs: pd.DataFrame) -> list[str]:
    """Which photos the runs used (the run key's image fingerprint and the folder each was read
    from), and a warning where one subject's runs used more than one set."""
    if "data_images" not in runs:
        return []
    used = runs.dropna(subset=["data_images"])
    if used.empty:
        return []
    sets = used.groupby(["subject", "data_images"], sort=True)
    named = [f"{subject} {images} ({group['data_root'].iloc[0]}, {len(group)} runs)"
             for (subject, images), group in sets]  # fmt: skip
    lines = [f"Images (subject, fingerprint, folder): {'; '.join(named)}."]
    per_subject = used.groupby("subject")["data_images"].nunique()
    lines += [f"Warning: {subject}'s runs used {n} different image sets; compare them with care."
              for subject, n in per_subject.items() if n > 1]  # fmt: skip
    return lines


def flat_axes(report: Report) -> list[str]:
    """A swept axis whose cells all read the same for a metric (at the table's precision): say
    so, with the spread and the likely reason."""
    from benchmark.report.display import axis_label

    table, out = report.table, []
    for metric in report.spec["metrics"]:
        measured, digits = table[metric].dropna(), METRICS[metric].digits
        shown = measured.round(digits) if digits is not None else measured
        if len(measured) < 2 or shown.nunique() > 1:
            continue
        axes = ", ".join(axis_label(r, text=True) for r in report.spec["rows"])
        value, spread = number(measured.iloc[0], digits), number(measured.max() - measured.min(), None)
        label = METRICS[metric].label
        line = (
            f"every {label} cell over {axes} reads {value} (spread {spread}): "
            "the swept axis had no visible effect."
        )
        steps = pd.to_numeric(report.runs.get("train_steps", pd.Series(dtype=float)), errors="coerce").max()
        if "method.tau" in report.spec["rows"] and table["method.tau"].min() >= steps:
            tau = table["method.tau"].min()
            line += (
                f" Likely reason: the runs trained {steps:g} steps and the Subspace Gradient first "
                f"switches on after tau >= {tau} steps, so it never did."
            )
        elif set(report.runs.get("model", pd.Series(dtype=object)).dropna()) == {"tiny"}:
            line += " Likely reason: the tiny random-weight model and smoke metrics do not respond to it."
        out.append(line)
    return out


MAX_SUFFIX = 160  # characters of a narrowed report folder's name after '<name>+'


def report_dir(results: Path, name: str, arguments: Sequence[str]) -> Path:
    """<results>/<name> for the full report; a narrowed one (subject=dog6, model=tiny, ...) gets
    its own folder named from its overrides, so it never overwrites the full report."""
    # not what is reported: where things live, settings that are not in the run key (a report.*
    # override does change how the table is drawn: it gets its own folder)
    where = ("experiment=", "data.", "hydra.", *(k for k in NOT_IN_RUN_KEY if k != "report"))
    narrowing = [a for a in arguments if not a.lstrip("+~").startswith(where)]
    # another dataset folder: a folder of its own (named by a digest of its resolved path)
    roots = [a.split("=", 1)[1] for a in arguments if a.lstrip("+~").startswith("data.root=")]
    if roots and roots[-1] not in ("null", "None", ""):
        where_from = str(Path(roots[-1]).expanduser().resolve())
        narrowing.append(f"data={hashlib.sha256(where_from.encode()).hexdigest()[:8]}")
    if not narrowing:
        return results / name
    suffix = "+".join(re.sub(r"[^A-Za-z0-9._=,-]", "_", a) for a in narrowing)
    if len(suffix) > MAX_SUFFIX:  # a folder name is at most 255 bytes: shortened, a hash keeps it unique
        digest = hashlib.sha256(suffix.encode()).hexdigest()[:10]
        suffix = f"{suffix[: MAX_SUFFIX - 11]}-{digest}"
    return results / f"{name}+{suffix}"


def failures(report: Report) -> pd.DataFrame:
    bad = report.runs[report.runs["state"] != "ok"]
    columns = [*report.spec["rows"], "subject", "seed", "state", "error", "path"]
    bad = bad.reindex(columns=columns).astype(object)
    return bad.where(bad.notna(), "")
