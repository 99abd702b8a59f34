"""The caching-allocator model (benchmark/memory/caching_allocator.py) on constructed sequences,
against the rules of PyTorch's CUDACachingAllocator.cpp (default configuration), and the device-
level figure the predictor builds from it (benchmark/memory/device.py)."""

from __future__ import annotations

import torch

from benchmark.memory.caching_allocator import CachingAllocator, round_size, segment_size
from benchmark.memory.device import replay
from benchmark.memory.tracker import tracking

KiB, MiB = 2**10, 2**20


def test_sizes_round_to_512_bytes_and_segments_follow_the_pools():
    assert [round_size(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    assert segment_size(512) == segment_size(1 * MiB) == 2 * MiB  # small pool: 2 MiB buffers
    assert segment_size(1 * MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB  # 1-10 MiB: 20 MiB
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(11 * MiB) == 12 * MiB  # >= 10 MiB: 2 MiB steps


def test_small_requests_pack_into_2_mib_segments():
    a = CachingAllocator()
    for _ in range(4096):  # 4096 x 512 B fill one 2 MiB segment exactly
        a.malloc(100)
    assert (a.reserved, a.allocated, len(a.segments)) == (2 * MiB, 2 * MiB, 1)
    a.malloc(100)
    assert (a.reserved, len(a.segments)) == (4 * MiB, 2)


def test_a_mid_size_request_splits_a_20_mib_segment_and_the_rest_serves_the_next():
    a = CachingAllocator()
    a.malloc(3 * MiB)
    a.malloc(3 * MiB)
    assert (a.reserved, a.allocated) == (20 * MiB, 6 * MiB)


def test_large_blocks_split_only_when_more_than_1_mib_remains():
    a = CachingAllocator()
    first = a.malloc(11 * MiB)  # a 12 MiB segment: 1 MiB would remain, not more, so no split
    assert (a.reserved, a.allocated) == (12 * MiB, 12 * MiB)
    a.free(first)
    a.malloc(10 * MiB + 1)  # 10 MiB + 512 B: more than 1 MiB remains of the cached 12 MiB
    assert (a.reserved, a.allocated) == (12 * MiB, 10 * MiB + 512)


def test_the_smallest_free_block_that_fits_is_taken():
    a = CachingAllocator()
    big, small = a.malloc(16 * MiB), a.malloc(12 * MiB)
    a.free(big)
    a.free(small)
    a.malloc(11 * MiB)  # fits both cached segments: takes the 12 MiB one
    a.malloc(15 * MiB)  # so this one still finds the 16 MiB one
    assert (a.reserved, len(a.segments)) == (28 * MiB, 2)


def test_freed_neighbours_merge_and_cached_segments_stay_reserved():
    a = CachingAllocator()
    x, y = a.malloc(5 * MiB), a.malloc(5 * MiB)
    a.free(x)
    a.free(y)
    assert (a.allocated, a.reserved) == (0, 20 * MiB)  # cached, not returned
    a.malloc(18 * MiB)  # only the merged 20 MiB block fits it
    assert (a.reserved, len(a.segments)) == (20 * MiB, 1)


def test_without_the_merge_a_fragmented_segment_needs_a_new_one():
    a = CachingAllocator()
    x, _, z = a.malloc(5 * MiB), a.malloc(5 * MiB), a.malloc(5 * MiB)
    a.free(x)
    a.free(z)  # 5 MiB free at the start, 10 MiB (z + the tail) at the end: not adjacent
    a.malloc(12 * MiB)
    assert (a.reserved, len(a.segments)) == (32 * MiB, 2)
    assert a.peak_reserved == 32 * MiB


def test_pools_do_not_share_blocks_and_empty_cache_releases_whole_free_segments():
    a = CachingAllocator()
    s = a.malloc(1 * MiB)  # small pool, 2 MiB segment
    a.free(s)
    kept = a.malloc(1 * MiB + 512)  # large: not served by the cached small segment
    assert (a.reserved, len(a.segments)) == (22 * MiB, 2)
    a.empty_cache()  # the small segment is all free; the large one holds `kept`
    assert (a.reserved, len(a.segments)) == (20 * MiB, 1)
    a.free(kept)
    a.empty_cache()
    assert a.reserved == 0 and a.peak_reserved == 22 * MiB


def test_replay_adds_the_context_to_the_reserved_peak():
    peak = replay([(1, 4 * MiB)], [("alloc", 2, 4 * MiB), ("free", 2, 0), ("alloc", 3, 4 * MiB)], 500 * MiB)
    assert (peak.reserved_bytes, peak.allocated_bytes) == (20 * MiB, 8 * MiB)
    assert peak.device_bytes == 520 * MiB


def test_the_tracker_records_each_free_before_the_next_allocation():
    """A 3 MiB temporary freed before the next one is made: the second reuses the first's block.
    Frees recorded late would show two blocks live and a second segment."""
    with tracking(fake=True) as tracker:
        tracker.events = []
        for _ in range(3):
            t = torch.empty(3 * MiB // 4)  # fp32: 3 MiB
            del t
        kept = torch.empty(3 * MiB // 4)
    allocs = [e for e in tracker.events if e[0] == "alloc"]
    frees = [e for e in tracker.events if e[0] == "free"]
    assert len(allocs) == 4 and len(frees) >= 3
    assert [e[0] for e in tracker.events[:6]] == ["alloc", "free"] * 3
    assert replay([], tracker.events, 0).allocated_bytes == 3 * MiB
    del kept
