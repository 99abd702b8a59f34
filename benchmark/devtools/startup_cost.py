"""CPU seconds of the processes the suite, SLURM jobs and users' sweeps start:
`python -m benchmark.devtools.startup_cost [--repeat N]` (`nox -s startup`).

Each kind runs N times in a fresh interpreter on the tiny model (the overrides the tests use);
it prints, per kind, the median user+sys CPU seconds of the whole process, the same for a
process that only imports the modules that one had imported when it exited (the imports' share)
and which optional backends it imported.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=tiny", "train.max_steps=1", "train.progress=false", "train.profile_steps=0"]
KINDS = {
    "run (ti, tiny, 1 step, smoke eval)": ["benchmark", "method=ti", "subject=dog6", "eval=smoke", *TINY],
    "run refused (bad subject, exit 2)": ["benchmark", "method=ti", "subject=dgo7", *TINY],
    "sweep status (table1)": ["benchmark.sweep", "experiment=table1", "model=tiny"],
    "report (table1, no records)": ["benchmark.report", "experiment=table1", "model=tiny"],
    "memory (ti, tiny, predicted)": ["benchmark.memory", "method=ti", "model=tiny"],
}
BACKENDS = ("bitsandbytes", "torchao", "peft", "torchvision", "torch._dynamo", "transformers", "diffusers")


def cpu_seconds(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def modules_at_exit(command: list[str], env: dict[str, str]) -> list[str]:
    """The modules the same process has imported when it exits, in import order."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = {command[2:]!r}\n"
        "try:\n"
        f"    runpy.run_module({command[2]!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', *[name for name, m in sys.modules.items() if executed(m)])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", EXECUTED + script], cwd=REPO, env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("MODULES")]
    if not lines:
        raise RuntimeError(done.stderr[-2000:])
    return lines[-1].split()[1:]


# a module that a lazy loader registered but nothing has used yet is not counted as imported
EXECUTED = (
    "import importlib.util\ndef executed(m):\n    return not isinstance(m, importlib.util._LazyModule)\n"
)


def kind_command(module: str, overrides: list[str], dataset: str, results: str) -> list[str]:
    return [sys.executable, "-m", module, *overrides, f"data.root={dataset}", f"paths.results={results}"]


def import_only(modules: list[str], results: str) -> list[str]:
    """A command that imports just these modules, in this order, and does nothing else."""
    names = [name for name in modules if name != "__main__" and not name.endswith(".__main__")]
    script = Path(results) / "import_only.py"
    script.write_text(
        f"import importlib\nfor name in {names!r}:\n"
        "    try:\n        importlib.import_module(name)\n    except BaseException:\n        pass\n"
    )
    return [sys.executable, "-c", f"exec(open({str(script)!r}).read())"]  # -c: the repository's modules


def median_cpu(make_command, repeat: int, env: dict[str, str]) -> float:
    seconds = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as results:  # a fresh results folder: nothing to resume
            cpu, done = cpu_seconds(make_command(results), env)
        if done.returncode not in (0, 2):
            raise RuntimeError(f"exit {done.returncode}: {done.stderr[-2000:]}")
        seconds.append(cpu)
    return statistics.median(seconds)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("kinds", nargs="*", help="the first word of each kind to measure (default: all)")
    args = parser.parse_args(argv)
    dataset = os.environ.get("DREAMBOOTH_DATASET", str(REPO.parent / "shared/dreambooth/dataset"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    print(f"{'process':38s} {'CPU s':>6s} {'imports s':>9s}  optional backends imported")
    for kind, (module, *overrides) in KINDS.items():
        if args.kinds and kind.split()[0] not in args.kinds:
            continue

        command = functools.partial(kind_command, module, overrides, dataset)
        cpu = median_cpu(command, args.repeat, env)
        with tempfile.TemporaryDirectory() as results:
            modules = modules_at_exit(command(results), env)
        imports = median_cpu(functools.partial(import_only, modules), args.repeat, env)
        backends = [name for name in BACKENDS if name in modules]
        print(f"{kind:38s} {cpu:6.1f} {imports:9.1f}  {' '.join(backends)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
