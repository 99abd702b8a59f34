"""benchmark.report.tables: paper tables and figures from the records of an experiment's sweep.

Two real sweeps on the tiny model, run in this process (table1 with two methods x two subjects;
fig7's T_L x T_U grid); the rest on records written by hand into the directories the sweep plans."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.records import RECORD_NAME, new_record, read_record, write_record
from benchmark.report.cli import write_report
from benchmark.report.tables import (
    METRICS,
    PAPER_DIR,
    bootstrap_ci,
    build_report,
    canonical,
    display_table,
    report_spec,
)
from benchmark.sweep.plan import plan_sweep, primary_config
from tests.conftest import run_sweep_in_process

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def tiny(results: Path, dataset_root: Path) -> list[str]:
    return [
        "model=tiny", f"data.root={dataset_root}", f"paths.results={results}",
        "train.progress=false", "train.max_steps=2",
    ]  # fmt: skip


def sweep(*overrides: str) -> None:
    # the memory profiler costs seconds a run and nothing here reads it; not in the run key
    records = run_sweep_in_process([*overrides, "train.profile_steps=0"])
    assert all(r["status"] == "ok" for r in records)


def records(results: Path) -> list[dict]:
    return [read_record(p) for p in sorted(results.glob(f"runs/**/{RECORD_NAME}"))]


def paper(name: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / f"{name}.csv")


# -- statistics ---------------------------------------------------------------------------


def test_bootstrap_ci_brackets_the_mean_and_needs_two_values():
    assert all(math.isnan(v) for v in bootstrap_ci([[0.5]]))
    assert bootstrap_ci([[0.3], [0.3], [0.3]]) == (0.3, 0.3)  # no spread, no interval
    rng = np.random.default_rng(1)
    few = [[v] for v in rng.normal(0.7, 0.05, 5)]
    many = [[v] for v in rng.normal(0.7, 0.05, 60)]
    low, high = bootstrap_ci(few)
    assert low < np.mean(few) < high
    assert np.subtract(*bootstrap_ci(many)[::-1]) < high - low  # more subjects, narrower
    # seeds within one subject are resampled too: one subject with two seeds has an interval
    assert bootstrap_ci([[0.2, 0.4]])[0] < bootstrap_ci([[0.2, 0.4]])[1]


def test_canonical_matches_record_and_csv_spellings():
    assert canonical(1e-3) == canonical("0.001") == canonical("1e-3")
    assert canonical(True) == canonical("True") == "true"
    assert canonical(128) == canonical("128")
    assert canonical(float("nan")) == canonical(None) == ""
    assert canonical("int8") == "int8"


# -- configs and paper values -------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_valid_report_and_sourced_paper_values(name):
    spec = report_spec(primary_config([f"experiment={name}"]), name)
    if spec.get("grid"):
        assert {spec["grid"]["index"], spec["grid"]["columns"]} == set(spec["rows"])
    if spec.get("paper"):
        values = paper(spec["paper"])
        assert set(spec["rows"]) <= set(values.columns)
        assert set(values.columns) - set(spec["rows"]) - {"source"} <= set(METRICS)
        assert values["source"].str.startswith("ZOODiP").all()


def test_paper_csvs_hold_the_papers_numbers():
    table1 = paper("table1").set_index("method")
    assert table1.loc["zoodip", ["memory_gb", "storage_mb", "clip_t", "clip_i", "dino"]].tolist() == [
        2.37, 0.003, 0.287, 0.772, 0.558,
    ]  # fmt: skip
    assert table1.loc["dreambooth", "storage_mb"] == 3438
    table4 = paper("table4").set_index(["method.tau", "method.nu"])
    assert table4.loc[(128, 1e-3), "clip_i"] == 0.759  # = Table 3's full ZOODiP (same subject)
    assert len(table4) == 20


# -- reports from hand-written records ----------------------------------------------------


def write(run_dir: Path, **fields) -> None:
    record = new_record(method="zoodip", subject="shiny_sneaker", seed=0, run_key=run_dir.name, **fields)
    write_record(run_dir, record)


def test_failures_and_missing_runs_are_shown_not_dropped(tmp_path):
    args = ["experiment=tableS4", "model=tiny", f"paths.results={tmp_path}"]
    runs = {r.value("method.estimator"): r.run_dir for r in plan_sweep(args)}
    write(runs["rge"], status="ok", clip_t=0.25, clip_i=0.75, dino=0.5)
    write(runs["spsa"], status="oom", error="OutOfMemoryError: CUDA out of memory")
    report = build_report(args)
    table = report.table.set_index("method.estimator")
    assert list(table.index) == ["rge", "spsa", "one_point"]  # the sweep's order, every row kept
    assert table.loc["rge", "clip_i"] == 0.75
    assert table.loc["rge", "clip_i_paper"] == 0.759
    assert table.loc["rge", "clip_i_diff"] == pytest.approx(0.75 - 0.759)
    assert math.isnan(table.loc["rge", "clip_i_ci_low"])  # one subject, one seed: no interval
    assert table.loc["spsa", "not_ok"] == "1 oom" and math.isnan(table.loc["spsa", "clip_i"])
    assert table.loc["one_point", "not_ok"] == "1 missing"
    md = (write_report(report)[0]).read_text()
    assert "CUDA out of memory" in md and str(runs["one_point"]) in md


def test_mean_and_bootstrap_ci_over_subjects_and_seeds(tmp_path):
    subjects = ["dog6", "cat", "dog", "can", "vase"]
    args = ["experiment=table1", "method=ti", f"subject={','.join(subjects)}", "seed=0,1", "model=tiny",
            f"paths.results={tmp_path}"]  # fmt: skip
    values = {}
    rng = np.random.default_rng(0)
    for run in plan_sweep(args):
        clip_i = float(rng.uniform(0.6, 0.9))
        values.setdefault(run.value("subject"), []).append(clip_i)
        record = new_record(
            method="ti", subject=run.value("subject"), seed=run.value("seed"), run_key=run.run_dir.name,
            status="ok", clip_i=clip_i, artifact_bytes=3072,
        )  # fmt: skip
        write_record(run.run_dir, record)
    report = build_report(args)
    (row,) = report.table.to_dict("records")
    assert row["clip_i"] == pytest.approx(np.mean(sum(values.values(), [])))
    assert (row["clip_i_ci_low"], row["clip_i_ci_high"]) == bootstrap_ci(list(values.values()))
    assert row["runs"] == row["ok"] == 10 and row["clip_i_n"] == 5
    # storage is the same for every subject: a constant, shown without an interval
    assert row["storage_mb_constant"] and math.isnan(row["storage_mb_ci_low"])
    shown = display_table(report).iloc[0]
    assert shown["Stor. (MB)"] == "0.003072"
    assert shown["CLIP-I"].startswith(f"{row['clip_i']:.3f} [")


def test_fewer_than_five_subjects_give_n_not_a_ci_and_short_rows_are_marked(tmp_path):
    args = [
        "experiment=table1",
        "method=ti,gfti",
        "subject=dog6,cat,can",
        "model=tiny",
        f"paths.results={tmp_path}",
    ]
    for run, clip_i in zip(plan_sweep(args), [0.7, 0.8, 0.75, 0.6, 0.9, 0.5]):
        if run.value("method") == "gfti" and run.value("subject") == "can":
            write(run.run_dir, status="failed", error="RuntimeError: boom")
            continue
        write_record(run.run_dir, new_record(
            method=run.value("method"), subject=run.value("subject"), seed=0, run_key=run.run_dir.name,
            status="ok", clip_i=clip_i))  # fmt: skip
    report = build_report(args)
    table = report.table.set_index("method")
    assert math.isnan(table.loc["ti", "clip_i_ci_low"])  # 3 subjects: no interval
    assert table.loc["ti", "clip_i_n"] == 3 and table.loc["gfti", "clip_i_n"] == 2
    assert table["fewer_subjects"].to_dict() == {"ti": False, "gfti": True}
    shown = display_table(report).set_index("Method")
    assert shown.loc["TI", "CLIP-I"] == "0.750 (n=3)"
    assert shown.loc["GF-TI †", "CLIP-I"] == "0.750 (n=2)"
    md = write_report(report)[0].read_text()
    assert "†: averaged over fewer subjects" in md and "no confidence interval" in md


def test_a_corrupt_record_is_listed_with_its_path_not_fatal(tmp_path):
    args = ["experiment=tableS5", "model=tiny", f"paths.results={tmp_path}"]
    bad = plan_sweep(args)[1].run_dir / RECORD_NAME
    bad.parent.mkdir(parents=True)
    bad.write_text('{"status": "ok", "clip')
    runs = build_report(args).runs.set_index("path")
    assert runs.loc[str(bad.parent), "state"] == "corrupt"
    assert str(bad) in runs.loc[str(bad.parent), "error"]


# -- reports from real sweeps (tiny model, smoke evaluation) ------------------------------


@pytest.mark.integration
def test_table1_from_a_two_method_two_subject_sweep(tmp_path, dataset_root):
    args = ["experiment=table1", "method=ti,dreambooth", "subject=dog6,cat", *tiny(tmp_path, dataset_root)]
    sweep(*args)
    report = build_report(args)
    files = write_report(report)
    assert {p.name for p in files} == {"table.md", "table.tex", "table.csv", "gallery.html"}
    narrowed = "table1+method=ti,dreambooth+subject=dog6,cat+model=tiny+train.max_steps=2+data="
    assert report.out_dir.parent == tmp_path and report.out_dir.name.startswith(narrowed)
    assert all(p.parent == report.out_dir and p.stat().st_size > 0 for p in files)

    table = report.table.set_index("method")
    assert list(table.index) == ["ti", "dreambooth"]
    metrics = ["memory_gb", "storage_mb", "clip_t", "clip_i", "dino"]
    assert [c for c in table.columns if c in METRICS] == metrics
    reported = paper("table1").set_index("method")
    for method, group in pd.DataFrame(records(tmp_path)).groupby("method"):
        assert len(group) == 2 and (group["status"] == "ok").all()
        row = table.loc[method]
        for metric in ["clip_t", "clip_i", "dino"]:
            assert row[metric] == pytest.approx(group[metric].mean())
            assert row[f"{metric}_paper"] == reported.loc[method, metric]
            assert row[f"{metric}_diff"] == pytest.approx(group[metric].mean() - reported.loc[method, metric])
        assert row["storage_mb"] == pytest.approx(group["artifact_bytes"].mean() / 1e6)
        assert (row["runs"], row["ok"], row["not_ok"]) == (2, 2, "")
    written = pd.read_csv(report.out_dir / "table.csv").set_index("method")
    assert written.loc["ti", "clip_i"] == pytest.approx(table.loc["ti", "clip_i"])
    assert "DreamBooth" in (report.out_dir / "table.tex").read_text()


@pytest.mark.integration
def test_fig7_heatmap_cells_are_the_records(tmp_path, dataset_root):
    grid = ["experiment=fig7", "method.T_L=100,200", "method.T_U=800,900"]
    cheap = ["method.precision=fp32", "method.quantize=none"]  # ZOODiP's fastest setting on a CPU
    args = [*grid, *cheap, *tiny(tmp_path, dataset_root)]
    sweep(*args)
    report = build_report(args)
    files = write_report(report)
    assert {"heatmap.png", "heatmap.pdf"} <= {p.name for p in files}  # one figure, three panels
    found = records(tmp_path)
    assert len(found) == 4 and all(r["status"] == "ok" for r in found)
    for metric in ("clip_t", "clip_i", "dino"):
        grid = report.grids[metric]
        assert grid.shape == (2, 2) and list(grid.index) == [100, 200] and list(grid.columns) == [800, 900]
        for r in found:
            assert grid.loc[r["method.T_L"], r["method.T_U"]] == r[metric]


def test_memory_figures_and_the_fraction_plot(tmp_path):
    from benchmark.report.plots import breakdown_gb

    args = [
        "experiment=fig1",
        "method=ti,dreambooth",
        "subject=dog6",
        "model=tiny",
        f"paths.results={tmp_path}",
    ]
    for run, weights in zip(plan_sweep(args), [2e9, 8e9]):
        record = new_record(
            method=run.value("method"), subject="dog6", seed=0, run_key=run.run_dir.name, status="ok",
            clip_t=0.3, clip_i=0.8, peak_reserved_with_load_bytes=weights + 3e9,
            breakdown_weights_fp32_bytes=weights, breakdown_activations_bytes=3e9,
        )  # fmt: skip
        write_record(run.run_dir, record)
    report = build_report(args)
    names = {p.name for p in write_report(report)}
    assert {
        "memory_breakdown.png",
        "memory_vs_score.png",
        "memory_breakdown.pdf",
        "memory_vs_score.pdf",
    } <= names
    parts = breakdown_gb(report)
    assert parts.loc["TI"].to_dict() == {"weights_fp32": 2.0, "activations": 3.0}
    assert report.table.set_index("method").loc["dreambooth", "memory_gb"] == 11.0

    args = ["experiment=hollowed", "method.fraction=0.0,0.5", "subject=dog6", "seed=0", "model=tiny"]
    for run in plan_sweep([*args, f"paths.results={tmp_path}"]):
        write(run.run_dir, status="ok", clip_i=0.7 + run.value("method.fraction"))
    report = build_report([*args, f"paths.results={tmp_path}"])
    assert "versus_method_fraction.png" in {p.name for p in write_report(report)}
    assert report.table["clip_i"].tolist() == [0.7, 1.2]


def test_the_savers_report_pairs_each_method_with_its_leanest_run_and_prediction(tmp_path):
    csv = tmp_path / "predicted.csv"
    lean = "method.optimizer=adamw8bit train.gradient_checkpointing=true train.mixed_precision=fp16"
    pd.DataFrame(
        [
            {"method": "dreambooth", "variant": "", "model": "sd15_arch", "predicted_peak_gb": 18.0,
             "predicted_device_gb": 19.5, "predicted_train_pflop": 1.0},
            {"method": "dreambooth", "variant": lean, "model": "sd15_arch", "predicted_peak_gb": 11.6,
             "predicted_device_gb": 12.9, "predicted_train_pflop": 1.3},
            {"method": "zoodip", "variant": "", "model": "sd15_arch", "predicted_peak_gb": 2.0},
        ]
    ).to_csv(csv, index=False)  # fmt: skip
    args = ["experiment=savers", "model=tiny", f"paths.results={tmp_path}", f"report.predicted={csv}"]
    planned = plan_sweep(args)
    assert len(planned) == 16  # 8 backprop methods x paper, leanest
    runs = {(r.value("method.name"), r.value("train.mixed_precision")): r.run_dir for r in planned}
    assert runs.keys() == {(m, p) for m, _ in runs for p in ("no", "fp16")}
    write(runs["dreambooth", "no"], status="ok", breakdown_peak_bytes=18e9, clip_i=0.7)
    write(runs["dreambooth", "fp16"], status="ok", breakdown_peak_bytes=11e9, clip_i=0.69)
    report = build_report(args)
    table = report.table.set_index(["method", "train.mixed_precision"])
    assert table.loc[("dreambooth", "no"), "memory_gb"] == pytest.approx(18.0)
    assert table.loc[("dreambooth", "fp16"), "memory_gb"] == pytest.approx(11.0)
    md = write_report(report)[0].read_text()
    section = md.split("## Predicted memory and compute", 1)[1]
    assert "11.6" in section and "12.9" in section and "paper (defaults)" in section
    assert "ZOODiP" not in section  # only the report's methods
