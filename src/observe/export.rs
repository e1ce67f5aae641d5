//! Stats export: the JSON behind `cudalloc_stats_json` and `stats_file:PATH`.

use crate::config::Config;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stats_field_is_exported() {
        // All fields are u64: the list must have one entry per field.
        let n = std::mem::size_of::<cudalloc_stats>() / 8;
        assert_eq!(stats_fields(&cudalloc_stats::default()).len(), n);
    }
}
