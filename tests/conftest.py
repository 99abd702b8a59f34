"""Shared fixtures: the real DreamBooth images from ../shared, Hydra configs for the tiny model.

Nothing here downloads: the hub is switched off for every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def _dataset_root() -> Path:
    env = os.environ.get("DREAMBOOTH_DATASET")
    return Path(env) if env else REPO.parent / "shared" / "dreambooth" / "dataset"


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


FEW_IMAGENET_CLASSES = 8


@pytest.fixture(autouse=True)
def _few_imagenet_classes(monkeypatch):
    """GF-TI's default init attends over 1,000 ImageNet class names x 80 templates (~17 s of CPU
    on the tiny model): tests take the first 8 names, all 80 templates. test_gfti checks the full
    lists against feizc's and the computation against a transcription of his code."""
    from methods.common import gfti_init

    full = gfti_init.imagenet_classes

    def few():
        names, templates = full()
        return names[:FEW_IMAGENET_CLASSES], templates

    monkeypatch.setattr(gfti_init, "imagenet_classes", few)


@pytest.fixture(scope="session")
def dataset_root() -> Path:
    """The DreamBooth dataset folder. Without it a test skips here and fails in CI (CI=true),
    where a missing dataset must not pass as a green run."""
    root = _dataset_root()
    if not (root / "dog6").is_dir():
        message = f"DreamBooth dataset not found at {root} (set DREAMBOOTH_DATASET)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


def compose(overrides: list[str]):
    """The run config as `python -m benchmark <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny_cfg(tmp_path, dataset_root):
    """Factory: compose a tiny-model, smoke-eval config writing into tmp_path."""

    def make(*overrides: str):
        base = [
            "model=tiny",
            f"data.root={dataset_root}",
            f"paths.results={tmp_path / 'results'}",
            "train.progress=false",
            # the profiler costs seconds a run; tests/memory/test_profiling.py turns it on
            "train.profile_steps=0",
        ]
        return compose(base + list(overrides))

    return make


def run_sweep_in_process(arguments: list[str]) -> list[dict]:
    """The records of `python -m benchmark -m <arguments>`, its runs made one after the other in this
    process (no interpreter start-up, no import of torch and diffusers per sweep). For tests about
    what a sweep's runs hold, not about the command: tests/sweep/test_sweep.py runs the command and checks
    that plan_sweep names the directories Hydra's jobs write."""
    from benchmark.records import RECORD_NAME, read_record
    from benchmark.run import run, run_dir_for
    from benchmark.sweep.plan import plan_sweep

    records = []
    for planned in plan_sweep(arguments, check="run"):
        cfg = compose(list(planned.overrides))
        assert run_dir_for(cfg) == planned.run_dir, planned.overrides
        run(cfg)
        records.append(read_record(planned.run_dir / RECORD_NAME))  # as written, for the report
    return records


def set_up_method(cfg, images, steps: int = 3):
    """The method of ``cfg`` (its train.* savers on) built and set up on its model for dog6,
    precomputed over ``images`` for ``steps`` steps: ready for its first step, as the harness
    leaves it."""
    from benchmark import data, models
    from benchmark.config import make_method, method_config, training_dtype

    method_cfg = method_config(cfg)
    components = models.load_components(cfg.model, dtype=training_dtype(method_cfg))
    method = make_method(cfg, method_cfg)
    method.setup(components, data.get_subject("dog6"))
    method.precompute(images, 0, steps)
    return method


class OnDemand(dict):
    """{key: make(key)}, each value made on first access: a test selected alone (``-k``, the
    mutants of ``nox -s mutants``) makes only what it reads of a shared fixture."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        value = self[key] = self.make(key)
        return value
