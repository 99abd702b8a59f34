"""The recovery experiment's report (`python -m benchmark.report experiment=recovery`).

One row per arm (conf/experiment/recovery/<arm>.yaml), each number a mean over seeds with a
95 % bootstrap CI over seeds: the gap L_init - L_teacher (is there anything to close?), the
seeds where it is positive, the fraction of it closed at the end (only over those seeds), the
held-out loss change, and for token methods the token's cosine and relative distance to the
teacher's. Beside each percentile bootstrap CI, a Student-t interval (the bootstrap's covers
less than 95 % at n = 8). The curves (per arm, mean over seeds, against training steps) go to
curves.png; every run's numbers to per_seed.csv (the "n of 8 seeds" claims, checkable).
Written to <paths.results>/recovery/: table.md, table.csv, per_seed.csv, curves.png.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from benchmark.report.display import method_name, method_type
from benchmark.report.tables import CI_LEVEL, bootstrap_ci, report_dir, runs_frame
from benchmark.sweep.plan import plan_sweep, primary_config
from methods.common.atomic import write_text_atomic

ROW = "recovery.arm"


def arm_name(arm, arm_names: Mapping[str, str]) -> str:
    """How a reader sees an arm: ``report.arms`` of conf/experiment/recovery.yaml, else its name."""
    return arm_names.get(str(arm), str(arm))


# (column, label, record field, digits)
COLUMNS = (
    ("gap", "gap L_init − L_teacher", "recovery_gap", 5),
    ("gap_closed", "gap closed", "recovery_gap_closed", 3),
    ("loss_change", "L_end − L_init", "loss_change", 5),
    ("prediction_distance", "‖ε − ε_teacher‖² / start's", "recovery_prediction_distance", 3),
    ("token_cosine", "token cos to teacher", "recovery_token_cosine", 3),
    ("token_distance", "token dist / start dist", "recovery_token_distance", 3),
)


# Student-t 0.975 quantiles for 1-30 degrees of freedom (beyond: a Cornish-Fisher expansion)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(df: int) -> float:
    """The two-sided 95 % Student-t quantile for ``df`` degrees of freedom."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values) -> tuple[float, float]:
    """95 % Student-t interval of the mean (mean ± t·s/√n); (nan, nan) with fewer than two values."""
    assert CI_LEVEL == 0.95, CI_LEVEL
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    half = t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs["state"] == "ok"].copy()
    if not ok.empty:
        ok["loss_change"] = ok["recovery_loss"] - ok["recovery_loss_initial"]
    table = []
    for arm in dict.fromkeys(runs[ROW]):
        member = ok[ok[ROW] == arm]
        methods = runs.loc[runs[ROW] == arm, "method"].dropna() if "method" in runs else []
        entry = {"arm": arm, "method": methods.iloc[0] if len(methods) else None}
        entry["runs"] = int((runs[ROW] == arm).sum())
        entry["ok"] = len(member)
        entry["positive_gap"] = int((member.get("recovery_gap", pd.Series(dtype=float)) > 0).sum())
        for column, _, field, _ in COLUMNS:
            values = pd.to_numeric(member.get(field, pd.Series(dtype=float)), errors="coerce").dropna()
            entry[column] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_ci_low"], entry[f"{column}_ci_high"] = bootstrap_ci([[v] for v in values])
            entry[f"{column}_t_low"], entry[f"{column}_t_high"] = t_interval(values)
        table.append(entry)
    return pd.DataFrame(table)


PAIR_FIELDS = (
    ("gap closed", "recovery_gap_closed"),
    ("‖ε − ε_teacher‖² / start's", "recovery_prediction_distance"),
)


def paired(runs: pd.DataFrame, pairs: Sequence[Sequence[str]], arm_names: Mapping[str, str]) -> list[str]:
    """One Markdown line per pair (arm a, arm b, question; ``report.pairs``) present in ``runs``:
    mean a − b over the seeds where both ran ok (same seed: same teacher and base), [95 %
    bootstrap CI], n."""
    ok = runs[runs["state"] == "ok"]
    lines = []
    for a, b, question in pairs:
        sides = [ok[ok[ROW] == arm].set_index("seed") for arm in (a, b)]
        seeds = sorted(set(sides[0].index) & set(sides[1].index))
        if not seeds:
            continue
        cells, diffs = [], {}
        for _, field in PAIR_FIELDS:
            if field not in ok:
                cells.append("—")
                continue
            diff = [float(sides[0].at[s, field]) - float(sides[1].at[s, field]) for s in seeds]
            diff = diffs[field] = [d for d in diff if not math.isnan(d)]
            low, high = bootstrap_ci([[d] for d in diff])
            t_low, t_high = t_interval(diff)
            ci = "" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}] t [{t_low:+.3f}, {t_high:+.3f}]"
            cells.append(f"{np.mean(diff):+.3f}{ci}" if diff else "—")
        closed = diffs.get(PAIR_FIELDS[0][1], [])
        cells.append(f"{sum(d > 0 for d in closed)} / {len(closed)}")  # the "n of 8 seeds" claims
        difference = f"{arm_name(a, arm_names)} − {arm_name(b, arm_names)}"
        lines.append(f"| {question} | {difference} | {' | '.join(cells)} | {len(seeds)} |")
    if not lines:
        return []
    header = ["question", "difference", *(f"Δ {label}" for label, _ in PAIR_FIELDS)]
    header += ["seeds where a closed more", "seeds (n)"]
    note = (
        "Paired over seeds (same seed: same teacher, base and held-out draws), [95 % percentile "
        "bootstrap CI] t [95 % Student-t interval]."
    )
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines, "", note]


T_COLUMNS = ("gap_closed",)  # the table's cells that show the t interval beside the bootstrap's


# per_seed.csv: the record fields of every run (curves as "a / b / c")
PER_SEED_FIELDS = (
    "recovery_loss_initial", "recovery_loss_teacher", "recovery_gap", "recovery_loss", "recovery_gap_closed",
    "recovery_prediction_distance", "recovery_token_cosine", "recovery_token_distance",
    "recovery_gap_reference", "recovery_apply_error", "recovery_heldout_images",
    "recovery_image_loss_initial", "recovery_image_loss_teacher", "recovery_image_gap_closed",
    "curve_step", "curve_gap_closed", "curve_prediction_distance", "curve_image_gap_closed", "train_steps",
)  # fmt: skip


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per planned run (arm, method, seed, state) with its record's numbers."""
    columns = [ROW, "method", "seed", "state", *(f for f in PER_SEED_FIELDS if f in runs)]
    table = runs[columns].rename(columns={ROW: "arm"}).sort_values(["arm", "seed"], kind="stable")
    for field in columns:
        if field.startswith("curve_"):
            table[field] = table[field].map(
                lambda c: (
                    " / ".join("" if v is None else f"{v:.6g}" for v in c) if isinstance(c, list) else ""
                )
            )
    return table.reset_index(drop=True)


def cell(row, column: str, digits: int) -> str:
    mean, low, high = row[column], row[f"{column}_ci_low"], row[f"{column}_ci_high"]
    if math.isnan(mean):
        return "—"
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    text = f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    if column in T_COLUMNS:
        text += f" t [{row[f'{column}_t_low']:.{digits}f}, {row[f'{column}_t_high']:.{digits}f}]"
    return text


def markdown(table: pd.DataFrame, title: str, arm_names: Mapping[str, str]) -> str:
    header = ["arm", "method", "ok / runs", "seeds with gap > 0", *(label for _, label, _, _ in COLUMNS)]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [
            arm_name(row["arm"], arm_names),
            method_name(row["method"]) if isinstance(row["method"], str) else "—",  # — : no run yet
            f"{row['ok']} / {row['runs']}",
            str(row["positive_gap"]),
        ]
        cells += [cell(row, column, digits) for column, _, _, digits in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Means over seeds, [95 % percentile bootstrap CI over seeds]; gap closed also t [95 % "
        "Student-t interval]. Gap closed = (L_init − L)/(L_init − L_teacher) "
        "on held-out draws, over the seeds whose gap is positive only (— where none is); "
        "‖ε − ε_teacher‖²: the noise predictions' distance to the teacher's on the same draws "
        "(1 = start, 0 = teacher).",
    ]
    return "\n".join(lines) + "\n"


def curves(runs: pd.DataFrame, path: Path, arm_names: Mapping[str, str]) -> Path:
    """Per arm, mean over its ok seeds (n in the legend): held-out loss change, gap closed,
    prediction distance, token distance; a panel no arm has (token distance without token
    arms) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (field, title, drawn relative to the start, log scale where it spans more than 10x)
    panels = (
        ("curve_loss", "held-out loss − start", True, False),
        ("curve_gap_closed", "gap closed (seeds with gap > 0)", False, False),
        ("curve_prediction_distance", "‖ε − ε_teacher‖² / start's (0 = teacher)", False, False),
        ("curve_token_distance", "token distance / start distance", False, True),  # GF-TI's: 20-30x
    )
    ok = runs[runs["state"] == "ok"]
    drawn = []  # (label, [(arm, steps, mean, n)], log)
    for field, label, relative, log in panels:
        lines = []
        for arm, group in ok.groupby(ROW, sort=False):
            series = [(s, c) for s, c in zip(group["curve_step"], group.get(field, [None] * len(group)))
                      if isinstance(c, list)]  # fmt: skip
            if not series:
                continue
            values = np.array([[np.nan if v is None else v for v in c] for _, c in series], dtype=float)
            if relative:
                values = values - values[:, :1]
            if not np.isnan(values).all():
                steps = np.asarray(series[0][0], dtype=float)
                lines.append((arm, steps, np.nanmean(values, axis=0), len(series)))
        if lines:
            drawn.append((label, lines, log))
    # one colour and marker per arm in every panel: more than 10 arms would repeat tab10's colours
    arms = list(dict.fromkeys(arm for _, lines, _ in drawn for arm, *_ in lines))
    x_label = step_label(ok.loc[ok[ROW].isin(arms), "method"].dropna() if "method" in ok else [])
    palette = plt.get_cmap("tab20" if len(arms) > 10 else "tab10").colors
    style = {arm: (palette[i % len(palette)], "osD^v<>PXh"[i % 10]) for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, max(len(drawn), 1), figsize=(4.5 * max(len(drawn), 1), 3.8), squeeze=False)
    for ax, (label, lines, log) in zip(axes[0], drawn):
        for arm, steps, mean, n in lines:
            color, marker = style[arm]
            ax.plot(
                steps, mean, color=color, marker=marker, ms=3.5, label=f"{arm_name(arm, arm_names)} (n = {n})"
            )
        ax.set_xlabel(x_label)
        ax.set_title(label, fontsize=10)
        spread = [m for _, _, mean, _ in lines for m in mean if np.isfinite(m)]
        if log and spread and min(spread) > 0 and max(spread) > 10 * min(spread):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # below the panels, where it hides no curve
        columns = min(4, len(handles))
        rows = math.ceil(len(handles) / columns)
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07 * rows + 0.01, 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_label(methods) -> str:
    """The step axis, naming what a step is for the methods whose step is no optimisation step
    (``Method.step_unit``: GF-TI's is a CMA-ES generation)."""
    units = []
    for name in dict.fromkeys(map(str, methods)):
        cls = method_type(name)
        if cls is not None and cls.step_unit != "step":
            units.append(f"{cls.display_name}: {cls.step_unit}")
    return f"training step ({'; '.join(units)})" if units else "training step"


def main(argv: Sequence[str]) -> int:
    cfg = primary_config(argv)
    results = Path(cfg.paths.results)
    runs = runs_frame(plan_sweep(argv), [ROW], results)
    table = summarize(runs)
    out_dir = report_dir(results, "recovery", argv)  # a narrowed report never overwrites the full one
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = OmegaConf.to_container(cfg.report, resolve=True)
    arm_names, pairs = spec.get("arms") or {}, spec.get("pairs") or []
    text = markdown(table, cfg.report.title, arm_names) + "\n".join(paired(runs, pairs, arm_names)) + "\n"
    write_text_atomic(out_dir / "table.md", text)
    write_text_atomic(out_dir / "table.csv", table.to_csv(index=False))
    write_text_atomic(out_dir / "per_seed.csv", per_seed(runs).to_csv(index=False))
    for path in (
        out_dir / "table.md",
        out_dir / "table.csv",
        out_dir / "per_seed.csv",
        curves(runs, out_dir / "curves.png", arm_names),
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
