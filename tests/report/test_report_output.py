"""What a researcher pastes: display names, LaTeX that compiles and fits, heatmaps
that tell failed from missing, the "Real images" row, Fig. 8, the gallery in a real browser,
narrowed report folders, flat axes and a quiet start.

Records are written by hand into the directories the sweep plans; pdflatex and Chromium come
from `.ci/setup.d/10-report-tools.sh`: without them these tests skip locally and fail in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.records import new_record, write_record
from benchmark.report import display, latex, paper
from benchmark.report.cli import write_report
from benchmark.report.gallery import write_gallery
from benchmark.report.heatmaps import MIN_SPAN_DIGITS, cell_states, color_range
from benchmark.report.tables import build_report, report_dir
from benchmark.run import IMAGE_SCORES_NAME, real_run_dir
from benchmark.sweep.plan import plan_sweep, primary_config
from methods.common.atomic import write_json_atomic
from methods.common.registry import method_classes, method_names
from methods.common.subspace import SubspaceGradient

REPO = Path(__file__).resolve().parents[2]


def need_tool(name: str) -> str:
    """The tool's path; skip without it, but fail under CI (which installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} missing in CI: .ci/setup.d/10-report-tools.sh should install it")
        pytest.skip(f"{name} not installed (bash .ci/setup.d/10-report-tools.sh)")
    return path


def record(run, **fields) -> None:
    values = {"method": run.value("method"), "subject": run.value("subject"), "seed": run.value("seed"),
              "run_key": run.run_dir.name, "model": "tiny", "eval": "smoke", **fields}  # fmt: skip
    for key in ("method.tau", "method.nu", "method.quantize", "method.bits"):
        values.setdefault(key, run.value(key))
    write_record(run.run_dir, new_record(**values))


def table1_records(results: Path, subjects: str = "dog6,cat") -> list[str]:
    args = ["experiment=table1", "method=dreambooth,peqa,zoodip", f"subject={subjects}", "model=tiny",
            f"paths.results={results}"]  # fmt: skip
    rng = np.random.default_rng(0)
    storage = {"dreambooth": 3.4e9, "peqa": 1.3e6, "zoodip": 3072}
    for run in plan_sweep(args):
        record(run, status="ok", clip_t=rng.uniform(0.2, 0.3), clip_i=rng.uniform(0.6, 0.9),
               dino=rng.uniform(0.4, 0.7), artifact_bytes=storage[run.value("method")],
               peak_reserved_with_load_bytes=rng.uniform(1e9, 2e10))  # fmt: skip
    return args


# -- display names ------------------------------------------------------------------------


def test_every_method_has_one_display_name_and_colour():
    classes = method_classes().values()
    names = [cls.display_name for cls in classes] + [display.REAL_DISPLAY[0]]
    colours = [cls.color for cls in classes] + [display.REAL_DISPLAY[1]]
    assert len(set(names)) == len(names) and len(set(colours)) == len(colours)
    assert display.UNKNOWN_COLOR not in colours  # every method declares its own
    assert display.method_name("gfti") == "GF-TI" and display.axis_label("method.tau") == r"$\tau$"
    assert display.method_name("real") == "Real images" and display.method_name("nope") == "nope"
    assert display.quantization({"method": "zoodip", "method.quantize": "int8"}) == "INT8"
    assert display.quantization({"method": "ti", "method.bits": float("nan")}) == ""
    assert display.quantization({"method": "qlora"}) == "NF4"
    assert display.quantization({"method": "peqa", "method.bits": 4.0}) == "INT4"
    assert [n for n in method_names() if display.gradient_free(n)] == ["gfti", "zoodip"]


# -- LaTeX --------------------------------------------------------------------------------


def test_table1_latex_has_the_papers_columns_display_names_and_no_ci_on_constants(tmp_path):
    args = table1_records(tmp_path)
    for subject in ("dog6", "cat"):
        cfg = primary_config([*args[:1], f"subject={subject}", "model=tiny", f"paths.results={tmp_path}"])
        write_record(real_run_dir(cfg), new_record(
            method="real", subject=subject, seed=None, status="ok", run_key="real", eval="smoke",
            clip_i=0.9, dino=0.8))  # fmt: skip
    report = build_report(args)
    tex = latex.table_tex(report, report.reference)
    assert r"\toprule" in tex and r"\begin{tabular*}{\textwidth}" in tex
    lines = tex.splitlines()
    head = next(line for line in lines if line.startswith("Method &"))
    assert head.split(" & ")[:5] == ["Method", "Quant.", "Grad-free", "Mem. (GB)", "Storage (MB)"]
    zoodip = next(line for line in lines if line.startswith("ZOODiP &")).split(" & ")
    assert zoodip[1:3] == ["INT8", r"$\checkmark$"]
    assert zoodip[4] == "0.003072"  # storage: the same for every subject, so no interval and no n
    assert "(n=2)" in zoodip[5]  # two subjects: n, not a CI
    assert "gfti" not in tex and "dreambooth" not in tex
    paper_line = lines[lines.index(next(line for line in lines if line.startswith("ZOODiP &"))) + 1]
    assert r"\quad paper" in paper_line and "0.772" in paper_line  # ZOODiP Table 1's CLIP-I
    real = next(line for line in lines if line.startswith("Real images"))
    assert "0.900" in real and "0.885" in lines[lines.index(real) + 1]  # DreamBooth paper's value


def test_table1_tex_compiles_and_fits_a_two_column_page(tmp_path):
    need_tool("pdflatex")
    report = build_report(table1_records(tmp_path))
    write_report(report)
    body = (report.out_dir / "table.tex").read_text()
    document = paper.HEAD + "\n" + body + "\n\\end{document}\n"
    (tmp_path / "doc.tex").write_text(document)
    pdf = paper.compile_pdf(tmp_path / "doc.tex")
    assert pdf.stat().st_size > 1000
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log, "the table is wider than the page"


# -- heatmaps -----------------------------------------------------------------------------


def test_heatmap_cells_tell_failed_from_missing_and_scales_are_not_stretched(tmp_path):
    args = [
        "experiment=table4",
        "method.tau=32,64",
        "method.nu=1e-1,1e-2",
        "model=tiny",
        f"paths.results={tmp_path}",
    ]
    runs = plan_sweep(args)
    record(runs[0], status="ok", clip_i=0.8064)
    record(runs[1], status="ok", clip_i=0.8072)
    record(runs[2], status="oom", error="OutOfMemoryError")
    report = build_report(args)
    states = cell_states(report)
    assert states.to_numpy().tolist() == [["ok", "ok"], ["failed", "missing"]]
    names = {p.name for p in write_report(report)}
    assert {"heatmap.pdf", "heatmap.png"} <= names
    assert (report.out_dir / "heatmap.pdf").read_bytes().startswith(b"%PDF")
    low, high = color_range([report.grids["clip_i"].to_numpy(dtype=float)], 3)
    assert high - low == pytest.approx(MIN_SPAN_DIGITS * 1e-3)  # 0.8064..0.8072 is not the full scale
    assert low < 0.8064 and high > 0.8072


def test_flat_axis_is_flagged_with_the_reason_and_narrowed_reports_get_their_own_folder(tmp_path):
    args = [
        "experiment=table4",
        "method.tau=32,64",
        "method.nu=1e-1",
        "model=tiny",
        f"paths.results={tmp_path}",
    ]
    for run in plan_sweep(args):
        record(run, status="ok", clip_i=0.5 + 1e-4 * (run.value("method.tau") == 64), train_steps=4)
    report = build_report(args)
    md = write_report(report)[0].read_text()
    assert "reads 0.500 (spread 0.0001): the swept axis had no visible effect" in md  # equal as printed
    assert "never did" in md  # the reason: tau >= the 4 training steps, so SG never switched on
    full = report_dir(tmp_path, "table4", ["experiment=table4", f"paths.results={tmp_path}"])
    assert full == tmp_path / "table4"
    not_in_run_key = ["train.profile_steps=0", "+train.step_delay_s=0", "device=cpu"]
    assert report_dir(tmp_path, "table4", ["experiment=table4", *not_in_run_key]) == full
    many = [f"+recovery.setting_{i}={i}" for i in range(40)]  # 700 characters of overrides
    long_name = report_dir(tmp_path, "table4", many)
    assert len(long_name.name) < 255 and long_name != report_dir(tmp_path, "table4", many[:-1])
    long_name.mkdir()
    assert report.out_dir != full and report.out_dir.name.startswith("table4+method.tau=32,64")


# -- upper bound, Fig. 8 ------------------------------------------------------------------


def test_real_image_runs_are_keyed_without_the_seed():
    def cfg(*more):
        return primary_config(["subject=dog6", "model=tiny", "mode=real", "paths.results=/r", *more])

    assert real_run_dir(cfg("seed=0")) == real_run_dir(cfg("seed=1"))
    assert real_run_dir(cfg()) != real_run_dir(cfg("subject=cat"))
    assert real_run_dir(cfg()).name.startswith("real-")


def test_subspace_gradient_records_the_kept_share_at_each_recomputation():
    sg = SubspaceGradient(dim=4, tau=4, nu=1e-3)
    direction = torch.tensor([1.0, 1.0, 0.0, 0.0])
    for step in range(8):  # the history varies along one direction only: one component kept
        sg.record(direction * step)
    assert sg.kept_ratios() == [0.25, 0.25]
    restored = SubspaceGradient(dim=4, tau=4, nu=1e-3)
    restored.load_state_dict(sg.state_dict())
    assert restored.kept_ratios() == [0.25, 0.25]


def test_fig8_histogram_from_the_records(tmp_path):
    args = ["experiment=fig8", "model=tiny", f"paths.results={tmp_path}"]
    for run in plan_sweep(args):
        record(run, status="ok", clip_i=0.7, sg_kept_ratios=[0.1, 0.15, 0.2])
    report = build_report(args)
    names = {p.name for p in write_report(report)}
    assert {"istar_histogram.pdf", "istar_histogram.png"} <= names


# -- gallery ------------------------------------------------------------------------------


def gallery_report(tmp_path: Path, dataset_root: Path):
    args = ["experiment=table1", "method=ti,zoodip", "subject=dog6,cat", "model=tiny",
            f"data.root={dataset_root}", f"paths.results={tmp_path}"]  # fmt: skip
    for k, run in enumerate(plan_sweep(args)):
        images = run.run_dir / "images"
        images.mkdir(parents=True)
        (run.run_dir / "config.yaml").write_text(f"data:\n  root: {dataset_root}\n  cache_dir: {tmp_path}\n")
        for p in range(2):
            colour = (40 * k, 200 - 60 * p, 90)
            Image.new("RGB", (64, 64), colour).save(images / f"p{p:02d}_000.png")
        write_json_atomic(images / IMAGE_SCORES_NAME, {
            "prompts": {"p00": "a sks in the jungle", "p01": "a sks in the snow"},
            "images": {f"p0{p}_000.png": {"clip_t": 0.25, "clip_i": 0.7 + p / 10, "dino": 0.5}
                       for p in range(2)},
        })  # fmt: skip
        record(run, status="ok", clip_t=0.25, clip_i=0.75, dino=0.5)
    return build_report(args)


def test_gallery_links_every_image_relatively(tmp_path, dataset_root):
    report = gallery_report(tmp_path, dataset_root)
    page = write_gallery(report)
    text = page.read_text()
    assert "file://" not in text and str(tmp_path) not in text  # relative links only
    assert text.count('<option value="') == 2 and "ZOODiP" in text and "a sks in the snow" in text
    assert "CLIP-I 0.800" in text  # the second prompt's image's own score


@pytest.mark.integration
def test_gallery_loads_in_headless_chromium_with_no_broken_image(tmp_path, dataset_root):
    chromium = need_tool("chromium")
    page = write_gallery(gallery_report(tmp_path, dataset_root))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             "--window-size=1200,900"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert 'data-broken-images="0"' in dom.stdout, dom.stderr[-2000:]
    n_images = int(dom.stdout.split('data-images="')[1].split('"')[0])
    assert n_images >= 2 * (4 + 4)  # per subject: its real images and 2 methods x 2 prompts
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.02  # not a blank page


# -- quiet start --------------------------------------------------------------------------


@pytest.mark.integration
def test_imports_and_the_profiler_print_no_third_party_chatter_but_our_warnings_show():
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"  # as Hydra's job logging: INFO shown
        "import benchmark, methods.zoodip, methods.qlora, benchmark.models, benchmark.metrics\n"
        "import torch, open_clip\n"
        "open_clip.get_tokenizer('ViT-B-32')\n"
        "import bitsandbytes; bitsandbytes.nn.Linear4bit\n"  # QLoRA's first use runs the deferred module
        "before = [torch.randn(256, 256) for _ in range(4)]\n"  # freed while profiled, as in a run
        "from torch.profiler import ProfilerActivity, profile\n"
        "with profile(activities=[ProfilerActivity.CPU], profile_memory=True):\n"
        "    torch.ones(4).sum(); before.clear()\n"
        "logging.getLogger('benchmark.run').warning('our warning')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in (
        "Enum subclass",
        "Unable to import `torchao`",
        "gpuGetDeviceCount",
        "USDT",
        "SimpleTokenizer",
        "Memory block of unknown size",
        "kernels-community",
        "publisher trust check",
    ):
        assert noise not in output
    assert "our warning" in output


# -- image sets, datasets, what the terminal and the folder say ---------------------------------


def _two_method_args(results: Path, *more: str) -> list[str]:
    return ["experiment=table1", "method=ti,zoodip", "subject=dog6", "model=tiny",
            f"paths.results={results}", *more]  # fmt: skip


def test_the_report_finds_the_runs_without_the_sweeps_data_root_and_names_their_images(
    tmp_path, dataset_root
):
    with_root = _two_method_args(tmp_path, f"data.root={dataset_root}")
    for run in plan_sweep(with_root):
        assert not run.run_dir.name.endswith("noimages")
        record(run, status="ok", clip_i=0.7, data_images=run.run_dir.name.rsplit("-", 1)[1],
               data_root=str(dataset_root / "dog6"))  # fmt: skip
    elsewhere = _two_method_args(tmp_path, f"data.cache_dir={tmp_path / 'no_dataset_here'}")
    report = build_report(elsewhere)
    assert list(report.runs["state"]) == ["ok", "ok"]
    md = write_report(report)[0].read_text()
    fingerprint = plan_sweep(with_root)[0].run_dir.name.rsplit("-", 1)[1]
    assert f"dog6 {fingerprint} ({dataset_root / 'dog6'}, 2 runs)" in md
    assert "different image sets" not in md


def test_reports_of_different_dataset_folders_never_share_a_folder(tmp_path):
    base = ["experiment=table1", f"paths.results={tmp_path}"]
    one = report_dir(tmp_path, "table1", [*base, f"data.root={tmp_path / 'a'}"])
    other = report_dir(tmp_path, "table1", [*base, f"data.root={tmp_path / 'b'}"])
    spelled = report_dir(tmp_path, "table1", [*base, f"data.root={tmp_path / 'x' / '..' / 'a'}"])
    assert one != other and one == spelled and one != report_dir(tmp_path, "table1", base)


def test_the_report_says_what_failed_and_why_a_run_is_missing_and_drops_stale_files(tmp_path, capsys):
    from benchmark.report.cli import main

    args = _two_method_args(tmp_path, "seed=0,1")
    planned = plan_sweep(args)
    ok, failed, torn, missing = planned
    record(ok, status="ok", clip_i=0.7)
    record(failed, status="failed", error="RuntimeError: boom")
    record(torn, status="ok", clip_i=0.7)
    (torn.run_dir / "record.json").write_text('{"method": "zo')  # half-written
    nearby = missing.run_dir.parent / "seed1-0000000000-abcdef12"  # the same run, more steps
    nearby.mkdir(parents=True)
    config = dict(missing.config)
    config["method.steps"] = config["method.steps"] * 10
    _write_flat_config(nearby / "config.yaml", config)
    out_dir = report_dir(tmp_path, "table1", args)
    out_dir.mkdir(parents=True)
    (out_dir / "gallery.html").write_text("a gallery of runs that have since failed")
    (out_dir / "gallery_thumbs").mkdir()
    assert main(args) == 0
    shown = capsys.readouterr().out.splitlines()
    summary = shown.index("runs: 4 planned: 1 corrupt, 1 failed, 1 missing, 1 ok")
    rest = "\n".join(shown[summary:])
    assert f"failed: {failed.run_dir}: RuntimeError: boom" in rest
    assert f"corrupt: {torn.run_dir}" in rest and f"missing: {missing.run_dir}" in rest
    assert f"{nearby.name}, differs in method.steps=" in rest
    assert not (out_dir / "gallery.html").exists() and not (out_dir / "gallery_thumbs").exists()
    assert (out_dir / "table.md").exists()


def _write_flat_config(path: Path, flat_values: dict) -> None:
    from omegaconf import OmegaConf

    nested: dict = {}
    for key, value in flat_values.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(nested)))
