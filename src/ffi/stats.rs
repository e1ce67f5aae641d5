//! Statistics exports: `cudalloc_get_stats`, the peak and accumulated
//! resets, `cudalloc_stats_json`, `cudalloc_leak_report` and the memory
//! snapshot (`cudalloc_snapshot_json`, `cudalloc_record_memory_history`),
//! with the buffer convention the text exports share.

use super::boundary::Written;
use super::{non_null, on_device};
use crate::error::{Error, ErrorCode, Result};
use crate::global;
use crate::stats::cudalloc_stats;
use libc::{c_char, c_int};

/// Fill `*out` with the statistics of `device`. Returns `CUDALLOC_OK` (0) or
/// an error code (`CUDALLOC_ERR_INVALID_ARGUMENT` when `out` is NULL,
/// `CUDALLOC_ERR_INVALID_DEVICE` for a bad index).
///
/// # Safety
/// 1. `out` is NULL or points to writable memory for one `cudalloc_stats`.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_get_stats(device: c_int, out: *mut cudalloc_stats) -> c_int {
    crate::export!(cudalloc_get_stats, -> () {
        let out = non_null(out, "cudalloc_get_stats: out")?;
        let s = on_device(device, |a, d| a.stats(d))?;
        // SAFETY: `out` is non-NULL and the caller promises it points to a
        // writable `cudalloc_stats`.
        unsafe { out.write(s) };
        Ok(())
    })
}

/// Reset the peak statistics of `device` to the current values.
#[no_mangle]
pub extern "C" fn cudalloc_reset_peak_stats(device: c_int) {
    crate::export!(cudalloc_reset_peak_stats, -> () {
        on_device(device, |a, d| a.reset_peak(d))
    })
}

/// Restart the accumulated counters of `device` from zero: the `num_*`
/// counts and `trimmed_bytes` (PyTorch's `reset_accumulated_memory_stats`).
/// Current values and peaks stay. A bad device sets an error and changes
/// nothing.
#[no_mangle]
pub extern "C" fn cudalloc_reset_accumulated_stats(device: c_int) {
    crate::export!(cudalloc_reset_accumulated_stats, -> () {
        on_device(device, |a, d| a.reset_accumulated(d))
    })
}

/// Copy `text` into the caller's buffer by the size-query convention of
/// `cudalloc_leak_report` and `cudalloc_stats_json` (see their docs).
fn write_text(name: &str, text: &str, buf: *mut c_char, len: usize) -> Result<Written> {
    let needed = text.len() + 1;
    if buf.is_null() {
        if len == 0 {
            return Ok(Written {
                needed,
                error: None,
            });
        }
        return Err(Error::new(
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
            format!("{name}: buf is NULL but len is {len}"),
        ));
    }
    if len < needed {
        return Ok(Written {
            needed,
            error: Some(Error::new(
                ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL,
                format!("{name}: needs {needed} bytes, buffer has {len}"),
            )),
        });
    }
    // SAFETY: `buf` is non-NULL and the caller promises `len >= needed`
    // writable bytes; the source is a distinct Rust string.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(Written {
        needed,
        error: None,
    })
}

/// Write the leak report into `buf`: every live allocation at least
/// `min_age_s` seconds old, on every device, as text (`json` == 0) or JSON,
/// grouped by call site when `backtrace:N` is on.
///
/// Returns the bytes the report needs, terminating NUL included (like
/// `snprintf`, plus one). Query the size with `buf` NULL and `len` 0. When
/// `len` is smaller than needed, nothing is written, the last error is
/// `CUDALLOC_ERR_BUFFER_TOO_SMALL`, and the needed size is returned: allocate
/// and call again (allocations may change in between; allow some slack).
/// `buf` NULL with `len` > 0, or a negative or NaN `min_age_s`, is
/// `CUDALLOC_ERR_INVALID_ARGUMENT` and returns 0. Never calls the driver.
///
/// # Safety
/// 1. `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_leak_report(
    min_age_s: f64,
    json: c_int,
    buf: *mut c_char,
    len: usize,
) -> usize {
    crate::export!(cudalloc_leak_report, -> Written {
        if !(min_age_s >= 0.0 && min_age_s.is_finite()) {
            return Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                format!("cudalloc_leak_report: min_age_s {min_age_s} is not a finite number >= 0"),
            ));
        }
        let a = global::get()?;
        let text = crate::observe::leak::report(a.engine(), (min_age_s * 1e3) as u64, json != 0);
        write_text("cudalloc_leak_report", &text, buf, len)
    })
}

/// Write the statistics of every device, and the effective configuration, as
/// JSON into `buf`: `{"devices":[{"device":0,<every cudalloc_stats field>}],
/// "config":{...}}`. The same text `stats_file:PATH` writes at exit.
/// Buffer convention and errors as for `cudalloc_leak_report`.
///
/// # Safety
/// 1. `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_stats_json(buf: *mut c_char, len: usize) -> usize {
    crate::export!(cudalloc_stats_json, -> Written {
        let text = global::get()?.stats_json();
        write_text("cudalloc_stats_json", &text, buf, len)
    })
}

/// Write a memory snapshot into `buf` as JSON, in the format of PyTorch's
/// `torch.cuda.memory._snapshot()`: `{"segments":[...],"device_traces":[...]}`,
/// every segment of every device with its blocks (`address`, `size`,
/// `requested_size`, `state`), and per device the actions recorded while
/// history is on (`cudalloc_record_memory_history`; empty lists otherwise).
/// Pickled, it loads in torch's viewer (pytorch.org/memory_viz): the Python
/// package's `cudalloc.dump_snapshot(path)` does that. Buffer convention
/// and errors as for `cudalloc_leak_report`; a snapshot written (not a size
/// query) is marked by a `snapshot` action in the history, which the next
/// snapshot shows. Never calls the driver.
///
/// # Safety
/// 1. `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_snapshot_json(buf: *mut c_char, len: usize) -> usize {
    crate::export!(cudalloc_snapshot_json, -> Written {
        let a = global::get()?;
        let snap = a.snapshot();
        let text = crate::observe::export::snapshot_json(&snap);
        let w = write_text("cudalloc_snapshot_json", &text, buf, len)?;
        if !buf.is_null() && w.error.is_none() {
            a.engine().mark_snapshot(&snap);
        }
        Ok(w)
    })
}

/// Switch the history of allocator actions that snapshots carry on
/// (`enabled` != 0), keeping the newest `max_entries` actions per device,
/// or off (`enabled` == 0), dropping what was recorded. `clear_history` !=
/// 0 drops it when switching on. PyTorch's `_record_memory_history`
/// (`enabled="all"`, `max_entries`, `clear_history`). Off by default; while
/// off, allocations and frees pay one check. Returns `CUDALLOC_OK`, or
/// `CUDALLOC_ERR_INVALID_ARGUMENT` (nothing changed) when switching on with
/// `max_entries` 0.
#[no_mangle]
pub extern "C" fn cudalloc_record_memory_history(
    enabled: c_int,
    max_entries: usize,
    clear_history: c_int,
) -> c_int {
    crate::export!(cudalloc_record_memory_history, -> () {
        if enabled != 0 && max_entries == 0 {
            return Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                "cudalloc_record_memory_history: max_entries is 0 (keep at least 1 action)",
            ));
        }
        global::get()?.record_history(enabled != 0, max_entries, clear_history != 0);
        Ok(())
    })
}
