"""Sweep status: how many of a sweep's runs are done / running / failed / pending.

    python -m benchmark.sweep experiment=table1 [overrides]

prints the counts from the run directories alone, so it works while the jobs run elsewhere
(a cluster). A run is *done* (record says ok), *failed* (record says failed, diverged or oom:
a new sweep retries it), *running* (started, no record yet: running now, or interrupted: the
status command tells the two apart and the next sweep resumes it from its checkpoint) or
*pending* (not started). A corrupt record is listed as *corrupt*, with its path, and counted:
it never stops a status query or a report. `SweepProgress`, a Hydra callback configured in
conf/config.yaml, logs the counts before a sweep and after every job.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from benchmark.config import LOCK_NAME
from benchmark.records import RECORD_NAME, CorruptRecord, read_record
from benchmark.sweep.plan import InvalidSweep, PlannedRun, job_overrides, plan_jobs, plan_sweep
from methods.common.atomic import exclusive_lock

log = logging.getLogger(__name__)
STATES = ("done", "running", "failed", "corrupt", "pending")


def run_state(directory: Path, probe_lock: bool = False) -> str:
    """done | failed | running | pending; with ``probe_lock``, a started run whose lock no process
    holds is *interrupted* (the probe takes the lock for an instant: for a status query only)."""
    record_path = directory / RECORD_NAME
    if record_path.exists():
        try:
            return "done" if read_record(record_path)["status"] == "ok" else "failed"
        except CorruptRecord:
            return "corrupt"
    if not (directory / "config.yaml").exists():
        return "pending"
    if probe_lock and (directory / LOCK_NAME).exists():
        with exclusive_lock(directory / LOCK_NAME) as free:
            return "interrupted" if free else "running"
    return "running"


def count_states(runs: Sequence[PlannedRun], probe_lock: bool = False) -> Counter:
    return Counter(run_state(r.run_dir, probe_lock) for r in runs)


def progress_line(counts: Counter) -> str:
    total = sum(counts.values())
    done, running, failed, pending = (counts[s] for s in ("done", "running", "failed", "pending"))
    line = f"{done}/{total} done, {running} running, {failed} failed, {pending} pending"
    line += f", {counts['corrupt']} corrupt records (delete or move them)" if counts["corrupt"] else ""
    return line + (f", {counts['interrupted']} interrupted (resumable)" if counts["interrupted"] else "")


class SweepProgress(Callback):
    """Hydra callback: the sweep's counts before it starts and after each job (local launcher:
    this process; SLURM: each job's log, and the final count when all have returned)."""

    def __init__(self) -> None:
        self.runs: list[PlannedRun] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            params = config.hydra.sweeper.get("params")
            jobs = job_overrides(
                OmegaConf.to_container(params) if params else None, config.hydra.overrides.task
            )
            self.runs = plan_jobs(jobs, config.hydra.job.config_name)  # validated before Hydra started
            counts = count_states(self.runs)  # no lock probing: another sweep's job may be starting
        except Exception as e:  # progress is a courtesy: it never stops a sweep
            log.warning("sweep progress unavailable: %s", e)
            self.runs = None
            return
        log.info("sweep of %d runs: %s", len(self.runs), progress_line(counts))
        if counts["done"]:
            log.info("%d runs already done: skipped (skip_done=true)", counts["done"])

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self._log_progress("sweep progress")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._log_progress("sweep finished")

    def _log_progress(self, what: str) -> None:
        if self.runs is None:
            return
        try:
            log.info("%s: %s", what, progress_line(count_states(self.runs)))
        except OSError as e:
            log.warning("sweep progress unavailable: %s", e)


USAGE = """\
python -m benchmark.sweep [experiment=<name>] [key=a,b ...]
  The state of each run of `python -m benchmark -m <the same arguments>`, from the run
  folders alone (it works while the jobs run elsewhere): done, running, interrupted, failed,
  corrupt or pending; then each unfinished run with its folder and overrides.
  Takes the same arguments as the sweep (no -m needed); data.root may be left out.
  Exit status: 0 listed, 2 bad input (one line per bad value).
"""


def main(argv: Sequence[str]) -> int:
    """`python -m benchmark.sweep experiment=table1 [overrides]`: counts, then each unfinished run.
    Exit 2 on bad input (every bad value listed), 0 otherwise."""
    if {"--help", "-h"} & set(argv):
        print(USAGE, end="")
        return 0
    argv = [a for a in argv if a not in ("-m", "--multirun")]  # the sweep's own command line works too
    try:
        runs = plan_sweep(argv)
    except InvalidSweep as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 2
    states = [(r, run_state(r.run_dir, probe_lock=True)) for r in runs]
    print(f"{len(runs)} runs: {progress_line(Counter(s for _, s in states))}")
    for r, state in states:
        if state != "done":
            print(f"  {state:11s} {r.run_dir}  ({' '.join(r.overrides)})")
        if state == "corrupt":
            print(f"              {corrupt_reason(r.run_dir)}")
    return 0


def corrupt_reason(directory: Path) -> str:
    try:
        read_record(directory / RECORD_NAME)
    except CorruptRecord as e:
        return str(e)
    return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
