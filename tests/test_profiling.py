"""Measured memory and speed (benchmark/profiling.py): the profiler's breakdown on the tiny
model, the speed bookkeeping, and the figures every run record carries."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.profiling import BREAKDOWN_FIELDS, CATEGORIES, CUDA_FIELDS, NvmlSampler, TrainingMonitor
from benchmark.train import train
from methods.registry import method_class


def profiled_training(tiny_cfg, tmp_path, method_name: str, *overrides: str):
    """Two steps of ``method_name`` on the tiny model; the second is profiled."""
    cfg = tiny_cfg(f"method={method_name}", *overrides)
    method_cfg = method_config(cfg)
    components = models.load_components(cfg.model, dtype=training_dtype(method_cfg))
    method = method_class(method_name)(method_cfg)
    method.setup(components, data.get_subject("dog6"))
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    method.precompute(images, 0, 2)
    monitor = TrainingMonitor("cpu", profile_start=1, profile_steps=1)
    monitor.loaded(components, method)
    train(
        method,
        images,
        2,
        1,
        0,
        tmp_path,
        torch.device("cpu"),
        checkpoint_every=0,
        progress=False,
        monitor=monitor,
    )
    return method, monitor.summary()


def test_dreambooth_optimizer_state_is_twice_the_trainable_bytes(tiny_cfg, tmp_path):
    method, summary = profiled_training(tiny_cfg, tmp_path, "dreambooth")
    params = list(method.trainable_parameters().values())
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    # AdamW: exp_avg and exp_avg_sq per parameter, plus its 4-byte `step` counter (a CPU scalar)
    assert summary["breakdown_optimizer_state_bytes"] == 2 * trainable_bytes + 4 * len(params)
    assert summary["breakdown_gradients_bytes"] >= trainable_bytes  # the peak is in the optimizer step
    assert summary["breakdown_weights_fp32_bytes"] > trainable_bytes  # the whole model, U-Net included
    assert summary["breakdown_steps"] == 1
    assert summary["breakdown_peak_bytes"] == sum(summary[f"breakdown_{c}_bytes"] for c in CATEGORIES)


def test_zoodip_has_no_gradient_bytes(tiny_cfg, tmp_path):
    method, summary = profiled_training(tiny_cfg, tmp_path, "zoodip")
    assert summary["breakdown_gradients_bytes"] == 0
    assert summary["breakdown_weights_int8_bytes"] > 0  # the INT8 model
    moments = sum(t.numel() * t.element_size() for t in method.adam.m + method.adam.v)
    assert summary["breakdown_optimizer_state_bytes"] == moments  # ZO-Adam's m and v
    assert all(summary[k] is None for k in CUDA_FIELDS)  # the CPU cannot measure them


def test_it_per_s_leaves_out_warmup_and_profiled_steps(monkeypatch):
    clock = itertools.count(0.0, 1.0)  # every perf_counter() call advances one second
    monitor = TrainingMonitor("cpu", warmup_steps=1, profile_steps=0)
    monkeypatch.setattr("benchmark.profiling.time.perf_counter", lambda: next(clock))
    monitor.loaded()
    for _ in range(4):
        next(clock)  # the step itself takes one more second: two seconds per step
        monitor.step_done()
    monitor.profiled = {1}  # as if step 1 had been profiled
    summary = monitor.summary()
    assert summary["it_per_s"] == pytest.approx(0.5)  # steps 2 and 3: 2 steps in 4 s
    assert summary["breakdown_peak_bytes"] is None  # nothing was profiled


def test_nvml_is_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    sampler = NvmlSampler(torch.device("cuda", 0))
    assert not sampler.available
    sampler.start()
    sampler.stop()
    assert sampler.process_peak is None and sampler.device_peak is None


def test_records_carry_every_figure(tiny_cfg):
    from benchmark.run import run

    record = run(tiny_cfg("method=zoodip", "train.max_steps=3"))  # step 0 warm-up, 1 profiled, 2 timed
    assert record["status"] == "ok"
    for key in CUDA_FIELDS:  # the CPU cannot measure them: None, never 0
        assert key in record and record[key] is None, key
    for key in BREAKDOWN_FIELDS:
        assert isinstance(record[key], int), key
    assert record["breakdown_gradients_bytes"] == 0 and record["breakdown_peak_bytes"] > 0
    for key in ("it_per_s", "train_seconds", "generation_seconds"):
        assert record[key] > 0, key
    assert record["artifact_bytes"] > 0
    assert record["forward_passes_per_step"] == 3  # n = 2 perturbations + the unperturbed loss
