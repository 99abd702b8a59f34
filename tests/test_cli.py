"""The CLI end to end on the tiny model and the real DreamBooth images."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmark.records import REQUIRED_FIELDS
from benchmark.run import run

REPO = Path(__file__).resolve().parents[1]


# `python -m benchmark` (runpy does what -m does), then, at exit, which deferred backends ran
CLI = (
    "import atexit, runpy, sys\n"
    "from benchmark.lazy_backends import DEFERRED, executed\n"
    "atexit.register(lambda: print('backends run:', *filter(executed, DEFERRED), file=sys.stderr))\n"
    "runpy.run_module('benchmark', run_name='__main__', alter_sys=True)\n"
)

pytestmark = pytest.mark.integration


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ti_run_writes_a_complete_run_directory(tmp_path, dataset_root):
    results = tmp_path / "results"
    proc = run_cli(
        "method=ti",
        "subject=dog6",
        "model=tiny",
        f"data.root={dataset_root}",
        f"paths.results={results}",
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (results / "runs" / "ti" / "dog6").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(record)
    assert record["status"] == "ok" and record["method"] == "ti" and record["subject"] == "dog6"
    assert record["run_key"] == run_dir.name and run_dir.name.endswith("-" + record["data_images"])
    assert record["data_root"] == str((dataset_root / "dog6").resolve())
    for key in ("clip_t", "clip_i", "dino", "dino_inter", "train_seconds"):
        assert isinstance(record[key], float) and math.isfinite(record[key]), key
    assert record["train_steps"] == record["train_step_cap"] == 4  # the tiny model caps steps
    assert f"training 4 of method.steps={record['method.steps']} steps (train.max_steps=4)" in proc.stdout
    assert sorted(p.name for p in results.iterdir()) == ["runs"]  # no empty hydra/<time>/ left
    assert record["trainable_params"] == 32  # one token row of the tiny text encoder
    artifact = run_dir / "learned_embeds.safetensors"
    assert record["artifact_bytes"] == artifact.stat().st_size
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.method.name == "ti" and saved.model.name == "tiny" and saved.subject == "dog6"
    n_images = len(list((run_dir / "images").glob("*.png")))
    assert record["n_images"] == 2 and n_images >= 2
    # CPU: allocator figures are unmeasurable -> null, never 0
    assert record["peak_allocated_bytes"] is None
    assert not (run_dir / "checkpoint.pt").exists()
    # diffusers and peft import bitsandbytes at start-up; only QLoRA uses it (benchmark.lazy_backends)
    assert proc.stderr.splitlines()[-1] == "backends run:"


def test_a_deferred_backend_is_the_real_module_on_first_use():
    import bitsandbytes as bnb

    from benchmark.lazy_backends import executed

    assert bnb.nn.Linear4bit.__module__ == "bitsandbytes.nn.modules" and executed("bitsandbytes")
    assert isinstance(bnb.functional.QuantState, type)


def test_real_mode_scores_the_real_images(tiny_cfg):
    record = run(tiny_cfg("mode=real", "subject=cat"))
    assert record["method"] == "real" and record["status"] == "ok"
    assert 0 < record["clip_i"] < 1 and 0 < record["dino"] < 1
    assert record["n_images"] == len(list((Path(tiny_cfg().data.root) / "cat").glob("*.jpg")))


def test_real_model_without_weights_fails_at_once_saying_how_to_get_them(tmp_path, dataset_root, monkeypatch):
    import huggingface_hub.constants

    from benchmark import models
    from tests.conftest import compose

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("tried to load a model"))
    cfg = compose(
        ["method=ti", f"data.root={dataset_root}", f"paths.results={tmp_path}", "device=cpu"]
    )  # sd15
    with pytest.raises(models.WeightsUnavailable, match="model.path=") as error:
        run(cfg)
    assert "\n" not in str(error.value)
