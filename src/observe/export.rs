//! Exports as JSON: the statistics behind `cudalloc_stats_json` and
//! `stats_file:PATH`, and the memory snapshot behind
//! `cudalloc_snapshot_json` (PyTorch's `_snapshot()` format).

use crate::config::Config;
use crate::engine::snapshot::{Snapshot, TraceAction};
use crate::size_class::Pool;
use crate::stats::cudalloc_stats;
use serde_json::{json, Map, Value};

/// Every field of a [`cudalloc_stats`], by name, in declaration order.
pub fn stats_fields(s: &cudalloc_stats) -> Vec<(&'static str, u64)> {
    vec![
        ("allocated_bytes", s.allocated_bytes),
        ("allocated_bytes_peak", s.allocated_bytes_peak),
        ("reserved_bytes", s.reserved_bytes),
        ("reserved_bytes_peak", s.reserved_bytes_peak),
        ("requested_bytes", s.requested_bytes),
        ("active_allocations", s.active_allocations),
        ("num_allocs", s.num_allocs),
        ("num_frees", s.num_frees),
        ("num_cache_hits", s.num_cache_hits),
        ("num_driver_allocs", s.num_driver_allocs),
        ("num_driver_frees", s.num_driver_frees),
        ("num_ooms", s.num_ooms),
        ("num_alloc_retries", s.num_alloc_retries),
        ("num_invalid_frees", s.num_invalid_frees),
        ("num_segments_adopted", s.num_segments_adopted),
        ("segments", s.segments),
        ("cached_free_bytes", s.cached_free_bytes),
        ("largest_free_block", s.largest_free_block),
        ("pending_free_bytes", s.pending_free_bytes),
        ("limit_bytes", s.limit_bytes),
        ("pressure_level", s.pressure_level),
        ("num_pressure_low", s.num_pressure_low),
        ("num_pressure_moderate", s.num_pressure_moderate),
        ("num_pressure_high", s.num_pressure_high),
        ("num_pressure_critical", s.num_pressure_critical),
        ("num_trims", s.num_trims),
        ("trimmed_bytes", s.trimmed_bytes),
        ("num_leak_age_alarms", s.num_leak_age_alarms),
        ("num_leak_growth_alarms", s.num_leak_growth_alarms),
        ("log_records_dropped", s.log_records_dropped),
        ("mapped_bytes", s.mapped_bytes),
        ("virtual_bytes", s.virtual_bytes),
        ("num_vmm_creates", s.num_vmm_creates),
        ("num_vmm_releases", s.num_vmm_releases),
        ("num_vmm_maps", s.num_vmm_maps),
        ("num_vmm_unmaps", s.num_vmm_unmaps),
        ("num_vmm_set_access", s.num_vmm_set_access),
    ]
}

/// `{"devices":[{"device":0, <every cudalloc_stats field>}, ...], "config":{key: value}}`.
pub fn stats_json(devices: &[(usize, cudalloc_stats)], config: &Config) -> String {
    let devices: Vec<Value> = devices
        .iter()
        .map(|(d, s)| {
            let mut m = Map::new();
            m.insert("device".into(), json!(d));
            for (k, v) in stats_fields(s) {
                m.insert(k.into(), json!(v));
            }
            Value::Object(m)
        })
        .collect();
    let config: Map<String, Value> = crate::config::OPTIONS
        .iter()
        .filter_map(|o| config.get(o.key).map(|v| (o.key.to_string(), json!(v))))
        .collect();
    json!({ "devices": devices, "config": config }).to_string()
}

/// A snapshot in the format of PyTorch's `torch.cuda.memory._snapshot()`
/// (torch/csrc/cuda/Module.cpp, `_memory_snapshot_pickled`), which torch's
/// viewer (`torch.cuda._memory_viz`, pytorch.org/memory_viz) reads:
/// `{"segments": [...], "device_traces": [[...] per device]}`. Each segment
/// has `device`, `address`, `total_size`, `allocated_size`, `active_size`,
/// `requested_size`, `stream`, `segment_type` ("small" or "large"),
/// `segment_pool_id` ([0, 0] outside a private pool), `is_expandable`
/// (false), `frames` ([]) and `blocks`; each block `address`, `size`,
/// `requested_size`, `state` ("active_allocated", "active_pending_free" or
/// "inactive") and `frames` ([]); each trace entry `action`, `addr` (for
/// an `oom`: `device_free`), `size`, `stream`, `time_us` and `frames` ([]).
/// Streams are the raw stream values as signed 64-bit integers, as torch's.
pub fn snapshot_json(s: &Snapshot) -> String {
    let frames = || Value::Array(Vec::new());
    let segments: Vec<Value> = s
        .segments
        .iter()
        .map(|seg| {
            let blocks: Vec<Value> = seg
                .blocks
                .iter()
                .map(|b| {
                    json!({
                        "address": b.address,
                        "size": b.size,
                        "requested_size": b.requested_size,
                        "state": b.status.torch_state(),
                        "frames": frames(),
                    })
                })
                .collect();
            json!({
                "device": seg.device,
                "address": seg.address,
                "total_size": seg.total_size,
                "allocated_size": seg.allocated_size(),
                "active_size": seg.active_size(),
                "requested_size": seg.requested_size(),
                "stream": seg.stream as i64,
                "segment_type": if seg.pool == Pool::Small { "small" } else { "large" },
                "segment_pool_id": [seg.pool_id.0, seg.pool_id.1],
                "is_expandable": false,
                "frames": frames(),
                "blocks": blocks,
            })
        })
        .collect();
    let traces: Vec<Value> = s
        .device_traces
        .iter()
        .map(|t| {
            t.iter()
                .map(|e| {
                    let mut m = Map::new();
                    m.insert("action".into(), json!(e.action.name()));
                    let key = if e.action == TraceAction::Oom {
                        "device_free"
                    } else {
                        "addr"
                    };
                    m.insert(key.into(), json!(e.addr));
                    m.insert("size".into(), json!(e.size));
                    m.insert("stream".into(), json!(e.stream as i64));
                    m.insert("time_us".into(), json!(e.time_us));
                    m.insert("frames".into(), frames());
                    Value::Object(m)
                })
                .collect()
        })
        .collect();
    json!({ "segments": segments, "device_traces": traces }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot's JSON has torch's keys and values, for an allocation,
    /// its segment, and the history's actions.
    #[test]
    fn the_snapshot_json_speaks_torchs_format() {
        use crate::driver::sim::SimDriver;
        use crate::Allocator;
        use std::sync::Arc;
        let c = Config::parse("sim_memory:1GiB").unwrap();
        let a = Allocator::new(c.clone(), Arc::new(SimDriver::new(1, c.sim_memory)));
        a.record_history(true, 100, false);
        let p = a.malloc(1000, 0, 0x10).unwrap();
        let q = a.malloc(1000, 0, 0x10).unwrap();
        a.free(q, Some(0), 0x10).unwrap();
        let _ = a.malloc(1 << 40, 0, 0x10).unwrap_err();
        let v: Value = serde_json::from_str(&a.snapshot_json()).unwrap();
        let seg = &v["segments"][0];
        assert_eq!(v["segments"].as_array().unwrap().len(), 1);
        assert_eq!(seg["device"], 0);
        assert_eq!(seg["address"], p);
        assert_eq!(seg["total_size"], 2 << 20);
        assert_eq!(seg["allocated_size"], 1024);
        assert_eq!(seg["active_size"], 1024);
        assert_eq!(seg["requested_size"], 1000);
        assert_eq!(seg["stream"], 0x10);
        assert_eq!(seg["segment_type"], "small");
        assert_eq!(seg["segment_pool_id"], json!([0, 0]));
        assert_eq!(seg["is_expandable"], false);
        assert_eq!(seg["frames"], json!([]));
        let states: Vec<&str> = seg["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["active_allocated", "inactive", "inactive"]);
        let b = &seg["blocks"][0];
        assert_eq!(
            (
                &b["address"],
                &b["size"],
                &b["requested_size"],
                &b["frames"]
            ),
            (&json!(p), &json!(1024), &json!(1000), &json!([]))
        );
        let t = v["device_traces"][0].as_array().unwrap();
        let actions: Vec<&str> = t.iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(
            actions,
            [
                "segment_alloc",
                "alloc",
                "alloc",
                "free_requested",
                "free_completed",
                "oom",
            ]
        );
        assert_eq!((&t[0]["addr"], &t[0]["size"]), (&json!(p), &json!(2 << 20)));
        assert_eq!(
            (&t[2]["addr"], &t[2]["size"], &t[2]["stream"]),
            (&json!(q), &json!(1000), &json!(0x10))
        );
        let oom = &t[5];
        assert!(oom.get("addr").is_none() && oom["device_free"].as_u64().unwrap() > 0);
        assert_eq!(oom["size"], 1u64 << 40);
        for e in t {
            assert!(e["time_us"].as_u64().unwrap() > 0 && e["frames"] == json!([]));
        }
    }

    #[test]
    fn every_stats_field_is_exported() {
        // All fields are u64: the list must have one entry per field.
        let n = std::mem::size_of::<cudalloc_stats>() / 8;
        assert_eq!(stats_fields(&cudalloc_stats::default()).len(), n);
    }
}
