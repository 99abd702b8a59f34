"""The lock (.ci/constraints.txt) that `.ci/install` installs: exact pins for every package the
project and its test extras need, each inside pyproject.toml's ranges."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return [Requirement(r) for r in listed]


def test_the_lock_pins_every_requirement_inside_its_range():
    pins = _lock()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in .ci/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} is outside pyproject.toml's {requirement.specifier}"
        )


def test_ci_installs_the_locked_torch_pair_through_the_lock():
    install = (REPO / ".ci" / "install").read_text()
    pins = _lock()
    pairs = re.findall(r'"(torch|torchvision)==([0-9.]+)"', install)
    assert {name for name, _ in pairs} == {"torch", "torchvision"}
    for name, version in pairs:
        assert pins[name] == Version(version), name
    installs = [
        line for line in install.splitlines() if "pip install" in line and "--upgrade pip" not in line
    ]
    assert installs and all("-c .ci/constraints.txt" in line for line in installs)


@pytest.mark.integration
@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_dataset_fails_in_ci_and_skips_elsewhere(ci, outcome, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CI": ci, "DREAMBOOTH_DATASET": str(tmp_path / "no_dataset")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "tests/test_data.py::test_load_images_real_subject"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert outcome in done.stdout and (done.returncode != 0) == (ci == "true"), done.stdout[-2000:]
