"""Sweeps: which runs an experiment makes, each validated before anything runs.

`python -m benchmark -m experiment=table1` runs a sweep with Hydra's basic sweeper (the jobs:
the product of `hydra.sweeper.params` and the command line's comma lists) on the configured
launcher (local, or SLURM with `hydra/launcher=slurm`). ``plan_sweep`` expands the same
arguments into the same run directories without running anything: the status command
(benchmark.sweep.status), the report and the memory table read them.

The expansion reuses Hydra 1.3's own pieces (BasicSweeper.split_arguments and the config
loader's override step), so the planned directories are the ones the jobs write to
(tests/sweep/test_sweep.py checks this). Planning validates every job (benchmark.schema.problems)
before anything runs: a typo on the last value of an axis fails the sweep at once, every bad
value on its own line (:class:`InvalidSweep`), not after days of training.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from benchmark.config import flat, located, run_dir_for
from benchmark.sweep.jobs import (
    COMPOSE_ERRORS,
    ComposeFailed,
    JobComposer,
    hydra_context,
    hydra_message,
)

log = logging.getLogger(__name__)
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
    overrides = parse_overrides(params_conf)
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def parse_overrides(arguments: Sequence[str]) -> list[Override]:
    """Hydra's parse, one argument at a time, so that a syntax error names its argument."""
    parsed = []
    for argument in arguments:
        try:
            parsed.append(parse_argument(argument))
        except HydraException as e:
            raise InvalidSweep([JobProblem((), f"{argument}: {hydra_message(e)}")], 1) from None
    return parsed


@functools.lru_cache(maxsize=4096)
def parse_argument(argument: str) -> Override:
    """One override, parsed once: a sweep's jobs repeat the same few hundred arguments."""
    (override,) = OverridesParser.create().parse_overrides([argument])
    return override


def single_valued(arguments: Sequence[str]) -> list[str]:
    """The overrides that are not comma lists: only they compose a single config."""
    parsed = parse_overrides(arguments)
    return [arg for arg, o in zip(arguments, parsed) if not o.is_sweep_override()]


@dataclass(frozen=True)
class JobProblem:
    overrides: tuple[str, ...]  # the job's overrides; () for the command line as a whole
    message: str  # names the key, the value and what is allowed


class InvalidSweep(ValueError):
    """Bad input in a sweep, found before any job starts: each problem once, with a job that has it."""

    def __init__(self, problems: Sequence[JobProblem], n_jobs: int, axes: Sequence[str] = ()):
        self.problems, self.n_jobs = list(problems), n_jobs
        self.axes = set(axes)  # the keys whose value differs between jobs: what tells a job apart
        super().__init__("\n".join(self.lines()))

    def shown(self, job: tuple[str, ...]) -> str:
        return " ".join(o for o in job if not self.axes or o.split("=", 1)[0] in self.axes)

    def lines(self) -> list[str]:
        by_message: dict[str, list[tuple[str, ...]]] = {}
        for p in self.problems:
            by_message.setdefault(p.message, []).append(p.overrides)
        lines = []
        for message, jobs in by_message.items():
            where = f"job ({self.shown(jobs[0])}): " if jobs[0] and self.n_jobs > 1 else ""
            also = f" [and {len(jobs) - 1} more of the {self.n_jobs} jobs]" if len(jobs) > 1 else ""
            lines.append(f"error: {where}{message}{also}")
        return lines


@dataclass(frozen=True)
class Check:
    """How a sweep's jobs are validated, each a composed job -> its problems, one line each:
    ``values`` for every job first (fast: a typo answers in seconds), then, only if no job has a
    bad value, ``inputs`` (images decoded, weights located: what a run reads)."""

    values: Callable[[DictConfig], list[str]]
    inputs: Callable[[DictConfig], list[str]] | None = None


def run_checks(check_device: bool = True, inputs: bool = True) -> Check:
    """benchmark.schema.problems, with the disk checks shared by all jobs of a sweep; without
    ``inputs``, the values alone (a status query or a report needs no images, weights or GPU)."""
    from benchmark.schema import DiskChecks, problems

    disk = DiskChecks()
    return Check(
        values=lambda cfg: problems(cfg, disk, check_device, inputs=False),
        inputs=(lambda cfg: problems(cfg, disk, check_device, inputs=True)) if inputs else None,
    )


def plan_jobs(
    jobs: Sequence[Sequence[str]], config_name: str = "config", check: Check | None = None
) -> list[PlannedRun]:
    """Each job's run directory; every job composed (benchmark.sweep.jobs: its config files once per
    distinct choice, so a 700-run sweep costs seconds) and, with ``check``, validated first
    (``InvalidSweep`` lists each bad value)."""
    composer = JobComposer(config_name)
    good: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    bad: list[JobProblem] = []
    with hydra_context():
        for job in jobs:
            try:
                values = composer.values(job, parse_overrides(job))
            except InvalidSweep as e:
                bad += [JobProblem(tuple(job), p.message) for p in e.problems]
                continue
            except ComposeFailed as e:
                bad.append(JobProblem(tuple(job), str(e)))
                continue
            found = check.values(values) if check else []
            bad += [JobProblem(tuple(job), message) for message in found]
            if not found:
                good.append((tuple(job), values))
    if not bad and check and check.inputs:
        bad = [JobProblem(job, message) for job, values in good for message in check.inputs(values)]
    if bad:
        raise InvalidSweep(bad, len(jobs), sweep_axes(jobs))
    return [PlannedRun(job, located(run_dir_for(values)), flat(values)) for job, values in good]


def sweep_axes(jobs: Sequence[Sequence[str]]) -> list[str]:
    """The override keys whose value is not the same in every job."""
    values: dict[str, set[str]] = {}
    in_jobs: Counter = Counter()
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
            in_jobs[key] += 1
    return [k for k, v in values.items() if len(v) > 1 or in_jobs[k] < len(jobs)]


def primary_config(arguments: Sequence[str], config_name: str = "config") -> DictConfig:
    """The config of `python -m benchmark -m <arguments>` before the sweep is expanded (with the
    `hydra` node: its sweeper params), composed from the non-sweep overrides."""
    overrides = single_valued(arguments)
    with hydra_context():
        while True:
            try:
                return compose(config_name, overrides=overrides, return_hydra_config=True)
            except COMPOSE_ERRORS as e:
                message = hydra_message(e)
                key = re.match(r"Could not override '([^']+)'", message)
                swept = len(overrides) < len(arguments)
                keep = [o for o in overrides if not key or o.lstrip("+~").split("=", 1)[0] != key[1]]
                if not swept or len(keep) == len(overrides):
                    raise InvalidSweep([JobProblem((), message)], 1) from None
                # a key that only some jobs' groups have (method.tau with method=ti,zoodip):
                # each job is checked on its own, naming the jobs that lack it
                overrides = keep


def plan_sweep(
    arguments: Sequence[str], config_name: str = "config", check: Check | None | str = "values"
) -> list[PlannedRun]:
    """Every run of `python -m benchmark -m <arguments>`, with the directory its record lands in;
    every job validated first (InvalidSweep: bad input, one line per value) by ``check``:
    "values" (the config values: enough to plan, report or count), "run" (also the images, weights
    and device a run needs; a job for another machine, SLURM, is not checked against this
    machine's devices), another Check, or None (compose only)."""
    primary = primary_config(arguments, config_name)
    params = primary.hydra.sweeper.params
    if check == "values":
        check = run_checks(check_device=False, inputs=False)
    elif check == "run":
        local = "basic_launcher" in str(OmegaConf.select(primary, "hydra.launcher._target_", default=""))
        check = run_checks(check_device=local)
    jobs = job_overrides(OmegaConf.to_container(params) if params else None, arguments)
    return plan_jobs(jobs, config_name, check)
