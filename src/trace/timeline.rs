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
            Action::AllocateFailure => {}
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

/// Draw the timeline of `r` (a replay of `events` with its timeline) to `path`.
pub fn draw_svg(path: &str, title: &str, events: &[Event], r: &ReplayResult) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {path}: {e}");
    let pts = downsample(r, 2000);
    let t0 = r.samples.first().map_or(0, |s| s.time_us);
    let t_end = pts.last().map_or(1.0, |p| p.0).max(1e-6);
    let y_max = pts
        .iter()
        .map(|p| p.2.max(p.1))
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.1;
    let root = SVGBackend::new(path, (1200, 640)).into_drawing_area();
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
        format!("peak live {}", format_size(r.peak_live)),
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
