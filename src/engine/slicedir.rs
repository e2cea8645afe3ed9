//! The directory of published L2 slices: from an L1 index and a slice index straight to the
//! cached slice, so that a lock-free reader finds its slice with a few loads instead of a
//! hash probe (see [`super::mapview::MapView::lookup`]), and without taking any lock.
//!
//! The directory is a [`PinnedGrid`]: a row per table with a published slice (one slot per
//! slice of a table), indexed by L1 index. Readers hold a grace pin for their whole request
//! anyway (it keeps the host clusters they map from reuse), and the same pin keeps every
//! slice, row and row array they can reach alive: what a writer unlinks is dropped a grace
//! period later. A slot holds whatever slice was last published there, so readers check the
//! slice's own key (its host offset) against the one the current L1 entry gives: a slot left
//! over from the table the entry pointed at before is never used. Every published slice is
//! also in the metadata cache, which unpublishes it when it evicts or drops it (the slice
//! records its own slot, [`L2Table::home`]), so the directory never holds more than the
//! cache does (plus, for a grace period, what it unpublished).
//!
//! Memory: a pointer per L1 entry up to the highest one with a published slice (at most
//! twice that: the row array doubles), a pointer per slot of each table with a published
//! slice (a table has cluster size / slice size slots: 128 bytes per table at 64 KiB clusters
//! and 4 KiB slices); at most `max_blocks` tables at once (a table beyond that is not
//! published and its readers take the metadata mutex), and everything is given back when
//! the last slice is unpublished.

use super::mapview::{L2Table, MAX_L1_ENTRIES};
use crate::storage::{Grace, GridWriter, Pinned, PinnedGrid};
use std::sync::Arc;

/// Published slices (see the module comment). Changes come from metadata mutex holders.
#[derive(Debug)]
pub struct SliceDir {
    grid: PinnedGrid<L2Table>,
    /// Slots per row: slices per L2 table.
    per_table: usize,
}

impl SliceDir {
    /// An empty directory for tables of `per_table` slices, holding at most `max_blocks`
    /// tables at once (at least one), for readers pinned in `grace`.
    pub fn new(grace: Arc<Grace>, per_table: usize, max_blocks: usize) -> SliceDir {
        // Home indices must fit 32 bits each (see `L2Table::set_home`).
        let per_table = per_table.clamp(1, u32::MAX as usize);
        SliceDir {
            // A row per L1 entry: no image has more than QEMU's limit.
            grid: PinnedGrid::new(grace, per_table, MAX_L1_ENTRIES, max_blocks),
            per_table,
        }
    }

    /// The slice published for slice `slice` of the table under L1 entry `l1`, for a reader
    /// pinned in the directory's grace periods (callers check its key: the slot may hold a
    /// slice of the table the entry pointed at before).
    #[inline(always)]
    pub fn get<'a>(&'a self, pinned: &Pinned<'a>, l1: usize, slice: usize) -> Option<&'a L2Table> {
        self.grid.get(pinned, l1, slice)
    }

    /// The grace periods its readers pin.
    #[cfg(test)]
    pub fn grace(&self) -> &Arc<Grace> {
        self.grid.grace()
    }

    /// The key of the slice published at (`l1`, `slice`), if any (for writers: no pin).
    pub fn key_at(&self, l1: usize, slice: usize) -> Option<crate::format::HostOffset> {
        self.grid.write().get(l1, slice).map(L2Table::key)
    }

    /// Number of published slices.
    #[cfg(all(test, not(loom)))]
    pub fn len(&self) -> usize {
        self.grid.write().len()
    }

    /// Publishes `t` (slice `slice` of the table under L1 entry `l1`) for readers; replaces
    /// the slot's occupant and moves the slice if it was published elsewhere. Returns false
    /// (nothing published) when every block is in use and `l1` has none.
    pub fn publish(&self, l1: usize, slice: usize, t: &Arc<L2Table>) -> bool {
        let mut w = self.grid.write();
        Self::publish_in(&mut w, self.per_table, l1, slice, t)
    }

    /// Withdraws `evicted` (if given and published) and publishes `t` as [`Self::publish`]
    /// does, as one writer: a cache miss that evicts takes the writer mutex once.
    pub fn replace(
        &self,
        evicted: Option<&Arc<L2Table>>,
        l1: usize,
        slice: usize,
        t: &Arc<L2Table>,
    ) -> bool {
        let mut w = self.grid.write();
        if let Some(e) = evicted {
            Self::unpublish_in(&mut w, e);
        }
        Self::publish_in(&mut w, self.per_table, l1, slice, t)
    }

    /// Withdraws `t`, if published; a block left empty is given back, and an empty
    /// directory gives its memory back (a grace period later).
    pub fn unpublish(&self, t: &Arc<L2Table>) {
        if t.home().is_some() {
            Self::unpublish_in(&mut self.grid.write(), t);
        }
    }

    /// Lets the directory hold up to `max_blocks` tables (never fewer than now).
    pub fn grow_max_blocks(&self, max_blocks: usize) {
        self.grid.write().grow_max_rows(max_blocks);
    }

    /// Drops what was withdrawn once no reader can still hold it.
    pub fn collect(&self) {
        self.grid.write().collect();
    }

    /// Withdraws everything and gives the memory back (a grace period later).
    pub fn clear(&self) {
        let mut w = self.grid.write();
        for t in w.values() {
            t.set_home(None);
        }
        w.clear();
    }

    fn publish_in(
        w: &mut GridWriter<'_, L2Table>,
        per_table: usize,
        l1: usize,
        slice: usize,
        t: &Arc<L2Table>,
    ) -> bool {
        if slice >= per_table || l1 >= u32::MAX as usize {
            return false;
        }
        match t.home() {
            Some(at) if at == (l1, slice) => return true,
            Some(_) => Self::unpublish_in(w, t),
            None => {}
        }
        match w.set(l1, slice, Arc::clone(t)) {
            Ok(old) => {
                if let Some(old) = old {
                    old.set_home(None);
                }
                t.set_home(Some((l1, slice)));
                true
            }
            Err(_) => false,
        }
    }

    fn unpublish_in(w: &mut GridWriter<'_, L2Table>, t: &Arc<L2Table>) {
        let Some((l1, slice)) = t.home() else {
            return;
        };
        t.set_home(None);
        // The slot is the slice's own (its home says so); check anyway rather than withdraw
        // another slice.
        if w.get(l1, slice).is_some_and(|s| std::ptr::eq(s, &**t)) {
            w.take(l1, slice);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::format::HostOffset;

    fn slice(key: u64) -> Arc<L2Table> {
        L2Table::new(HostOffset::new(key), vec![key; 4])
    }

    fn dir(per_table: usize, max_blocks: usize) -> SliceDir {
        SliceDir::new(Arc::new(Grace::default()), per_table, max_blocks)
    }

    /// Whether the directory holds exactly `t` at (`l1`, `slice`).
    fn holds(d: &SliceDir, l1: usize, slice: usize, t: &Arc<L2Table>) -> bool {
        let pin = d.grid.grace().pin();
        let p = pin.pinned();
        d.get(&p, l1, slice).is_some_and(|s| std::ptr::eq(s, &**t))
    }

    fn empty_at(d: &SliceDir, l1: usize, slice: usize) -> bool {
        let pin = d.grid.grace().pin();
        let p = pin.pinned();
        d.get(&p, l1, slice).is_none()
    }

    #[test]
    fn slices_are_found_by_l1_and_slice_index_and_withdrawn_by_their_home() {
        let d = dir(4, 8);
        let a = slice(0x1_0000);
        let b = slice(0x1_0200);
        assert!(d.publish(7, 0, &a));
        assert!(d.publish(7, 1, &b));
        assert!(d.publish(2, 3, &slice(0x9_0600)));
        assert!(holds(&d, 7, 0, &a));
        assert!(holds(&d, 7, 1, &b));
        assert_eq!(b.home(), Some((7, 1)));
        assert!(empty_at(&d, 7, 2));
        assert!(empty_at(&d, 3, 0), "an L1 index without a block");
        assert!(empty_at(&d, 7, 4), "past the slices of a table");
        assert!(
            !d.publish(7, 4, &slice(0x1_0800)),
            "past the slices of a table"
        );
        d.unpublish(&a);
        assert!(empty_at(&d, 7, 0));
        assert_eq!(a.home(), None);
        d.unpublish(&a);
        assert_eq!(d.len(), 2, "withdrawing twice changes nothing");
        assert_eq!(d.key_at(7, 1), Some(HostOffset::new(0x1_0200)));
    }

    #[test]
    fn a_slot_holds_one_slice_and_a_slice_one_slot() {
        let d = dir(4, 8);
        let old = slice(0x1_0000);
        assert!(d.publish(1, 0, &old));
        // The L1 entry now points at another table: its slice takes the slot over and the
        // old one is no longer published anywhere.
        let new = slice(0x5_0000);
        assert!(d.publish(1, 0, &new));
        assert_eq!(old.home(), None);
        d.unpublish(&old);
        assert!(holds(&d, 1, 0, &new), "not the old one's slot");
        // The same slice reached through another L1 entry (a corrupt image) moves.
        assert!(d.publish(3, 0, &new));
        assert!(empty_at(&d, 1, 0));
        assert!(holds(&d, 3, 0, &new));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn blocks_are_bounded_reused_and_released() {
        let d = dir(2, 2);
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
        assert!(empty_at(&d, 0, 0));
        for t in &s[1..] {
            d.unpublish(t);
        }
        assert_eq!(d.len(), 0);
        d.grid.write().collect();
        assert!(
            s.iter().all(|t| Arc::strong_count(t) == 1),
            "the directory's references are dropped once no reader is pinned"
        );
    }

    #[test]
    fn clearing_withdraws_every_slice() {
        let d = dir(2, 4);
        let s: Vec<Arc<L2Table>> = [0x1000, 0x3000].into_iter().map(slice).collect();
        assert!(d.publish(0, 0, &s[0]));
        assert!(d.publish(1, 1, &s[1]));
        d.clear();
        assert!(s.iter().all(|t| t.home().is_none()));
        assert!(empty_at(&d, 0, 0) && empty_at(&d, 1, 1));
        assert_eq!(d.len(), 0);
    }
}
