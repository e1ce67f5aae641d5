#!/usr/bin/env python3
"""Reference points for `cudalloc replay`'s fragmentation figure.

Usage: python3 scripts/frag_bounds.py TRACE.csv [TRACE.csv ...]

For an RMM-format trace (Thread,Time,Action,Pointer,Size,Stream), prints two
ratios over the trace's peak requested live bytes, the same denominator as
`cudalloc replay`'s "fragmentation (reserved/requested)":

- contiguous: an ideal best-fit allocator (exact best fit, immediate
  coalescing, 512 B rounding) on ONE unbounded contiguous heap, with no
  segments at all. Its high-water mark is what any allocator that never
  moves or remaps memory pays for the trace's holes, give or take the
  placement luck of best fit.
- vmm-2MiB: the same heap, but a 2 MiB page is only backed while some live
  block touches it (what CUDA VMM / torch's expandable_segments could reach
  by unmapping every empty page at once). The peak count of touched pages.

Neither is a strict lower bound for every policy (best fit is a heuristic),
but both are what cudalloc's segment-based design is measured against in
docs/BENCHMARKS.md. Pure Python with an O(free blocks) scan per allocation:
fine for traces of tens of thousands of events, slow beyond.
"""

import bisect
import csv
import gzip
import sys

GRANULE = 512
PAGE = 2 << 20


def open_trace(path):
    """A trace file as text: plain or gzip-compressed (told by its first
    bytes), with or without a byte-order mark."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_events(path):
    """The trace's events as (action, pointer, size, stream), in time order
    (stable: events with one time stamp keep the file's order)."""
    with open_trace(path) as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["Time"])
    return [(r["Action"], r["Pointer"], int(r["Size"]), r.get("Stream", "0")) for r in rows]


def bounds(path):
    free = []  # address-ordered (addr, size) free blocks below `top`
    top = 0
    live = {}
    req = peak_req = peak_top = peak_pages = 0
    pages = {}

    def touch(addr, size, d):
        for pg in range(addr // PAGE, (addr + size - 1) // PAGE + 1):
            n = pages.get(pg, 0) + d
            if n:
                pages[pg] = n
            else:
                del pages[pg]

    for action, ptr, asked, _stream in read_events(path):
        if action == "allocate":
            if ptr in live:  # a reused pointer without a free: drop the old one
                addr, size, n = live.pop(ptr)
                req -= n
                touch(addr, size, -1)
                free_block(free, addr, size)
            size = (max(asked, 1) + GRANULE - 1) // GRANULE * GRANULE
            best = None
            for i, (_, fs) in enumerate(free):
                if fs >= size and (best is None or fs < free[best][1]):
                    best = i
            if best is None:
                if free and free[-1][0] + free[-1][1] == top:
                    addr, _ = free.pop()
                else:
                    addr = top
                top = addr + size
            else:
                addr, fs = free.pop(best)
                if fs > size:
                    free.insert(best, (addr + size, fs - size))
            live[ptr] = (addr, size, asked)
            req += asked
            touch(addr, size, 1)
            peak_req = max(peak_req, req)
            peak_top = max(peak_top, top)
            peak_pages = max(peak_pages, len(pages))
        elif action == "free" and ptr in live:
            addr, size, n = live.pop(ptr)
            req -= n
            touch(addr, size, -1)
            free_block(free, addr, size)
    peak_req = max(peak_req, 1)
    return peak_top / peak_req, peak_pages * PAGE / peak_req


def free_block(free, addr, size):
    i = bisect.bisect(free, (addr, 0))
    if i < len(free) and free[i][0] == addr + size:
        size += free.pop(i)[1]
    if i > 0 and free[i - 1][0] + free[i - 1][1] == addr:
        addr, s = free.pop(i - 1)
        size += s
        i -= 1
    free.insert(i, (addr, size))


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    print(f"{'trace':<40} {'contiguous':>10} {'vmm-2MiB':>10}")
    for p in argv[1:]:
        c, v = bounds(p)
        print(f"{p:<40} {c:>10.4f} {v:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
