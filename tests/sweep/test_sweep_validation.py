"""A sweep checks every job before the first trains; every bad input exits 2 with one
line per bad value and writes nothing; a corrupt record is listed, not fatal; the first minute
(--help, validation) does not wait for the heavy libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark import data
from benchmark.records import RECORD_NAME
from benchmark.report import cli as report
from benchmark.sweep import status as sweep
from benchmark.sweep.plan import InvalidSweep, plan_sweep
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
HEAVY = ("diffusers", "transformers", "bitsandbytes", "torchao", "peft", "open_clip", "timm", "cma")


def cli(*args: str, module: str = "benchmark") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )


def refused(capsys, *args: str) -> str:
    """`python -m benchmark <args>` refusing bad input, in-process: benchmark/__main__.py checks
    the input (benchmark.sweep.preflight) before Hydra starts, and exits 2 with stderr's lines. The
    entry point itself runs as a process in test_what_hydra_refuses_is_one_line_and_exit_2."""
    from benchmark.sweep.preflight import exit_on_bad_input

    with pytest.raises(SystemExit) as exited:
        exit_on_bad_input(list(args))
    assert exited.value.code == 2
    return capsys.readouterr().err


def tiny(results: Path, dataset_root: Path) -> list[str]:
    return ["model=tiny", f"data.root={dataset_root}", f"paths.results={results}", "train.max_steps=1"]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), stderr[-3000:]
    return lines


# -- 1. every job of a sweep is checked before the first one starts -----------------------------


def test_a_bad_value_on_the_last_axis_stops_the_sweep_before_anything_trains(tmp_path, dataset_root, capsys):
    results = tmp_path / "results"
    stderr = refused(
        capsys, "-m", "method=zoodip", "method.tau=64,0", "subject=dog6,dgo7", *tiny(results, dataset_root)
    )
    lines = error_lines(stderr)
    assert len(lines) == 2  # each bad value once, with a job that has it
    (subject_line,) = [line for line in lines if "subject='dgo7'" in line]
    assert "job (method.tau=64 subject=dgo7)" in subject_line and "choose one of: backpack" in subject_line
    (tau_line,) = [line for line in lines if "method.tau=0" in line]
    assert "job (method.tau=0 subject=dog6)" in tau_line and ">= 2" in tau_line
    assert not results.exists()  # nothing trained, nothing written, no hydra/<time>/ folder


def test_every_bad_section_of_a_job_is_named(tmp_path):
    args = ["method=ti", "method.lr=inf", "eval.num_prompts=0", "train.max_steps=0", "model=tiny",
            f"paths.results={tmp_path}"]  # fmt: skip
    with pytest.raises(InvalidSweep) as bad:
        plan_sweep(args)
    text = "\n".join(bad.value.lines())
    for value in ("method.lr=inf", "eval.num_prompts=0", "train.max_steps=0"):
        assert value in text


def planning_errors(args: list[str]) -> list[str]:
    with pytest.raises(InvalidSweep) as bad:
        plan_sweep(args)
    return bad.value.lines()


def test_every_bad_value_of_one_section_is_listed(tmp_path):
    lines = planning_errors(
        ["method=zoodip", "method.tau=0", "method.nu=2", "model=tiny", f"paths.results={tmp_path}"]
    )
    assert len(lines) == 2
    assert "method.tau=0" in lines[0] and ">= 2" in lines[0]
    assert "method.nu=2.0" in lines[1] and "(0, 1)" in lines[1]


def test_every_wrong_type_unknown_key_and_range_of_a_job_is_listed(tmp_path):
    args = ["method=zoodip", "method.tau=abc", "method.n=x", "+method.no_such_knob=1", "method.lr=inf",
            "seed=-1", "subject=dgo7", "eval.num_prompts=0", "eval.guidance_scale=inf", "model=tiny",
            f"paths.results={tmp_path}"]  # fmt: skip
    lines = planning_errors(args)
    expected = ["method.tau: Value 'abc'", "method.n: Value 'x'", "method.no_such_knob: unknown key",
                "method.lr=inf", "seed=-1", "subject='dgo7'", "eval.num_prompts=0",
                "eval.guidance_scale=inf"]  # fmt: skip
    assert len(lines) == len(expected), lines  # one line each, no echo of a bad value's consequences
    for line, value in zip(sorted(lines), sorted(expected)):
        assert line.startswith(f"error: {value}"), (line, value)


def test_a_rule_across_sections_is_checked_beside_a_bad_top_level_value(tmp_path):
    args = ["method=zoodip", "method.T_L=900", "method.T_U=100", "subject=dgo7", "model=tiny"]
    lines = planning_errors([*args, f"paths.results={tmp_path}"])
    assert len(lines) == 2 and any("T_L=900" in line for line in lines)


def test_each_bad_value_of_a_sweep_is_listed_once_with_a_job_that_has_it(tmp_path):
    lines = planning_errors(["method=zoodip", "method.tau=0,64", "method.nu=2,0.5", "model=tiny",
                             f"paths.results={tmp_path}"])  # fmt: skip
    assert lines == [
        "error: job (method.tau=0 method.nu=2): method.tau=0 must be >= 2 (history length for the PCA)"
        " [and 1 more of the 4 jobs]",
        "error: job (method.tau=0 method.nu=2): method.nu=2.0 must be in (0, 1) [and 1 more of the 4 jobs]",
    ]


def test_status_and_report_refuse_a_bad_sweep_with_exit_2(tmp_path, capsys):
    args = ["experiment=table1", "subject=dgo7", "model=tiny", f"paths.results={tmp_path}"]
    assert sweep.main(args) == 2
    assert report.main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 2 and all("subject='dgo7'" in line for line in lines)
    assert not tmp_path.joinpath("runs").exists() and not tmp_path.joinpath("table1").exists()


# -- 2. what Hydra refuses exits 2 too, with one line, writing nothing ---------------------------


@pytest.mark.parametrize(
    "args, expect",
    [
        (
            ["method=no_such_method"],
            "Could not find 'method/no_such_method'; choose one of: boft, custom_diffusion, dreambooth",
        ),
        (["no_such_key=1"], "+no_such_key=1"),
        (["method.lr=[1,"], "method.lr=[1,"),
        (["subject=dog6,cat"], "add -m"),
    ],
    ids=["unknown config name", "key without +", "lexer error", "a list without -m"],
)
@pytest.mark.integration
def test_what_hydra_refuses_is_one_line_and_exit_2(args, expect, tmp_path):
    results = tmp_path / "results"
    done = cli(*args, "model=tiny", f"paths.results={results}")
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert expect in line
    assert not results.exists()


def test_an_unwritable_results_folder_is_bad_input(tmp_path, dataset_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    (line,) = error_lines(refused(capsys, "method=ti", *tiny(blocker / "results", dataset_root)))
    assert f"paths.results='{blocker / 'results'}'" in line and "not a folder" in line


@pytest.mark.integration
def test_memory_and_report_name_a_bad_experiment_in_one_line(capsys):
    done = cli("experiment=no_such_table", module="benchmark.memory")
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "experiment/no_such_table" in line and "table1" in line
    assert report.main(["experiment=no_such_table"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "experiment/no_such_table" in line


# -- 4. a corrupt record is listed with its path, and the rest goes on ---------------------------


def _corrupt_one(tmp_path) -> tuple[list[str], Path]:
    args = ["experiment=tableS5", "model=tiny", f"paths.results={tmp_path}"]
    bad = plan_sweep(args)[1].run_dir / RECORD_NAME
    bad.parent.mkdir(parents=True)
    bad.write_text('{"status": "ok", "clip')  # a torn write from another tool
    return args, bad


def test_sweep_status_lists_a_corrupt_record_and_what_to_do(tmp_path, capsys):
    args, bad = _corrupt_one(tmp_path)
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "1 corrupt records" in out.splitlines()[0]  # the progress line still shows
    assert f"corrupt     {bad.parent}" in out and f"corrupt record {bad}" in out and "delete it" in out


def test_the_report_lists_a_corrupt_record_among_the_runs(tmp_path):
    args, bad = _corrupt_one(tmp_path)
    built = report.build_report(args)
    (row,) = built.runs[built.runs["state"] == "corrupt"].to_dict("records")
    assert row["path"] == str(bad.parent) and "delete it" in row["error"]
    table_md = report.write_report(built)[0].read_text()
    assert str(bad.parent) in table_md and "1 corrupt" in table_md


def test_a_sweep_stops_on_a_corrupt_record_before_it_trains(tmp_path, dataset_root, capsys):
    args = ["method=ti", "subject=dog6,cat", *tiny(tmp_path, dataset_root)]
    bad = plan_sweep(args)[1].run_dir / RECORD_NAME
    bad.parent.mkdir(parents=True)
    bad.write_text("[]")
    (line,) = error_lines(refused(capsys, "-m", *args))
    assert str(bad) in line and "delete it" in line
    assert list(tmp_path.glob("runs/ti/dog6/*")) == []  # the good job did not start either


# -- 6. the first minute --------------------------------------------------------------------------


def imported_after(code: str) -> list[str]:
    """The heavy libraries imported by ``code`` run in a fresh interpreter (SystemExit caught)."""
    script = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True)
    modules = set(done.stdout.splitlines()[-1].split())  # the last line: --help prints above it
    assert done.returncode == 0 and "benchmark" in modules, done.stderr[-3000:]
    return [m for m in ("torch", *HEAVY) if m in modules]


@pytest.mark.integration
def test_help_imports_no_heavy_library_and_lists_the_subjects():
    code = "import runpy; sys.argv = ['x', '--help']; runpy.run_module('benchmark', run_name='__main__')"
    assert imported_after(code) == []
    shown = cli("--help").stdout
    assert all(name in shown for name in data.SUBJECTS)


@pytest.mark.integration
def test_validating_every_method_imports_torch_at_most():
    code = (
        "from benchmark.sweep.preflight import problems; from methods.common.registry import method_names; "
        "every = 'method=' + ','.join(method_names()); "
        "assert len(problems(['-m', every, 'method.lr=inf', 'model=tiny'])) == 1"
    )
    assert set(imported_after(code)) <= {"torch"}


def test_the_main_job_reports_missing_weights_before_fetching_the_dataset(tmp_path, monkeypatch):
    from benchmark.schema import problems
    from tests.conftest import compose

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("downloaded the dataset first"))
    cfg = compose(["method=ti", "subject=dog6", f"data.cache_dir={tmp_path / 'cache'}", "device=cpu"])
    found = problems(cfg)
    assert found and "Stable Diffusion weights" in found[0] and "model.path=" in found[0]
    # every missing set of weights, one line each, before anything loads
    assert [line.split()[0] for line in found[:3]] == ["cannot", "CLIP", "DINO"], found
    assert "eval.clip.checkpoint=" in found[1] and "eval.dino." in found[2]


def test_hydra_output_folders_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/hydra/2026-01-01_00-00-00/x"], cwd=REPO)
    assert ignored.returncode == 0


def test_readme_lists_the_subjects_and_the_versions_ci_installs():
    readme = (REPO / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in data.SUBJECTS)
    assert "source .venv/bin/activate" in readme
    install = (REPO / ".ci" / "install").read_text()
    for package, version in re.findall(r'"(torch|torchvision)==([0-9.]+)"', install):
        assert f"{package} {version}" in readme, package


def test_the_placeholder_token_check_reads_the_shared_tokenizer_and_leaves_it_unchanged(
    tmp_path, dataset_root
):
    from benchmark.models.tokenizer import clip_tokenizer, shared_clip_tokenizer
    from benchmark.schema import problems
    from tests.conftest import compose

    shared = shared_clip_tokenizer()
    size = len(shared)
    overrides = [
        "method=ti",
        "model=tiny",
        "subject=dog6",
        f"data.root={dataset_root}",
        f"paths.results={tmp_path}",
    ]
    (taken,) = problems(compose([*overrides, "method.placeholder_token=dog"]), check_device=False)
    assert "'dog' is already in the tokenizer's vocabulary" in taken
    assert problems(compose([*overrides, "method.placeholder_token='<sks-dog>'"]), check_device=False) == []
    copy = clip_tokenizer()  # what a method gets: a copy it may add its token to
    copy.add_tokens(["<sks-dog>"])
    assert shared_clip_tokenizer() is shared and len(shared) == size and "<sks-dog>" not in shared.get_vocab()


@pytest.mark.integration
@pytest.mark.parametrize(
    "module, first_line",
    [
        ("benchmark.sweep", "python -m benchmark.sweep [experiment=<name>]"),
        ("benchmark.report", "python -m benchmark.report experiment=<name>"),
        ("benchmark.memory", "python -m benchmark.memory [key=value ...]"),
    ],
)
def test_every_command_has_help_of_its_own(module, first_line):
    shown = cli("--help", module=module)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.lstrip().startswith(first_line) and "Exit status" in shown.stdout
    assert "python -m benchmark [key=value ...]        one run" not in shown.stdout  # not the run's help


def test_a_key_that_only_some_jobs_have_is_refused_naming_the_jobs_without_it():
    from benchmark.sweep.preflight import problems

    found = problems(["-m", "method=ti,zoodip", "method.tau=64", "model=tiny"])
    assert len(found) == 1 and found[0].startswith("error: job (method=ti): ") and "method.tau" in found[0]
