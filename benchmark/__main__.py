"""`python -m benchmark method=ti subject=dog6 [model=tiny] [-m sweeps]` (Hydra).

Exit status: 0 done; 1 the run failed, diverged, ran out of memory or is held by another
process (its record.json says which); 2 bad input (one line per bad value on stderr, nothing
trained, nothing written; a sweep checks every job before the first starts: benchmark.sweep.preflight);
128+N stopped by signal N during training (a checkpoint was written: the same command resumes).
torch, diffusers and the other heavy libraries load only once a run starts.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from benchmark.run import USER_ERRORS, record_refusal, run
    from benchmark.train import TrainingInterrupted

    try:
        record = run(cfg)
    except USER_ERRORS as e:  # the message says what is wrong and how to fix it: no traceback
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            record_refusal(cfg, e)  # the sweep's status and report count this job as failed
            raise  # Hydra marks this job failed, runs the sweep's other jobs, then exits with it
        sys.exit(2)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    if record["status"] != "ok" and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)


if __name__ == "__main__":
    from benchmark.sweep.preflight import exit_on_bad_input

    exit_on_bad_input(sys.argv[1:])
    main()
