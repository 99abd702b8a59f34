"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, readable on a real cluster.

Two changes, both in the submitting process. conf/hydra/launcher/slurm.yaml selects the launcher,
hydra_plugins/benchmark_slurm/launcher.py (Hydra takes launchers from the hydra_plugins package
only); this module holds what it uses.

- Job states. submitit polls `sacct`; a cluster without accounting refuses every poll, and
  submitit logs a warning per poll and never learns that a job was cancelled (it would wait for
  it forever). `QueueWatcher` says once that accounting is off and asks `squeue` from then on
  (finished jobs stay in squeue for the cluster's MinJobAge; a job no longer listed is over).
- The end of a sweep. A job that ends without a result (cancelled, killed, out of requeues) or
  whose run refused its input is one warning line naming the job and its overrides (and its log),
  after every job has returned, then one summary line with which Hydra exits 1; plain submitit
  raises at the first such job with its whole log while the others still run.

The jobs themselves run Hydra's own job code (`BaseSubmititLauncher.__call__`): a job that hits
its time limit is checkpointed by submitit (SIGUSR2 `signal_delay_s` before the limit), requeued
and, like any rerun, resumes its run from `checkpoint.pt`.
"""

from __future__ import annotations

import getpass
import logging
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)
NO_ACCOUNTING = "accounting storage is disabled"  # what sacct says on a cluster without slurmdbd
NOT_LISTED = "NOT_LISTED"  # squeue no longer lists the job: it is over (purged after MinJobAge)


class JobFailed(CompactHydraException):
    """One line about one job; Hydra prints it without a traceback."""


class QueueWatcher(SlurmInfoWatcher):
    """Job states from sacct, or from squeue once sacct has said that accounting is off."""

    def __init__(self, delay_s: int) -> None:
        super().__init__(delay_s)
        self.use_squeue = False
        self._last_error = ""

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()  # None when every registered job has finished
        if command is None or not self.use_squeue:
            return command
        user = getpass.getuser()
        return ["squeue", "--noheader", "--array", "--states=all", f"--user={user}", "--format=%i|%T|%N"]

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode and not self.use_squeue and NO_ACCOUNTING in done.stderr.lower():
            log.info("sacct: accounting is off on this cluster; job states come from squeue")
            self.use_squeue = True
            self.update()
            return
        if done.returncode:
            reason = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()[0]
            error = f"{command[0]} failed ({reason})"
            if error != self._last_error:  # once per distinct error, not once per poll
                log.warning("%s; job states may lag", error)
            self._last_error = error
        elif self.use_squeue:
            info = self.read_info("JobID|State|NodeList\n" + done.stdout)
            for job_id in self._registered - self._finished - set(info):
                info[job_id] = {"JobID": job_id, "State": NOT_LISTED}
            self._info_dict.update(info)
        else:
            self._info_dict.update(self.read_info(done.stdout))
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


class QueueWatchedJob(SlurmJob):
    watcher = QueueWatcher(delay_s=60)  # squeue at most a minute apart (submitit's sacct: 10 minutes)


def job_returns(jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
    """Every job's JobReturn once all are over: one warning line per failed or lost job, and one
    JobFailed summary that Hydra prints at the end (exit status 1)."""
    returns, failures = [], 0
    for job, overrides in zip(jobs, job_overrides):
        result, failure = job_outcome(job, overrides)
        if failure:
            log.warning(failure)
            failures += 1
        returns.append(result)
    if failures:
        summary = JobFailed(
            f"{failures} of {len(returns)} SLURM jobs failed or ended without a result (listed above); "
            "the same command runs them again, from their checkpoints where they have one"
        )
        for result in returns:
            if result.status == JobStatus.FAILED:
                result.return_value = summary
    return returns


def job_outcome(job: Any, overrides: Sequence[str]) -> tuple[JobReturn, str | None]:
    """The job's JobReturn (waiting for it), and a line saying what went wrong, if anything did."""
    import submitit

    what = f"SLURM job {job.job_id} ({' '.join(filter_overrides(overrides))})"
    failed = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    try:
        result: JobReturn = job.results()[0]
    except submitit.core.utils.UncompletedJobError:
        return failed, f"{what} ended without a result (state {job.state}); log: {job.paths.stderr}"
    except submitit.core.utils.FailedJobError:
        return failed, f"{what} crashed; log: {job.paths.stderr}"
    if result.status != JobStatus.FAILED:
        return result, None
    error = result._return_value
    return result, f"{what} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
