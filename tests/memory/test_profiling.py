"""Measured memory and speed (benchmark/memory/profiling.py): the profiler's breakdown on the tiny
model, the speed bookkeeping, and the figures every run record carries."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmark import data, models
from benchmark.config import method_config, training_dtype
from benchmark.memory.profiling import BREAKDOWN_FIELDS, CATEGORIES, CUDA_FIELDS, NvmlSampler, TrainingMonitor
from benchmark.train import train
from methods.common.registry import method_class


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
    monkeypatch.setattr("benchmark.memory.profiling.time.perf_counter", lambda: next(clock))
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


@pytest.mark.integration
def test_records_carry_every_figure(tiny_cfg):
    from benchmark.run import run

    # step 0 warm-up, 1 profiled, 2 timed
    record = run(tiny_cfg("method=zoodip", "train.max_steps=3", "train.profile_steps=1"))
    assert record["status"] == "ok"
    for key in CUDA_FIELDS:  # the CPU cannot measure them: None, never 0
        assert key in record and record[key] is None, key
    for key in BREAKDOWN_FIELDS:
        assert isinstance(record[key], int), key
    assert record["breakdown_steps"] == 1
    assert record["breakdown_gradients_bytes"] == 0 and record["breakdown_peak_bytes"] > 0
    for key in ("it_per_s", "train_seconds", "generation_seconds"):
        assert record[key] > 0, key
    assert record["artifact_bytes"] > 0
    assert record["forward_passes_per_step"] == 3  # n = 2 perturbations + the unperturbed loss


# -- the CUDA and NVML bookkeeping, against a scripted allocator and driver --------------------

GiB = 2**30


class ScriptedGpu:
    """torch.cuda's memory functions and nvidia-ml-py's answers for one process on one device:
    ``alloc`` / ``free`` move PyTorch's allocator; the driver sees the allocator's reserved
    bytes plus the CUDA context (and another process's memory on the device)."""

    def __init__(self, context: int, other_process: int, process_visible: bool = True):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.context, self.other_process, self.process_visible = context, other_process, process_visible
        self.uuids: list[str] = []

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.reserved = max(self.reserved, self.allocated)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes  # the allocator keeps it reserved (cached)

    def install(self, monkeypatch) -> None:
        import os
        import sys
        import types

        cuda = {
            "current_device": lambda: 0,
            "synchronize": lambda device=None: None,
            "max_memory_allocated": lambda device=None: self.peak_allocated,
            "max_memory_reserved": lambda device=None: self.peak_reserved,
            "memory_reserved": lambda device=None: self.reserved,
            "empty_cache": lambda: setattr(self, "reserved", self.allocated),
            "reset_peak_memory_stats": lambda device=None: self.__dict__.update(
                peak_allocated=self.allocated, peak_reserved=self.reserved
            ),
            "get_device_properties": lambda device: types.SimpleNamespace(uuid="0d1e-2f"),
        }
        for name, fn in cuda.items():
            monkeypatch.setattr(torch.cuda, name, fn)
        mine = lambda: self.reserved + self.context  # noqa: E731
        processes = lambda handle: [  # noqa: E731
            types.SimpleNamespace(pid=os.getpid() if self.process_visible else -1, usedGpuMemory=mine()),
            types.SimpleNamespace(pid=-2, usedGpuMemory=self.other_process),
        ]
        nvml = types.SimpleNamespace(
            nvmlInit=lambda: None,
            nvmlDeviceGetHandleByUUID=lambda uuid: self.uuids.append(uuid) or "handle",
            nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=mine() + self.other_process),
            nvmlDeviceGetComputeRunningProcesses=processes,
        )
        monkeypatch.setitem(sys.modules, "pynvml", nvml)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the NVML sampler thread never saw the state"
        time.sleep(0.005)


def scripted_training(gpu: ScriptedGpu, monkeypatch) -> dict:
    """Load (10 GiB weights, 4 GiB of load-time buffers freed again), then 3 steps that each
    hold 3 GiB of activations, sampled by the NVML thread while they are alive."""
    gpu.install(monkeypatch)
    monitor = TrainingMonitor("cuda", warmup_steps=0, profile_steps=0)
    gpu.alloc(10 * GiB)
    gpu.alloc(4 * GiB)
    gpu.free(4 * GiB)
    monitor.loaded()
    assert monitor.nvml.available
    for _ in range(3):
        gpu.alloc(3 * GiB)
        if gpu.process_visible:
            wait_for(lambda: monitor.nvml.process_peak == 13 * GiB + gpu.context)
        else:
            wait_for(lambda: monitor.nvml.device_peak == 13 * GiB + gpu.context + gpu.other_process)
        gpu.free(3 * GiB)
        monitor.step_done()
    return monitor.summary()


def test_cuda_peaks_are_reset_after_load_and_nvml_adds_the_context(monkeypatch):
    gpu = ScriptedGpu(context=GiB // 2, other_process=GiB)
    summary = scripted_training(gpu, monkeypatch)
    assert gpu.uuids == ["GPU-0d1e-2f"]  # torch's bare UUID, in NVML's spelling
    assert summary["peak_allocated_bytes"] == 13 * GiB  # weights + activations, not the load
    assert summary["peak_reserved_bytes"] == 13 * GiB  # the load's cache was given back first
    assert summary["peak_allocated_with_load_bytes"] == 14 * GiB
    assert summary["peak_reserved_with_load_bytes"] == 14 * GiB
    assert summary["nvml_process_peak_bytes"] == 13 * GiB + GiB // 2
    assert summary["nvml_device_peak_bytes"] == 13 * GiB + GiB // 2 + GiB  # the other process too
    assert summary["cuda_context_bytes"] == GiB // 2
    assert summary["it_per_s"] > 0


def test_nvml_without_this_process_keeps_the_device_figure_only(monkeypatch):
    """In a container's PID namespace NVML lists no process of ours: None, never 0."""
    gpu = ScriptedGpu(context=GiB // 2, other_process=GiB, process_visible=False)
    summary = scripted_training(gpu, monkeypatch)
    assert summary["nvml_process_peak_bytes"] is None and summary["cuda_context_bytes"] is None
    assert summary["nvml_device_peak_bytes"] == 13 * GiB + GiB // 2 + GiB
    assert summary["peak_allocated_bytes"] == 13 * GiB


@pytest.mark.integration
def test_profile_steps_zero_turns_the_profiler_off(tiny_cfg):
    from benchmark.run import run

    record = run(tiny_cfg("method=ti", "train.max_steps=2", "train.profile_steps=0"))
    assert record["status"] == "ok"
    assert all(record[key] is None for key in BREAKDOWN_FIELDS)
