//! The shared behaviour suite ([`cudalloc::conformance`]) over every sim
//! configuration, each a tiny fixture.

use cudalloc::conformance::{run_all, STREAMS};
use cudalloc::driver::sim::SimDriver;
use cudalloc::{Allocator, Config};
use std::sync::Arc;

fn suite(conf: &str) {
    let make = || {
        let c = Config::parse(conf).unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        Allocator::new(c, d)
    };
    let streams: Vec<u64> = (0..STREAMS as u64).map(|i| i * 0x10).collect();
    let failures: Vec<String> = run_all(&make, &streams)
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "[{conf}] failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn default_policy_1gib() {
    suite("sim_memory:1GiB");
}

#[test]
fn small_device_256mib() {
    suite("sim_memory:256MiB");
}

#[test]
fn two_devices() {
    suite("sim_devices:2,sim_memory:512MiB");
}

#[test]
fn max_memory_limit() {
    suite("sim_memory:4GiB,max_memory:1GiB");
}

#[test]
fn tiny_segments() {
    suite("sim_memory:512MiB,small_max:64KiB,small_segment:256KiB,large_segment:4MiB,huge_threshold:2MiB,huge_round:512KiB");
}

#[test]
fn huge_split_off() {
    suite("sim_memory:1GiB,huge_split:off");
    suite("sim_memory:512MiB,small_max:512,small_segment:256KiB,large_segment:4MiB,huge_threshold:2MiB,huge_round:512KiB,huge_split:off");
}

#[test]
fn huge_device_16gib() {
    suite("sim_memory:16GiB");
}

#[test]
fn expandable_segments() {
    suite("sim_memory:1GiB,expandable_segments:on");
    suite("sim_devices:2,sim_memory:256MiB,max_memory:200MiB,expandable_segments:True");
    suite("sim_memory:512MiB,small_max:64KiB,small_segment:256KiB,large_segment:4MiB,huge_threshold:2MiB,huge_round:512KiB,huge_split:off,expandable_segments:on");
}

/// A warm-up reservation (`reserve:`) taken at each device's first use.
#[test]
fn warm_up_reservation() {
    suite("sim_devices:2,sim_memory:1GiB,reserve:256MiB|64MiB");
}

/// A reservation under `huge_split:off` (taken as large segments).
#[test]
fn warm_up_reservation_huge_split_off() {
    suite("sim_memory:1GiB,huge_split:off,reserve:100MiB");
}
