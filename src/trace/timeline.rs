//! `cudalloc report`: the memory timeline of a trace as an SVG picture: live
//! and reserved bytes over time (from a replay on the sim device), OOM events
//! marked, and the largest live allocations at the peak listed beside it.
//! Drawn with plotters' SVG backend; text is left to the viewer's fonts, so
//! no font library is needed to render.

use super::replay::ReplayResult;
use super::Event;
use crate::config::format_size;
use crate::observe::tracelog::Action;
use plotters::prelude::*;
use rustc_hash::FxHashMap;

/// Largest live allocations at the replay's peak: `(trace pointer, size, time_us)`.
pub fn largest_at_peak(events: &[Event], peak_event: usize, n: usize) -> Vec<(u64, u64, u64)> {
    let mut live: FxHashMap<u64, (u64, u64)> = FxHashMap::default();
    for e in events.iter().take(peak_event + 1) {
        match e.action {
            Action::Allocate => {
                live.insert(e.ptr, (e.size, e.time_us));
            }
            Action::Free => {
                live.remove(&e.ptr);
            }
            Action::AllocateFailure | Action::Synchronize => {}
        }
    }
    let mut v: Vec<(u64, u64, u64)> = live.into_iter().map(|(p, (s, t))| (p, s, t)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    v.truncate(n);
    v
}

/// At most `n` points: the maximum of each bucket, so peaks survive.
fn downsample(r: &ReplayResult, n: usize) -> Vec<(f64, f64, f64)> {
    let t0 = r.samples.first().map_or(0, |s| s.time_us);
    let per = r.samples.len().div_ceil(n.max(1)).max(1);
    r.samples
        .chunks(per)
        .map(|c| {
            let live = c.iter().map(|s| s.live).max().unwrap_or(0);
            let res = c.iter().map(|s| s.reserved).max().unwrap_or(0);
            (
                (c[0].time_us - t0) as f64 / 1e6,
                live as f64 / (1u64 << 30) as f64,
                res as f64 / (1u64 << 30) as f64,
            )
        })
        .collect()
}

/// The timeline of `r` (a replay of `events` with its timeline) as SVG text.
pub fn render_svg(title: &str, events: &[Event], r: &ReplayResult) -> Result<String, String> {
    let mut buf = String::new();
    draw_into(&mut buf, title, events, r)?;
    Ok(buf)
}

fn draw_into(
    buf: &mut String,
    title: &str,
    events: &[Event],
    r: &ReplayResult,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing the timeline: {e}");
    let pts = downsample(r, 2000);
    let t0 = r.samples.first().map_or(0, |s| s.time_us);
    let t_end = pts.last().map_or(1.0, |p| p.0).max(1e-6);
    let y_max = pts
        .iter()
        .map(|p| p.2.max(p.1))
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.1;
    let root = SVGBackend::with_string(buf, (1200, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(820);
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_end, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("GiB")
        .draw()
        .map_err(|e| err(&e))?;
    let reserved = RGBColor(230, 120, 20);
    let live = RGBColor(30, 90, 200);
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.2)),
            reserved.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("reserved (held from the device)")
        .legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], reserved.stroke_width(2))
        });
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.1)),
            live.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("live (allocated)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], live.stroke_width(2)));
    if !r.oom_times.is_empty() {
        chart
            .draw_series(r.oom_times.iter().map(|&t| {
                let x = t.saturating_sub(t0) as f64 / 1e6;
                PathElement::new(vec![(x, 0.0), (x, y_max)], RED.stroke_width(1))
            }))
            .map_err(|e| err(&e))?
            .label(format!("OOM ({})", r.oom_times.len()))
            .legend(|(x, y)| PathElement::new(vec![(x, y - 6), (x, y + 6)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    // The side panel: figures, then the largest live allocations at the peak.
    let mut lines = vec![
        format!("peak live {}", format_size(r.peak_requested)),
        format!("peak reserved {}", format_size(r.peak_reserved)),
        format!("reserved / live {:.3}", r.fragmentation()),
        format!("cache hit rate {:.3}", r.hit_rate),
        format!("driver calls {}", r.driver_calls),
        format!(
            "OOMs {} (device {})",
            r.oom_times.len(),
            format_size(r.capacity)
        ),
        String::new(),
        "largest live allocations at the peak:".to_string(),
    ];
    for (i, (p, s, t)) in largest_at_peak(events, r.peak_event, 15).iter().enumerate() {
        lines.push(format!(
            "{:>2}. {} at {:.3}s ({p:#x})",
            i + 1,
            format_size(*s),
            t.saturating_sub(t0) as f64 / 1e6
        ));
    }
    let style = ("monospace", 14).into_font().color(&BLACK);
    for (i, l) in lines.iter().enumerate() {
        right
            .draw(&Text::new(
                l.clone(),
                (10, 40 + 20 * i as i32),
                style.clone(),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Escape text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A self-contained HTML page: the timeline picture inline, the replay's
/// figures (`rows`), the largest live allocations at the peak, and the OOM
/// events with their times. No scripts and no external resources, so it opens
/// anywhere and can be attached to a bug report.
pub fn render_html(
    title: &str,
    events: &[Event],
    r: &ReplayResult,
    rows: &[(&str, String)],
) -> Result<String, String> {
    use std::fmt::Write as _;
    let svg = render_svg(title, events, r)?;
    let t0 = r.samples.first().map_or(0, |s| s.time_us);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}td.n{{text-align:right;font-family:monospace}}</style>\n\
         </head><body>\n<h1>{t}</h1>\n{svg}\n<h2>Figures</h2>\n<table>\n",
        t = esc(title)
    );
    for (k, v) in rows {
        let _ = writeln!(
            h,
            "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
            esc(k),
            esc(v)
        );
    }
    let _ = writeln!(
        h,
        "</table>\n<h2>Largest live allocations at the peak</h2>\n<table>\n\
         <tr><th>#</th><th>size</th><th>bytes</th><th>allocated at (s)</th><th>trace pointer</th></tr>"
    );
    for (i, (p, s, t)) in largest_at_peak(events, r.peak_event, 25).iter().enumerate() {
        let _ = writeln!(
            h,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{s}</td><td class=\"n\">{:.6}</td><td class=\"n\">{p:#x}</td></tr>",
            i + 1,
            esc(&format_size(*s)),
            t.saturating_sub(t0) as f64 / 1e6
        );
    }
    let _ = writeln!(h, "</table>\n<h2>OOM events ({})</h2>", r.oom_times.len());
    if r.oom_times.is_empty() {
        let _ = writeln!(
            h,
            "<p>None at a device of {}.</p>",
            esc(&format_size(r.capacity))
        );
    } else {
        let _ = writeln!(h, "<table>\n<tr><th>#</th><th>time (s)</th></tr>");
        for (i, t) in r.oom_times.iter().take(1000).enumerate() {
            let _ = writeln!(
                h,
                "<tr><td class=\"n\">{}</td><td class=\"n\">{:.6}</td></tr>",
                i + 1,
                t.saturating_sub(t0) as f64 / 1e6
            );
        }
        let _ = writeln!(h, "</table>");
        if r.oom_times.len() > 1000 {
            let _ = writeln!(h, "<p>({} more not listed.)</p>", r.oom_times.len() - 1000);
        }
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::trace::replay::{replay, replay_config};

    fn ev(time_us: u64, action: Action, ptr: u64, size: u64) -> Event {
        Event {
            thread: 1,
            time_us,
            action,
            ptr,
            size,
            stream: 0,
        }
    }

    /// 8 MiB live, then a 30 MiB request that does not fit a 32 MiB device.
    fn trace() -> (Vec<Event>, Config) {
        let mib = 1u64 << 20;
        let events = vec![
            ev(1, Action::Allocate, 0x100, 3 * mib),
            ev(2, Action::Allocate, 0x200, 5 * mib),
            ev(3, Action::Allocate, 0x300, 1000),
            ev(4, Action::Allocate, 0x400, 30 * mib),
            ev(5, Action::Free, 0x100, 3 * mib),
        ];
        (events, replay_config("", 32 * mib).unwrap())
    }

    #[test]
    fn html_page_holds_the_picture_figures_peak_allocations_and_ooms() {
        let (events, c) = trace();
        let r = replay(&events, &c, true, 0);
        assert_eq!(r.oom_times, vec![4], "the 30 MiB request fails");
        let rows = vec![("peak reserved", format_size(r.peak_reserved))];
        let h = render_html("a<b>&\"c\"", &events, &r, &rows).unwrap();
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(
            h.contains("<title>a&lt;b&gt;&amp;&quot;c&quot;</title>"),
            "title escaped"
        );
        assert!(!h.contains("a<b>"), "no raw title");
        assert!(h.contains("<svg") && h.contains("</svg>"), "picture inline");
        assert!(h.contains(&format!(
            "<th>peak reserved</th><td class=\"n\">{}</td>",
            format_size(r.peak_reserved)
        )));
        // Largest first: 5 MiB, 3 MiB, then the 1000-byte one.
        let five = h
            .find("<td class=\"n\">5242880</td>")
            .expect("5 MiB listed");
        let three = h
            .find("<td class=\"n\">3145728</td>")
            .expect("3 MiB listed");
        assert!(five < three);
        assert!(h.contains("<h2>OOM events (1)</h2>"));
        assert!(h.trim_end().ends_with("</html>"));
    }

    #[test]
    fn fragmentation_counts_requested_bytes() {
        let (events, c) = trace();
        let r = replay(&events, &c, false, 0);
        assert_eq!(r.peak_requested, 8 * (1 << 20) + 1000);
        assert!(r.peak_live > r.peak_requested, "blocks are rounded up");
        let f = r.peak_reserved as f64 / r.peak_requested as f64;
        assert_eq!(r.fragmentation(), f);
        assert!(r.fragmentation() > r.reserved_over_allocated());
    }
}
