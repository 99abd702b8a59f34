"""Memory and speed measurement, identical for every method.

Every figure lands flat in the run's record; a figure the device cannot measure is None.

- CUDA allocator: ``max_memory_allocated`` / ``max_memory_reserved`` over training (reset after
  the model is loaded and set up, "after quantization" as the papers measure), and including
  the load.
- NVML (what nvidia-smi shows, the figure the papers quote): a background thread samples the
  process's and the device's used memory; peaks over training are kept. The CUDA context
  (with the loaded kernel libraries: memory the process holds outside PyTorch's allocator) is
  reported separately.
- Breakdown as in the ZOODiP paper's Figure 1a: model weights by dtype (counted from the
  model's parameters and buffers), and gradients, optimizer state, activations and other from
  the PyTorch profiler's memory timeline over the profiled step(s), at their peak. Works on
  CPU too. Activations include autograd temporaries.
- Speed: iterations per second after warm-up, excluding profiled steps.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHT_CATEGORIES = ("weights_fp32", "weights_fp16", "weights_bf16", "weights_int8", "weights_4bit")
CATEGORIES = (*WEIGHT_CATEGORIES, "gradients", "optimizer_state", "activations", "other")
CUDA_FIELDS = (
    "peak_allocated_bytes", "peak_reserved_bytes",
    "peak_allocated_with_load_bytes", "peak_reserved_with_load_bytes",
    "nvml_process_peak_bytes", "nvml_device_peak_bytes", "cuda_context_bytes",
)  # fmt: skip
BREAKDOWN_FIELDS = ("breakdown_peak_bytes", *(f"breakdown_{c}_bytes" for c in CATEGORIES), "breakdown_steps")


def weight_category(dtype: torch.dtype) -> str:
    """Model weights by storage dtype: uint8 holds packed 4-bit codes (methods/common/quant.py,
    bitsandbytes NF4), int8 8-bit codes; integer buffers (position ids) are "other"."""
    return {
        torch.float32: "weights_fp32", torch.float16: "weights_fp16", torch.bfloat16: "weights_bf16",
        torch.int8: "weights_int8", torch.uint8: "weights_4bit",
    }.get(dtype, "weights_fp32" if dtype.is_floating_point else "other")  # fmt: skip


def model_tensors(components, method) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(every parameter and buffer of the model and of the method's own modules, and the
    parameters among them plus the method's trainable tensors)."""
    modules = [*components.text_encoders, components.vae, components.unet]
    modules += [
        v
        for v in vars(method).values()
        if isinstance(v, torch.nn.Module) and all(v is not m for m in modules)
    ]
    tensors, params = [], []
    for module in modules:
        params += list(module.parameters())
        tensors += list(module.parameters()) + list(module.buffers())
    extra = [p for p in method.trainable_parameters().values() if all(p is not q for q in params)]
    return tensors + extra, params + extra


def update_rules(method) -> list[Any]:
    """The method's hand-written optimizers (objects with a ``step`` method that are neither
    modules nor torch optimizers, e.g. ZOODiP's ZO-Adam); torch optimizers are found by hooks."""
    return [
        v for v in vars(method).values()
        if callable(getattr(v, "step", None))
        and not isinstance(v, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor, type))
    ]  # fmt: skip


def optimizer_state_tensors(method) -> list[torch.Tensor]:
    """Tensors held by the method's optimizers: torch optimizers' state and the tensors (or
    lists of tensors) a hand-written optimizer keeps as attributes."""
    tensors: list[torch.Tensor] = []
    for v in vars(method).values():
        if isinstance(v, torch.optim.Optimizer):
            tensors += [
                t for state in v.state.values() for t in state.values() if isinstance(t, torch.Tensor)
            ]
    for rule in update_rules(method):
        for value in vars(rule).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            tensors += [t for t in items if isinstance(t, torch.Tensor)]
    return tensors


def weight_storages(tensors: list[torch.Tensor]) -> dict[int, tuple[str, int]]:
    """data pointer -> (weight category, bytes) of each distinct storage."""
    out: dict[int, tuple[str, int]] = {}
    for t in tensors:
        storage = t.untyped_storage()
        out.setdefault(storage.data_ptr(), (weight_category(t.dtype), storage.nbytes()))
    return out


# -- the profiler's memory timeline ---------------------------------------------------------


def profiled_breakdown(
    profile,
    device: torch.device,
    weights: dict[int, tuple[str, int]],
    optimizer_state: frozenset[int] = frozenset(),
) -> dict[str, int]:
    """Bytes per category at the profiled peak on ``device``. Weight storages (``weights``,
    by data pointer) count whole, whether or not the profiled steps touched them; storages in
    ``optimizer_state`` (data pointers: a hand-written optimizer's moments, which the profiler
    cannot recognise) are optimizer state."""
    from torch.profiler._memory_profiler import Action, Category, TensorKey

    kinds = {
        Category.GRADIENT: "gradients",
        Category.OPTIMIZER_STATE: "optimizer_state",
        Category.ACTIVATION: "activations",
        Category.TEMPORARY: "activations",
        Category.AUTOGRAD_DETAIL: "activations",
    }  # fmt: skip; INPUT, PARAMETER outside the model, unknown: other
    memory = profile._memory_profile()

    def kind(key, version) -> str | None:
        if not isinstance(key, TensorKey):
            return "other"
        if key.storage.ptr in weights:
            return None
        if key.storage.ptr in optimizer_state:
            return "optimizer_state"
        return kinds.get(memory._categories.get(key, version), "other")

    live = dict.fromkeys(("gradients", "optimizer_state", "activations", "other"), 0)
    peak, peak_total, time_now = {}, -1, None
    for t, action, (key, version), nbytes in memory.timeline:
        if key.device != device:
            continue
        if t != time_now:  # the state between two timestamps is a candidate peak
            if sum(live.values()) > peak_total:
                peak, peak_total = dict(live), sum(live.values())
            time_now = t
        if action in (Action.PREEXISTING, Action.CREATE):
            changes = [(kind(key, version), nbytes)]
        elif action == Action.INCREMENT_VERSION:
            changes = [(kind(key, version), -nbytes), (kind(key, version + 1), nbytes)]
        else:  # DESTROY
            changes = [(kind(key, version), -nbytes)]
        for name, delta in changes:
            if name is not None:
                live[name] += delta
    if sum(live.values()) > peak_total:
        peak = dict(live)
    out = dict.fromkeys(CATEGORIES, 0)
    for category, nbytes in [*weights.values(), *peak.items()]:
        out[category] += nbytes
    return out


# -- NVML ---------------------------------------------------------------------------------


class NvmlSampler:
    """Samples this process's and the whole device's used memory (nvidia-smi's figures) in a
    background thread and keeps the peaks. ``available`` is False where NVML cannot answer
    (no driver, no nvidia-ml-py); the process figure is None where NVML cannot see this
    process (e.g. a container's PID namespace)."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.available = False
        self.process_peak = self.device_peak = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            )
            self.available = self.read() is not None
        except Exception as e:  # no NVML here: the figures are None
            log.info("NVML unavailable (%s: %s): no nvidia-smi figures", type(e).__name__, e)

    def read(self) -> tuple[int | None, int] | None:
        """(this process's used bytes or None, the device's used bytes)."""
        try:
            device_used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return None
        mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
        return (sum(mine) if mine else None), int(device_used)

    def reset(self) -> None:
        sample = self.read() if self.available else None
        self.process_peak, self.device_peak = sample if sample else (None, None)

    def _update(self) -> None:
        sample = self.read()
        if sample is not None:
            process, device = sample
            if process is not None:
                self.process_peak = max(process, self.process_peak or 0)
            self.device_peak = max(device, self.device_peak or 0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def start(self) -> None:
        if self.available and self._thread is None:
            self.reset()
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._update()


# -- the monitor the train loop calls -------------------------------------------------------


class TrainingMonitor:
    """Wraps the train loop: ``loaded(components, method)`` after model load and setup,
    ``step_done()`` after every step, ``summary()`` for the record.

    Steps ``profile_start .. profile_start + profile_steps - 1`` (counted from the first step
    this process runs; by default step 1, the first with optimizer state) are profiled for the
    breakdown; they and the first ``warmup_steps`` are left out of it/s. ``profile_steps=0``
    turns the profiler off.
    """

    def __init__(self, device, warmup_steps: int = 2, profile_start: int = 1, profile_steps: int = 1):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.warmup_steps = warmup_steps
        self.profile_start, self.profile_steps = profile_start, profile_steps
        self.load_peak_allocated = self.load_peak_reserved = None
        self.step_times: list[float] = []
        self.profiled: set[int] = set()
        self.breakdown: dict[str, int] | None = None
        self._profile = None
        self._weights: dict[int, tuple[str, int]] | None = None
        self._optimizer_state: frozenset[int] = frozenset()
        self._last: float | None = None
        self.nvml = NvmlSampler(self.device) if self.cuda else None

    def loaded(self, components=None, method=None) -> None:
        """The model is loaded and set up: training starts now. What loading left cached in
        the allocator is returned to the driver, so NVML figures show training."""
        if components is not None and method is not None:
            self._weights = weight_storages(model_tensors(components, method)[0])
            moments = {t.untyped_storage().data_ptr() for t in optimizer_state_tensors(method)}
            self._optimizer_state = frozenset(moments - set(self._weights))
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.load_peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.load_peak_reserved = torch.cuda.max_memory_reserved(self.device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.nvml.start()  # stopped by summary()
        if self.profile_steps and self.profile_start == 0:
            self._start_profile()
        self._last = time.perf_counter()

    def _start_profile(self) -> None:
        if self._weights is None:
            return  # the breakdown needs to know the weights (loaded(components, method))
        self._profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],  # allocations on every device
            record_shapes=True, profile_memory=True, with_stack=True,
        )  # fmt: skip
        self._profile.start()

    def _finish_profile(self) -> None:
        if self._profile is None:
            return
        self._profile.stop()
        try:
            self.breakdown = profiled_breakdown(
                self._profile, self.device, self._weights, self._optimizer_state
            )
        except Exception as e:  # the profiler's analysis is private API: never fail a run on it
            log.warning("memory breakdown failed (%s: %s); its fields stay None", type(e).__name__, e)
        self._profile = None

    def step_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        index = len(self.step_times)
        self.step_times.append(now - (self._last if self._last is not None else now))
        if self._profile is not None:
            self.profiled.add(index)
            if index + 1 == self.profile_start + self.profile_steps:
                self._finish_profile()
        elif self.profile_steps and index + 1 == self.profile_start and self.breakdown is None:
            self._start_profile()
        self._last = time.perf_counter()  # profiler start/stop and analysis are not step time

    def summary(self) -> dict[str, Any]:
        self._finish_profile()  # a run shorter than the profiled window
        timed = [
            t for i, t in enumerate(self.step_times) if i >= self.warmup_steps and i not in self.profiled
        ]
        timed = (
            timed or [t for i, t in enumerate(self.step_times) if i not in self.profiled] or self.step_times
        )
        out: dict[str, Any] = dict.fromkeys((*CUDA_FIELDS, *BREAKDOWN_FIELDS))
        out["it_per_s"] = len(timed) / sum(timed) if timed and sum(timed) > 0 else None
        if self.breakdown is not None:
            out.update({f"breakdown_{c}_bytes": v for c, v in self.breakdown.items()})
            out["breakdown_peak_bytes"] = sum(self.breakdown.values())
            out["breakdown_steps"] = len(self.profiled)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            alloc = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            out.update(
                peak_allocated_bytes=alloc,
                peak_reserved_bytes=reserved,
                peak_allocated_with_load_bytes=max(alloc, self.load_peak_allocated or 0),
                peak_reserved_with_load_bytes=max(reserved, self.load_peak_reserved or 0),
            )
            self.nvml.stop()
            out["nvml_process_peak_bytes"] = self.nvml.process_peak
            out["nvml_device_peak_bytes"] = self.nvml.device_peak
            now = self.nvml.read() if self.nvml.available else None
            if now and now[0] is not None:  # held by the process outside PyTorch's allocator
                out["cuda_context_bytes"] = now[0] - torch.cuda.memory_reserved(self.device)
        return out
