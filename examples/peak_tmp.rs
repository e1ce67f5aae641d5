fn main() {
    let path = std::env::args().nth(1).unwrap();
    let conf = std::env::args().nth(2).unwrap_or_default();
    let lag: u64 = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or(0);
    let ev = cudalloc::trace::parse(&cudalloc::trace::cli::read_trace(std::path::Path::new(&path)).unwrap()).unwrap();
    let c = cudalloc::trace::replay::replay_config(&conf, 16 << 30).unwrap();
    let r = cudalloc::trace::replay::replay(&ev, &c, false, lag);
    println!("{path} [{conf}] peak_reserved_MiB {:.2} requested_MiB {:.2} ratio {:.4} calls {} vmm {:?} secs {:.4}", r.peak_reserved as f64 / 1048576.0, r.peak_requested as f64/1048576.0, r.fragmentation(), r.driver_calls, r.vmm_calls, r.seconds);
}
