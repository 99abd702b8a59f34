"""`python -m benchmark method=ti subject=dog6 [model=tiny] [-m sweeps]` (Hydra).

Exit status: 0 done; 1 the run failed, diverged, ran out of memory or of disk space (its
record.json says which, where the disk allows); 2 bad input (one line per bad value on stderr,
nothing trained, nothing written; a sweep checks every job before the first starts:
benchmark.sweep.preflight); 3 another process holds the run (or, in a sweep, at least one run),
so it was left to that process, nothing written: rerun once it is done; 128+N stopped by signal
N during training (a checkpoint was written: the same command resumes).
torch, diffusers and the other heavy libraries load only once a run starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

EXIT_BUSY = 3
_left_to_others: list[str] = []  # this sweep's runs that another process holds


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_job(cfg)
    finally:
        remove_if_empty(Path(HydraConfig.get().runtime.output_dir))


def remove_if_empty(output_dir: Path) -> None:
    """Hydra makes a folder per call (`<results>/hydra/<time>/`, a sweep's
    `hydra/multirun-<time>/<job>/`); runs log to the terminal and write under `<results>/runs/`,
    so it is usually empty: remove it, then its sweep folder and `hydra/` if they are empty too
    (a sweep's SLURM logs keep theirs)."""
    folders = [output_dir]
    if output_dir.parent.name.startswith("multirun-"):
        folders.append(output_dir.parent)
    if folders[-1].parent.name == "hydra":
        folders.append(folders[-1].parent)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone: what is above it stays
            return


def run_job(cfg: DictConfig) -> None:
    from benchmark.run import BUSY, USER_ERRORS, record_refusal, run
    from benchmark.train import TrainingInterrupted
    from methods.common.atomic import DiskFull

    single = HydraConfig.get().mode == RunMode.RUN
    try:
        record = run(cfg)
    except USER_ERRORS as e:  # the message says what is wrong and how to fix it: no traceback
        print(f"error: {e}", file=sys.stderr)
        if not single:
            record_refusal(cfg, e)  # the sweep's status and report count this job as failed
            raise  # Hydra marks this job failed, runs the sweep's other jobs, then exits with it
        sys.exit(2)
    except DiskFull as e:  # not even the record could be written
        print(f"error: {e}", file=sys.stderr)
        if not single:
            raise
        sys.exit(1)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    if record["status"] == BUSY:
        if single:
            sys.exit(EXIT_BUSY)
        _left_to_others.append(record["run_dir"])
    elif record["status"] != "ok" and single:
        sys.exit(1)


if __name__ == "__main__":
    from benchmark.sweep.preflight import exit_on_bad_input

    exit_on_bad_input(sys.argv[1:])
    main()
    if _left_to_others:  # the sweep's other runs are done; these are another process's
        print(f"busy: {len(_left_to_others)} run(s) left to the process holding them", file=sys.stderr)
        sys.exit(EXIT_BUSY)
