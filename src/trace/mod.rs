//! Allocation traces in RMM's logging-adaptor CSV format
//! (`Thread,Time,Action,Pointer,Size,Stream`): reading and writing them,
//! replaying them on the simulated device ([`replay`]), generating synthetic
//! ones ([`gen`]) and drawing their memory timeline ([`timeline`]).

pub mod cli;
pub mod gen;
pub mod replay;
pub mod timeline;

use crate::observe::tracelog::{format_time_us, Action, HEADER};
use std::fmt::Write as _;

/// One line of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub thread: u64,
    /// Microseconds since midnight (days wrap: see [`parse`]).
    pub time_us: u64,
    pub action: Action,
    pub ptr: u64,
    pub size: u64,
    pub stream: u64,
}

fn parse_time(s: &str) -> Option<u64> {
    // HH:MM:SS.ffffff, or RMM's older HH:MM:SS:ffffff.
    let mut it = s.trim().splitn(4, [':', '.']);
    let h: u64 = it.next()?.parse().ok()?;
    let m: u64 = it.next()?.parse().ok()?;
    let sec: u64 = it.next()?.parse().ok()?;
    let frac = it.next().unwrap_or("0");
    let digits = frac.len().min(6);
    let mut us: u64 = frac.get(..digits)?.parse().ok()?;
    for _ in digits..6 {
        us *= 10;
    }
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + us)
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parse a trace. Columns are found by name in the header. Events are put in
/// time order (stable, so each thread's order is kept): a log written by
/// several threads is in order per thread only. Times that fall back by more
/// than 12 hours are taken to have passed midnight.
pub fn parse(text: &str) -> Result<Vec<Event>, String> {
    // A byte-order mark (spreadsheets write one) is not part of the header.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or("empty trace")?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("trace header lacks column '{name}' (want {HEADER})"))
    };
    let (ct, ctime, ca, cp, cs, cst) = (
        col("Thread")?,
        col("Time")?,
        col("Action")?,
        col("Pointer")?,
        col("Size")?,
        col("Stream")?,
    );
    let mut out = Vec::new();
    let mut day = 0u64;
    let mut last = 0u64;
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let bad = |what: &str| format!("trace line {}: bad {what}: '{line}'", n + 1);
        let get = |i: usize| f.get(i).copied().unwrap_or("");
        let action = match get(ca).trim() {
            "allocate" => Action::Allocate,
            "allocate failure" => Action::AllocateFailure,
            "free" => Action::Free,
            "synchronize" => Action::Synchronize,
            _ => return Err(bad("action")),
        };
        let mut t = parse_time(get(ctime)).ok_or_else(|| bad("time"))?;
        if t + 43_200_000_000 < last {
            day += 86_400_000_000;
        }
        last = t;
        t += day;
        out.push(Event {
            thread: parse_u64(get(ct)).ok_or_else(|| bad("thread"))?,
            time_us: t,
            action,
            ptr: parse_u64(get(cp)).ok_or_else(|| bad("pointer"))?,
            size: parse_u64(get(cs)).ok_or_else(|| bad("size"))?,
            stream: parse_u64(get(cst)).ok_or_else(|| bad("stream"))?,
        });
    }
    out.sort_by_key(|e| e.time_us);
    Ok(out)
}

/// Render events as a trace (header included).
pub fn to_csv(events: &[Event]) -> String {
    let mut s = String::with_capacity(events.len() * 48);
    let _ = writeln!(s, "{HEADER}");
    for e in events {
        let _ = writeln!(
            s,
            "{},{},{},{:#x},{},{}",
            e.thread,
            format_time_us(e.time_us % 86_400_000_000),
            e.action.as_str(),
            e.ptr,
            e.size,
            e.stream
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts_by_time() {
        let ev = vec![
            Event {
                thread: 1,
                time_us: 5,
                action: Action::Allocate,
                ptr: 0x10,
                size: 100,
                stream: 0,
            },
            Event {
                thread: 2,
                time_us: 7,
                action: Action::AllocateFailure,
                ptr: 0,
                size: 1 << 40,
                stream: 3,
            },
            Event {
                thread: 1,
                time_us: 9,
                action: Action::Free,
                ptr: 0x10,
                size: 100,
                stream: 0,
            },
        ];
        assert_eq!(parse(&to_csv(&ev)).unwrap(), ev);
        let csv = to_csv(&ev);
        let mut lines: Vec<&str> = csv.lines().collect();
        lines.swap(1, 3);
        assert_eq!(parse(&lines.join("\n")).unwrap(), ev, "sorted by time");
        assert_eq!(parse_time("01:02:03:000004"), Some(3_723_000_004));
        assert_eq!(parse_time("01:02:03.5"), Some(3_723_500_000));
        assert!(parse("Thread,Time\n").is_err());
        assert_eq!(
            parse(&format!("\u{feff}{}", to_csv(&ev))).unwrap(),
            ev,
            "a byte-order mark is skipped"
        );
        assert!(parse(&format!("{HEADER}\n1,00:00:00.000001,alloc,0x1,1,0")).is_err());
    }
}
