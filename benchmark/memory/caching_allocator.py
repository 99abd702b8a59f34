"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default
configuration: no ``PYTORCH_CUDA_ALLOC_CONF``, one stream, no expandable segments): what
``torch.cuda.memory_reserved`` would be for a sequence of allocations and frees.

The rules modelled:
- a request is rounded up to a multiple of 512 bytes (at least 512);
- rounded requests of at most 1 MiB come from the small pool, larger ones from the large pool;
- a request no free block fits gets a new segment (cudaMalloc): 2 MiB for the small pool,
  20 MiB for large requests under 10 MiB, else the request rounded up to a multiple of 2 MiB;
- the free block chosen is the smallest that fits (ties: the lowest address);
- a block is split when the remainder is at least 512 bytes (small pool) or more than 1 MiB
  (large pool); the remainder stays in the pool as a free block;
- a freed block merges with free neighbours in its segment; segments stay reserved (cached)
  until ``empty_cache``, which releases those with no block in use.

Not modelled: several streams, ``max_split_size_mb`` and the other ``PYTORCH_CUDA_ALLOC_CONF``
options, expandable segments, and the retry after a failed cudaMalloc (the device is taken to
be large enough: the figure is what a card with room to spare would show).
"""

from __future__ import annotations

import bisect
import dataclasses

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: the segment of a large request under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def round_size(size: int) -> int:
    """The bytes a request of ``size`` takes (``round_size``)."""
    return MIN_BLOCK if size < MIN_BLOCK else MIN_BLOCK * -(-size // MIN_BLOCK)


def segment_size(rounded: int) -> int:
    """The cudaMalloc size for a request no cached block fits (``get_allocation_size``)."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-rounded // ROUND_LARGE)


@dataclasses.dataclass
class Block:
    address: int
    size: int
    segment: int
    small: bool
    free: bool = True


class CachingAllocator:
    """``malloc(size)`` returns a handle for ``free``; ``reserved``, ``allocated`` and their
    peaks follow what torch.cuda.memory_stats reports under the rules above."""

    def __init__(self) -> None:
        self.blocks: dict[int, Block] = {}  # address -> block, free or not
        self.free_blocks = {True: [], False: []}  # small pool?: sorted [(size, address)]
        self.segments: dict[int, list[int]] = {}  # segment id -> its blocks' addresses, in order
        self.next_address = 0
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.segment_count = 0

    def reset_peaks(self) -> None:
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated

    def malloc(self, size: int) -> int:
        rounded = round_size(size)
        small = rounded <= SMALL_SIZE
        pool = self.free_blocks[small]
        i = bisect.bisect_left(pool, (rounded, -1))
        if i < len(pool):
            _, address = pool.pop(i)
            block = self.blocks[address]
        else:
            block = self._new_segment(segment_size(rounded), small)
        remaining = block.size - rounded
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            self._split(block, rounded)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.address

    def free(self, address: int) -> None:
        block = self.blocks[address]
        assert not block.free, f"double free of block {address}"
        self.allocated -= block.size
        block.free = True
        addresses = self.segments[block.segment]
        i = addresses.index(address)
        for j in (i + 1, i - 1):  # merge the next, then the previous free neighbour
            if 0 <= j < len(addresses) and self.blocks[addresses[j]].free:
                neighbour = self.blocks[addresses[j]]
                self._unlist(neighbour)
                first, second = sorted((block, neighbour), key=lambda b: b.address)
                first.size += second.size
                del self.blocks[second.address]
                addresses.remove(second.address)
                block = first
                i = addresses.index(block.address)
        self._list(block)

    def empty_cache(self) -> None:
        """Release every segment with no block in use (``torch.cuda.empty_cache``)."""
        for segment, addresses in list(self.segments.items()):
            if len(addresses) == 1 and self.blocks[addresses[0]].free:
                block = self.blocks.pop(addresses[0])
                self._unlist(block)
                self.reserved -= block.size
                del self.segments[segment]

    def _new_segment(self, size: int, small: bool) -> Block:
        block = Block(self.next_address, size, self.segment_count, small)
        self.next_address += size
        self.segment_count += 1
        self.blocks[block.address] = block
        self.segments[block.segment] = [block.address]
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _split(self, block: Block, size: int) -> None:
        rest = Block(block.address + size, block.size - size, block.segment, block.small)
        block.size = size
        self.blocks[rest.address] = rest
        addresses = self.segments[block.segment]
        addresses.insert(addresses.index(block.address) + 1, rest.address)
        self._list(rest)

    def _list(self, block: Block) -> None:
        bisect.insort(self.free_blocks[block.small], (block.size, block.address))

    def _unlist(self, block: Block) -> None:
        pool = self.free_blocks[block.small]
        pool.pop(bisect.bisect_left(pool, (block.size, block.address)))
