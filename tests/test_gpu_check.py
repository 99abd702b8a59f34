"""`nox -s gpu_check` (benchmark/devtools/gpu_check.py): its dry run on the CPU exercises every
check's plumbing; without a GPU the real run is refused in one line."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from benchmark.devtools import gpu_check

pytestmark = pytest.mark.integration


def test_the_dry_run_runs_every_check_and_writes_one_row_each(tmp_path):
    rows = gpu_check.run_checks(tmp_path, dry_run=True, only=[], methods=("ti",))
    assert {r["check"] for r in rows} == set(gpu_check.CHECKS)
    by_case = {(r["check"], r["case"]): r for r in rows}
    assert {case for check, case in by_case if check == "method_run"} == {"ti"}
    assert {case for check, case in by_case if check == "memory_gpu"} == {"ti"}
    failed = [r for r in rows if r["status"] != "pass"]
    assert not failed, failed
    assert "resumed from step" in by_case[("gfti_resume", "kill after first checkpoint")]["detail"]
    written = list(csv.DictReader((tmp_path / "gpu_check.csv").open()))
    assert [(r["check"], r["case"]) for r in written] == [(r["check"], r["case"]) for r in rows]
    assert all(r["device"] == "cpu" for r in written)


def test_a_check_that_raises_is_a_failed_row_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("injected")
        yield  # a generator, as the real checks

    monkeypatch.setitem(gpu_check.CHECKS, "method_run", broken)
    rows = gpu_check.run_checks(tmp_path, dry_run=True, only=["method_run", "vae_fp16"], methods=("ti",))
    assert [(r["check"], r["status"]) for r in rows] == [("method_run", "fail"), ("vae_fp16", "pass")]
    assert "injected" in rows[0]["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_run_is_refused_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.devtools.gpu_check", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CUDA" in done.stderr and "--dry-run" in done.stderr
