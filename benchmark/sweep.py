"""Sweeps: which runs an experiment makes, and how many are done / running / failed.

`python -m benchmark -m experiment=table1` runs a sweep with Hydra's basic sweeper (the jobs:
the product of `hydra.sweeper.params` and the command line's comma lists) on the configured
launcher (local, or SLURM with `hydra/launcher=slurm`). `SweepProgress`, a Hydra callback
configured in conf/config.yaml, logs the counts before the sweep and after every job.

    python -m benchmark.sweep experiment=table1 [overrides]

prints the same counts from the run directories alone, so it works while the jobs run
elsewhere (a cluster). A run is *done* (record says ok), *failed* (record says failed,
diverged or oom: a new sweep retries it), *running* (started, no record yet: running now, or
interrupted: the status command tells the two apart and the next sweep resumes it from its
checkpoint) or *pending* (not started).

The expansion reuses Hydra 1.3's own pieces (BasicSweeper.split_arguments and the config
loader's override step), so the planned directories are the ones the jobs write to
(tests/test_sweep.py checks this).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from benchmark.atomic import exclusive_lock
from benchmark.config import flat
from benchmark.records import RECORD_NAME, CorruptRecord, read_record
from benchmark.run import LOCK_NAME, run_dir_for

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
NAMED = ("method", "model", "eval")  # config groups whose record field is the chosen name


@dataclass(frozen=True)
class PlannedRun:
    overrides: tuple[str, ...]  # this job's overrides, as Hydra's sweeper passes them
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # flat, resolved

    def value(self, key: str) -> Any:
        """A config value by its record name: `method` (the method's name), `subject`, `method.tau`..."""
        return self.config.get(f"{key}.name") if key in NAMED else self.config.get(key)


def job_overrides(params: Mapping[str, Any] | None, arguments: Sequence[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes: `hydra.sweeper.params`, then the command line (which
    wins for a key given in both), expanded into their product."""
    params_conf = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(params_conf)
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def single_valued(arguments: Sequence[str]) -> list[str]:
    """The overrides that are not comma lists: only they compose a single config."""
    parsed = OverridesParser.create().parse_overrides(list(arguments))
    return [arg for arg, o in zip(arguments, parsed) if not o.is_sweep_override()]


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """Compose with conf/ (or, inside a running Hydra app, with the app's own config)."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield


def is_group_override(override: Override) -> bool:
    """`method=ti`, `+experiment/table2=x`, `hydra/launcher=slurm`: choose a config file (the
    defaults list consumes them); anything else sets a value."""
    key = override.key_or_group
    return override.package is not None or key.startswith("hydra") or (CONF_DIR / key).is_dir()


def plan_jobs(jobs: Sequence[Sequence[str]], config_name: str = "config") -> list[PlannedRun]:
    """Each job's run directory. Hydra composes a job as (config files chosen by the group
    overrides) + (value overrides applied on top); composing once per distinct choice of files
    makes a 700-run sweep cost seconds, not minutes."""
    parser = OverridesParser.create()
    composed: dict[tuple[str, ...], DictConfig] = {}
    planned = []
    with hydra_context():
        for job in jobs:
            overrides = parser.parse_overrides(list(job))
            files = tuple(line for line, o in zip(job, overrides) if is_group_override(o))
            if files not in composed:
                composed[files] = compose(config_name, overrides=list(files))
            cfg = copy.deepcopy(composed[files])
            ConfigLoaderImpl._apply_overrides_to_config(
                [o for o in overrides if not is_group_override(o)], cfg
            )
            planned.append(
                PlannedRun(tuple(job), run_dir_for(cfg), flat(OmegaConf.to_container(cfg, resolve=True)))
            )
    return planned


def primary_config(arguments: Sequence[str]) -> DictConfig:
    """The config of `python -m benchmark -m <arguments>` before the sweep is expanded (with the
    `hydra` node: its sweeper params), composed from the non-sweep overrides."""
    with hydra_context():
        return compose("config", overrides=single_valued(arguments), return_hydra_config=True)


def plan_sweep(arguments: Sequence[str]) -> list[PlannedRun]:
    """Every run of `python -m benchmark -m <arguments>`, with the directory its record lands in."""
    params = primary_config(arguments).hydra.sweeper.params
    return plan_jobs(job_overrides(OmegaConf.to_container(params) if params else None, arguments))


def run_state(directory: Path, probe_lock: bool = False) -> str:
    """done | failed | running | pending; with ``probe_lock``, a started run whose lock no process
    holds is *interrupted* (the probe takes the lock for an instant: for a status query only)."""
    record_path = directory / RECORD_NAME
    if record_path.exists():
        return "done" if read_record(record_path)["status"] == "ok" else "failed"
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
            self.runs = plan_jobs(jobs, config.hydra.job.config_name)
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
        except (CorruptRecord, OSError) as e:
            log.warning("sweep progress unavailable: %s", e)


def main(argv: Sequence[str]) -> int:
    """`python -m benchmark.sweep experiment=table1 [overrides]`: counts, then each unfinished run."""
    runs = plan_sweep(argv)
    states = [(r, run_state(r.run_dir, probe_lock=True)) for r in runs]
    print(f"{len(runs)} runs: {progress_line(Counter(s for _, s in states))}")
    for r, state in states:
        if state != "done":
            print(f"  {state:11s} {r.run_dir}  ({' '.join(r.overrides)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
