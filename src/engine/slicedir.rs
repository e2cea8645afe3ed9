//! The directory of published L2 slices: from an L1 index and a slice index straight to the
//! cached slice, so that a lock-free reader finds its slice with two array loads instead of a
//! hash probe (see [`super::mapview::MapView::lookup`]).
//!
//! Every table with a published slice owns a block of slots (one per slice of a table) in one
//! arena; `bases` maps an L1 index to its block. A slot holds whatever slice was last
//! published there, so readers check the slice's own key (its host offset) against the one
//! the current L1 entry gives: a slot left over from the table the entry pointed at before is
//! never used. Every published slice is also in the metadata cache, which unpublishes it when
//! it evicts or drops it (the slice records its own slot, [`L2Table::home`]), so the
//! directory never holds more than the cache does.
//!
//! Memory: 4 bytes per L1 entry up to the highest one with a published slice, 8 bytes per
//! slot of each table with a published slice (a table has cluster size / slice size slots:
//! 128 bytes per table at 64 KiB clusters and 4 KiB slices); at most `max_blocks` tables at
//! once (a table beyond that is not published and its readers take the metadata mutex), and
//! everything is given back when the last slice is unpublished.

use super::mapview::L2Table;
use std::sync::Arc;

/// Published slices (see the module comment). Callers serialise changes (the view's write
/// lock) and read under its read lock.
#[derive(Debug)]
pub struct SliceDir {
    /// Slots per block: slices per L2 table.
    per_table: usize,
    /// Most blocks at once (bounds the arena).
    max_blocks: usize,
    /// Per L1 index: 1 + its block number (0: no block).
    bases: Vec<u32>,
    /// `per_table` slots per block.
    arena: Vec<Option<Arc<L2Table>>>,
    /// Per block: the L1 index owning it and its number of published slices.
    blocks: Vec<(u32, u32)>,
    /// Blocks no L1 index owns.
    free: Vec<u32>,
    /// Number of published slices.
    published: usize,
}

impl SliceDir {
    /// An empty directory for tables of `per_table` slices, holding at most `max_blocks`
    /// tables at once (at least one).
    pub fn new(per_table: usize, max_blocks: usize) -> SliceDir {
        // Block numbers and slot indices must fit the u32 bases.
        let cap = (u32::MAX as usize - 1) / per_table.max(1);
        SliceDir {
            per_table: per_table.max(1),
            max_blocks: max_blocks.clamp(1, cap),
            bases: Vec::new(),
            arena: Vec::new(),
            blocks: Vec::new(),
            free: Vec::new(),
            published: 0,
        }
    }

    /// The slice published for slice `slice` of the table under L1 entry `l1` (callers check
    /// its key: the slot may hold a slice of the table the entry pointed at before).
    #[inline]
    pub fn get(&self, l1: usize, slice: usize) -> Option<&Arc<L2Table>> {
        let b = *self.bases.get(l1)? as usize;
        if b == 0 || slice >= self.per_table {
            return None;
        }
        self.arena.get((b - 1) * self.per_table + slice)?.as_ref()
    }

    /// Number of published slices.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.published
    }

    /// Publishes `t` (slice `slice` of the table under L1 entry `l1`) for readers; replaces
    /// the slot's occupant and moves the slice if it was published elsewhere. Returns false
    /// (nothing published) when every block is in use and `l1` has none.
    pub fn publish(&mut self, l1: usize, slice: usize, t: &Arc<L2Table>) -> bool {
        if slice >= self.per_table || l1 >= u32::MAX as usize {
            return false;
        }
        match t.home() {
            Some(at) if at == (l1, slice) => return true,
            Some(_) => self.unpublish(t),
            None => {}
        }
        let Some(block) = self.block_of(l1) else {
            return false;
        };
        match self.arena[block * self.per_table + slice].replace(Arc::clone(t)) {
            Some(old) => old.set_home(None),
            None => {
                self.blocks[block].1 += 1;
                self.published += 1;
            }
        }
        t.set_home(Some((l1, slice)));
        true
    }

    /// Withdraws `t`, if published; a block left empty goes back to the free list, and an
    /// empty directory gives its memory back.
    pub fn unpublish(&mut self, t: &Arc<L2Table>) {
        let Some((l1, slice)) = t.home() else {
            return;
        };
        t.set_home(None);
        let b = self.bases.get(l1).map_or(0, |&b| b as usize);
        if b == 0 {
            return;
        }
        let Some(slot) = self.arena.get_mut((b - 1) * self.per_table + slice) else {
            return;
        };
        // The slot is the slice's own (its home says so); check anyway rather than drop
        // another slice.
        if !slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, t)) {
            return;
        }
        *slot = None;
        self.published -= 1;
        let n = &mut self.blocks[b - 1].1;
        *n -= 1;
        if *n == 0 {
            self.bases[l1] = 0;
            self.free.push(b as u32 - 1);
            if self.published == 0 {
                self.clear();
            }
        }
    }

    /// Lets the directory hold up to `max_blocks` tables (never fewer than now).
    pub fn grow_max_blocks(&mut self, max_blocks: usize) {
        let cap = (u32::MAX as usize - 1) / self.per_table;
        self.max_blocks = self.max_blocks.max(max_blocks.min(cap));
    }

    /// Withdraws everything and gives the memory back.
    pub fn clear(&mut self) {
        for t in self.arena.iter().flatten() {
            t.set_home(None);
        }
        *self = SliceDir::new(self.per_table, self.max_blocks);
    }

    /// The block of `l1`, taking a free one (or growing the arena) if it has none.
    fn block_of(&mut self, l1: usize) -> Option<usize> {
        if let Some(&b) = self.bases.get(l1) {
            if b != 0 {
                return Some(b as usize - 1);
            }
        }
        let block = match self.free.pop() {
            Some(b) => b as usize,
            None if self.blocks.len() < self.max_blocks => {
                self.blocks.push((0, 0));
                self.arena
                    .resize_with(self.blocks.len() * self.per_table, || None);
                self.blocks.len() - 1
            }
            None => return None,
        };
        if self.bases.len() <= l1 {
            self.bases.resize(l1 + 1, 0);
        }
        self.bases[l1] = block as u32 + 1;
        self.blocks[block] = (l1 as u32, 0);
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::HostOffset;

    fn slice(key: u64) -> Arc<L2Table> {
        L2Table::new(HostOffset::new(key), vec![key; 4])
    }

    #[test]
    fn slices_are_found_by_l1_and_slice_index_and_withdrawn_by_their_home() {
        let mut d = SliceDir::new(4, 8);
        let a = slice(0x1_0000);
        let b = slice(0x1_0200);
        assert!(d.publish(7, 0, &a));
        assert!(d.publish(7, 1, &b));
        assert!(d.publish(2, 3, &slice(0x9_0600)));
        assert!(Arc::ptr_eq(d.get(7, 0).expect("a"), &a));
        assert!(Arc::ptr_eq(d.get(7, 1).expect("b"), &b));
        assert_eq!(b.home(), Some((7, 1)));
        assert!(d.get(7, 2).is_none());
        assert!(d.get(3, 0).is_none(), "an L1 index without a block");
        assert!(d.get(7, 4).is_none(), "past the slices of a table");
        d.unpublish(&a);
        assert!(d.get(7, 0).is_none());
        assert_eq!(a.home(), None);
        d.unpublish(&a);
        assert_eq!(d.len(), 2, "withdrawing twice changes nothing");
    }

    #[test]
    fn a_slot_holds_one_slice_and_a_slice_one_slot() {
        let mut d = SliceDir::new(4, 8);
        let old = slice(0x1_0000);
        assert!(d.publish(1, 0, &old));
        // The L1 entry now points at another table: its slice takes the slot over and the
        // old one is no longer published anywhere.
        let new = slice(0x5_0000);
        assert!(d.publish(1, 0, &new));
        assert_eq!(old.home(), None);
        d.unpublish(&old);
        assert!(
            Arc::ptr_eq(d.get(1, 0).expect("new"), &new),
            "not the old one's slot"
        );
        // The same slice reached through another L1 entry (a corrupt image) moves.
        assert!(d.publish(3, 0, &new));
        assert!(d.get(1, 0).is_none());
        assert!(Arc::ptr_eq(d.get(3, 0).expect("moved"), &new));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn blocks_are_bounded_reused_and_released() {
        let mut d = SliceDir::new(2, 2);
        let s: Vec<Arc<L2Table>> = [0x1000, 0x5200, 0x9000, 0x5000]
            .into_iter()
            .map(slice)
            .collect();
        assert!(d.publish(0, 0, &s[0]));
        assert!(d.publish(5, 1, &s[1]));
        assert!(!d.publish(9, 0, &s[2]), "no third block");
        assert_eq!(s[2].home(), None);
        assert!(d.publish(5, 0, &s[3]), "a block already owned");
        d.unpublish(&s[0]);
        assert!(d.publish(9, 0, &s[2]), "the freed block is reused");
        assert!(d.get(0, 0).is_none());
        for t in &s[1..] {
            d.unpublish(t);
        }
        assert_eq!(d.len(), 0);
        assert!(
            d.arena.capacity() == 0 && d.bases.capacity() == 0,
            "memory given back"
        );
    }
}
