//! One options table, parsed from `CUDALLOC_CONF` in torch syntax
//! (`key:value,key:value`).
//!
//! Every option is a row of [`OPTIONS`]: its key, what it accepts, its default
//! and a line of docs. Defaults are applied through the same parser as user
//! values, so the table is the single source of truth. An unknown key or a bad
//! value is an [`Error`] naming the key and what is accepted. `cudalloc config`
//! prints the effective configuration with [`Config::render`].

use crate::error::{Error, Result};
use std::fmt::Write as _;

/// The environment variable holding the configuration string.
pub const CONF_ENV: &str = "CUDALLOC_CONF";

/// Which driver backs the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `cuda` when libcuda loads, else `sim` with one warning.
    Auto,
    /// The CUDA driver API; an error when libcuda is missing.
    Cuda,
    /// The simulated device.
    Sim,
}

/// Event behaviour of the simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimEvents {
    /// Recorded events complete at once.
    Auto,
    /// Recorded events complete only when a test says so (or on synchronise).
    Manual,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub backend: Backend,
    pub sim_devices: usize,
    pub sim_memory: u64,
    pub sim_events: SimEvents,
    pub sim_fail_alloc: u64,
    /// Per-device byte limit; 0 means none.
    pub max_memory: u64,
    /// Per-device fraction of total memory cudalloc may reserve.
    pub memory_fraction: f64,
    /// Warm-up reservation in bytes, taken at a device's first use: one
    /// value for every device, or one per device (devices past the list
    /// take none). See [`Config::reserve_for`].
    pub reserve: Vec<u64>,
    /// Largest request served from the small pool.
    pub small_max: u64,
    /// Segment size of the small pool.
    pub small_segment: u64,
    /// Segment size of the large pool.
    pub large_segment: u64,
    /// Requests at least this big get a segment of their own ...
    pub huge_threshold: u64,
    /// ... rounded up to a multiple of this.
    pub huge_round: u64,
    /// Whether the block of a segment of its own (a huge request's) may be
    /// split to serve smaller requests (torch's behaviour). When false it is
    /// handed out whole, only to requests within one `large_segment` of its
    /// size, and released before growing when it fits no request.
    pub huge_split: bool,
    /// Segments are virtual ranges whose physical pages are mapped on
    /// demand and move where they are needed (CUDA virtual memory).
    pub expandable_segments: bool,
    /// Serve PyTorch's private memory pools (CUDA graph capture) instead of
    /// refusing them.
    pub graph_pools: bool,
    // Observability (src/observe/): leak tracking, pressure, trace log, exports.
    /// Call-site frames captured per sampled allocation; 0 = off.
    pub backtrace: u32,
    /// Capture a call site for one allocation in this many.
    pub backtrace_sample: u32,
    /// Print the leak report when the process exits.
    pub leak_report_exit: bool,
    /// Log allocations live longer than this (ms); 0 = off.
    pub leak_age_ms: u64,
    /// Growth of the live-bytes floor over a window that raises the alarm; 0 = off.
    pub leak_growth: f64,
    /// The growth alarm's window (ms).
    pub leak_window_ms: u64,
    /// Least time between two samples of device memory (ms); 0 = off.
    pub pressure_interval_ms: u64,
    /// Device-memory use above which idle cached segments are released; 1 = never.
    pub trim_threshold: f64,
    /// Where the RMM-format CSV trace goes; empty = off.
    pub log_file: String,
    /// Where the JSON stats go at exit; empty = off.
    pub stats_file: String,
}

/// One row of the options table.
pub struct OptionSpec {
    pub key: &'static str,
    pub accepted: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
    set: fn(&mut Config, &str) -> std::result::Result<(), String>,
    get: fn(&Config) -> String,
}

const DURATION_ACCEPTED: &str =
    "off, or a duration with unit ms, s, min or h (decimals allowed), e.g. 300s";

/// The largest simulated device: half its 16 TiB address window, so that
/// every byte of it can be handed out whatever the sizes (each segment
/// takes a 2 MiB guard gap in the window).
pub const SIM_MEMORY_MAX: u64 = 8 << 40;

/// Every option cudalloc understands.
pub static OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        key: "backend",
        accepted: "auto | cuda | sim",
        default: "auto",
        doc: "device driver: auto picks cuda when libcuda loads, else sim with one warning",
        set: |c, v| {
            c.backend = match v {
                "auto" => Backend::Auto,
                "cuda" => Backend::Cuda,
                "sim" => Backend::Sim,
                _ => return Err(String::new()),
            };
            Ok(())
        },
        get: |c| format!("{:?}", c.backend).to_lowercase(),
    },
    OptionSpec {
        key: "sim_devices",
        accepted: "an integer from 1 to 64",
        default: "1",
        doc: "number of simulated devices",
        set: |c, v| {
            c.sim_devices = parse_int(v)
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(String::new)? as usize;
            Ok(())
        },
        get: |c| c.sim_devices.to_string(),
    },
    OptionSpec {
        key: "sim_memory",
        accepted: "a byte count from 1 to 8TiB with optional suffix K/M/G/T, e.g. 16GiB",
        default: "16GiB",
        doc: "capacity of each simulated device",
        set: |c, v| {
            c.sim_memory = parse_size(v)
                .filter(|n| (1..=SIM_MEMORY_MAX).contains(n))
                .ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| format_size(c.sim_memory),
    },
    OptionSpec {
        key: "sim_events",
        accepted: "auto | manual",
        default: "auto",
        doc: "simulated events complete at once (auto) or only when a test says so (manual)",
        set: |c, v| {
            c.sim_events = match v {
                "auto" => SimEvents::Auto,
                "manual" => SimEvents::Manual,
                _ => return Err(String::new()),
            };
            Ok(())
        },
        get: |c| format!("{:?}", c.sim_events).to_lowercase(),
    },
    OptionSpec {
        key: "sim_fail_alloc",
        accepted: "a non-negative integer (0 = off)",
        default: "0",
        doc: "fault injection: the Nth simulated driver allocation fails with OOM",
        set: |c, v| {
            c.sim_fail_alloc = parse_int(v).ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| c.sim_fail_alloc.to_string(),
    },
    OptionSpec {
        key: "max_memory",
        accepted: "0 (no limit) or a byte count with optional suffix K/M/G/T, e.g. 8GiB",
        default: "0",
        doc: "per-device cap on reserved bytes; going over it is an OOM",
        set: |c, v| {
            c.max_memory = parse_size(v).ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| {
            if c.max_memory == 0 {
                "0 (none)".into()
            } else {
                format_size(c.max_memory)
            }
        },
    },
    OptionSpec {
        key: "memory_fraction",
        accepted: "a number in (0, 1]",
        default: "1",
        doc: "per-device cap on reserved bytes as a fraction of total device memory",
        set: |c, v| {
            let f: f64 = v.parse().map_err(|_| String::new())?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(String::new());
            }
            c.memory_fraction = f;
            Ok(())
        },
        get: |c| c.memory_fraction.to_string(),
    },
    OptionSpec {
        key: "reserve",
        accepted: "0 (none), a byte count with optional suffix K/M/G/T for every device, or one per device separated by '|', e.g. 4GiB or 4GiB|0|2GiB",
        default: "0",
        doc: "warm-up reservation taken from the driver at a device's first use and kept cached; trim never goes below it, empty_cache releases it",
        set: |c, v| {
            c.reserve = parse_reserve(v)?;
            Ok(())
        },
        get: |c| {
            if c.reserve.iter().all(|&n| n == 0) {
                "0 (none)".into()
            } else {
                c.reserve
                    .iter()
                    .map(|&n| if n == 0 { "0".into() } else { format_size(n) })
                    .collect::<Vec<_>>()
                    .join("|")
            }
        },
    },
    OptionSpec {
        key: "small_max",
        accepted: "a size that is a multiple of 512, e.g. 1MiB",
        default: "1MiB",
        doc: "largest request served from the small pool",
        set: |c, v| {
            c.small_max = parse_granular(v)?;
            Ok(())
        },
        get: |c| format_size(c.small_max),
    },
    OptionSpec {
        key: "small_segment",
        accepted: "a size that is a multiple of 512 and >= small_max, e.g. 2MiB",
        default: "2MiB",
        doc: "segment size of the small pool",
        set: |c, v| {
            c.small_segment = parse_granular(v)?;
            Ok(())
        },
        get: |c| format_size(c.small_segment),
    },
    OptionSpec {
        key: "large_segment",
        accepted: "a size that is a multiple of 512 and > small_max, e.g. 20MiB",
        default: "20MiB",
        doc: "segment size of the large pool",
        set: |c, v| {
            c.large_segment = parse_granular(v)?;
            Ok(())
        },
        get: |c| format_size(c.large_segment),
    },
    OptionSpec {
        key: "huge_threshold",
        accepted: "a size that is a multiple of 512, e.g. 10MiB",
        default: "10MiB",
        doc: "requests at least this big get a segment of their own",
        set: |c, v| {
            c.huge_threshold = parse_granular(v)?;
            Ok(())
        },
        get: |c| format_size(c.huge_threshold),
    },
    OptionSpec {
        key: "huge_round",
        accepted: "a size that is a multiple of 512, e.g. 2MiB",
        default: "2MiB",
        doc: "own segments of huge requests are rounded up to a multiple of this",
        set: |c, v| {
            c.huge_round = parse_granular(v)?;
            Ok(())
        },
        get: |c| format_size(c.huge_round),
    },
    OptionSpec {
        key: "huge_split",
        accepted: "on | off",
        default: "on",
        doc: "on: own segments of huge requests are split to serve smaller requests (torch); off: handed out whole to requests within large_segment of their size, and released before growing when they fit none",
        set: |c, v| {
            c.huge_split = parse_on_off(v)?;
            Ok(())
        },
        get: |c| on_off(c.huge_split),
    },
    OptionSpec {
        key: "expandable_segments",
        accepted: "on | off (True | False, as PyTorch spells it)",
        default: "off",
        doc: "on: each stream's pools are virtual ranges whose 2 MiB pages are mapped as blocks need them, and a page whose frees are proven complete moves to wherever a request needs it before new memory is asked for (CUDA virtual memory; falls back to classic segments, with one warning, where the driver or GPU lacks it)",
        set: |c, v| {
            c.expandable_segments = match v {
                "True" | "true" => true,
                "False" | "false" => false,
                _ => parse_on_off(v)?,
            };
            Ok(())
        },
        get: |c| on_off(c.expandable_segments),
    },
    OptionSpec {
        key: "graph_pools",
        accepted: "on | off",
        default: "off",
        doc: "on: PyTorch's private memory pools (torch.cuda.graph, make_graphed_callables) get pool-private segments, kept until the graph is released; off: cudalloc refuses them with a clear error (experimental until checked on a GPU)",
        set: |c, v| {
            c.graph_pools = parse_on_off(v)?;
            Ok(())
        },
        get: |c| on_off(c.graph_pools),
    },
    OptionSpec {
        key: "backtrace",
        accepted: "off | a frame count from 1 to 64",
        default: "off",
        doc: "capture call sites of sampled allocations (frames each) for leak reports",
        set: |c, v| {
            c.backtrace = match v {
                "off" | "0" => 0,
                _ => parse_int(v)
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(String::new)? as u32,
            };
            Ok(())
        },
        get: |c| off_or(c.backtrace as u64 == 0, c.backtrace.to_string()),
    },
    OptionSpec {
        key: "backtrace_sample",
        accepted: "an integer K >= 1 (one allocation in K gets a call site)",
        default: "1",
        doc: "backtrace sampling: capture one allocation's call site in K",
        set: |c, v| {
            c.backtrace_sample = parse_int(v)
                .filter(|n| (1..=u32::MAX as u64).contains(n))
                .ok_or_else(String::new)? as u32;
            Ok(())
        },
        get: |c| c.backtrace_sample.to_string(),
    },
    OptionSpec {
        key: "leak_report",
        accepted: "off | exit",
        default: "off",
        doc: "exit: print the live allocations (grouped by call site) to stderr at process exit",
        set: |c, v| {
            c.leak_report_exit = match v {
                "off" => false,
                "exit" => true,
                _ => return Err(String::new()),
            };
            Ok(())
        },
        get: |c| if c.leak_report_exit { "exit" } else { "off" }.into(),
    },
    OptionSpec {
        key: "leak_age",
        accepted: DURATION_ACCEPTED,
        default: "300s",
        doc: "log (rate-limited) allocations live longer than this",
        set: |c, v| {
            c.leak_age_ms = parse_duration_ms(v).ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| format_duration_ms(c.leak_age_ms),
    },
    OptionSpec {
        key: "leak_growth",
        accepted: "off or a fraction > 0, e.g. 0.2 for 20%",
        default: "0.2",
        doc: "alarm when the live-bytes floor rises steadily by more than this over leak_window",
        set: |c, v| {
            c.leak_growth = match v {
                "off" | "0" => 0.0,
                _ => v
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(String::new)?,
            };
            Ok(())
        },
        get: |c| off_or(c.leak_growth == 0.0, c.leak_growth.to_string()),
    },
    OptionSpec {
        key: "leak_window",
        accepted: "a duration > 0 with unit ms, s, min or h, e.g. 5min",
        default: "5min",
        doc: "window of the growth alarm (logged at most once per window)",
        set: |c, v| {
            c.leak_window_ms = parse_duration_ms(v)
                .filter(|n| *n > 0)
                .ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| format_duration_ms(c.leak_window_ms),
    },
    OptionSpec {
        key: "pressure_interval",
        accepted: DURATION_ACCEPTED,
        default: "100ms",
        doc: "least time between samples of device memory (pressure level, trim), taken on allocation calls",
        set: |c, v| {
            c.pressure_interval_ms = parse_duration_ms(v).ok_or_else(String::new)?;
            Ok(())
        },
        get: |c| format_duration_ms(c.pressure_interval_ms),
    },
    OptionSpec {
        key: "trim_threshold",
        accepted: "a number in (0, 1] (1 = never trim)",
        default: "0.85",
        doc: "above this fraction of device memory in use, release idle cached segments, oldest first",
        set: |c, v| {
            let f: f64 = v.parse().map_err(|_| String::new())?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(String::new());
            }
            c.trim_threshold = f;
            Ok(())
        },
        get: |c| c.trim_threshold.to_string(),
    },
    OptionSpec {
        key: "log_file",
        accepted: "off or a file path (no commas)",
        default: "off",
        doc: "write every allocate/free/failure as RMM logging-adaptor CSV",
        set: |c, v| {
            c.log_file = path_or_off(v);
            Ok(())
        },
        get: |c| off_or(c.log_file.is_empty(), c.log_file.clone()),
    },
    OptionSpec {
        key: "stats_file",
        accepted: "off or a file path (no commas)",
        default: "off",
        doc: "write the JSON stats (as cudalloc_stats_json) at process exit",
        set: |c, v| {
            c.stats_file = path_or_off(v);
            Ok(())
        },
        get: |c| off_or(c.stats_file.is_empty(), c.stats_file.clone()),
    },
];

impl Default for Config {
    fn default() -> Self {
        let mut c = Config {
            backend: Backend::Auto,
            sim_devices: 1,
            sim_memory: 0,
            sim_events: SimEvents::Auto,
            sim_fail_alloc: 0,
            max_memory: 0,
            memory_fraction: 1.0,
            reserve: Vec::new(),
            small_max: 0,
            small_segment: 0,
            large_segment: 0,
            huge_threshold: 0,
            huge_round: 0,
            huge_split: true,
            expandable_segments: false,
            graph_pools: false,
            backtrace: 0,
            backtrace_sample: 1,
            leak_report_exit: false,
            leak_age_ms: 0,
            leak_growth: 0.0,
            leak_window_ms: 0,
            pressure_interval_ms: 0,
            trim_threshold: 1.0,
            log_file: String::new(),
            stats_file: String::new(),
        };
        for o in OPTIONS {
            (o.set)(&mut c, o.default).expect("option table default must parse");
        }
        c
    }
}

/// Where an option's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The options table's default.
    Default,
    /// The program: `cudalloc_init`'s string (Python: `configure`/`enable`).
    Program,
    /// The operator: `CUDALLOC_CONF`.
    Environment,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::Program => "program",
            Source::Environment => CONF_ENV,
        }
    }
}

/// A configuration and where each value came from (by [`OPTIONS`] row).
#[derive(Debug, Clone, PartialEq)]
pub struct Layered {
    pub config: Config,
    pub sources: Vec<Source>,
}

impl Layered {
    /// Where the value of `key` came from.
    pub fn source(&self, key: &str) -> Option<Source> {
        OPTIONS
            .iter()
            .position(|o| o.key == key)
            .map(|i| self.sources[i])
    }

    /// The effective configuration, one option a line, each with its source.
    pub fn render(&self) -> String {
        render(&self.config, Some(&self.sources))
    }

    /// One line: every value that is not a default, with its source.
    pub fn summary(&self) -> String {
        let set: Vec<String> = OPTIONS
            .iter()
            .zip(&self.sources)
            .filter(|(_, s)| **s != Source::Default)
            .map(|(o, s)| format!("{}:{} ({})", o.key, (o.get)(&self.config), s.name()))
            .collect();
        if set.is_empty() {
            "the defaults".into()
        } else {
            set.join(", ")
        }
    }
}

/// `CUDALLOC_CONF`'s value: `None` when unset.
pub fn env_conf() -> Result<Option<String>> {
    match std::env::var(CONF_ENV) {
        Ok(s) => Ok(Some(s)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::config(format!("{CONF_ENV} is not valid UTF-8")))
        }
    }
}

impl Config {
    /// Parse a `key:value,key:value` string on top of the defaults.
    pub fn parse(s: &str) -> Result<Config> {
        let mut c = Config::default();
        c.apply_from(s, "configuration", &mut Vec::new())?;
        Ok(c)
    }

    /// Read `CUDALLOC_CONF` (unset or empty means defaults).
    pub fn from_env() -> Result<Config> {
        Ok(Config::layered(None, env_conf()?.as_deref())?.config)
    }

    /// The configuration of a program that passes `program` (the string
    /// given to `cudalloc_init`; `None`: none) in an environment whose
    /// `CUDALLOC_CONF` is `env`: the defaults, then the program's values,
    /// then the operator's, key by key. The program sets its defaults; the
    /// operator's setting always wins and is never ignored (a bad one is an
    /// error, as it is without a program string).
    pub fn layered(program: Option<&str>, env: Option<&str>) -> Result<Layered> {
        let mut config = Config::default();
        let mut sources = vec![Source::Default; OPTIONS.len()];
        for (text, source, label) in [
            (program, Source::Program, "configuration"),
            (env, Source::Environment, CONF_ENV),
        ] {
            let Some(text) = text else { continue };
            let mut set = Vec::new();
            config.apply_from(text, label, &mut set)?;
            for i in set {
                sources[i] = source;
            }
        }
        Ok(Layered { config, sources })
    }

    /// Apply `key:value` pairs on top of this configuration. On error the
    /// configuration is left unchanged.
    pub fn apply(&mut self, s: &str) -> Result<()> {
        self.apply_from(s, "configuration", &mut Vec::new())
    }

    /// [`Config::apply`], with errors naming `label` (where the string came
    /// from); the rows of [`OPTIONS`] set are added to `set`.
    fn apply_from(&mut self, s: &str, label: &str, set: &mut Vec<usize>) -> Result<()> {
        let mut next = self.clone();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((key, value)) = item.split_once(':') else {
                return Err(Error::config(format!(
                    "{label}: '{item}' is not key:value; accepted keys: {}",
                    keys()
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let Some(opt) = OPTIONS.iter().find(|o| o.key == key) else {
                return Err(Error::config(format!(
                    "{label}: unknown key '{key}'; accepted keys: {}",
                    keys()
                )));
            };
            if seen.contains(&key) {
                tracing::warn!(
                    "{label}: key '{key}' is given more than once; the last value, '{value}', is used"
                );
            }
            seen.push(opt.key);
            set.push(
                OPTIONS
                    .iter()
                    .position(|o| o.key == key)
                    .expect("found above"),
            );
            (opt.set)(&mut next, value).map_err(|why| {
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                };
                Error::config(format!(
                    "{label}: key '{key}' has bad value '{value}'{why}; accepted: {}",
                    opt.accepted
                ))
            })?;
        }
        next.validate(label)?;
        *self = next;
        Ok(())
    }

    fn validate(&self, label: &str) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(Error::config(format!("{label}: key '{key}': {msg}")));
        if self.small_segment < self.small_max {
            return bad("small_segment", "must be >= small_max");
        }
        if self.large_segment <= self.small_max {
            return bad("large_segment", "must be > small_max");
        }
        if self.huge_threshold <= self.small_max {
            return bad("huge_threshold", "must be > small_max");
        }
        if self.max_memory > 0 {
            if let Some(&r) = self.reserve.iter().find(|&&r| r > self.max_memory) {
                return bad(
                    "reserve",
                    &format!(
                        "{} is above max_memory ({}): the reservation counts against the limit",
                        format_size(r),
                        format_size(self.max_memory)
                    ),
                );
            }
        }
        Ok(())
    }

    /// The warm-up reservation of `device` in bytes (0: none): the one
    /// value of `reserve:SIZE` for every device, or the device's entry of
    /// `reserve:A|B|...` (devices past the list take none).
    pub fn reserve_for(&self, device: usize) -> u64 {
        match self.reserve.as_slice() {
            [all] => *all,
            list => list.get(device).copied().unwrap_or(0),
        }
    }

    /// The effective configuration as an aligned table, one option a line.
    pub fn render(&self) -> String {
        render(self, None)
    }

    /// The value of one option as text, or `None` for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        OPTIONS.iter().find(|o| o.key == key).map(|o| (o.get)(self))
    }
}

/// The table of [`Config::render`], with each value's source when known.
fn render(c: &Config, sources: Option<&[Source]>) -> String {
    let mut out = String::new();
    for (i, o) in OPTIONS.iter().enumerate() {
        let from = match sources {
            Some(s) => format!("{:<14} ", s[i].name()),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<20} {from}# {}; accepted: {}",
            o.key,
            (o.get)(c),
            o.doc,
            o.accepted
        );
    }
    out
}

fn keys() -> String {
    OPTIONS.iter().map(|o| o.key).collect::<Vec<_>>().join(", ")
}

/// An `on | off` value (the error is filled in by the caller's key).
fn parse_on_off(v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(String::new()),
    }
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

fn parse_int(v: &str) -> Option<u64> {
    v.parse::<u64>().ok()
}

fn off_or(off: bool, v: String) -> String {
    if off {
        "off".into()
    } else {
        v
    }
}

fn path_or_off(v: &str) -> String {
    if v == "off" {
        String::new()
    } else {
        v.to_string()
    }
}

/// Parse a duration in milliseconds: a number (decimals allowed) with unit
/// `ms`, `s`, `min` or `h`; a bare number is seconds; `off` is 0.
pub fn parse_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    if v == "off" {
        return Some(0);
    }
    let split = v
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" => 1.0,
        "" | "s" | "sec" => 1e3,
        "min" | "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    let f: f64 = num.parse().ok()?;
    let ms = f * mult;
    (0.0..1e15).contains(&ms).then_some(ms.round() as u64)
}

/// Render milliseconds with the largest unit that divides them exactly.
pub fn format_duration_ms(ms: u64) -> String {
    match ms {
        0 => "off".into(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}min", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// `reserve`'s value: one size, or sizes separated by `|` (neither `,` nor
/// `:`, which `CUDALLOC_CONF` itself uses). At most 64 entries, as devices.
fn parse_reserve(v: &str) -> std::result::Result<Vec<u64>, String> {
    let parts: Vec<&str> = v.split('|').map(str::trim).collect();
    if parts.len() > 64 {
        return Err(format!("{} entries; at most 64", parts.len()));
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            parse_size(p).ok_or_else(|| {
                if parts.len() == 1 {
                    String::new()
                } else {
                    format!("entry {i}, '{p}', is not a size")
                }
            })
        })
        .collect()
}

fn parse_granular(v: &str) -> std::result::Result<u64, String> {
    match parse_size(v) {
        Some(n) if n > 0 && n % 512 == 0 => Ok(n),
        Some(_) => Err("not a positive multiple of 512".into()),
        None => Err(String::new()),
    }
}

/// Parse a size: a number (decimals allowed) with an optional binary suffix.
/// `K`, `KB` and `KiB` all mean 1024, as in torch and mimalloc.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() {
        return None;
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    let bytes = f * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Render a byte count with the largest exact binary unit (or two decimals).
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, m) in UNITS {
        if n >= m {
            return if n % m == 0 {
                format!("{}{name}", n / m)
            } else {
                format!("{:.2}{name}", n as f64 / m as f64)
            };
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::default();
        assert_eq!(c.backend, Backend::Auto);
        assert_eq!(c.sim_memory, 16 << 30);
        assert_eq!(
            (c.small_max, c.small_segment, c.large_segment),
            (1 << 20, 2 << 20, 20 << 20)
        );
        assert_eq!((c.huge_threshold, c.huge_round), (10 << 20, 2 << 20));
    }

    #[test]
    fn parses_torch_syntax_and_sizes() {
        let c = Config::parse(
            "backend:sim, sim_devices:2,sim_memory:1GiB,max_memory:512M,memory_fraction:0.5",
        )
        .unwrap();
        assert_eq!(c.backend, Backend::Sim);
        assert_eq!(c.sim_devices, 2);
        assert_eq!(c.sim_memory, 1 << 30);
        assert_eq!(c.max_memory, 512 << 20);
        assert_eq!(c.memory_fraction, 0.5);
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("16g"), Some(16 << 30));
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key_and_what_is_accepted() {
        let e = Config::parse("backend:gpu").unwrap_err();
        assert!(
            e.message.contains("'backend'") && e.message.contains("auto | cuda | sim"),
            "{e}"
        );
        let e = Config::parse("bogus:1").unwrap_err();
        assert!(
            e.message.contains("unknown key 'bogus'") && e.message.contains("sim_memory"),
            "{e}"
        );
        let e = Config::parse("sim_memory").unwrap_err();
        assert!(e.message.contains("not key:value"), "{e}");
        let e = Config::parse("memory_fraction:1.5").unwrap_err();
        assert!(
            e.message.contains("'memory_fraction'") && e.message.contains("(0, 1]"),
            "{e}"
        );
        let e = Config::parse("small_segment:512K").unwrap_err();
        assert!(e.message.contains("small_segment"), "{e}");
        let e = Config::parse("small_max:1000").unwrap_err();
        assert!(e.message.contains("multiple of 512"), "{e}");
    }

    #[test]
    fn durations_and_observability_keys() {
        assert_eq!(parse_duration_ms("300s"), Some(300_000));
        assert_eq!(parse_duration_ms("5min"), Some(300_000));
        assert_eq!(parse_duration_ms("100ms"), Some(100));
        assert_eq!(parse_duration_ms("1.5h"), Some(5_400_000));
        assert_eq!(parse_duration_ms("2"), Some(2000));
        assert_eq!(parse_duration_ms("off"), Some(0));
        assert_eq!(parse_duration_ms("3 days"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
        let d = Config::default();
        assert_eq!((d.leak_age_ms, d.leak_window_ms), (300_000, 300_000));
        assert_eq!((d.pressure_interval_ms, d.trim_threshold), (100, 0.85));
        assert_eq!((d.backtrace, d.leak_growth), (0, 0.2));
        let c = Config::parse(
            "backtrace:8,backtrace_sample:100,leak_report:exit,leak_age:2s,leak_window:1min,log_file:/tmp/x.csv",
        )
        .unwrap();
        assert_eq!((c.backtrace, c.backtrace_sample), (8, 100));
        assert!(c.leak_report_exit);
        assert_eq!(c.get("leak_window").as_deref(), Some("1min"));
        assert_eq!(c.log_file, "/tmp/x.csv");
        let e = Config::parse("leak_window:0s").unwrap_err();
        assert!(e.message.contains("'leak_window'"), "{e}");
        assert!(Config::parse("backtrace:65").is_err());
        assert!(Config::parse("trim_threshold:0").is_err());
        assert!(Config::parse("leak_report:now").is_err());
    }

    /// The program's string gives defaults; CUDALLOC_CONF overrides them
    /// key by key; each value knows where it came from.
    #[test]
    fn the_environment_overrides_the_program_key_by_key() {
        let l = Config::layered(
            Some("backend:sim,sim_memory:1GiB,max_memory:512MiB"),
            Some("backend:cuda,log_file:/tmp/t.csv"),
        )
        .unwrap();
        assert_eq!(l.config.backend, Backend::Cuda);
        assert_eq!(l.config.sim_memory, 1 << 30);
        assert_eq!(l.config.max_memory, 512 << 20);
        assert_eq!(l.config.log_file, "/tmp/t.csv");
        assert_eq!(l.source("backend"), Some(Source::Environment));
        assert_eq!(l.source("sim_memory"), Some(Source::Program));
        assert_eq!(l.source("log_file"), Some(Source::Environment));
        assert_eq!(l.source("small_max"), Some(Source::Default));
        assert_eq!(
            l.summary(),
            "backend:cuda (CUDALLOC_CONF), sim_memory:1GiB (program), \
             max_memory:512MiB (program), log_file:/tmp/t.csv (CUDALLOC_CONF)"
        );
        let r = l.render();
        assert!(
            r.contains("backend          cuda                 CUDALLOC_CONF"),
            "{r}"
        );
        // Each source's errors name it.
        let e = Config::layered(Some("bogus:1"), None).unwrap_err();
        assert!(
            e.message.starts_with("configuration: unknown key 'bogus'"),
            "{e}"
        );
        let e = Config::layered(Some("sim_devices:2"), Some("sim_devices:x")).unwrap_err();
        assert!(
            e.message.starts_with("CUDALLOC_CONF: key 'sim_devices'"),
            "{e}"
        );
        // Neither: the defaults.
        let l = Config::layered(None, None).unwrap();
        assert_eq!(
            (l.summary().as_str(), l.config),
            ("the defaults", Config::default())
        );
    }

    #[test]
    fn reserve_takes_one_size_or_one_per_device() {
        let c = Config::default();
        assert_eq!(
            (c.reserve_for(0), c.get("reserve").as_deref()),
            (0, Some("0 (none)"))
        );
        let c = Config::parse("reserve:4GiB").unwrap();
        assert_eq!((c.reserve_for(0), c.reserve_for(7)), (4 << 30, 4 << 30));
        assert_eq!(c.get("reserve").as_deref(), Some("4GiB"));
        let c = Config::parse("reserve: 4GiB | 0 | 512M ").unwrap();
        let each: Vec<u64> = (0..4).map(|d| c.reserve_for(d)).collect();
        assert_eq!(each, [4 << 30, 0, 512 << 20, 0], "past the list: none");
        assert_eq!(c.get("reserve").as_deref(), Some("4GiB|0|512MiB"));
        assert_eq!(
            Config::parse(&format!("reserve:{}", c.get("reserve").unwrap())).unwrap(),
            c
        );
        let e = Config::parse("reserve:4GiB|x").unwrap_err();
        assert!(
            e.message
                .contains("key 'reserve' has bad value '4GiB|x' (entry 1, 'x', is not a size)")
                && e.message.contains("separated by '|'"),
            "{e}"
        );
        let e = Config::parse("reserve:2GiB,max_memory:1GiB").unwrap_err();
        assert!(
            e.message
                .contains("key 'reserve': 2GiB is above max_memory (1GiB)"),
            "{e}"
        );
        assert!(Config::parse("reserve:1GiB,max_memory:1GiB").is_ok());
    }

    #[test]
    fn sim_memory_stays_within_the_simulated_address_window() {
        assert_eq!(
            Config::parse("sim_memory:8TiB").unwrap().sim_memory,
            8 << 40
        );
        let e = Config::parse("sim_memory:64TiB").unwrap_err();
        assert!(
            e.message.contains("'sim_memory'") && e.message.contains("1 to 8TiB"),
            "{e}"
        );
        assert!(Config::parse("sim_memory:0").is_err());
    }

    fn captured_logs(f: impl FnOnce()) -> String {
        crate::global::capture_logs(f).1
    }

    #[test]
    fn a_key_given_twice_is_warned_about() {
        let mut c = None;
        let logs = captured_logs(|| c = Some(Config::parse("sim_devices:2,sim_devices:3")));
        assert_eq!(c.unwrap().unwrap().sim_devices, 3);
        assert!(
            logs.contains(
                "key 'sim_devices' is given more than once; the last value, '3', is used"
            ),
            "{logs}"
        );
        let logs = captured_logs(|| {
            Config::parse("sim_devices:2,sim_memory:1GiB").unwrap();
        });
        assert!(logs.is_empty(), "{logs}");
    }

    #[test]
    fn failed_apply_changes_nothing_and_render_lists_every_key() {
        let mut c = Config::parse("sim_devices:3").unwrap();
        assert!(c.apply("sim_devices:4,sim_memory:nope").is_err());
        assert_eq!(c.sim_devices, 3);
        let r = c.render();
        for o in OPTIONS {
            assert!(r.contains(o.key));
        }
        assert_eq!(c.get("sim_devices").as_deref(), Some("3"));
    }
}
