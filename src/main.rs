//! The `cudalloc` command line: `bench` (the main job), `config`, `selftest`,
//! and the trace tools `replay`, `trace-gen`, `report` (src/trace/cli.rs).

use clap::{value_parser, Arg, ArgMatches, Command};
use cudalloc::bench::{self, BenchOptions};
use cudalloc::config::{parse_size, Config};
use cudalloc::conformance;
use cudalloc::global;
use std::process::ExitCode;

fn cli() -> Command {
    Command::new("cudalloc")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A drop-in CUDA device-memory caching allocator: benchmarks, configuration, checks")
        .after_help("Configuration comes from CUDALLOC_CONF (key:value,key:value); logging from CUDALLOC_LOG.")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("bench")
                .about("Run the benchmarks (hot path, mixed sizes, RMM random_allocations) on the configured backend")
                .arg(
                    Arg::new("pairs")
                        .long("pairs")
                        .value_parser(value_parser!(u64).range(1..))
                        .default_value("1000000")
                        .help("alloc+free pairs per hot-path thread, each round"),
                )
                .arg(
                    Arg::new("rounds")
                        .long("rounds")
                        .value_parser(value_parser!(u32).range(1..=1000))
                        .default_value("5")
                        .help("rounds: every workload runs once a round; rows give the least and the median"),
                )
                .arg(Arg::new("quick").long("quick").num_args(0).help("a short run (100k pairs, 3 rounds, 1k/10k random ops)"))
                .arg(Arg::new("random-max").long("random-max").default_value("4MiB").help("largest random_allocations request")),
        )
        .subcommand(Command::new("config").about("Print the effective configuration and check that its backend starts"))
        .subcommand(
            Command::new("selftest")
                .about("Run the shared behaviour suite against the configured backend (e.g. backend:cuda on a GPU)"),
        )
        // replay, trace-gen, report (src/trace/cli.rs)
        .subcommands(cudalloc::trace::cli::commands())
}

fn config() -> Result<Config, String> {
    Config::from_env().map_err(|e| e.to_string())
}

fn bench_cmd(m: &ArgMatches) -> Result<(), String> {
    let c = config()?;
    let mut o = BenchOptions {
        pairs: *m.get_one::<u64>("pairs").unwrap(),
        rounds: *m.get_one::<u32>("rounds").unwrap(),
        ..Default::default()
    };
    if m.get_flag("quick") {
        o.pairs = 100_000;
        o.rounds = 3;
        o.random_ops = vec![1_000, 10_000];
    }
    let max = m.get_one::<String>("random-max").unwrap();
    o.random_max = parse_size(max)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("--random-max: '{max}' is not a size"))?;
    global::init_logging();
    bench::run(&c, &o).map_err(|e| e.to_string())
}

fn config_cmd() -> Result<(), String> {
    let layered = cudalloc::config::env_conf()
        .and_then(|env| Config::layered(None, env.as_deref()))
        .map_err(|e| e.to_string())?;
    let c = layered.config.clone();
    global::init_logging();
    // Each value with where it came from: the default or CUDALLOC_CONF (a
    // program's cudalloc_init string comes between the two).
    print!("{}", layered.render());
    let d = global::make_driver(&c).map_err(|e| {
        format!(
            "backend:{} cannot start: {e}",
            c.get("backend").unwrap_or_default()
        )
    })?;
    println!(
        "# backend in use: {} with {} device(s)",
        d.name(),
        d.device_count()
    );
    Ok(())
}

fn selftest_cmd() -> Result<(), String> {
    let c = config()?;
    global::init_logging();
    let driver = global::make_driver(&c).map_err(|e| e.to_string())?;
    println!(
        "selftest: backend {} with {} device(s)",
        driver.name(),
        driver.device_count()
    );
    // Stream 0 is the default stream; the others are real streams of device 0.
    let mut streams = vec![0u64];
    for _ in 1..conformance::STREAMS {
        streams.push(
            driver
                .stream_create(0)
                .map_err(|e| format!("cannot create a stream: {e}"))?,
        );
    }
    let make = || {
        cudalloc::Allocator::new(
            c.clone(),
            global::make_driver(&c).expect("backend started once"),
        )
    };
    let results = conformance::run_all(&make, &streams);
    let failed = results.iter().filter(|r| r.1.is_err()).count();
    for (name, r) in &results {
        match r {
            Ok(()) => println!("ok   {name}"),
            Err(e) => println!("FAIL {name}: {e}"),
        }
    }
    for &s in &streams[1..] {
        let _ = driver.stream_destroy(0, s);
    }
    println!(
        "{} passed, {failed} failed (the cases make out-of-memory errors and bad frees on \
         purpose; their logs are shown only for a case that fails)",
        results.len() - failed
    );
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} case(s) failed"))
    }
}

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader
    // goes, as other command-line tools do, not with a panic on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE, before any
    // thread starts, touches no memory of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let m = cli().get_matches();
    let r = match m.subcommand() {
        Some(("bench", m)) => bench_cmd(m),
        Some(("config", _)) => config_cmd(),
        Some(("selftest", _)) => selftest_cmd(),
        Some((name, m)) => cudalloc::trace::cli::run(name, m).and_then(|known| {
            known
                .then_some(())
                .ok_or_else(|| format!("unknown subcommand {name}"))
        }),
        _ => unreachable!("clap requires a subcommand"),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cudalloc: {e}");
            ExitCode::FAILURE
        }
    }
}
