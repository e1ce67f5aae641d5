//! Fuzz the `CUDALLOC_CONF` parser (see `common/ops.rs`).
#![no_main]

#[path = "../common/ops.rs"]
mod ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ops::conf_parser(data));
