"""Sweeps: `python -m benchmark -m ...` skips finished runs, re-runs only what is missing, writes a
failure record and goes on; benchmark.sweep.plan plans the same run directories Hydra's jobs use; the
SLURM launcher config composes without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.records import RECORD_NAME, read_record
from benchmark.sweep.plan import job_overrides, plan_sweep, primary_config
from benchmark.sweep.status import count_states

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# Runs `python -m benchmark` with TI's step raising for method.lr=0.001: an injected failure.
INJECT_FAILURE = """
import runpy, sys
import methods.ti as ti
real_step = ti.TextualInversion.step
def step(self, batch, step):
    if self.cfg.lr == 0.001:
        raise RuntimeError("injected failure")
    return real_step(self, batch, step)
ti.TextualInversion.step = step
sys.argv = ["benchmark", *sys.argv[1:]]
runpy.run_module("benchmark", run_name="__main__", alter_sys=True)
"""


def tiny(results: Path, dataset_root: Path) -> list[str]:
    return [
        "model=tiny", f"data.root={dataset_root}", f"paths.results={results}",
        "train.progress=false", "train.max_steps=2",
        "train.profile_steps=0",  # the memory profiler: seconds a run, and nothing here reads it
    ]  # fmt: skip


def sweep(*overrides: str, inject_failure: bool = False) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", INJECT_FAILURE] if inject_failure else [sys.executable, "-m", "benchmark"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([*head, "-m", *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(results: Path) -> dict[Path, dict]:
    return {p.parent: read_record(p) for p in results.glob(f"runs/**/{RECORD_NAME}")}


def test_sweep_jobs_are_the_product_and_the_command_line_wins():
    jobs = job_overrides({"method": "ti,zoodip", "subject": "dog6"}, ["method=ti", "seed=0,1"])
    assert jobs == [["method=ti", "subject=dog6", "seed=0"], ["method=ti", "subject=dog6", "seed=1"]]


def test_rerun_runs_nothing_and_a_deleted_record_reruns_alone(tmp_path, dataset_root):
    args = ["method=ti", "subject=dog6,cat", *tiny(tmp_path, dataset_root)]
    first = sweep(*args)
    found = records(tmp_path)
    planned = plan_sweep(args)
    assert {r.run_dir for r in planned} == set(found)  # the plan names the directories Hydra's jobs used
    assert all(r["status"] == "ok" for r in found.values())
    assert "sweep finished: 2/2 done" in first.stdout + first.stderr
    stamps = {d: (d / RECORD_NAME).stat().st_mtime_ns for d in found}

    again = sweep(*args)
    output = again.stdout + again.stderr
    assert "sweep of 2 runs: 2/2 done" in output
    assert "ok: " not in output  # nothing ran
    assert {d: (d / RECORD_NAME).stat().st_mtime_ns for d in found} == stamps

    cat_dir = next(d for d, r in found.items() if r["subject"] == "cat")
    (cat_dir / RECORD_NAME).unlink()
    assert count_states(planned)["done"] == 1
    third = sweep(*args)
    assert (third.stdout + third.stderr).count("ok: ") == 1
    after = records(tmp_path)
    assert after[cat_dir]["status"] == "ok"
    assert {d: (d / RECORD_NAME).stat().st_mtime_ns for d in found if d != cat_dir} == {
        d: t for d, t in stamps.items() if d != cat_dir
    }


def test_a_failing_run_leaves_a_failure_record_and_the_sweep_completes(tmp_path, dataset_root):
    args = ["method=ti", "subject=dog6", "method.lr=0.005,0.001", *tiny(tmp_path, dataset_root)]
    done = sweep(*args, inject_failure=True)
    by_lr = {r["method.lr"]: r for r in records(tmp_path).values()}
    assert by_lr[0.005]["status"] == "ok"
    assert by_lr[0.001]["status"] == "failed"
    assert by_lr[0.001]["error"] == "RuntimeError: injected failure"
    assert "sweep finished: 1/2 done, 0 running, 1 failed, 0 pending" in done.stdout + done.stderr

    from benchmark.report.tables import build_report  # the report shows the failure, it does not drop it

    report = build_report(["experiment=table1", *args])
    (row,) = report.table.to_dict("records")
    assert (row["method"], row["runs"], row["ok"], row["not_ok"]) == ("ti", 2, 1, "1 failed")
    assert row["clip_i"] == by_lr[0.005]["clip_i"]


def test_slurm_launcher_config_composes_without_a_cluster():
    job = subprocess.run(
        [sys.executable, "-m", "benchmark", "--cfg", "job", "hydra/launcher=slurm", "experiment=table3"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    assert yaml.safe_load(job.stdout)["method"]["name"] == "zoodip"

    launcher = primary_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.benchmark_slurm.launcher.SlurmLauncher"
    from hydra.core.plugins import Plugins  # Hydra instantiates only the launchers it discovers
    from hydra.plugins.launcher import Launcher

    found = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)]
    assert launcher._target_ in found
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert launcher.max_num_timeout > 0  # a timed-out job is requeued and resumes from its checkpoint


def test_a_refused_job_of_a_sweep_leaves_a_failed_record_but_never_replaces_an_ok_one(tiny_cfg, tmp_path):
    """`python -m benchmark -m ...` calls record_refusal for a job whose input is refused (where
    it runs: on SLURM, the compute node), so that the sweep's status and report count it."""
    from benchmark.records import CorruptRecord, new_record, write_record
    from benchmark.run import record_refusal, run_dir_for
    from benchmark.schema import validate
    from methods.common.base import ConfigError

    missing = tmp_path / "no-such-weights"
    cfg = tiny_cfg("model=sd15", f"model.path={missing}", "eval=smoke")
    try:
        validate(cfg)
    except ConfigError as e:
        error = e
    run_dir = run_dir_for(cfg)
    path = record_refusal(cfg, error)
    assert path == run_dir / RECORD_NAME
    record = read_record(path)
    assert (record["status"], record["method"], record["model"]) == ("failed", "ti", "sd15")
    assert record["error"] == f"ConfigError: {str(error).splitlines()[0]}"
    assert f"model.path='{missing}'" in record["error"]

    write_record(run_dir, new_record(method="ti", subject="dog6", seed=0, status="ok"))
    assert record_refusal(cfg, error) is None  # an ok record stays
    assert read_record(path)["status"] == "ok"
    path.write_text("{")  # a corrupt record is the user's to look at: refused, never overwritten
    with pytest.raises(CorruptRecord):
        record_refusal(cfg, error)
    assert path.read_text() == "{"
    assert record_refusal(cfg, CorruptRecord(path, "not JSON")) is None


@pytest.mark.parametrize(
    "job, on_resolved_copy",
    [
        (["method=zoodip", "subject=cat", "seed=3", "method.tau=32", "method.lr=1e-3", "data.root=/d"], True),
        (["method=ti", "model=tiny", "model.resolution=64", "train.max_steps=null"], False),
        (["method=selective", "method.high_resolution=256", "+method.data.no_such=1"], False),
        (
            ["method=gfti", "data.cache_dir=/c", "method.placeholder_token='<a b>'", "~method.initializer"],
            False,
        ),
        (["method=dreambooth", "experiment=table1", "subject=${seed}", "eval.guidance_scale=true"], False),
    ],
    ids=[
        "plain values",
        "read by interpolations",
        "relative interpolation, added key",
        "deleted key",
        "experiment file, interpolated value",
    ],  # fmt: skip
)
def test_a_planned_job_is_the_config_hydra_composes_for_it(job, on_resolved_copy):
    """The composer sets values nothing interpolates on a resolved copy and sends every other
    override through Hydra: either way, what a job's run resolves to."""
    from hydra import compose
    from omegaconf import OmegaConf

    from benchmark.sweep.jobs import JobComposer, hydra_context, is_group_override
    from benchmark.sweep.plan import parse_overrides

    with hydra_context():
        expected = OmegaConf.to_container(compose("config", overrides=job), resolve=True)
        composer, overrides = JobComposer(), parse_overrides(job)
        assert composer.values(job, overrides) == expected
        (files,) = composer.composed.values()
        assert all(files.settable(o) for o in overrides if not is_group_override(o)) == on_resolved_copy
