"""The command line checked before Hydra starts: `python -m benchmark` and `python -m benchmark.memory`.

Bad input exits 2 with one line per bad value and writes nothing (Hydra has not made its
``hydra/<time>/`` folder yet): a name Hydra does not know, a key without ``+``, a syntax error,
an unwritable results folder, a corrupt record, and, for a sweep (``-m``), every value of every
job, before the first job trains. ``--help``, ``--hydra-help``, ``--info`` and
``--experimental-rerun`` go straight to Hydra; ``--cfg`` is only composed. Nothing here imports
diffusers or transformers until every value has passed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmark.sweep.plan import (
    Check,
    InvalidSweep,
    JobProblem,
    PlannedRun,
    parse_overrides,
    plan_jobs,
    plan_sweep,
    run_checks,
)
from benchmark.sweep.status import corrupt_reason, run_state


def hydra_arguments(argv: Sequence[str]):
    """Hydra's own parse of the command line (argparse: an unknown flag exits 2 itself)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(argv))


def problems(argv: Sequence[str], config_name: str = "config", check: Check | str | None = "run"):
    """The lines to print for bad input; empty: Hydra may run the command line."""
    args = hydra_arguments(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return []
    if args.config_path or args.config_dir or args.config_name not in (None, config_name):
        return []  # another config tree: Hydra's checks alone
    if args.cfg:
        check = None
    try:
        if args.multirun:
            runs = plan_sweep(args.overrides, config_name, check)
        else:
            runs = plan_single(args.overrides, config_name, run_checks() if check == "run" else check)
    except InvalidSweep as e:
        return e.lines()
    return corrupt_records(runs) if check == "run" and not args.cfg else []


def plan_single(overrides: Sequence[str], config_name: str, check: Check | None) -> list[PlannedRun]:
    sweeps = [a for a, o in zip(overrides, parse_overrides(overrides)) if o.is_sweep_override()]
    if sweeps:
        raise sweep_without_m(sweeps[0])
    return plan_jobs([list(overrides)], config_name, check)


def sweep_without_m(argument: str) -> InvalidSweep:
    message = f"{argument} is a list of values: add -m (--multirun) to run one job per value"
    return InvalidSweep([JobProblem((), message)], 1)


def corrupt_records(runs: Sequence[PlannedRun]) -> list[str]:
    """A record that does not parse stops the command: the user decides whether it goes or stays."""
    return [f"error: {corrupt_reason(r.run_dir)}" for r in runs if run_state(r.run_dir) == "corrupt"]


def exit_on_bad_input(argv: Sequence[str], config_name: str = "config", check: Check | str | None = "run"):
    lines = problems(argv, config_name, check)
    if lines:
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)
