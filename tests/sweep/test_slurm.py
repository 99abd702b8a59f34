"""SLURM for real: tiny sweeps through `hydra/launcher=slurm` on a running cluster.

The cluster is the one-node cluster of `.ci/slurm/up.sh` (run by `.ci/setup.d/20-slurm.sh`
before the tests in CI): no accounting (sacct refuses), no GPUs (the sweeps set
`hydra.launcher.gpus_per_node=null`). Without a cluster the tests skip, except in CI (CI=true),
where they fail. Two xdist groups, which may run at once on the two workers: the sweeps that end by
themselves, and the sweep that is stopped twice (with its rerun and the local reference). The node
takes both groups' jobs at once (.ci/slurm/slurm.conf.in: two jobs per core; the stopped jobs
mostly sleep).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from benchmark.records import RECORD_NAME, read_record
from benchmark.train import CHECKPOINT_NAME, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SWEEPS = pytest.mark.xdist_group("slurm-sweeps")
STOPS = pytest.mark.xdist_group("slurm-stops")


# What a CPU-only one-node cluster can give each job; everything else is the README's command.
LAUNCHER = (
    "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=30",
)  # fmt: skip
# Two runs (seeds 0 and 1) that are stopped mid-training: a checkpoint after every step, and a
# second of sleep after every step (train.step_delay_s, not in the run key), so that on any machine
# training outlasts SLURM's 30-s time-limit tick after the first checkpoint (40 steps: at least 40 s,
# the tick plus 10 s for noticing the checkpoint and updating the limit). Each resumed run must end
# with the numbers of an uninterrupted local run of the same config (no sleep).
LONG_STEPS = 40
LONG_RUNS = (
    "method=ti", "subject=dog6", "seed=0,1", f"train.max_steps={LONG_STEPS}", f"method.steps={LONG_STEPS}",
    "train.checkpoint_every=1",
)  # fmt: skip

pytestmark = pytest.mark.integration
CANCEL_AT_STEP = 25  # the seed-1 run is cancelled once it has done this many steps; the rerun does the rest
NUMBERS = ("clip_t", "clip_i", "dino", "dino_inter", "final_loss", "train_steps", "n_images")
# One thread per process: a job and the local reference run compute alike (the same numbers), and
# a job uses no more than the one CPU it asks for. sbatch passes the environment on to the jobs.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def cluster_problem() -> str | None:
    """None when a SLURM controller answers and a node takes jobs; else what is wrong."""
    if not shutil.which("sbatch"):
        return "no SLURM client (sbatch) on PATH"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    states = info.stdout.split()
    if info.returncode or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no SLURM node takes jobs (sinfo: {(info.stdout + info.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = cluster_problem()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {problem}: .ci/setup.d/20-slurm.sh should have started the cluster")
    if problem:
        pytest.skip(f"{problem} (bash .ci/slurm/up.sh starts a one-node cluster)")


def tiny(results: Path, dataset_root: Path) -> list[str]:
    return [
        "model=tiny", f"data.root={dataset_root}", f"paths.results={results}", "train.progress=false",
        "train.profile_steps=0",  # the memory profiler: seconds a job, and nothing here reads it
    ]  # fmt: skip


def unique_job_name() -> str:
    return f"bench-test-{uuid.uuid4().hex[:10]}"  # squeue keeps finished jobs for MinJobAge


def start_sweep(*overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmark", "-m", *LAUNCHER, *overrides]
    return subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(sweep: subprocess.Popen, expect_rc: int = 0, timeout_s: float = 1500) -> str:
    output = sweep.communicate(timeout=timeout_s)[0]
    assert sweep.returncode == expect_rc, output[-4000:]
    return output


def records(results: Path) -> dict[Path, dict]:
    return {p.parent: read_record(p) for p in results.glob(f"runs/**/{RECORD_NAME}")}


def job_ids(name: str) -> list[str]:
    """This test's SLURM jobs (array tasks as <array>_<task>), by job name, in every state."""
    listed = subprocess.run(
        ["squeue", "-h", "--array", "--states=all", f"--name={name}", "-o", "%i"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return listed.stdout.split()


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True)
    return re.search(rf"\b{field}=(\S*)", shown.stdout).group(1)


def run_seconds(elapsed: str) -> int:
    """scontrol's RunTime, [D-]HH:MM:SS, in seconds."""
    days, _, clock = elapsed.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def wait_for(condition, what: str, timeout_s: float = 900, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def assert_readable(output: str) -> None:
    """The submitting command's output on a cluster without accounting: one sacct line at most."""
    assert "Bypassing sacct error" not in output
    assert sum("sacct" in line for line in output.splitlines()) <= 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@SWEEPS
def test_a_two_run_sweep_runs_as_two_array_jobs_and_reports_two_done(slurm, tmp_path, dataset_root):
    results = tmp_path / "results"
    args = ["method=ti", "subject=dog6,cat", "seed=1", "train.max_steps=2", *tiny(results, dataset_root)]
    output = finish(start_sweep(*args))
    assert_readable(output)
    assert "sweep finished: 2/2 done" in output
    found = records(results)
    assert sorted((r["subject"], r["seed"], r["status"]) for r in found.values()) == [
        ("cat", 1, "ok"), ("dog6", 1, "ok"),
    ]  # fmt: skip
    # where the README says the logs go: <results>/hydra/multirun-<time>/.submitit/<job id>_<task>/
    logs = sorted(results.glob("hydra/multirun-*/.submitit/*/*_log.out"))
    assert [re.sub(r"^\d+", "<id>", p.name) for p in logs] == [f"<id>_{t}_0_log.out" for t in range(2)]
    assert all(p.with_name(p.name.replace(".out", ".err")).exists() for p in logs)
    assert len(list(results.glob("hydra/multirun-*/.submitit/*/*_submission.sh"))) == 1

    status = subprocess.run(
        [sys.executable, "-m", "benchmark.sweep", *LAUNCHER, *args],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.startswith("2 runs: 2/2 done, 0 running, 0 failed, 0 pending"), status.stdout


@SWEEPS
def test_a_job_that_fails_leaves_a_failed_record_and_the_others_finish(slurm, tmp_path, dataset_root):
    """One job of the sweep gets a weights folder that looks complete where the sweep is submitted
    (so the preflight lets it through) but holds no weights where the job loads them."""
    results = tmp_path / "results"
    broken = tmp_path / "sd15-without-weights"
    for name in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        (broken / name).mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")
    args = [
        "method=ti", "subject=dog6", "model=tiny,sd15", f"++model.path={broken}", "eval=smoke",
        "train.max_steps=2", "device=cpu", *tiny(results, dataset_root),
    ]  # fmt: skip
    args.remove("model=tiny")  # the sweep chooses the model
    output = finish(start_sweep(*args), expect_rc=1)
    assert_readable(output)
    by_model = {r["model"]: r for r in records(results).values()}
    assert by_model["tiny"]["status"] == "ok"
    assert by_model["sd15"]["status"] == "failed"
    refusal = f"cannot load Stable Diffusion weights from model.path='{broken}'"
    assert refusal in by_model["sd15"]["error"]
    (failure,) = [line for line in output.splitlines() if "SLURM job" in line and " failed: " in line]
    assert "model=sd15" in failure and refusal in failure
    assert output.count("1 of 2 SLURM jobs failed or ended without a result") == 1
    assert "1/2 done" in subprocess.run(
        [sys.executable, "-m", "benchmark.sweep", *LAUNCHER, *args],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    ).stdout  # fmt: skip


def checkpoint_step(run_dir: Path) -> int:
    return load_checkpoint(run_dir / CHECKPOINT_NAME)["step"]


def by_seed(results: Path, name: str) -> dict[int, Path]:
    """Run directories with `name` (a file) in them, by their run's seed."""
    found = [p.parent for p in results.glob(f"runs/**/{name}")]
    return {yaml.safe_load((d / "config.yaml").read_text())["seed"]: d for d in found}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset_root):
    """LONG_RUNS' records by seed, from one uninterrupted local sweep of the same configs (no
    SLURM, no sleep). It starts at once and trains beside the SLURM jobs; calling waits for it."""
    results = tmp_path_factory.mktemp("uninterrupted") / "results"
    command = [sys.executable, "-m", "benchmark", "-m", *LONG_RUNS, *tiny(results, dataset_root)]
    run = subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def records_by_seed() -> dict[int, dict]:
        output = run.communicate(timeout=1500)[0]
        assert run.returncode == 0, output[-3000:]
        found = {r["seed"]: r for r in records(results).values()}
        assert sorted(found) == [0, 1] and all(r["resumed_from_step"] == 0 for r in found.values())
        return found

    yield records_by_seed
    run.kill()
    run.wait()


@dataclass
class Interrupted:
    """The sweep of LONG_RUNS once it has ended: the seed-0 job hit its time limit, the seed-1 job
    was cancelled."""

    results: Path
    args: list[str]
    output: str  # the submitting command's
    timed_out: str  # job ids, <array>_<task>
    cancelled: str
    records: dict[Path, dict]  # and when each was written
    written_ns: dict[Path, int]
    cancelled_dir: Path  # the seed-1 run


@pytest.fixture(scope="module")
def interrupted(slurm, tmp_path_factory, dataset_root, uninterrupted) -> Interrupted:
    """One sweep for both stops (one job start less than a sweep each). Once a run has its first
    checkpoint: the seed-0 job's time limit is cut to 1-2 minutes ahead, inside submitit's signal
    window (signal_delay_s before the limit), so SLURM sends SIGUSR2 at its next time-limit tick
    (every 30 s) and submitit requeues the job; the seed-1 job is `scancel`led (SIGTERM: the run
    checkpoints after its step and stops, leaving no record)."""
    results = tmp_path_factory.mktemp("interrupted") / "results"
    name = unique_job_name()
    # timeout_min <= 10: submitit counts any SIGUSR2 as a time-out (else as a preemption)
    args = [
        *LONG_RUNS, "train.step_delay_s=1", *tiny(results, dataset_root), f"hydra.launcher.name={name}",
        "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=150",
    ]  # fmt: skip
    sweep = start_sweep(*args)
    jobs = {}

    def task(seed: int) -> str:
        (job_id,) = [j for j in job_ids(name) if j.endswith(f"_{seed}")]  # task n: seed=n
        return job_id

    def stop_each_run_mid_training() -> bool:
        checkpoints = by_seed(results, CHECKPOINT_NAME)
        if 0 in checkpoints and 0 not in jobs:  # at once: the signal may take 30 s to come
            jobs[0] = task(0)
            minutes_run = run_seconds(job_field(jobs[0], "RunTime")) // 60
            subprocess.run(
                ["scontrol", "update", f"JobId={jobs[0]}", f"TimeLimit={minutes_run + 2}"], check=True
            )
        if 1 in checkpoints and 1 not in jobs and checkpoint_step(checkpoints[1]) >= CANCEL_AT_STEP:
            jobs[1] = task(1)
            subprocess.run(["scancel", jobs[1]], check=True)
        return len(jobs) == 2

    wait_for(stop_each_run_mid_training, "the runs' checkpoints")

    def requeued() -> bool:  # and pending again: only then does StartTime stick
        return int(job_field(jobs[0], "Restarts")) >= 1 and job_field(jobs[0], "JobState") == "PENDING"

    wait_for(requeued, "the requeue", timeout_s=300)
    # the requeued job gets its time back, and may start now (SLURM holds a requeued job for 2 min)
    subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "TimeLimit=10", "StartTime=now"], check=True)
    output = finish(sweep, expect_rc=1)
    found = records(results)
    return Interrupted(
        results, args, output, jobs[0], jobs[1], found,
        {d: (d / RECORD_NAME).stat().st_mtime_ns for d in found}, by_seed(results, "config.yaml")[1],
    )  # fmt: skip


@STOPS
def test_a_job_at_its_time_limit_is_requeued_and_resumes_to_the_same_numbers(interrupted, uninterrupted):
    assert_readable(interrupted.output)
    assert f"SLURM job {interrupted.timed_out} " not in interrupted.output  # not listed as failed or lost
    (record,) = [r for r in interrupted.records.values() if r["seed"] == 0]
    reference = uninterrupted()[0]
    assert record["status"] == "ok"
    assert 0 < record["resumed_from_step"] < LONG_STEPS
    assert {k: record[k] for k in NUMBERS} == {k: reference[k] for k in NUMBERS}
    (log,) = interrupted.results.glob(f"hydra/multirun-*/.submitit/{interrupted.timed_out}/*_log.err")
    log = log.read_text()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log  # submitit's words
    assert re.search(r"JOB \S+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE", log)  # slurmstepd's


@STOPS
def test_a_cancelled_job_is_the_only_one_the_next_sweep_trains_and_it_resumes(interrupted, uninterrupted):
    output, cancelled_dir = interrupted.output, interrupted.cancelled_dir
    assert_readable(output)
    lost = [line for line in output.splitlines() if "ended without a result (state" in line]
    assert (
        len(lost) == 1 and f"SLURM job {interrupted.cancelled} " in lost[0] and "(state CANCELLED)" in lost[0]
    )
    assert output.count("1 of 2 SLURM jobs failed or ended without a result") == 1
    assert cancelled_dir not in interrupted.records
    assert (cancelled_dir / CHECKPOINT_NAME).exists()

    # the same sweep without the sleep (train.step_delay_s is not in the run key: the same runs)
    rerun_args = [a if a != "train.step_delay_s=1" else "train.step_delay_s=0" for a in interrupted.args]
    rerun = finish(start_sweep(*rerun_args))
    assert "sweep finished: 2/2 done" in rerun
    after = records(interrupted.results)
    for run_dir, written_ns in interrupted.written_ns.items():
        assert (run_dir / RECORD_NAME).stat().st_mtime_ns == written_ns  # not run again
    resumed = after[cancelled_dir]
    reference = uninterrupted()[1]
    assert resumed["status"] == "ok"
    assert CANCEL_AT_STEP <= resumed["resumed_from_step"] < LONG_STEPS
    assert {k: resumed[k] for k in NUMBERS} == {k: reference[k] for k in NUMBERS}


def fake_slurm_commands(folder: Path, queue: Path) -> None:
    """`sacct` as on a cluster without accounting; `squeue` prints the file `queue`."""
    folder.mkdir()
    unreachable = "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1"
    for name, script in {
        "sacct": "echo 'Slurm accounting storage is disabled' >&2; exit 1",
        "squeue": f'cat "{queue}" 2>/dev/null || {{ {unreachable}; }}',
    }.items():  # fmt: skip
        (folder / name).write_text(f"#!/bin/sh\n{script}\n")
        (folder / name).chmod(0o755)


def test_without_accounting_the_watcher_says_so_once_and_follows_squeue(tmp_path, monkeypatch, caplog):
    """No cluster needed: fake sacct/squeue commands, as a one-node cluster answers them."""
    from benchmark.sweep.slurm import NOT_LISTED, QueueWatcher

    queue = tmp_path / "queue"
    fake_slurm_commands(tmp_path / "bin", queue)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    watcher = QueueWatcher(delay_s=60)
    for job_id in ("7_0", "7_1", "8"):
        watcher.register_job(job_id)
    queue.write_text("7_0|RUNNING|vm\n7_1|CANCELLED|vm\n")
    with caplog.at_level("INFO", logger="benchmark.sweep.slurm"):
        for _ in range(5):  # five polls
            watcher.update()
    assert [r.getMessage() for r in caplog.records] == [
        "sacct: accounting is off on this cluster; job states come from squeue"
    ]
    states = {j: watcher.get_state(j, mode="cache") for j in ("7_0", "7_1", "8")}
    assert states == {"7_0": "RUNNING", "7_1": "CANCELLED", "8": NOT_LISTED}  # 8: purged, over
    assert [watcher.is_done(j, mode="cache") for j in ("7_0", "7_1", "8")] == [False, True, True]

    caplog.clear()
    queue.unlink()  # the controller stops answering: one warning, not one per poll
    with caplog.at_level("INFO", logger="benchmark.sweep.slurm"):
        for _ in range(3):
            watcher.update()
    (warning,) = caplog.records
    assert "Unable to contact slurm controller" in warning.getMessage()
    assert watcher.get_state("7_0", mode="cache") == "RUNNING"  # the last known state stays

    queue.write_text("7_0|COMPLETED|vm\n")
    watcher.update()
    assert watcher.is_done("7_0", mode="cache")


class FakeJob:
    """What job_returns reads of a submitit job: id, state, log path, results()."""

    def __init__(self, job_id: str, outcome, state: str = "COMPLETED"):
        self.job_id, self.state, self.outcome = job_id, state, outcome
        self.paths = type("Paths", (), {"stderr": Path(f"/logs/{job_id}_0_log.err")})()

    def results(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return [self.outcome]


def test_job_returns_lists_each_failed_or_lost_job_once_then_one_summary(caplog):
    """No cluster needed: the end of a sweep, from jobs as submitit reports them."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    from benchmark.sweep.slurm import JobFailed, job_returns
    from methods.common.base import ConfigError

    ok = JobReturn(overrides=["seed=0"], status=JobStatus.COMPLETED, _return_value={"status": "ok"})
    error = ConfigError("seed: bad\nmore")
    refused = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED, _return_value=error)
    jobs = [
        FakeJob("5_0", ok),
        FakeJob("5_1", refused),
        FakeJob("5_2", UncompletedJobError("no result\nlong log"), state="CANCELLED"),
    ]
    overrides = [["seed=0"], ["seed=1"], ["seed=2"]]
    with caplog.at_level("INFO", logger="benchmark.sweep.slurm"):
        returns = job_returns(jobs, overrides)
    assert [r.getMessage() for r in caplog.records] == [
        "SLURM job 5_1 (seed=1) failed: ConfigError: seed: bad",
        "SLURM job 5_2 (seed=2) ended without a result (state CANCELLED); log: /logs/5_2_0_log.err",
    ]
    assert returns[0].return_value == {"status": "ok"}
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.FAILED]
    assert returns[2].overrides == ["seed=2"]
    with pytest.raises(JobFailed, match="^2 of 3 SLURM jobs failed or ended without a result"):
        _ = returns[1].return_value  # what Hydra's sweeper raises, and prints as one line
