//! Pure functions from request sizes to rounded sizes, pools, segment sizes
//! and free-list bins. No state, no locks: the engine calls these and tests
//! check them exhaustively.

use crate::config::Config;

/// Allocation granularity and alignment, as in torch and CuPy.
pub const GRANULE: u64 = 512;

/// Round a request up to a multiple of [`GRANULE`].
///
/// **Worst-case waste:** 511 bytes per request. Relative to the request that is
/// at most 50% for tiny requests (1 B takes 512 B, 513 B takes 1 KiB) and under
/// 0.05% for requests of 1 MiB and more. Splitting adds more only in the large
/// pool: see [`Policy::should_split`]. Returns `None` when rounding overflows.
pub fn round_size(size: u64) -> Option<u64> {
    size.max(1).checked_next_multiple_of(GRANULE)
}

/// Which pool a rounded request is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    Small = 0,
    Large = 1,
}

/// The engine's sizing policy, taken from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub small_max: u64,
    pub small_segment: u64,
    pub large_segment: u64,
    pub huge_threshold: u64,
    pub huge_round: u64,
    pub huge_split: bool,
}

impl Policy {
    pub fn from_config(c: &Config) -> Self {
        Policy {
            small_max: c.small_max,
            small_segment: c.small_segment,
            large_segment: c.large_segment,
            huge_threshold: c.huge_threshold,
            huge_round: c.huge_round,
            huge_split: c.huge_split,
        }
    }

    /// The pool for a rounded size.
    pub fn pool(&self, rounded: u64) -> Pool {
        if rounded <= self.small_max {
            Pool::Small
        } else {
            Pool::Large
        }
    }

    /// The size of a new segment for a rounded request: the small segment, the
    /// large segment, or for requests of at least `huge_threshold` (or larger
    /// than a large segment) the request rounded up to `huge_round`.
    pub fn segment_size(&self, rounded: u64) -> Option<u64> {
        match self.pool(rounded) {
            Pool::Small => Some(self.small_segment),
            Pool::Large if rounded < self.huge_threshold && rounded <= self.large_segment => {
                Some(self.large_segment)
            }
            Pool::Large => rounded.checked_next_multiple_of(self.huge_round),
        }
    }

    /// The segment sizes a growth for a rounded request tries, largest
    /// first: the policy's ([`Policy::segment_size`]), then, for when the
    /// device or its limit has no room for that, smaller ones that still
    /// hold the request: the request rounded up to `huge_round`, then the
    /// request itself. Without these a small limit or a small device could
    /// serve nothing (a 2 MiB request under `max_memory:10MiB` would need a
    /// 20 MiB segment). `None` when rounding overflows.
    pub fn growth_sizes(&self, rounded: u64) -> Option<impl Iterator<Item = u64>> {
        let first = self.segment_size(rounded)?;
        let mid = rounded
            .checked_next_multiple_of(self.huge_round)
            .filter(|&m| m < first);
        let last = Some(rounded).filter(|&r| r < mid.unwrap_or(first));
        Some([Some(first), mid, last].into_iter().flatten())
    }

    /// Whether a segment of `seg` bytes in `pool` is a segment of its own
    /// (made for one huge request) whose block, under `huge_split:off`, is
    /// handed out whole.
    pub fn whole(&self, pool: Pool, seg: u64) -> bool {
        !self.huge_split && pool == Pool::Large && seg != self.large_segment
    }

    /// Whether a free block of `block` bytes in a segment of `seg` bytes may
    /// serve a request of `rounded` bytes (`block >= rounded`). Always, except
    /// for a whole-handed block (see [`Policy::whole`]) more than one large
    /// segment bigger than the request: that much waste would be worse than
    /// a new segment.
    pub fn may_serve(&self, pool: Pool, seg: u64, block: u64, rounded: u64) -> bool {
        !self.whole(pool, seg) || block - rounded <= self.large_segment
    }

    /// Whether a free block of `block` bytes serving `rounded` bytes is split.
    ///
    /// Small pool: whenever at least one granule remains. Large pool: only when
    /// more than `small_max` remains (torch's rule), so the large pool never
    /// fills with slivers; the cost is up to `small_max` (1 MiB) of internal
    /// waste per large block, which the stats count as allocated.
    pub fn should_split(&self, pool: Pool, block: u64, rounded: u64) -> bool {
        let rest = block - rounded;
        match pool {
            Pool::Small => rest >= GRANULE,
            Pool::Large => rest > self.small_max,
        }
    }
}

/// Second-level subdivisions per power of two (log2).
pub const SL_LOG2: u32 = 5;
/// Second-level subdivisions per power of two.
pub const SL_COUNT: usize = 1 << SL_LOG2;
/// First-level classes: enough for any `u64` size.
pub const FL_COUNT: usize = 64 - 9 - SL_LOG2 as usize + 1;

/// The TLSF bin `(fl, sl)` holding free blocks of `size` bytes (a multiple of
/// [`GRANULE`]). Sizes below 32 granules (16 KiB) have exact bins; above, each
/// power of two is cut into 32 bins, so a bin's sizes differ by under 3.2%.
pub fn bin_of(size: u64) -> (usize, usize) {
    let u = size / GRANULE;
    if u < SL_COUNT as u64 {
        return (0, u as usize);
    }
    let log = 63 - u.leading_zeros();
    let fl = (log - SL_LOG2 + 1) as usize;
    let sl = ((u >> (log - SL_LOG2)) as usize) - SL_COUNT;
    (fl, sl)
}

/// The first bin whose every block is at least `size` bytes: where a
/// good-fit search starts. Returns `None` past the largest bin.
pub fn bin_at_least(size: u64) -> Option<(usize, usize)> {
    let u = size / GRANULE;
    if u < SL_COUNT as u64 {
        return Some((0, u as usize));
    }
    let log = 63 - u.leading_zeros();
    let step = 1u64 << (log - SL_LOG2);
    let up = u.checked_add(step - 1)?.checked_mul(GRANULE)?;
    Some(bin_of(up))
}

/// The smallest size (bytes) that maps to bin `(fl, sl)`.
pub fn bin_min(fl: usize, sl: usize) -> u64 {
    if fl == 0 {
        return sl as u64 * GRANULE;
    }
    (((SL_COUNT + sl) as u64) << (fl - 1)).saturating_mul(GRANULE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_512_granular_with_bounded_waste() {
        assert_eq!(round_size(0), Some(512));
        assert_eq!(round_size(1), Some(512));
        assert_eq!(round_size(512), Some(512));
        assert_eq!(round_size(513), Some(1024));
        assert_eq!(round_size(u64::MAX), None);
        for s in (1..200_000u64).step_by(97) {
            let r = round_size(s).unwrap();
            assert!(r >= s && r - s < GRANULE && r % GRANULE == 0);
        }
    }

    #[test]
    fn pools_and_segments_follow_torch() {
        let p = Policy::from_config(&Config::default());
        assert_eq!(p.pool(1 << 20), Pool::Small);
        assert_eq!(p.pool((1 << 20) + 512), Pool::Large);
        assert_eq!(p.segment_size(512), Some(2 << 20));
        assert_eq!(p.segment_size(5 << 20), Some(20 << 20));
        assert_eq!(p.segment_size(10 << 20), Some(10 << 20));
        assert_eq!(p.segment_size((10 << 20) + 512), Some(12 << 20));
        assert_eq!(p.segment_size(u64::MAX - 511), None);
        let sizes = |r| p.growth_sizes(r).unwrap().collect::<Vec<_>>();
        assert_eq!(
            sizes(512),
            [2 << 20, 512],
            "small: the segment, then the request"
        );
        assert_eq!(sizes(2 << 20), [20 << 20, 2 << 20]);
        assert_eq!(sizes(3 << 20), [20 << 20, 4 << 20, 3 << 20]);
        assert_eq!(
            sizes(10 << 20),
            [10 << 20],
            "an own segment is already the least"
        );
        assert_eq!(sizes((10 << 20) + 512), [12 << 20, (10 << 20) + 512]);
        assert!(p.growth_sizes(u64::MAX - 511).is_none());
        assert!(p.should_split(Pool::Small, 2 << 20, (2 << 20) - 512));
        assert!(!p.should_split(Pool::Large, 20 << 20, 19 << 20));
        assert!(p.should_split(Pool::Large, 20 << 20, 18 << 20));
    }

    #[test]
    fn bins_are_monotone_and_search_bins_fit() {
        let mut last = (0, 0);
        let mut s = GRANULE;
        while s < (1u64 << 50) {
            let b = bin_of(s);
            assert!(b >= last, "bins must not decrease");
            assert!(b.0 < FL_COUNT && b.1 < SL_COUNT);
            assert!(
                bin_min(b.0, b.1) <= s,
                "a size lies at or above its bin's minimum"
            );
            last = b;
            // Every block in the search bin (and above) is big enough.
            let start = bin_at_least(s).unwrap();
            assert!(
                bin_min(start.0, start.1) >= s,
                "search bin for {s} starts too low"
            );
            assert!(
                start == b || bin_min(b.0, b.1) < s,
                "round up only when needed"
            );
            s = (s * 9 / 8).next_multiple_of(GRANULE) + GRANULE * (s % 3);
        }
        assert_eq!(bin_of(u64::MAX / GRANULE * GRANULE).0, FL_COUNT - 1);
    }
}
