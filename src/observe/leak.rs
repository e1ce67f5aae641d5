//! Leak tracking on top of the live table: the leak report (text or JSON,
//! grouped by call site when backtraces are on), the old-allocation alarm
//! (`leak_age`) and the growth-trend alarm (`leak_growth` over `leak_window`).

use super::callsite;
use crate::config::{format_duration_ms, format_size};
use crate::engine::Engine;
use crate::live::{now_ms, LiveInfo};
use serde_json::json;
use std::fmt::Write as _;

/// Live allocations at least `min_age_ms` old at `now`, biggest first.
fn old_allocations(
    alloc: &Engine,
    device: Option<usize>,
    min_age_ms: u64,
    now: u64,
) -> Vec<LiveInfo> {
    let mut live: Vec<LiveInfo> = alloc
        .live_allocations(device)
        .into_iter()
        .filter(|l| now.saturating_sub(l.time_ms) >= min_age_ms)
        .collect();
    live.sort_by(|a, b| b.size.cmp(&a.size).then(a.seq.cmp(&b.seq)));
    live
}

struct Group {
    site: u32,
    count: u64,
    bytes: u64,
    oldest_ms: u64,
}

fn groups(live: &[LiveInfo], now: u64) -> Vec<Group> {
    let mut by: rustc_hash::FxHashMap<u32, Group> = Default::default();
    for l in live {
        let g = by.entry(l.site).or_insert(Group {
            site: l.site,
            count: 0,
            bytes: 0,
            oldest_ms: 0,
        });
        g.count += 1;
        g.bytes += l.size;
        g.oldest_ms = g.oldest_ms.max(now.saturating_sub(l.time_ms));
    }
    let mut v: Vec<Group> = by.into_values().collect();
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.site.cmp(&b.site)));
    v
}

/// Most allocations listed one by one in the text report.
const TEXT_LIST: usize = 20;

/// The leak report: every live allocation at least `min_age_ms` old, on all
/// devices. Text lists the biggest [`TEXT_LIST`]; JSON lists all. Groups by
/// call site when any allocation has one. Never calls the driver.
pub fn report(alloc: &Engine, min_age_ms: u64, json_out: bool) -> String {
    let now = now_ms();
    let live = old_allocations(alloc, None, min_age_ms, now);
    let bytes: u64 = live.iter().map(|l| l.size).sum();
    let sited = live.iter().any(|l| l.site != 0);
    let groups = if sited {
        groups(&live, now)
    } else {
        Vec::new()
    };
    if json_out {
        let v = json!({
            "min_age_s": min_age_ms as f64 / 1e3,
            "count": live.len(),
            "bytes": bytes,
            "sites": groups.iter().map(|g| json!({
                "site": g.site,
                "count": g.count,
                "bytes": g.bytes,
                "oldest_age_s": g.oldest_ms as f64 / 1e3,
                "frames": *callsite::describe(g.site),
            })).collect::<Vec<_>>(),
            "allocations": live.iter().map(|l| json!({
                "ptr": format!("{:#x}", l.ptr),
                "size": l.size,
                "requested": l.requested,
                "device": l.device,
                "stream": l.stream,
                "thread": l.thread,
                "seq": l.seq,
                "age_s": now.saturating_sub(l.time_ms) as f64 / 1e3,
                "site": l.site,
            })).collect::<Vec<_>>(),
        });
        return v.to_string();
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cudalloc leak report: {} live allocation(s) at least {:.1}s old, {} ({bytes} bytes)",
        live.len(),
        min_age_ms as f64 / 1e3,
        format_size(bytes)
    );
    for g in &groups {
        let frames = callsite::describe(g.site);
        if g.site == 0 {
            let _ = writeln!(
                s,
                "  {} allocation(s), {} ({} bytes), oldest {:.1}s: no call site sampled",
                g.count,
                format_size(g.bytes),
                g.bytes,
                g.oldest_ms as f64 / 1e3
            );
            continue;
        }
        let _ = writeln!(
            s,
            "  site #{}: {} allocation(s), {} ({} bytes), oldest {:.1}s",
            g.site,
            g.count,
            format_size(g.bytes),
            g.bytes,
            g.oldest_ms as f64 / 1e3
        );
        for f in frames.iter() {
            let _ = writeln!(s, "      at {f}");
        }
    }
    for l in live.iter().take(TEXT_LIST) {
        let _ = writeln!(
            s,
            "  {:#x} {} ({} bytes, requested {}) device {} stream {:#x} thread {} seq {} age {:.1}s{}",
            l.ptr,
            format_size(l.size),
            l.size,
            l.requested,
            l.device,
            l.stream,
            l.thread,
            l.seq,
            now.saturating_sub(l.time_ms) as f64 / 1e3,
            if l.site != 0 { format!(" site #{}", l.site) } else { String::new() }
        );
    }
    if live.len() > TEXT_LIST {
        let _ = writeln!(s, "  ... and {} more", live.len() - TEXT_LIST);
    }
    s
}

/// The old-allocation alarm of one device: scans the live table at most every
/// `scan_ms` and logs, once per allocation, those live longer than `age_ms`.
#[derive(Debug)]
pub struct AgeAlarm {
    age_ms: u64,
    scan_ms: u64,
    last_scan: u64,
    /// Allocations made at or before this time were already reported.
    reported_upto: u64,
}

impl AgeAlarm {
    pub fn new(age_ms: u64) -> Self {
        AgeAlarm {
            age_ms,
            scan_ms: (age_ms / 2).clamp(1, 30_000),
            last_scan: 0,
            reported_upto: 0,
        }
    }

    /// Scan if due. Returns whether it logged an alarm.
    pub fn check(&mut self, alloc: &Engine, device: usize, now: u64) -> bool {
        if now < self.last_scan + self.scan_ms || now < self.age_ms {
            return false;
        }
        self.last_scan = now;
        let cutoff = now - self.age_ms;
        let fresh: Vec<LiveInfo> = old_allocations(alloc, Some(device), self.age_ms, now)
            .into_iter()
            .filter(|l| l.time_ms > self.reported_upto || self.reported_upto == 0)
            .collect();
        self.reported_upto = cutoff;
        if fresh.is_empty() {
            return false;
        }
        let bytes: u64 = fresh.iter().map(|l| l.size).sum();
        let mut oldest = String::new();
        for l in fresh.iter().take(3) {
            let site = callsite::describe(l.site);
            let _ = write!(
                oldest,
                "; {:#x} {} age {:.0}s{}",
                l.ptr,
                format_size(l.size),
                now.saturating_sub(l.time_ms) as f64 / 1e3,
                site.first().map(|f| format!(" at {f}")).unwrap_or_default()
            );
        }
        tracing::warn!(
            device,
            "leak_age: {} allocation(s), {}, live longer than {}{oldest} (full list: cudalloc_leak_report)",
            fresh.len(),
            format_size(bytes),
            format_duration_ms(self.age_ms)
        );
        true
    }
}

/// The growth-trend alarm of one device. Each window is split in quarters;
/// the *floor* of a quarter is the least live-bytes sample in it (temporaries
/// come and go above the floor; a leak raises it). At the end of a window the
/// alarm fires when the floors never fall and the last exceeds the first,
/// which must be non-zero, by more than `growth`. Evaluated, and so logged, at
/// most once per window.
#[derive(Debug)]
pub struct GrowthAlarm {
    growth: f64,
    window_ms: u64,
    start: u64,
    floors: [u64; 4],
}

impl GrowthAlarm {
    pub fn new(growth: f64, window_ms: u64) -> Self {
        GrowthAlarm {
            growth,
            window_ms,
            start: u64::MAX,
            floors: [u64::MAX; 4],
        }
    }

    /// Add a sample of live bytes at `now`. Returns whether the alarm fired.
    pub fn sample(&mut self, device: usize, live: u64, now: u64) -> bool {
        if self.start == u64::MAX {
            self.start = now;
        }
        let mut fired = false;
        if now >= self.start + self.window_ms {
            let f = self.floors;
            let steady = f.iter().all(|&x| x != u64::MAX) && f.windows(2).all(|w| w[0] <= w[1]);
            if steady && f[0] > 0 && f[3] as f64 > f[0] as f64 * (1.0 + self.growth) {
                tracing::warn!(
                    device,
                    "leak_growth: live bytes rose steadily from {} to {} (+{:.0}%) over {}; possible leak (see cudalloc_leak_report)",
                    format_size(f[0]),
                    format_size(f[3]),
                    (f[3] as f64 / f[0] as f64 - 1.0) * 100.0,
                    format_duration_ms(self.window_ms)
                );
                fired = true;
            }
            self.start = now;
            self.floors = [u64::MAX; 4];
        }
        let q = (((now - self.start) * 4) / self.window_ms).min(3) as usize;
        self.floors[q] = self.floors[q].min(live);
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_alarm_needs_a_steady_rise() {
        let mut g = GrowthAlarm::new(0.2, 400);
        // Steady state: a loop between 100 and 500 bytes; floors stay 100.
        let mut fired = 0;
        for t in 0..2000u64 {
            let live = if t % 7 == 0 { 100 } else { 500 };
            fired += g.sample(0, live, t) as u64;
        }
        assert_eq!(fired, 0, "steady-state loop is silent");
        // A leak: the floor rises by 1 each ms from 1000.
        let mut g = GrowthAlarm::new(0.2, 400);
        let fired: u64 = (0..2000u64).map(|t| g.sample(0, 1000 + t, t) as u64).sum();
        assert!(fired >= 2, "fires once per window while growing: {fired}");
        assert!(fired <= 5, "at most once per window: {fired}");
    }
}
