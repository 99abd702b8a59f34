"""Deliberate breakages the known-answer tests must catch (`nox -s mutants`; not part of CI).

Each mutant is one text substitution (its pattern found exactly once) applied alone to a scratch
copy of the tree (without .git and results/), then only the tests meant to catch it are run
there. A mutant is caught when those tests fail (pytest exit status 1). The last line printed is
``mutants caught: k/n``. tests/recovery/test_mutants.py checks in CI that every pattern and
every test named here still exists, so the list cannot rot silently.

    python -m benchmark.devtools.mutants [name ...]   # all, or the named mutants only
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKEN_ARMS = (
    "tests/recovery/test_recovery_token_arms.py::test_every_token_method_closes_a_real_part_of_the_gap"
)
WEIGHT_ARMS = "tests/recovery/test_recovery_weights.py::test_every_weight_arm_closes_a_real_part_of_the_gap"
APPLY = (
    "tests/recovery/test_recovery.py::"
    "test_the_methods_apply_of_the_teacher_matches_the_teacher_put_in_directly"
)
ONE_RUN = "tests/recovery/test_recovery.py::test_one_run_per_teacher_kind_records_its_curve"


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str  # the class of breakage
    path: str  # relative to the repository root
    old: str  # found exactly once in path
    new: str
    tests: tuple[str, ...]  # pytest node ids meant to catch it


MUTANTS = (
    Mutant("zoodip_update_zeroed", "an update zeroed", "methods/zoodip.py",
           "self.adam.step([grad])", "self.adam.step([grad * 0])", (f"{TOKEN_ARMS}[zoodip]",)),
    Mutant("ti_step_skipped", "a step skipped", "methods/ti.py",
           "        self.optimize(loss, self.tables)\n", "        loss.backward()\n", (f"{TOKEN_ARMS}[ti]",)),
    Mutant("zoodip_lr_quartered", "a learning rate quartered", "methods/zoodip.py",
           "ZOAdam([self.token], cfg.lr,", "ZOAdam([self.token], cfg.lr * 0.25,", (f"{TOKEN_ARMS}[zoodip]",)),
    Mutant("peqa_lr_quartered", "a learning rate quartered", "conf/experiment/recovery/peqa.yaml",
           "lr: 1.0e-5", "lr: 2.5e-6", (f"{WEIGHT_ARMS}[peqa]",)),
    Mutant("peqa_apply_drops_scales", "an apply that drops part of the artifact", "methods/peqa.py",
           '                layer.scale.copy_(artifact[f"{name}.scale"])',
           '                layer.scale.copy_(artifact[f"{name}.scale"]) if len(name) % 2 else None',
           (f"{APPLY}[peqa]", f"{WEIGHT_ARMS}[peqa]")),
    Mutant("score_on_start", "the score taken on the start", "benchmark/recovery/run.py",
           "if step == 0 else scores_with(artifact)", "if step == 0 else scores_with(initial)", (ONE_RUN,)),
    Mutant("zoti_naive_stopped", "a comparison arm broken", "conf/experiment/recovery/zoti_naive.yaml",
           "lr: 1.0e-3", "lr: 1.0e-9", (f"{TOKEN_ARMS}[zoti_naive]",)),
    Mutant("zoodip_spsa_stopped", "a comparison arm broken", "conf/experiment/recovery/zoodip_spsa.yaml",
           "lr: 1.0e-3", "lr: 1.0e-9", (f"{TOKEN_ARMS}[zoodip_spsa]",)),
)  # fmt: skip


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: {mutant.old!r} found {count} times in {mutant.path}; need 1")
    path.write_text(text.replace(mutant.old, mutant.new))


def scratch_copy(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", "results", ".venv", ".nox", "__pycache__", ".ruff_cache", "*.egg-info"
    )
    return Path(shutil.copytree(REPO, destination, ignore=ignore))


def caught(mutant: Mutant, env: dict[str, str]) -> tuple[bool, str]:
    """(its tests failed, a one-line summary) with ``mutant`` applied to a scratch copy."""
    with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as tmp:
        root = scratch_copy(Path(tmp) / "tree")
        apply(mutant, root)
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        done = subprocess.run(command, cwd=root, env={**env, "PYTHONPATH": str(root)},
                              capture_output=True, text=True)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    why = next((line.strip() for line in lines if line.startswith("E ")), "")  # the first failed assertion
    summary = lines[-1] if lines else f"exit {done.returncode}"
    return done.returncode == 1, f"{summary}{'; ' + why[:160] if why else ''}"


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(
            f"unknown mutant(s) {sorted(unknown)}; choose from: {', '.join(m.name for m in MUTANTS)}"
        )
    dataset = Path(os.environ.get("DREAMBOOTH_DATASET", REPO.parent / "shared/dreambooth/dataset"))
    if not (dataset / "dog6").is_dir():  # else every test would skip: nothing caught, nothing learnt
        raise SystemExit(f"DreamBooth dataset not found at {dataset} (set DREAMBOOTH_DATASET)")
    env = {**os.environ, "DREAMBOOTH_DATASET": str(dataset.resolve()), "HF_HUB_OFFLINE": "1"}
    env.pop("CI", None)
    count = 0
    for mutant in chosen:
        start = time.monotonic()
        hit, summary = caught(mutant, env)
        count += hit
        verdict = "caught" if hit else "MISSED"
        print(
            f"{verdict:7s} {mutant.name} ({mutant.kind}; {time.monotonic() - start:.0f} s): {summary}",
            flush=True,
        )
    print(f"mutants caught: {count}/{len(chosen)}")
    return 0 if count == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
