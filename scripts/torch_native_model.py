#!/usr/bin/env python3
"""PyTorch's native CUDA caching allocator, modelled, replaying a trace.

Usage: python3 scripts/torch_native_model.py [--mode M | --expandable] [--memory SIZE] TRACE ...

For an RMM-format trace (Thread,Time,Action,Pointer,Size,Stream), prints what
torch's DeviceCachingAllocator (c10/cuda/CUDACachingAllocator.cpp) would
reserve, with the default PYTORCH_CUDA_ALLOC_CONF and with
`expandable_segments:True` (both unless --mode or --expandable picks one):
peak reserved, peak allocated (its `allocated_bytes`, rounded block sizes),
peak requested, their ratios, the driver calls and the allocations that
failed. It is the "native" column next to `cudalloc replay`'s figures, for
traces with no GPU at hand (docs/BENCHMARKS.md).

The trace is read as `cudalloc replay` reads it (scripts/rmm_trace.py):
times in numeric order, streams as integers ("0" and "0x0" are one stream),
the same actions. An `allocate` of 0 bytes makes no block (torch returns a
null pointer; replay skips it too), one of a pointer still live frees the old
block first, `allocate failure` lines are counted, `synchronize` lines change
nothing here (no events are modelled).

What is modelled, from torch's source (the same in 2.5 to 2.11; read in
CUDACachingAllocator.cpp, functions named in the code below):
- round_size: at least 512 B, then up to a multiple of 512 B
  (roundup_power2_divisions unset);
- pools: small for rounded sizes <= 1 MiB (kSmallSize), large above;
- get_allocation_size: a new cudaMalloc segment is 2 MiB (kSmallBuffer) for
  the small pool, 20 MiB (kLargeBuffer) for requests under 10 MiB
  (kMinLargeAlloc), else the request rounded up to 2 MiB (kRoundLarge);
- get_free_block: the first free block of the pool, ordered by (stream,
  size, address), at or above (stream, size); it must be on the same stream
  (best fit, lowest address among equal sizes);
- should_split: small pool when at least 512 B remain, large pool when more
  than 1 MiB remains (max_split_size unset); with expandable segments, any
  pool when at least 512 B remain; the request takes the front;
- free_block / try_merge_blocks: merges with its free neighbours within the
  segment (mapped with mapped, unmapped with unmapped);
- capacity (--memory, default 16GiB like `cudalloc replay`): a cudaMalloc
  (or cuMemCreate) that would take reserved bytes past it fails. malloc's
  OOM path then: release_available_cached_blocks (a no-op with
  max_split_size unset: it returns false at once), release_cached_blocks
  (empty_cache: cudaFree every free segment that is not split; unmap every
  whole free page of the expandable segments, and drop a segment left
  wholly unmapped), one retry, and if that fails too the allocation fails
  (torch raises OutOfMemoryError; counted under "OOMs").

expandable_segments:True (ExpandableSegment, find_expandable_block,
map_block, try_allocate_expandable_block, unmap_block, release_blocks):
- one segment per (stream, pool), made when the stream's pool has no
  unmapped range that fits: a virtual range of 1 1/8 the device's memory
  (here --memory), mapped in units of 2 MiB (small pool) or 20 MiB (large
  pool);
- alloc_block asks for the rounded request itself (p.size(), not
  get_allocation_size: no 2 MiB kRoundLarge rounding), at the lowest
  address where free and unmapped ranges of the stream's segments hold it
  (the end of the segment, extending a free block there, unless
  release_cached_blocks unmapped pages lower down); map() maps just enough
  whole units to cover it;
- get_free_block takes a free block followed by unmapped space (the growing
  end) only when no other free block of the stream fits;
- reserved bytes = mapped bytes; free pages stay mapped, in their segment,
  until release_cached_blocks unmaps them: a free page never moves to
  another stream's segment, or into a hole, while it is mapped.

Driver calls counted: cudaMalloc and cudaFree (torch's num_device_alloc and
num_device_free count the same); with expandable segments, per unit mapped
one cuMemCreate and one cuMemMap, per map() one cuMemSetAccess (no peers),
per unit unmapped one cuMemUnmap and one cuMemRelease, per segment one
cuMemAddressReserve, and one cuMemAddressFree when release_cached_blocks
drops it (torch's num_device_alloc counts one per map_block instead).
Only calls that succeed are counted; a cudaMalloc or cuMemCreate that fails
for lack of memory is counted apart ("failed driver allocations"), and the
units a failed map() created before it failed are counted as created and
released. The cudaStreamSynchronize before each unmap is not counted.

Not modelled: record_stream events (a free is reusable at once), the
allocator's own event processing, max_split_size_mb,
garbage_collection_threshold, roundup_power2_divisions, memory fractions,
CUDA graph pools, the driver's own overhead on the device. Checked against
torch's rules by tests/python/test_native_model.py, not against a GPU run;
treat its figures as a model's.
"""

import argparse
import bisect
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rmm_trace  # noqa: E402

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20
DEFAULT_MEMORY = 16 << 30  # `cudalloc replay --memory`'s default


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


class Segment:
    """An expandable segment: a virtual range mapped in whole units."""

    __slots__ = ("base", "unit", "size")

    def __init__(self, base, unit, size):
        self.base, self.unit, self.size = base, unit, size


class Block:
    __slots__ = ("addr", "size", "stream", "small", "prev", "next", "allocated", "mapped", "seg")

    def __init__(self, addr, size, stream, small, seg=None, mapped=True):
        self.addr, self.size, self.stream, self.small = addr, size, stream, small
        self.prev = self.next = None
        self.allocated = False
        self.mapped = mapped
        self.seg = seg  # the expandable Segment, or None for a cudaMalloc one

    def key(self):
        return (self.stream, self.size, self.addr)

    def addr_key(self):
        return (self.stream, self.addr)


def _splice(b, before, after):
    """Puts b between before and after in a segment's block list."""
    b.prev, b.next = before, after
    if before is not None:
        before.next = b
    if after is not None:
        after.prev = b


class NativeModel:
    """One device's DeviceCachingAllocator on a device of `capacity` bytes.
    Streams are the trace's stream numbers."""

    def __init__(self, expandable=False, capacity=DEFAULT_MEMORY):
        self.expandable = expandable
        self.capacity = capacity
        self.pools = {True: [], False: []}  # small? -> sorted free (mapped) block keys
        self.free_blocks = {}  # key -> Block
        self.unmapped = {True: [], False: []}  # small? -> sorted (stream, addr) of unmapped blocks
        self.unmapped_blocks = {}  # (stream, addr) -> Block
        self.top = 0  # the next segment's (virtual) address
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.calls = Counter()  # driver calls that succeeded, by name
        self.failed_driver_allocs = 0  # cudaMalloc / cuMemCreate out of memory
        self.cache_flushes = 0  # release_cached_blocks calls (the OOM path, or empty_cache)
        self.ooms = 0  # allocations that failed after the retry (num_ooms)

    # -- the sorted sets (BlockPool::blocks and BlockPool::unmapped) --

    def _insert(self, b):
        bisect.insort(self.pools[b.small], b.key())
        self.free_blocks[b.key()] = b

    def _remove(self, b):
        keys = self.pools[b.small]
        i = bisect.bisect_left(keys, b.key())
        assert keys[i] == b.key()
        del keys[i]
        del self.free_blocks[b.key()]

    def _insert_unmapped(self, b):
        bisect.insort(self.unmapped[b.small], b.addr_key())
        self.unmapped_blocks[b.addr_key()] = b

    def _remove_unmapped(self, b):
        keys = self.unmapped[b.small]
        i = bisect.bisect_left(keys, b.addr_key())
        assert keys[i] == b.addr_key()
        del keys[i]
        del self.unmapped_blocks[b.addr_key()]

    def driver_calls(self):
        return sum(self.calls.values())

    def _grow(self, n):
        self.reserved += n
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # -- malloc --

    def malloc(self, size, stream):
        """DeviceCachingAllocator::malloc: the Block, or None when even the
        retry after release_cached_blocks fails."""
        size = round_size(size)
        small = size <= K_SMALL_SIZE
        b = self._get_free_block(small, stream, size)
        if b is None:
            b = self._alloc_block(small, stream, size)
            # release_available_cached_blocks returns false at once while
            # max_split_size is unset (the default), so next comes
            # release_cached_blocks and one retry.
            if b is None:
                self.release_cached_blocks()
                b = self._alloc_block(small, stream, size)
            if b is None:
                self.ooms += 1
                return None
        remaining = b.size - size
        if small or self.expandable:
            split = remaining >= K_MIN_BLOCK
        else:
            split = remaining > K_SMALL_SIZE
        if split:
            rest = Block(b.addr + size, remaining, stream, small, b.seg)
            _splice(rest, b, b.next)
            b.size = size
            self._insert(rest)
        b.allocated = True
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b

    def _get_free_block(self, small, stream, size):
        keys = self.pools[small]
        i = bisect.bisect_left(keys, (stream, size, -1))
        if i == len(keys) or keys[i][0] != stream:
            return None
        fb = self.free_blocks
        if self.expandable and fb[keys[i]].seg is not None:
            # get_free_block: "for the purposes of best fit we consider its
            # size to be the size it can expand to": a block followed by
            # unmapped space is passed over for a larger one that is not.
            def expandable_size(b):
                n = b.next
                return b.size + (n.size if n is not None and not n.mapped else 0)

            j = i + 1
            while (
                fb[keys[i]].seg is not None
                and j < len(keys)
                and keys[j][0] == stream
                and expandable_size(fb[keys[j]]) < expandable_size(fb[keys[i]])
            ):
                i, j = j, j + 1
        b = fb[keys[i]]
        self._remove(b)
        return b

    def _alloc_block(self, small, stream, size):
        if self.expandable:
            return self._try_allocate_expandable_block(small, stream, size)
        n = allocation_size(size)
        if self.reserved + n > self.capacity:
            self.failed_driver_allocs += 1
            return None
        self.calls["cudaMalloc"] += 1
        b = Block(self.top, n, stream, small)
        self.top += n
        self._grow(n)
        return b

    # -- expandable segments --

    def _try_allocate_expandable_block(self, small, stream, size):
        c = self._find_expandable_block(small, stream, size)
        # c starts a run of free and unmapped blocks with room for size:
        # unmapped -> None, unmapped -> free -> ..., or free -> unmapped -> ...
        if not c.mapped and not self._map_block(c, min(c.size, size)):
            return None
        while c.size < size:
            nxt = c.next  # unmapped: map what is missing; it merges with c
            if not self._map_block(nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt
        self._remove(c)
        return c

    def _find_expandable_block(self, small, stream, size):
        """The lowest address where the stream's free and unmapped blocks hold
        size, else a new segment."""

        def allocatable(b):
            return b is not None and not b.allocated

        def has_room(b):
            n = 0
            while n < size and allocatable(b):
                n += b.size
                b = b.next
            return n >= size

        keys = self.unmapped[small]
        i = bisect.bisect_left(keys, (stream, -1))
        while i < len(keys) and keys[i][0] == stream:
            c = self.unmapped_blocks[keys[i]]
            if allocatable(c.prev):
                c = c.prev
            if has_room(c):
                return c
            i += 1
        unit = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        space = self.capacity + self.capacity // 8  # 1 1/8 the device's memory
        seg = Segment(self.top, unit, -(-space // unit) * unit)
        self.top += seg.size
        self.calls["cuMemAddressReserve"] += 1
        c = Block(seg.base, seg.size, stream, small, seg, mapped=False)
        self._insert_unmapped(c)
        return c

    def _map_block(self, b, size):
        """Maps the units that cover [b.addr, b.addr + size) (b unmapped, at a
        unit boundary); False when the device runs out."""
        seg = b.seg
        begin = (b.addr - seg.base) // seg.unit
        end = -(-(b.addr + size - seg.base) // seg.unit)
        n = end - begin
        room = max(0, (self.capacity - self.reserved) // seg.unit)
        if n > room:
            # ExpandableSegment::map: cuMemCreate fails on unit `room`; the
            # ones created before it are released.
            self.calls["cuMemCreate"] += room
            self.calls["cuMemRelease"] += room
            self.failed_driver_allocs += 1
            return False
        self.calls["cuMemCreate"] += n
        self.calls["cuMemMap"] += n
        self.calls["cuMemSetAccess"] += 1
        mapped = n * seg.unit
        self._remove_unmapped(b)
        b.mapped = True
        if mapped < b.size:
            rest = Block(b.addr + mapped, b.size - mapped, b.stream, b.small, seg, mapped=False)
            _splice(rest, b, b.next)
            self._insert_unmapped(rest)
            b.size = mapped
        self._try_merge(b, b.prev)
        self._try_merge(b, b.next)
        self._insert(b)
        self._grow(mapped)
        return True

    def _unmap_block(self, b):
        """unmap_block: unmaps the whole units inside free block b; the
        partial units at either end stay mapped as free blocks."""
        seg = b.seg
        begin = -(-(b.addr - seg.base) // seg.unit)
        end = (b.addr + b.size - seg.base) // seg.unit
        if begin >= end:
            return
        self._remove(b)
        start = seg.base + begin * seg.unit
        size = (end - begin) * seg.unit
        before = start - b.addr
        if before > 0:
            bf = Block(b.addr, before, b.stream, b.small, seg)
            _splice(bf, b.prev, b)
            self._insert(bf)
        after = b.size - before - size
        if after > 0:
            af = Block(start + size, after, b.stream, b.small, seg)
            _splice(af, b, b.next)
            self._insert(af)
        b.addr, b.size, b.mapped = start, size, False
        self._try_merge(b, b.prev)
        self._try_merge(b, b.next)
        self._insert_unmapped(b)
        self.reserved -= size
        self.calls["cuMemUnmap"] += end - begin
        self.calls["cuMemRelease"] += end - begin

    # -- free and release --

    def _try_merge(self, dst, src):
        """try_merge_blocks: dst (in no set) takes in its free neighbour src."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if src.mapped:
            self._remove(src)
        else:
            self._remove_unmapped(src)
        if src is dst.prev:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def free(self, b):
        """free / free_block: the block goes back to its pool at once."""
        b.allocated = False
        self.allocated -= b.size
        self._try_merge(b, b.prev)
        self._try_merge(b, b.next)
        self._insert(b)

    def release_cached_blocks(self):
        """release_cached_blocks / release_blocks (empty_cache): cudaFree each
        free segment that is not split; unmap the whole free units of the
        expandable segments, and drop a segment left wholly unmapped."""
        self.cache_flushes += 1
        for small in (False, True):  # large_blocks, then small_blocks
            to_unmap = []
            for key in list(self.pools[small]):
                b = self.free_blocks[key]
                if b.seg is not None:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._remove(b)
                    self.reserved -= b.size
                    self.calls["cudaFree"] += 1
            for b in to_unmap:
                self._unmap_block(b)
                if not b.mapped and b.prev is None and b.next is None:
                    self._remove_unmapped(b)  # release_expandable_segment
                    self.calls["cuMemAddressFree"] += 1


def replay(path, expandable=False, memory=DEFAULT_MEMORY):
    """Replays one trace as `cudalloc replay` does; returns a dict of its figures."""
    events = rmm_trace.read_events(path)
    m = NativeModel(expandable, memory)
    live = {}
    req = peak_req = unmatched = failures = trace_failures = allocs_of_live = 0
    for action, ptr, size, stream in events:
        if action == "allocate":
            if ptr in live:  # a reused pointer without a free: drop the old one
                b, n = live.pop(ptr)
                req -= n
                m.free(b)
                allocs_of_live += 1
            if size == 0:  # torch returns a null pointer and makes no block
                continue
            b = m.malloc(size, stream)
            if b is None:
                failures += 1
                continue
            live[ptr] = (b, size)
            req += size
            peak_req = max(peak_req, req)
        elif action == "free":
            if ptr not in live:
                unmatched += 1
                continue
            b, n = live.pop(ptr)
            req -= n
            m.free(b)
        elif action == "allocate failure":
            trace_failures += 1
        # "synchronize": nothing waits on events in this model.
    return {
        "events": len(events),
        "peak_requested": peak_req,
        "peak_allocated": m.peak_allocated,
        "peak_reserved": m.peak_reserved,
        "driver_calls": m.driver_calls(),
        "calls": dict(m.calls),
        "failed_driver_allocs": m.failed_driver_allocs,
        "cache_flushes": m.cache_flushes,
        "failures": failures,
        "trace_failures": trace_failures,
        "unmatched_frees": unmatched,
        "allocs_of_live": allocs_of_live,
    }


def parse_size(v):
    """A size like `cudalloc replay --memory` takes (src/config.rs parse_size):
    a number, optionally with a binary unit (B, K/KB/KiB, M.., G.., T.., P..)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", v)
    units = {"": 0, "b": 0, "k": 10, "kb": 10, "kib": 10, "m": 20, "mb": 20, "mib": 20}
    units.update({"g": 30, "gb": 30, "gib": 30, "t": 40, "tb": 40, "tib": 40})
    units.update({"p": 50, "pb": 50, "pib": 50})
    if not m or m.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"'{v}' is not a size")
    shift = units[m.group(2).lower()]
    try:
        n = int(m.group(1)) << shift if m.group(1).isdigit() else int(float(m.group(1)) * (1 << shift))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is not a size") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"'{v}' is not a size")
    return n


CALL_ORDER = (
    "cudaMalloc",
    "cudaFree",
    "cuMemAddressReserve",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemAddressFree",
)


def main(argv):
    ap = argparse.ArgumentParser(
        prog="torch_native_model.py",
        description="Model of PyTorch's native CUDA caching allocator replaying RMM-format traces.",
    )
    ap.add_argument("traces", nargs="+", metavar="TRACE", help="trace CSV, plain or gzip-compressed")
    ap.add_argument(
        "--mode",
        choices=("default", "expandable", "both"),
        default="both",
        help="torch's default settings, expandable_segments:True, or both (the default)",
    )
    ap.add_argument("--expandable", action="store_true", help="the same as --mode expandable")
    ap.add_argument(
        "--memory",
        type=parse_size,
        metavar="SIZE",
        default=DEFAULT_MEMORY,
        help="device capacity (default 16GiB, as `cudalloc replay`)",
    )
    args = ap.parse_args(argv[1:])
    mode = "expandable" if args.expandable else args.mode
    modes = [m for m in ("default", "expandable") if mode in (m, "both")]
    mib = 1 << 20
    print(
        f"{'trace':<40} {'mode':<10} {'reserved MiB':>12} {'allocated MiB':>13} {'requested MiB':>13} "
        f"{'reserved/requested':>18} {'reserved/allocated':>18} {'driver calls':>12} {'OOMs':>5}"
    )
    rc = 0
    for p in args.traces:
        for md in modes:
            try:
                r = replay(p, md == "expandable", args.memory)
            except (OSError, rmm_trace.TraceError) as e:
                print(f"{p}: {e}", file=sys.stderr)
                rc = 1
                break
            req = max(r["peak_requested"], 1)
            print(
                f"{p:<40} {md:<10} {r['peak_reserved'] / mib:>12.1f} {r['peak_allocated'] / mib:>13.1f} "
                f"{r['peak_requested'] / mib:>13.1f} {r['peak_reserved'] / req:>18.4f} "
                f"{r['peak_reserved'] / max(r['peak_allocated'], 1):>18.4f} {r['driver_calls']:>12} "
                f"{r['failures']:>5}"
            )
            calls = ", ".join(f"{k} {r['calls'][k]}" for k in CALL_ORDER if r["calls"].get(k))
            extra = [calls or "no driver call"]
            if r["cache_flushes"]:
                extra.append(f"{r['cache_flushes']} cache flushes (release_cached_blocks)")
            if r["failed_driver_allocs"]:
                extra.append(f"{r['failed_driver_allocs']} failed driver allocations")
            print(f"  {md}: {'; '.join(extra)}")
            if md == modes[0] and r["trace_failures"]:
                print(f"  {r['trace_failures']} 'allocate failure' lines in the trace", file=sys.stderr)
            if md == modes[0] and r["unmatched_frees"]:
                print(f"  {r['unmatched_frees']} frees of unknown pointers skipped", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
