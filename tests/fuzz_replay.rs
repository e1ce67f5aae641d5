//! The fuzz targets of `fuzz/` as proptest properties, so they run in CI on
//! stable Rust (cargo-fuzz needs nightly). Same bodies: `fuzz/common/ops.rs`.
//! Fixed seeds; `CUDALLOC_FUZZ_CASES` raises the case count.

#[path = "../fuzz/common/ops.rs"]
mod ops;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

fn runner(seed: u64) -> TestRunner {
    let cases = std::env::var("CUDALLOC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    })
}

#[test]
fn c_abi_op_sequences() {
    let r = runner(11).run(&vec(any::<u8>(), 0..1500), |data| {
        ops::c_abi(&data);
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn conf_parser_on_arbitrary_bytes() {
    let r = runner(12).run(&vec(any::<u8>(), 0..200), |data| {
        ops::conf_parser(&data);
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Bytes alone rarely spell a key; this mixes real keys, values and
/// separators so the parser's value paths are reached.
#[test]
fn conf_parser_on_key_shaped_strings() {
    let keys = cudalloc::config::OPTIONS
        .iter()
        .map(|o| o.key)
        .collect::<Vec<_>>();
    let part = prop_oneof![
        proptest::sample::select(keys).prop_map(str::to_string),
        proptest::sample::select(vec![
            ":",
            ",",
            " ",
            "0",
            "1",
            "512",
            "1.5",
            "-1",
            "1e9",
            "K",
            "MiB",
            "g",
            "T",
            "P",
            "auto",
            "sim",
            "manual",
            "nan",
            "inf",
            "\t",
            "99999999999999999999",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,6}",
    ];
    let r = runner(13).run(&vec(part, 0..12), |parts| {
        ops::conf_parser(parts.concat().as_bytes());
        Ok(())
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}
