"""The launcher of `hydra/launcher=slurm`: hydra-submitit-launcher's, with benchmark.sweep.slurm's job
states (squeue where sacct is off) and one line per failed or lost job. Hydra takes launchers from
the hydra_plugins package only, so the class lives here; what it uses is in benchmark/sweep/slurm.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from benchmark.sweep.slurm import QueueWatchedJob, job_returns

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )  # fmt: skip
        generic = set(OmegaConf.structured(BaseQueueConf).keys())  # names every submitit executor takes
        executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        folder = "<id>_<task>" if len(job_overrides) > 1 else "<id>"  # one run: a plain job, no array
        log.info("SLURM sweep of %d jobs; logs in %s/.submitit/%s/", len(job_overrides), sweep_dir, folder)
        state = Singleton.get_state()
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for n, overrides in zip(numbers, job_overrides):
            log.info("\t#%d : %s", n, " ".join(filter_overrides(overrides)))
        job_params = [
            (list(overrides), "hydra.sweep.dir", n, f"job_id_for_{n}", state)
            for n, overrides in zip(numbers, job_overrides)
        ]
        # submitit's SlurmJob objects ask sacct; ours (same folder and id) follow squeue where sacct is off
        jobs = [
            QueueWatchedJob(folder=executor.folder, job_id=job.job_id, tasks=range(job.num_tasks))
            for job in executor.map_array(self, *zip(*job_params))
        ]
        log.info("submitted: SLURM job %s", jobs[0].job_id.split("_")[0] if jobs else "-")
        return job_returns(jobs, job_overrides)
