#!/usr/bin/env python3
"""PyTorch's native CUDA caching allocator, modelled, replaying a trace.

Usage: python3 scripts/torch_native_model.py TRACE.csv [TRACE.csv ...]

For an RMM-format trace (Thread,Time,Action,Pointer,Size,Stream), prints what
torch's DeviceCachingAllocator (c10/cuda/CUDACachingAllocator.cpp, default
PYTORCH_CUDA_ALLOC_CONF) would reserve: peak reserved, peak allocated (its
`allocated_bytes`, rounded block sizes), peak requested, their ratios and the
cudaMalloc count. It is the "native" column next to `cudalloc replay`'s
figures, for traces with no GPU at hand (docs/BENCHMARKS.md).

What is modelled, from torch's source (the same in 2.5 to 2.11):
- round_size: at least 512 B, then up to a multiple of 512 B
  (roundup_power2_divisions unset);
- pools: small for rounded sizes <= 1 MiB, large above;
- get_allocation_size: a new segment is 2 MiB for the small pool, 20 MiB for
  requests under 10 MiB, else the request rounded up to 2 MiB;
- get_free_block: the first free block of the pool, ordered by (stream,
  size, address), at or above (stream, size); it must be on the same stream
  (best fit, lowest address among equal sizes);
- should_split: small pool when at least 512 B remain, large pool when more
  than 1 MiB remains (max_split_size unset); the request takes the front;
- free_block: merges with its free neighbours within the segment.

Not modelled: device capacity (memory is unbounded, so the OOM ladder never
releases a segment, as on an 80-141 GiB GPU with a model of a few GiB),
record_stream events (a free is reusable at once), expandable_segments,
max_split_size_mb, garbage_collection_threshold, CUDA graph pools. Checked
against torch's rules by tests/python/test_native_model.py, not against a
GPU run; treat its figures as a model's.
"""

import bisect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from frag_bounds import read_events  # noqa: E402

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20


def round_size(size):
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return (size + K_MIN_BLOCK - 1) // K_MIN_BLOCK * K_MIN_BLOCK


def allocation_size(size):
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return (size + K_ROUND_LARGE - 1) // K_ROUND_LARGE * K_ROUND_LARGE


class Block:
    __slots__ = ("addr", "size", "stream", "small", "prev", "next", "allocated")

    def __init__(self, addr, size, stream, small):
        self.addr, self.size, self.stream, self.small = addr, size, stream, small
        self.prev = self.next = None
        self.allocated = False

    def key(self):
        return (self.stream, self.size, self.addr)


class NativeModel:
    """One device's DeviceCachingAllocator with unbounded memory. Streams are
    compared by name (the trace's Stream column)."""

    def __init__(self):
        self.pools = {True: [], False: []}  # small? -> sorted free-block keys
        self.free_blocks = {}  # key -> Block
        self.top = 0  # the next segment's address
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.segments = 0  # cudaMalloc calls

    def _insert(self, b):
        bisect.insort(self.pools[b.small], b.key())
        self.free_blocks[b.key()] = b

    def _remove(self, b):
        keys = self.pools[b.small]
        i = bisect.bisect_left(keys, b.key())
        assert keys[i] == b.key()
        del keys[i]
        del self.free_blocks[b.key()]

    def malloc(self, size, stream):
        size = round_size(size)
        small = size <= K_SMALL_SIZE
        keys = self.pools[small]
        i = bisect.bisect_left(keys, (stream, size, -1))
        if i < len(keys) and keys[i][0] == stream:
            b = self.free_blocks[keys[i]]
            self._remove(b)
        else:
            n = allocation_size(size)
            b = Block(self.top, n, stream, small)
            self.top += n
            self.segments += 1
            self.reserved += n
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = b.size - size
        if remaining >= K_MIN_BLOCK if small else remaining > K_SMALL_SIZE:
            rest = Block(b.addr + size, remaining, stream, small)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = size
            self._insert(rest)
        b.allocated = True
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b

    def free(self, b):
        b.allocated = False
        self.allocated -= b.size
        for n in (b.prev, b.next):
            if n is None or n.allocated:
                continue
            self._remove(n)
            if n is b.prev:
                b.addr = n.addr
                b.prev = n.prev
                if b.prev is not None:
                    b.prev.next = b
            else:
                b.next = n.next
                if b.next is not None:
                    b.next.prev = b
            b.size += n.size
        self._insert(b)


def replay(path):
    """Replays one trace; returns a dict of its figures."""
    m = NativeModel()
    live = {}
    req = peak_req = events = unmatched = 0
    for action, ptr, size, stream in read_events(path):
        events += 1
        if action == "allocate":
            if ptr in live:  # a reused pointer without a free: drop the old one
                b, n = live.pop(ptr)
                req -= n
                m.free(b)
            live[ptr] = (m.malloc(size, stream), size)
            req += size
            peak_req = max(peak_req, req)
        elif action == "free":
            if ptr not in live:
                unmatched += 1
                continue
            b, n = live.pop(ptr)
            req -= n
            m.free(b)
    return {
        "events": events,
        "peak_requested": peak_req,
        "peak_allocated": m.peak_allocated,
        "peak_reserved": m.peak_reserved,
        "segments": m.segments,
        "unmatched_frees": unmatched,
    }


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    mib = 1 << 20
    print(
        f"{'trace':<40} {'reserved MiB':>12} {'allocated MiB':>13} {'requested MiB':>13} "
        f"{'reserved/requested':>18} {'reserved/allocated':>18} {'cudaMalloc':>10}"
    )
    for p in argv[1:]:
        r = replay(p)
        req = max(r["peak_requested"], 1)
        print(
            f"{p:<40} {r['peak_reserved'] / mib:>12.1f} {r['peak_allocated'] / mib:>13.1f} "
            f"{r['peak_requested'] / mib:>13.1f} {r['peak_reserved'] / req:>18.4f} "
            f"{r['peak_reserved'] / max(r['peak_allocated'], 1):>18.4f} {r['segments']:>10}"
        )
        if r["unmatched_frees"]:
            print(f"  {r['unmatched_frees']} frees of unknown pointers skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
