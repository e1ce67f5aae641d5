//! The out-of-memory diagnosis: one screen that tells fragmentation, free
//! memory in the other pool and a full device apart, logged at a limited
//! rate and carried by the error.

use super::device::Device;
use super::Engine;
use crate::driver::Stream;
use crate::error::{Error, ErrorCode};
use crate::size_class::{round_size, Pool};

/// Out-of-memory diagnoses logged in full per device; after these, only a
/// line at each power of two (see `Engine::oom`).
pub const OOM_DIAGNOSES_LOGGED: u64 = 5;

impl Engine {
    /// Count an OOM, log the diagnosis, and make the error carrying it.
    ///
    /// The log is rate-limited per device, as invalid frees are: the first
    /// [`OOM_DIAGNOSES_LOGGED`] diagnoses in full, then one line with the
    /// count at each power of two (a loop that keeps failing must not flood
    /// stderr). The error always carries the full diagnosis.
    #[cold]
    pub(super) fn oom(&self, dev: &Device, size: u64, stream: Stream, why: &str) -> Error {
        dev.core.counters.ooms.inc();
        self.history_oom(dev, size, stream);
        let n = dev.core.counters.ooms.get();
        let diag = self.diagnose(dev.core.index, size, stream, why);
        if n <= OOM_DIAGNOSES_LOGGED {
            tracing::error!("{diag}");
        } else if n.is_power_of_two() {
            tracing::error!(
                "cudalloc: out of memory on device {}: could not allocate {size} bytes: {why}; \
                 {n} out-of-memory errors on this device so far (diagnoses after the first \
                 {OOM_DIAGNOSES_LOGGED} are logged at powers of two only; each error carries its own)",
                dev.core.index
            );
        }
        Error::new(ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, diag)
    }

    /// A one-screen explanation of an allocation failure of `size` bytes on
    /// `device` and `stream`.
    pub fn diagnose(&self, device: usize, size: u64, stream: Stream, why: &str) -> String {
        use crate::config::format_size as fs;
        use std::fmt::Write as _;
        let Ok(st) = self.stats(device) else {
            return format!("cudalloc: out of memory on device {device}");
        };
        let dev = &self.devices[device];
        let mut s = String::new();
        let _ = writeln!(s, "cudalloc: out of memory on device {device}: could not allocate {} ({size} bytes): {why}", fs(size));
        let _ = writeln!(
            s,
            "  live {} in {} allocations; reserved {} in {} segments; cached free {}; pending {}",
            fs(st.allocated_bytes),
            st.active_allocations,
            fs(st.reserved_bytes),
            st.segments,
            fs(st.cached_free_bytes),
            fs(st.pending_free_bytes)
        );
        if st.virtual_bytes > 0 {
            let physical = dev.vmm_physical_bytes();
            let _ = writeln!(
                s,
                "  expandable segments: mapped {}, physical {} ({} cached unmapped), virtual range {}",
                fs(st.mapped_bytes),
                fs(physical),
                fs(dev.vmm_idle_bytes()),
                fs(st.virtual_bytes)
            );
        }
        let frag = if st.cached_free_bytes == 0 {
            0.0
        } else {
            1.0 - st.largest_free_block as f64 / st.cached_free_bytes as f64
        };
        let _ = writeln!(
            s,
            "  largest free block {}; fragmentation of the free cache {:.0}%",
            fs(st.largest_free_block),
            frag * 100.0
        );
        // What this request could have used: free blocks of its own stream and
        // pool. Other streams' blocks move only as whole idle segments, the two
        // pools never lend to each other, and quarantined blocks wait for
        // empty_cache. `Here` also sums the free bytes of each pool over all
        // streams, for the hint.
        struct Here {
            rounded: u64,
            pool: Pool,
            largest: u64,
            pool_free: u64,
            other_free: u64,
        }
        let here = round_size(size).map(|r| {
            let pool = self.policy.pool(r);
            let mut h = Here {
                rounded: r,
                pool,
                largest: 0,
                pool_free: 0,
                other_free: 0,
            };
            for a in dev.arena_list() {
                let inner = a.inner.lock();
                let (small, large) = (
                    inner.pool_free_bytes(Pool::Small),
                    inner.pool_free_bytes(Pool::Large),
                );
                let (mine, other) = if pool == Pool::Small {
                    (small, large)
                } else {
                    (large, small)
                };
                h.pool_free += mine;
                h.other_free += other;
                if a.stream == stream {
                    h.largest = inner.largest_free(pool);
                }
            }
            h
        });
        let pool_name = |p: Pool| if p == Pool::Small { "small" } else { "large" };
        if let Some(h) = &here {
            let _ = writeln!(
                s,
                "  on stream {stream:#x}: largest free block of the {} pool {}",
                pool_name(h.pool),
                fs(h.largest)
            );
        }
        let limit = dev.limit();
        // Not during a graph capture: cuMemGetInfo could invalidate it.
        let dinfo = match self.mem_info_outside_capture(device, true) {
            Some(Ok((free, total))) => format!("device free {} of {}", fs(free), fs(total)),
            Some(Err(e)) => format!("device memory unknown ({e})"),
            None => "device memory not asked (a graph capture may be under way)".to_string(),
        };
        let lim = if limit == u64::MAX {
            "none".to_string()
        } else {
            fs(limit)
        };
        let _ = writeln!(s, "  limit {lim}; {dinfo}; OOMs so far {}", st.num_ooms);
        let mut live = self.live_allocations(Some(device));
        live.sort_by_key(|l| std::cmp::Reverse(l.size));
        if !live.is_empty() {
            let _ = writeln!(s, "  largest live allocations:");
            for l in live.iter().take(5) {
                let _ = writeln!(
                    s,
                    "    {:#x} {} stream {:#x} thread {} seq {}",
                    l.ptr,
                    fs(l.size),
                    l.stream,
                    l.thread,
                    l.seq
                );
            }
        }
        match &here {
            Some(h) if h.pool_free >= h.rounded && h.largest < h.rounded => {
                let _ = write!(
                    s,
                    "  hint: the {} pool holds {} free, but no free block of this stream fits: \
                     fragmentation, or memory freed on other streams (idle segments were already \
                     released; the rest hold live blocks). Free long-lived tensors or free on \
                     the stream that allocates; or try a low-fragmentation profile (README): \
                     record a trace with log_file:PATH and run `cudalloc replay PATH --profiles`",
                    pool_name(h.pool),
                    fs(h.pool_free)
                );
            }
            Some(h) if h.pool_free + h.other_free >= h.rounded && h.other_free > 0 => {
                let _ = write!(
                    s,
                    "  hint: {} of the cache is free in the {} pool, which never serves {} \
                     requests like this one. Free tensors you no longer need, or try a \
                     profile that shares segments between sizes (small_max:256KiB or \
                     small_max:512; README): record a trace with log_file:PATH and run \
                     `cudalloc replay PATH --profiles`",
                    fs(h.other_free),
                    pool_name(if h.pool == Pool::Small {
                        Pool::Large
                    } else {
                        Pool::Small
                    }),
                    pool_name(h.pool)
                );
            }
            _ => {
                let _ = write!(s, "  hint: free tensors you no longer need, lower the batch size, or set max_memory/memory_fraction");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    /// An OOM with enough cached free bytes but no block that fits says so,
    /// with the requesting stream's own largest block; a plain OOM does not.
    #[test]
    fn oom_diagnosis_tells_fragmentation_from_a_full_device() {
        const M: u64 = 1 << 20;
        let (a, _) = sim("sim_memory:40MiB");
        let s = 0x10;
        // Two 20 MiB large segments, four 5 MiB blocks each.
        let blocks: Vec<u64> = (0..8).map(|_| a.malloc(5 * M, 0, s).unwrap()).collect();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 40 * M);
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        assert!(e.message.contains("hint: free tensors"), "{}", e.message);
        assert!(!e.message.contains("fragmentation, or"), "{}", e.message);
        // Free every other block: 20 MiB cached, no two free blocks adjacent.
        for p in blocks.iter().step_by(2) {
            a.free(*p, Some(0), s).unwrap();
        }
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        let m = &e.message;
        assert!(
            m.contains("on stream 0x10: largest free block of the large pool 5MiB"),
            "{m}"
        );
        assert!(
            m.contains("the large pool holds 20MiB free, but no free block of this stream fits"),
            "{m}"
        );
        // Another stream sees none of it: its own largest block is 0.
        let e = a.malloc(8 * M, 0, 0x20).unwrap_err();
        assert!(
            e.message
                .contains("on stream 0x20: largest free block of the large pool 0B"),
            "{}",
            e.message
        );
        a.check_invariants().unwrap();
        for p in blocks.iter().skip(1).step_by(2) {
            a.free(*p, Some(0), s).unwrap();
        }
    }

    /// Free bytes in the other pool are not fragmentation of this one: the
    /// hint says where they are (found in review: a full large pool with a
    /// half-free small pool was called fragmentation).
    #[test]
    fn oom_diagnosis_names_free_bytes_in_the_other_pool() {
        const M: u64 = 1 << 20;
        let (a, _) = sim("sim_memory:40MiB");
        let s = 0x10;
        let small: Vec<u64> = (0..40)
            .map(|_| a.malloc(512 << 10, 0, s).unwrap())
            .collect();
        for (i, p) in small.iter().enumerate() {
            if i % 4 != 0 {
                a.free(*p, Some(0), s).unwrap();
            }
        }
        let mut large = Vec::new();
        while let Ok(p) = a.malloc(4 * M, 0, s) {
            large.push(p);
        }
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        let m = &e.message;
        assert!(!m.contains("fragmentation, or"), "{m}");
        assert!(
            m.contains("free in the small pool, which never serves large"),
            "{m}"
        );
        a.check_invariants().unwrap();
        for p in large.into_iter().chain(small.into_iter().step_by(4)) {
            a.free(p, Some(0), s).unwrap();
        }
    }
}
