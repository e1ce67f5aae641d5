//! The trace subcommands of the `cudalloc` command line: `replay`,
//! `trace-gen` and `report`.

use super::gen::{self, Model};
use super::replay::{min_capacity, replay, replay_config, ReplayResult};
use super::{parse, to_csv, Event};
use crate::config::{format_size, parse_size};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};

/// The configurations `replay --profiles` tries: the defaults and the
/// low-fragmentation profiles the README documents, with what each costs.
pub const PROFILES: &[(&str, &str)] = &[
    ("", "torch's layout; the fastest"),
    (
        "huge_split:off",
        "huge blocks handed out whole (training, variable sequence lengths); more driver calls",
    ),
    (
        "small_max:256KiB",
        "blocks above 256 KiB share the large pool (KV caches); 256 KiB-1 MiB requests lose the stash",
    ),
    (
        "small_max:512",
        "one pool for every size (many mixed sizes); about 2x the cached-pair instructions",
    ),
    (
        "expandable_segments:on",
        "pages mapped where blocks need them and moved once free (any workload that fragments); map/unmap driver calls on growth",
    ),
];

/// The configuration needing the least, as an index into `least` (each
/// configuration's need: least capacity with no failure or peak reserved
/// bytes; `None` when it needs more than was tried). Ties go to the
/// earliest, so the defaults (first) win unless another is strictly smaller.
pub fn recommend(least: &[Option<u64>]) -> Option<usize> {
    least
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.map(|m| (m, i)))
        .min()
        .map(|(_, i)| i)
}

/// The subcommands, for `main.rs` to add.
pub fn commands() -> Vec<Command> {
    let memory = || {
        Arg::new("memory")
            .long("memory")
            .default_value("16GiB")
            .help("capacity of the simulated device")
    };
    let conf = || {
        Arg::new("conf")
            .long("conf")
            .default_value("")
            .help("CUDALLOC_CONF-style options for the replayed allocator (periodic work is off unless set)")
    };
    let gpu_lag = || {
        Arg::new("gpu-lag")
            .long("gpu-lag")
            .value_name("EVENTS")
            .value_parser(value_parser!(u64))
            .default_value("0")
            .help("simulate a GPU running EVENTS trace events behind the host: device work (the events cudalloc records) completes that much later, or at a `synchronize` line; 0: at once")
    };
    vec![
        Command::new("replay")
            .about("Replay an RMM-format trace (Thread,Time,Action,Pointer,Size,Stream) on the sim device")
            .arg(Arg::new("trace").required(true).help("the trace CSV (log_file output, trace-gen, or RMM's logging adaptor), plain or gzip-compressed"))
            .arg(memory())
            .arg(conf())
            .arg(gpu_lag())
            .arg(
                Arg::new("compare")
                    .long("compare")
                    .num_args(2..)
                    .value_name("CONF")
                    .conflicts_with("conf")
                    .help("replay under two or more configurations, side by side (\"\" is the defaults)"),
            )
            .arg(
                Arg::new("profiles")
                    .long("profiles")
                    .action(ArgAction::SetTrue)
                    .conflicts_with_all(["conf", "compare"])
                    .help("compare the defaults with the README's low-fragmentation profiles, and name the one that needs the least device memory (implies --min-memory)"),
            )
            .arg(
                Arg::new("min-memory")
                    .long("min-memory")
                    .action(ArgAction::SetTrue)
                    .help("also find the least capacity with no failure (usable capacity = peak requested live bytes / it)"),
            ),
        Command::new("trace-gen")
            .about("Write a synthetic trace: random (RMM random_allocations), training (transformer), kv-cache (inference), sawtooth (fragmenting cycles)")
            .arg(
                Arg::new("kind")
                    .required(true)
                    .value_parser(["random", "training", "kv-cache", "sawtooth"]),
            )
            .arg(Arg::new("output").short('o').long("output").required(true).help("where to write the CSV"))
            .arg(Arg::new("seed").long("seed").value_parser(value_parser!(u64)).default_value("1"))
            .arg(
                Arg::new("size")
                    .long("size")
                    .value_parser(value_parser!(u64).range(1..))
                    .help("ops (random, default 2000), steps (training, default 6), requests (kv-cache, default 24) or cycles (sawtooth, default 20)"),
            )
            .arg(Arg::new("layers").long("layers").value_parser(value_parser!(u64).range(1..)).default_value("6"))
            .arg(Arg::new("random-max").long("random-max").default_value("8MiB").help("largest request of random"))
            .arg(Arg::new("random-usage").long("random-usage").default_value("2GiB").help("live-bytes cap of random")),
        Command::new("report")
            .about("Draw a trace's memory timeline (live, reserved, OOMs, largest allocations at the peak) as SVG, or as an HTML page (-o *.html) with the figures and tables")
            .arg(Arg::new("trace").required(true))
            .arg(Arg::new("output").short('o').long("output").required(true).help("the file to write: .svg for the picture, .html for a page with the picture, figures and tables (no other format)"))
            .arg(memory())
            .arg(conf())
            .arg(gpu_lag()),
    ]
}

/// Run a trace subcommand. `Ok(false)` when `name` is not one of them.
pub fn run(name: &str, m: &ArgMatches) -> Result<bool, String> {
    match name {
        "replay" => replay_cmd(m)?,
        "trace-gen" => gen_cmd(m)?,
        "report" => report_cmd(m)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn load(m: &ArgMatches) -> Result<(String, Vec<Event>), String> {
    let path = m.get_one::<String>("trace").expect("required").clone();
    let text = read_trace(std::path::Path::new(&path)).map_err(|e| format!("{path}: {e}"))?;
    let ev = parse(&text).map_err(|e| format!("{path}: {e}"))?;
    Ok((path, ev))
}

/// A trace file's text: plain, or gzip-compressed (told by its first bytes,
/// whatever its name).
pub fn read_trace(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("not a readable gzip file: {e}"))?;
        out
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not a text trace (byte {} is not UTF-8); want RMM's CSV, plain or gzip-compressed",
            e.utf8_error().valid_up_to()
        )
    })
}

/// What `report -o PATH` writes, by PATH's extension: SVG, or an HTML page.
fn report_format(out: &str) -> Result<bool, String> {
    let lower = out.to_ascii_lowercase();
    if lower.ends_with(".html") || lower.ends_with(".htm") {
        Ok(true)
    } else if lower.ends_with(".svg") {
        Ok(false)
    } else {
        Err(format!(
            "-o {out}: report writes an SVG picture (.svg) or an HTML page (.html), not this; \
             for a PNG, convert the SVG (for example with rsvg-convert)"
        ))
    }
}

fn size_arg(m: &ArgMatches, name: &str) -> Result<u64, String> {
    let v = m.get_one::<String>(name).expect("has a default");
    parse_size(v)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("--{name}: '{v}' is not a size"))
}

fn rows(r: &ReplayResult) -> Vec<(&'static str, String)> {
    vec![
        ("events", r.events.to_string()),
        ("peak live (requested)", format_size(r.peak_requested)),
        ("peak live (allocated)", format_size(r.peak_live)),
        ("peak reserved", format_size(r.peak_reserved)),
        (
            "fragmentation (reserved/requested)",
            format!("{:.4}", r.fragmentation()),
        ),
        (
            "reserved/allocated (torch's view)",
            format!("{:.4}", r.reserved_over_allocated()),
        ),
        ("cache hit rate", format!("{:.4}", r.hit_rate)),
        ("driver calls", r.driver_calls.to_string()),
        (
            "events recorded / queried",
            format!("{} / {}", r.event_records, r.event_queries),
        ),
        ("failures (OOM at this capacity)", r.failures.to_string()),
        (
            "failures already in the trace",
            r.trace_failures.to_string(),
        ),
        ("unmatched frees", r.unmatched_frees.to_string()),
        (
            "allocations of a live pointer",
            r.allocs_of_live.to_string(),
        ),
        ("replay time", format!("{:.2} ms", r.seconds * 1e3)),
    ]
}

fn replay_cmd(m: &ArgMatches) -> Result<(), String> {
    let (path, ev) = load(m)?;
    let memory = size_arg(m, "memory")?;
    let profiles = m.get_flag("profiles");
    let min_memory = profiles || m.get_flag("min-memory");
    let lag = *m.get_one::<u64>("gpu-lag").expect("has a default");
    let confs: Vec<String> = match m.get_many::<String>("compare") {
        Some(v) => v.cloned().collect(),
        None if profiles => PROFILES.iter().map(|(c, _)| c.to_string()).collect(),
        None => vec![m.get_one::<String>("conf").cloned().unwrap_or_default()],
    };
    println!(
        "replay of {path} on a simulated device of {}{}",
        format_size(memory),
        if lag > 0 {
            format!(", its work {lag} trace events behind the host")
        } else {
            String::new()
        }
    );
    let mut table: Vec<Vec<(&'static str, String)>> = Vec::new();
    let mut least: Vec<Option<u64>> = Vec::new();
    // Peak reserved of each run with no failure (a run that failed reserved
    // less only because its allocations failed).
    let mut peaks: Vec<Option<u64>> = Vec::new();
    let mut calls: Vec<u64> = Vec::new();
    let mut vmm: Vec<[u64; 6]> = Vec::new();
    for conf in &confs {
        let c = replay_config(conf, memory).map_err(|e| e.to_string())?;
        let r = replay(&ev, &c, false, lag);
        peaks.push((r.failures == 0).then_some(r.peak_reserved));
        calls.push(r.driver_calls);
        let mut t = rows(&r);
        if min_memory {
            let found = min_capacity(&ev, &c, lag);
            least.push(found.as_ref().map(|(min, _)| *min));
            match found {
                Some((min, best)) => {
                    t.push(("least capacity with no failure", format_size(min)));
                    t.push((
                        "usable capacity (peak requested / least)",
                        format!("{:.4}", best.peak_requested as f64 / min as f64),
                    ));
                }
                None => {
                    t.push((
                        "least capacity with no failure",
                        "more than --memory".into(),
                    ));
                    t.push(("usable capacity (peak requested / least)", "n/a".into()));
                }
            }
        }
        table.push(t);
        vmm.push(r.vmm_calls);
    }
    if vmm.iter().any(|v| v.iter().any(|&n| n > 0)) {
        // Where the driver calls went, for the expandable runs.
        let at = table[0]
            .iter()
            .position(|r| r.0 == "driver calls")
            .expect("a driver calls row")
            + 1;
        for (t, v) in table.iter_mut().zip(&vmm) {
            t.insert(
                at,
                (
                    "  create/release/map/unmap/access/range",
                    v.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join("/"),
                ),
            );
        }
    }
    let head: Vec<String> = confs
        .iter()
        .map(|c| {
            if c.is_empty() {
                "defaults".to_string()
            } else {
                c.clone()
            }
        })
        .collect();
    print!("{:<38}", "");
    for h in &head {
        print!(" {h:>24}");
    }
    println!();
    for i in 0..table[0].len() {
        print!("{:<38}", table[0][i].0);
        for t in &table {
            print!(" {:>24}", t[i].1);
        }
        println!();
    }
    if confs.len() > 1 && min_memory {
        // "(-3.0% against defaults)", or nothing when the first column won
        // or has no figure.
        let against = |best: usize, v: u64, base: Option<u64>| match base {
            Some(b) if best != 0 && b > 0 => format!(
                " ({:+.1}% against {})",
                (v as f64 / b as f64 - 1.0) * 100.0,
                head[0]
            ),
            _ => String::new(),
        };
        // "<configuration>, <size>[ (<percent> against <first>)]" for the
        // configuration needing the least of `needs`.
        let leanest = |needs: &[Option<u64>]| {
            recommend(needs).map(|best| {
                let v = needs[best].unwrap_or(0);
                format!(
                    "{}, {}{}",
                    head[best],
                    format_size(v),
                    against(best, v, needs[0])
                )
            })
        };
        println!();
        match leanest(&least) {
            None => println!(
                "no configuration replays this trace within {}; try a larger --memory",
                format_size(memory)
            ),
            Some(line) => println!("least device memory:  {line}"),
        }
        if let Some(line) = leanest(&peaks) {
            println!("lowest peak reserved: {line} at {}", format_size(memory));
        }
        // Memory is not the only cost: on a GPU each cuMemFree waits for the
        // whole device, and cuMemAlloc is slow. The sim does not time them.
        if let Some(best) = recommend(&least).filter(|&b| b != 0 && calls[b] > 2 * calls[0].max(1))
        {
            let why = if vmm[best].iter().any(|&n| n > 0) {
                "each cuMemMap, cuMemUnmap or cuMemSetAccess takes tens of microseconds"
            } else {
                "each cuMemFree waits for the whole device"
            };
            println!(
                "but {} makes {} driver calls against {} for {}: on a GPU {why}, so time a few \
                 steps with it before adopting it",
                head[best], calls[best], calls[0], head[0]
            );
        }
        for (c, why) in PROFILES {
            if let Some(h) = confs.iter().position(|x| x == c) {
                println!("  {}: {why}", head[h]);
            }
        }
    }
    Ok(())
}

fn gen_cmd(m: &ArgMatches) -> Result<(), String> {
    let kind = m.get_one::<String>("kind").expect("required").as_str();
    let seed = *m.get_one::<u64>("seed").expect("default");
    let size = m.get_one::<u64>("size").copied();
    let model = Model {
        layers: *m.get_one::<u64>("layers").expect("default"),
        ..Default::default()
    };
    let ev = match kind {
        "random" => gen::random_allocations(
            seed,
            size.unwrap_or(2000),
            size_arg(m, "random-max")?,
            size_arg(m, "random-usage")?,
        ),
        "training" => gen::training(seed, size.unwrap_or(6), model),
        "sawtooth" => gen::sawtooth(seed, size.unwrap_or(20)),
        _ => gen::kv_cache(seed, size.unwrap_or(24), model),
    };
    let out = m.get_one::<String>("output").expect("required");
    std::fs::write(out, to_csv(&ev)).map_err(|e| format!("{out}: {e}"))?;
    println!("wrote {} events ({kind}, seed {seed}) to {out}", ev.len());
    Ok(())
}

fn report_cmd(m: &ArgMatches) -> Result<(), String> {
    let out = m.get_one::<String>("output").expect("required");
    let html = report_format(out)?; // before the replay: fail fast
    let (path, ev) = load(m)?;
    let c = replay_config(
        m.get_one::<String>("conf").expect("default"),
        size_arg(m, "memory")?,
    )
    .map_err(|e| e.to_string())?;
    let r = replay(
        &ev,
        &c,
        true,
        *m.get_one::<u64>("gpu-lag").expect("has a default"),
    );
    let name = std::path::Path::new(&path)
        .file_name()
        .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
    let title = format!("cudalloc memory timeline: {name}");
    let figures = rows(&r);
    let text = if html {
        super::timeline::render_html(&title, &ev, &r, &figures)?
    } else {
        super::timeline::render_svg(&title, &ev, &r)?
    };
    std::fs::write(out, text).map_err(|e| format!("{out}: {e}"))?;
    for (k, v) in figures {
        println!("{k:<38} {v}");
    }
    println!("largest live allocations at the peak:");
    for (p, s, _) in super::timeline::largest_at_peak(&ev, r.peak_event, 10) {
        println!("  {p:#x} {} ({s} bytes)", format_size(s));
    }
    println!("wrote {out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_read_plain_or_gzipped_and_reports_only_as_svg_or_html() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("cudalloc-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "\u{feff}Thread,Time,Action,Pointer,Size,Stream\n1,00:00:01.000000,allocate,0x10,512,0\n";
        let plain = dir.join("t.csv");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.join("t.csv.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(read_trace(&plain).unwrap(), text);
        assert_eq!(read_trace(&gz).unwrap(), text);
        assert_eq!(parse(&read_trace(&gz).unwrap()).unwrap().len(), 1);
        let bin = dir.join("t.bin");
        std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_trace(&bin).unwrap_err().contains("not a text trace"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report_format("a.SVG"), Ok(false));
        assert_eq!(report_format("a.html"), Ok(true));
        assert!(report_format("out.png").unwrap_err().contains("not this"));
        assert!(report_format("timeline").is_err());
    }

    #[test]
    fn recommend_takes_the_least_capacity_and_prefers_the_first_on_ties() {
        assert_eq!(recommend(&[Some(10), Some(8), Some(9)]), Some(1));
        assert_eq!(recommend(&[Some(8), Some(8)]), Some(0));
        assert_eq!(recommend(&[None, Some(9)]), Some(1));
        assert_eq!(recommend(&[None, None]), None);
        assert_eq!(recommend(&[]), None);
    }

    #[test]
    fn every_profile_is_a_valid_configuration() {
        for (c, _) in PROFILES {
            crate::config::Config::parse(c).unwrap();
        }
        assert_eq!(
            PROFILES[0].0, "",
            "the defaults come first (ties go to them)"
        );
    }
}
