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

The trace is read as `cudalloc replay` reads it (scripts/rmm_trace.py: times
in numeric order, streams and pointers as integers; an allocation of 0 bytes
makes no block).

Neither is a strict lower bound for every policy (best fit is a heuristic),
but both are what cudalloc's segment-based design is measured against in
docs/BENCHMARKS.md. Pure Python with an O(free blocks) scan per allocation:
fine for traces of tens of thousands of events, slow beyond.
"""

import bisect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rmm_trace import TraceError, read_events  # noqa: E402

GRANULE = 512
PAGE = 2 << 20


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
            if asked == 0:  # no block, as in `cudalloc replay`
                continue
            size = (asked + GRANULE - 1) // GRANULE * GRANULE
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
    rc = 0
    for p in argv[1:]:
        try:
            c, v = bounds(p)
        except (OSError, TraceError) as e:
            print(f"{p}: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"{p:<40} {c:>10.4f} {v:>10.4f}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
