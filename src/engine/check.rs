//! The invariants of DESIGN.md, walked over every structure: checked in
//! debug builds (`ArenaInner::debug_check`) and by the tests.

use super::Engine;

impl Engine {
    /// Walk every structure and check the invariants of DESIGN.md. Exact when
    /// no other thread is allocating or freeing meanwhile.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for dev in &self.devices {
            let _slow = dev.slow.lock();
            let mut ranges = Vec::new();
            let (mut seg_bytes, mut free, mut pending, mut live_bytes) = (0u64, 0u64, 0u64, 0u64);
            for a in dev.arena_list() {
                let inner = a.inner.lock();
                let r = inner.check().map_err(|e| {
                    format!("device {} stream {:#x}: {e}", dev.core.index, a.stream)
                })?;
                live_bytes += r.iter().map(|x| x.1).sum::<u64>();
                ranges.extend(r);
                seg_bytes += inner.segment_bytes();
                free += inner.free_bytes();
                pending += inner.pending_bytes();
            }
            ranges.sort_unstable();
            for w in ranges.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return Err(format!(
                        "device {}: live blocks {:#x} and {:#x} overlap",
                        dev.core.index, w[0].0, w[1].0
                    ));
                }
            }
            let c = &dev.core.counters;
            let idle = dev.vmm_idle_bytes();
            if seg_bytes + idle != c.reserved.current() {
                return Err(format!(
                    "device {}: segments hold {seg_bytes} bytes and {idle} are cached unmapped, reserved says {}",
                    dev.core.index,
                    c.reserved.current()
                ));
            }
            dev.check_vmm()?;
            if live_bytes != dev.allocated() {
                return Err(format!(
                    "device {}: live blocks hold {live_bytes} bytes, allocated says {}",
                    dev.core.index,
                    dev.allocated()
                ));
            }
            dev.check_pools()?;
            if seg_bytes != live_bytes + free + pending {
                return Err(format!(
                    "device {}: reserved {seg_bytes} != live {live_bytes} + free {free} + pending {pending}",
                    dev.core.index
                ));
            }
        }
        Ok(())
    }
}
