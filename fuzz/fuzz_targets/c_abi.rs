//! Fuzz the C ABI: op sequences decoded from bytes (see `common/ops.rs`).
#![no_main]

#[path = "../common/ops.rs"]
mod ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ops::c_abi(data));
