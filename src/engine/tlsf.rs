//! Blocks and the TLSF free index (Masmano et al., 2004).
//!
//! Blocks live in a slab (`Vec<Block>` plus a free-slot list) and are linked
//! by index: physically, to their neighbours in the segment (for coalescing),
//! and into a doubly linked list per free-size bin. Two bitmaps say which bins
//! are non-empty, so finding a fitting block is O(1): a bounded look in the
//! request's own bin (catching same-size reuse, the common case), then the
//! first non-empty bin whose every block fits.

use crate::size_class::{bin_at_least, bin_of, FL_COUNT, SL_COUNT};

/// "No block" in index links.
pub const NIL: u32 = u32::MAX;

/// How many blocks of the request's own bin are looked at before moving up.
const OWN_BIN_PROBES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// In the free index, reusable on the arena's stream.
    Free,
    /// Handed out to a user.
    Live,
    /// Freed by the user but waiting on events of streams it was recorded on.
    Pending,
    /// Freed by the user and kept whole in the arena's stash for exact-size
    /// reuse on the same stream (coalescing deferred).
    Stashed,
    /// Virtual address space with no memory mapped behind it, in a virtual
    /// segment (`expandable_segments:on`): page-aligned, outside the free
    /// index, mapped when a request needs it.
    Hole,
    /// Slot in the slab is unused.
    Vacant,
}

#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
    pub seg: u32,
    /// Physical neighbours within the segment.
    pub prev: u32,
    pub next: u32,
    /// Links within the free bin (valid when `state == Free`).
    pub free_prev: u32,
    pub free_next: u32,
    pub state: BlockState,
}

/// A slab of blocks with slot reuse.
#[derive(Debug, Default)]
pub struct Blocks {
    pub slots: Vec<Block>,
    vacant: Vec<u32>,
}

impl Blocks {
    pub fn insert(&mut self, b: Block) -> u32 {
        if let Some(i) = self.vacant.pop() {
            self.slots[i as usize] = b;
            i
        } else {
            self.slots.push(b);
            (self.slots.len() - 1) as u32
        }
    }

    pub fn remove(&mut self, i: u32) {
        self.slots[i as usize].state = BlockState::Vacant;
        self.vacant.push(i);
    }

    #[inline]
    pub fn get(&self, i: u32) -> &Block {
        &self.slots[i as usize]
    }

    #[inline]
    pub fn get_mut(&mut self, i: u32) -> &mut Block {
        &mut self.slots[i as usize]
    }

    /// Indices of occupied slots.
    pub fn occupied(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, b)| b.state != BlockState::Vacant)
            .map(|(i, _)| i as u32)
    }
}

/// The segregated free lists of one pool of one arena.
#[derive(Debug)]
pub struct FreeIndex {
    heads: Vec<u32>,
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    /// Bytes in free blocks.
    pub free_bytes: u64,
    pub free_blocks: u64,
}

impl Default for FreeIndex {
    fn default() -> Self {
        FreeIndex {
            heads: vec![NIL; FL_COUNT * SL_COUNT],
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            free_bytes: 0,
            free_blocks: 0,
        }
    }
}

impl FreeIndex {
    #[inline]
    fn slot(fl: usize, sl: usize) -> usize {
        fl * SL_COUNT + sl
    }

    /// Put free block `i` at the head of its bin.
    pub fn insert(&mut self, blocks: &mut Blocks, i: u32) {
        let (fl, sl) = bin_of(blocks.get(i).size);
        let slot = Self::slot(fl, sl);
        let head = self.heads[slot];
        {
            let b = blocks.get_mut(i);
            b.state = BlockState::Free;
            b.free_prev = NIL;
            b.free_next = head;
            self.free_bytes += b.size;
        }
        if head != NIL {
            blocks.get_mut(head).free_prev = i;
        }
        self.heads[slot] = i;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
        self.free_blocks += 1;
    }

    /// Take free block `i` out of its bin (its state is left for the caller).
    pub fn remove(&mut self, blocks: &mut Blocks, i: u32) {
        let b = *blocks.get(i);
        debug_assert_eq!(b.state, BlockState::Free);
        if b.free_prev != NIL {
            blocks.get_mut(b.free_prev).free_next = b.free_next;
        } else {
            let (fl, sl) = bin_of(b.size);
            let slot = Self::slot(fl, sl);
            debug_assert_eq!(self.heads[slot], i);
            self.heads[slot] = b.free_next;
            if b.free_next == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        if b.free_next != NIL {
            blocks.get_mut(b.free_next).free_prev = b.free_prev;
        }
        self.free_bytes -= b.size;
        self.free_blocks -= 1;
    }

    /// A free block of at least `size` bytes, good-fit, in O(1).
    pub fn find(&self, blocks: &Blocks, size: u64) -> Option<u32> {
        // Same-size reuse: the best fit among a few blocks of the request's own bin.
        let (fl, sl) = bin_of(size);
        let mut i = self.heads[Self::slot(fl, sl)];
        let mut best: Option<(u64, u32)> = None;
        for _ in 0..OWN_BIN_PROBES {
            if i == NIL {
                break;
            }
            let b = blocks.get(i);
            if b.size == size {
                return Some(i);
            }
            if b.size > size && best.is_none_or(|(s, _)| b.size < s) {
                best = Some((b.size, i));
            }
            i = b.free_next;
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        // Then the first non-empty bin whose every block fits.
        let (fl, sl) = bin_at_least(size)?;
        let sl_map = self.sl_bitmap[fl] & (u32::MAX << sl);
        let (fl, sl) = if sl_map != 0 {
            (fl, sl_map.trailing_zeros() as usize)
        } else {
            let fl_map = self.fl_bitmap & (u64::MAX.checked_shl(fl as u32 + 1).unwrap_or(0));
            if fl_map == 0 {
                return None;
            }
            let fl = fl_map.trailing_zeros() as usize;
            (fl, self.sl_bitmap[fl].trailing_zeros() as usize)
        };
        let head = self.heads[Self::slot(fl, sl)];
        debug_assert!(head != NIL && blocks.get(head).size >= size);
        Some(head)
    }

    /// The best fit among the first blocks of the request's own size bin
    /// (blocks within a few percent of the request; the lowest address
    /// among equals), or `None`: no larger bin is looked at.
    pub fn find_own_bin(&self, blocks: &Blocks, size: u64) -> Option<u32> {
        let (fl, sl) = bin_of(size);
        let mut i = self.heads[Self::slot(fl, sl)];
        let mut best: Option<(u64, u64, u32)> = None;
        for _ in 0..OWN_BIN_PROBES * 4 {
            if i == NIL {
                break;
            }
            let b = blocks.get(i);
            if b.size >= size && best.is_none_or(|x| (b.size, b.addr) < (x.0, x.1)) {
                best = Some((b.size, b.addr, i));
            }
            i = b.free_next;
        }
        best.map(|x| x.2)
    }

    /// The largest free block's size (a scan of the top non-empty bin).
    pub fn largest(&self, blocks: &Blocks) -> u64 {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = 63 - self.fl_bitmap.leading_zeros() as usize;
        let sl = 31 - self.sl_bitmap[fl].leading_zeros() as usize;
        let mut i = self.heads[Self::slot(fl, sl)];
        let mut best = 0;
        while i != NIL {
            best = best.max(blocks.get(i).size);
            i = blocks.get(i).free_next;
        }
        best
    }

    /// Check that bins, bitmaps and byte counts agree with the blocks.
    pub fn check(&self, blocks: &Blocks) -> Result<(), String> {
        let (mut bytes, mut count) = (0, 0);
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let head = self.heads[Self::slot(fl, sl)];
                let bit = self.sl_bitmap[fl] & (1 << sl) != 0;
                if bit != (head != NIL) {
                    return Err(format!("bin ({fl},{sl}): bitmap bit {bit} but head {head}"));
                }
                let mut prev = NIL;
                let mut i = head;
                while i != NIL {
                    let b = blocks.get(i);
                    if b.state != BlockState::Free
                        || bin_of(b.size) != (fl, sl)
                        || b.free_prev != prev
                    {
                        return Err(format!(
                            "bin ({fl},{sl}): block {i} is {:?} of size {} misfiled",
                            b.state, b.size
                        ));
                    }
                    bytes += b.size;
                    count += 1;
                    prev = i;
                    i = b.free_next;
                }
            }
            if (self.fl_bitmap & (1 << fl) != 0) != (self.sl_bitmap[fl] != 0) {
                return Err(format!("first-level bitmap disagrees at {fl}"));
            }
        }
        if bytes != self.free_bytes || count != self.free_blocks {
            return Err(format!(
                "free index counts {}/{} bytes/blocks, bins hold {bytes}/{count}",
                self.free_bytes, self.free_blocks
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size: u64) -> Block {
        Block {
            addr: 0,
            size,
            seg: 0,
            prev: NIL,
            next: NIL,
            free_prev: NIL,
            free_next: NIL,
            state: BlockState::Free,
        }
    }

    #[test]
    fn finds_fitting_blocks_and_keeps_bitmaps_right() {
        let mut blocks = Blocks::default();
        let mut idx = FreeIndex::default();
        let sizes = [512u64, 1024, 4096, 1 << 20, (1 << 20) + 512, 20 << 20];
        let ids: Vec<u32> = sizes.iter().map(|&s| blocks.insert(block(s))).collect();
        for &i in &ids {
            idx.insert(&mut blocks, i);
        }
        idx.check(&blocks).unwrap();
        assert_eq!(idx.find(&blocks, 512), Some(ids[0]));
        assert_eq!(idx.find(&blocks, 3000 / 512 * 512 + 512), Some(ids[2]));
        let got = idx.find(&blocks, (1 << 20) + 512).unwrap();
        assert!(blocks.get(got).size >= (1 << 20) + 512);
        assert_eq!(idx.find(&blocks, 21 << 20), None);
        assert_eq!(idx.largest(&blocks), 20 << 20);
        idx.remove(&mut blocks, ids[5]);
        blocks.get_mut(ids[5]).state = BlockState::Live;
        idx.check(&blocks).unwrap();
        assert_eq!(idx.find(&blocks, 2 << 20), None);
        assert_eq!(idx.largest(&blocks), (1 << 20) + 512);
    }
}
