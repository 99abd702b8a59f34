"""Memory and speed measurement, identical for every method.

On CUDA: allocator peaks (max_memory_allocated / reserved) over training, reset after the
model is loaded, and also including the load. On CPU the allocator figures are None.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class TrainingMonitor:
    """Wraps the train loop: ``loaded()`` after model load, ``step_done()`` per step, ``summary()``."""

    def __init__(self, device: torch.device, warmup_steps: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.load_peak_allocated = self.load_peak_reserved = None
        self.step_times: list[float] = []
        self._last = None

    def loaded(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.load_peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.load_peak_reserved = torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._last = time.perf_counter()

    def step_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now

    def summary(self) -> dict[str, Any]:
        timed = self.step_times[self.warmup_steps :] or self.step_times
        out: dict[str, Any] = {"it_per_s": len(timed) / sum(timed) if timed and sum(timed) > 0 else None}
        if self.cuda:
            alloc = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            out.update(
                peak_allocated_bytes=alloc,
                peak_reserved_bytes=reserved,
                peak_allocated_with_load_bytes=max(alloc, self.load_peak_allocated or 0),
                peak_reserved_with_load_bytes=max(reserved, self.load_peak_reserved or 0),
            )
        else:
            out.update(
                peak_allocated_bytes=None,
                peak_reserved_bytes=None,
                peak_allocated_with_load_bytes=None,
                peak_reserved_with_load_bytes=None,
            )
        return out
