"""Reading RMM-format allocation traces (Thread,Time,Action,Pointer,Size,Stream)
exactly as `cudalloc replay` reads them (src/trace/mod.rs, `parse`; and
src/trace/cli.rs, `read_trace`), for the Python reference scripts
(scripts/frag_bounds.py, scripts/torch_native_model.py):

- the file is plain or gzip-compressed, told by its first two bytes (not its
  name), and must be UTF-8; a byte-order mark before the header is skipped;
- lines end at "\\n" (an "\\r" before it is dropped); blank lines are skipped;
- columns are found by name in the header (any case, spaces trimmed; extra
  columns are allowed); fields are split at every comma (no quoting);
- Action is one of `allocate`, `allocate failure`, `free`, `synchronize`;
- Time is HH:MM:SS.ffffff (or RMM's older HH:MM:SS:ffffff), read as
  microseconds; past six fractional digits the rest is ignored, fewer are
  padded (".5" is 500000 us); a time that falls back by more than 12 hours
  from the line before is taken to have passed midnight (a day is added);
- Thread, Pointer, Size and Stream are unsigned 64-bit integers, hex with a
  0x prefix or decimal, so streams "0" and "0x0" are one stream;
- events are put in time order, numerically and stably (events with one
  time stamp keep the file's order).

Anything else is an error naming the line, as replay's is.
"""

import gzip
import re

HEADER = "Thread,Time,Action,Pointer,Size,Stream"
ACTIONS = ("allocate", "allocate failure", "free", "synchronize")
_DEC = re.compile(r"\+?[0-9]+")
_HEX = re.compile(r"\+?[0-9a-fA-F]+")
_U64 = 1 << 64
_DAY_US = 86_400_000_000
_HALF_DAY_US = 43_200_000_000


class TraceError(ValueError):
    """A trace that `cudalloc replay` would refuse, with its reason."""


def _dec(s):
    """Rust's `str::parse::<u64>`: an optional '+', then decimal digits."""
    if not _DEC.fullmatch(s):
        return None
    n = int(s)
    return n if n < _U64 else None


def parse_u64(s):
    """An unsigned integer field: hex with 0x/0X, else decimal (None if bad)."""
    s = s.strip()
    if s[:2] in ("0x", "0X"):
        h = s[2:]
        if not _HEX.fullmatch(h):
            return None
        n = int(h, 16)
        return n if n < _U64 else None
    return _dec(s)


def parse_time(s):
    """HH:MM:SS.ffffff or HH:MM:SS:ffffff as microseconds (None if bad)."""
    parts = _splitn(s.strip(), 4)
    if len(parts) < 3:
        return None
    h, m, sec = (_dec(p) for p in parts[:3])
    if h is None or m is None or sec is None:
        return None
    frac = parts[3] if len(parts) > 3 else "0"
    digits = min(len(frac), 6)
    us = _dec(frac[:digits])
    if us is None:
        return None
    us *= 10 ** (6 - digits)
    return ((h * 60 + m) * 60 + sec) * 1_000_000 + us


def _splitn(s, n):
    """Rust's `s.splitn(n, [':', '.'])`: at most n pieces, the last keeps the rest."""
    out = []
    start = 0
    for i, ch in enumerate(s):
        if len(out) == n - 1:
            break
        if ch in ":.":
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return out


def read_text(path):
    """The trace file's text: plain or gzip-compressed (told by its first bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TraceError(f"not a readable gzip file: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(
            f"not a text trace (byte {e.start} is not UTF-8); want RMM's CSV, plain or gzip-compressed"
        ) from None


def parse(text):
    """A trace's events as (time_us, action, thread, pointer, size, stream)
    tuples, in time order (stable)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [l[:-1] if l.endswith("\r") else l for l in lines]
    if not lines:
        raise TraceError("empty trace")
    cols = [c.strip().lower() for c in lines[0].split(",")]

    def col(name):
        try:
            return cols.index(name.lower())
        except ValueError:
            raise TraceError(f"trace header lacks column '{name}' (want {HEADER})") from None

    ct, ctime, ca, cp, cs, cst = (col(n) for n in HEADER.split(","))
    out = []
    day = last = 0
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        f = line.split(",")

        def get(i):
            return f[i] if i < len(f) else ""

        def bad(what):
            return TraceError(f"trace line {n}: bad {what}: '{line}'")

        action = get(ca).strip()
        if action not in ACTIONS:
            raise bad("action")
        t = parse_time(get(ctime))
        if t is None:
            raise bad("time")
        if t + _HALF_DAY_US < last:
            day += _DAY_US
        last = t
        fields = []
        for what, i in (("thread", ct), ("pointer", cp), ("size", cs), ("stream", cst)):
            v = parse_u64(get(i))
            if v is None:
                raise bad(what)
            fields.append(v)
        thread, ptr, size, stream = fields
        out.append((t + day, action, thread, ptr, size, stream))
    out.sort(key=lambda e: e[0])  # stable: one time stamp keeps the file's order
    return out


def read_events(path):
    """The trace's events as (action, pointer, size, stream), all but the
    action integers, in time order (stable)."""
    return [(a, p, s, st) for _t, a, _th, p, s, st in parse(read_text(path))]
