"""The device-level figure (what nvidia-smi shows for the process) from a traced allocation
sequence: the sequence replayed through the caching-allocator model
(benchmark/memory/caching_allocator.py), whose peak of reserved segments is added to a stated
term for the CUDA context and library workspaces.

The replay starts where training starts: what is live after the model is loaded and set up is
allocated in birth order into an allocator whose cache was emptied (``benchmark.run`` and
``benchmark.memory.cli`` call ``torch.cuda.empty_cache()`` there), then every allocation and
free of the traced steps follows in order. Not modelled: how loading fragmented the segments
that stay (the live blocks are taken as packed in birth order), and the blocks a replayed
module call (benchmark/memory/pass_replay.py) frees inside itself: the call's storages live at
its peak are made and freed at once (a repeat of an identical call reuses the blocks the
traced calls left cached, so it adds no segment).
"""

from __future__ import annotations

import dataclasses

from benchmark.memory.caching_allocator import CachingAllocator

# The CUDA context and library workspaces (cuBLAS, cuDNN): not allocated through PyTorch's
# allocator. 500 MiB: the middle of the 0.3-0.6 GiB commonly seen with CUDA 12 and lazy module
# loading, an assumption until measured; `nox -s memory_gpu` measures the card's own
# (`cuda_context_bytes`), and `python -m benchmark.memory cuda_context_bytes=<that>` uses it.
CUDA_CONTEXT_BYTES = 500 * 2**20


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    reserved_bytes: int  # the caching allocator's peak of reserved segments over the steps
    allocated_bytes: int  # the peak of allocated blocks (rounded sizes), for comparison
    segments: int  # segments reserved at the end
    context_bytes: int

    @property
    def device_bytes(self) -> int:
        return self.reserved_bytes + self.context_bytes


def replay(
    live_at_start: list[tuple[int, int]], events: list[tuple[str, int, int]], context_bytes: int
) -> DevicePeak:
    """``live_at_start``: (serial, bytes) of the storages live when the steps start, in birth
    order; ``events``: ("alloc", serial, bytes) / ("free", serial, 0) in the order they happened."""
    allocator = CachingAllocator()
    address = {serial: allocator.malloc(nbytes) for serial, nbytes in live_at_start}
    allocator.reset_peaks()
    for kind, serial, nbytes in events:
        if kind == "alloc":
            address[serial] = allocator.malloc(nbytes)
        elif serial in address:  # frees of storages made and freed while loading: not replayed
            allocator.free(address.pop(serial))
    return DevicePeak(
        allocator.peak_reserved, allocator.peak_allocated, len(allocator.segments), context_bytes
    )
