//! A grid of shared values that pinned requests read without taking any lock: read-copy-
//! update on top of the grace periods of [`super::grace`].
//!
//! Values sit in rows of `cols` slots; a row is allocated when its first value lands and
//! given back when its last one leaves, and the array of row pointers grows by copying. A
//! reader holding a pin of the grid's [`Grace`] follows three pointers (row array, row,
//! value) with plain loads: no read-modify-write, nothing a reader writes.
//! Writers run one at a time (the grid's mutex); whatever they unlink (a value, an emptied
//! row, an outgrown row array) waits in a queue and is dropped once every request pinned at
//! the time has finished, so a reader never holds a reference into freed memory.
//!
//! Memory: a pointer per row up to the highest row in use (twice that at most, as the array
//! doubles, and never past the grid's row limit), a pointer per slot of each row in use,
//! and what is unlinked while requests that could still see it are in flight (at most what
//! writers unlink during one request's life).

use super::grace::{seqcst_point, Grace, Pinned};
#[cfg(loom)]
use loom::sync::atomic::AtomicPtr;
#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ptr;
#[cfg(not(loom))]
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

/// A grid of `Arc<T>` slots indexed by (row, column); see the module comment.
#[derive(Debug)]
pub struct PinnedGrid<T> {
    /// The grace periods readers pin; only pins of this `Grace` let a reader in.
    grace: Arc<Grace>,
    /// Slots per row.
    cols: usize,
    /// Rows are numbered below this.
    row_limit: usize,
    /// The current row array (null: no row in use). Owns its rows.
    rows: AtomicPtr<RowArray<T>>,
    writer: Mutex<Writer<T>>,
    /// The grid owns `Arc<T>`s (through raw pointers), so it is `Send` and `Sync` only
    /// where they are.
    _owns: PhantomData<Arc<T>>,
}

/// Row pointers (null: no row). An array does not own its rows: the grid does, through its
/// current array, so an outgrown copy can be dropped while the new one keeps the rows.
struct RowArray<T> {
    rows: Box<[AtomicPtr<Row<T>>]>,
}

/// A row: each non-null slot owns one strong count of its value (`Arc::into_raw`).
struct Row<T> {
    slots: Box<[AtomicPtr<T>]>,
    _owns: PhantomData<Arc<T>>,
}

/// What only the writer (the grid's mutex holder) touches.
#[derive(Debug)]
struct Writer<T> {
    /// Values per row of the current array.
    counts: Vec<u32>,
    /// Rows in use, and the most allowed at once.
    live_rows: usize,
    max_rows: usize,
    /// Values in the grid.
    len: usize,
    /// Unlinked things with the grace tag current when they were unlinked (tags never
    /// decrease along the queue).
    retired: VecDeque<(u64, Unlinked<T>)>,
}

/// Something readers may still hold a reference into, waiting for its grace period.
enum Unlinked<T> {
    Value(#[allow(dead_code)] Arc<T>),
    Row(#[allow(dead_code)] Box<Row<T>>),
    Rows(#[allow(dead_code)] Box<RowArray<T>>),
}

impl<T> std::fmt::Debug for Unlinked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unlinked::Value(_) => "Value",
            Unlinked::Row(_) => "Row",
            Unlinked::Rows(_) => "Rows",
        })
    }
}

/// Returned by [`GridWriter::set`] when the value would need a new row and the grid already
/// has its most rows in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsExhausted;

impl<T> RowArray<T> {
    fn new(len: usize) -> Box<RowArray<T>> {
        Box::new(RowArray {
            rows: (0..len).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
        })
    }
}

impl<T> Row<T> {
    fn new(cols: usize) -> Box<Row<T>> {
        Box::new(Row {
            slots: (0..cols).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            _owns: PhantomData,
        })
    }
}

impl<T> Drop for Row<T> {
    fn drop(&mut self) {
        for s in self.slots.iter() {
            let p = s.swap(ptr::null_mut(), Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: a non-null slot owns one strong count from `Arc::into_raw`, and a
                // row is dropped only once no reader can reach it (its grace period is
                // over, or the grid itself is being dropped).
                drop(unsafe { Arc::from_raw(p) });
            }
        }
    }
}

impl<T> PinnedGrid<T> {
    /// An empty grid of rows of `cols` slots (at least 1) numbered below `row_limit`, holding
    /// at most `max_rows` rows at once (at least 1), for readers pinned in `grace`.
    pub fn new(grace: Arc<Grace>, cols: usize, row_limit: usize, max_rows: usize) -> PinnedGrid<T> {
        PinnedGrid {
            grace,
            cols: cols.max(1),
            row_limit,
            rows: AtomicPtr::new(ptr::null_mut()),
            writer: Mutex::new(Writer {
                counts: Vec::new(),
                live_rows: 0,
                max_rows: max_rows.max(1),
                len: 0,
                retired: VecDeque::new(),
            }),
            _owns: PhantomData,
        }
    }

    /// The grace periods this grid's readers pin.
    pub fn grace(&self) -> &Arc<Grace> {
        &self.grace
    }

    /// The value at (`row`, `col`), for a reader pinned in this grid's grace periods (None
    /// for a pin of another `Grace`): valid for as long as the pin.
    #[inline(always)]
    pub fn get<'a>(&'a self, pinned: &Pinned<'a>, row: usize, col: usize) -> Option<&'a T> {
        if !pinned.is_of(&self.grace) {
            return None;
        }
        // SeqCst loads: a writer's unlink (a SeqCst swap) followed by its read of the grace
        // epoch, against this reader's pin followed by these loads: either the reader sees
        // the unlink or the writer's tag covers the reader's pin (see `super::grace`).
        let rows = self.rows.load(Ordering::SeqCst);
        // SAFETY: a non-null row array stays allocated until a grace period after it is
        // unlinked, and the caller's pin (checked above to be of this grid's `Grace`) was
        // taken before this load, so that period cannot end before the pin is dropped;
        // `'a` ends no later than the pin.
        let rows = unsafe { rows.as_ref() }?;
        let r = rows.rows.get(row)?.load(Ordering::SeqCst);
        // SAFETY: as for the row array: rows are unlinked (and dropped a grace period later)
        // the same way.
        let r = unsafe { r.as_ref() }?;
        let v = r.slots.get(col)?.load(Ordering::SeqCst);
        // SAFETY: a non-null slot holds a strong count of its value until a grace period
        // after the value is unlinked, as above.
        unsafe { v.as_ref() }
    }

    /// The writer: one at a time, excluding no reader.
    pub fn write(&self) -> GridWriter<'_, T> {
        GridWriter {
            grid: self,
            // The state stays consistent between statements, so a panic elsewhere leaves it
            // usable.
            w: self.writer.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

impl<T> Drop for PinnedGrid<T> {
    fn drop(&mut self) {
        let rows = self.rows.swap(ptr::null_mut(), Ordering::Relaxed);
        if rows.is_null() {
            return;
        }
        // SAFETY: the current array is a `Box::into_raw`; `&mut self` means no reader is left.
        let rows = unsafe { Box::from_raw(rows) };
        for r in rows.rows.iter() {
            let r = r.swap(ptr::null_mut(), Ordering::Relaxed);
            if !r.is_null() {
                // SAFETY: the current array owns its rows, each a `Box::into_raw`.
                drop(unsafe { Box::from_raw(r) });
            }
        }
    }
}

/// The grid's writer (see [`PinnedGrid::write`]).
pub struct GridWriter<'g, T> {
    grid: &'g PinnedGrid<T>,
    w: MutexGuard<'g, Writer<T>>,
}

impl<T> GridWriter<'_, T> {
    /// The current row array, if any.
    fn rows(&self) -> Option<&RowArray<T>> {
        let p = self.grid.rows.load(Ordering::SeqCst);
        // SAFETY: only writers unlink the array, and the writer mutex is held for as long as
        // `self` (which the returned borrow cannot outlive) lives.
        unsafe { p.as_ref() }
    }

    /// Row `row`, if in use.
    fn row(&self, row: usize) -> Option<&Row<T>> {
        let r = self.rows()?.rows.get(row)?.load(Ordering::SeqCst);
        // SAFETY: as in `rows`: only writers unlink rows.
        unsafe { r.as_ref() }
    }

    /// The value at (`row`, `col`).
    pub fn get(&self, row: usize, col: usize) -> Option<&T> {
        let v = self.row(row)?.slots.get(col)?.load(Ordering::SeqCst);
        // SAFETY: as in `rows`: only writers unlink values.
        unsafe { v.as_ref() }
    }

    /// Every value in the grid.
    pub fn values(&self) -> impl Iterator<Item = &T> + '_ {
        let rows = self.rows().map_or(&[][..], |a| &a.rows[..]);
        rows.iter()
            .flat_map(|r| {
                // SAFETY: as in `rows`: only writers unlink rows.
                let r = unsafe { r.load(Ordering::SeqCst).as_ref() };
                r.map_or(&[][..], |r| &r.slots[..]).iter()
            })
            .filter_map(|v| {
                // SAFETY: as in `rows`: only writers unlink values.
                unsafe { v.load(Ordering::SeqCst).as_ref() }
            })
    }

    /// Values in the grid.
    pub fn len(&self) -> usize {
        self.w.len
    }

    /// Whether the grid holds no value.
    pub fn is_empty(&self) -> bool {
        self.w.len == 0
    }

    /// Lets the grid hold up to `max_rows` rows at once (never fewer than now).
    pub fn grow_max_rows(&mut self, max_rows: usize) {
        self.w.max_rows = self.w.max_rows.max(max_rows);
    }

    /// Puts `v` at (`row`, `col`); returns what was there (its grid reference waits for its
    /// grace period; the returned one is the caller's). Fails, changing nothing, when the
    /// value needs a new row and the grid has its most rows in use, or (`row`, `col`) lies
    /// outside the grid.
    pub fn set(
        &mut self,
        row: usize,
        col: usize,
        v: Arc<T>,
    ) -> Result<Option<Arc<T>>, RowsExhausted> {
        if col >= self.grid.cols || row >= self.grid.row_limit {
            return Err(RowsExhausted);
        }
        let r = self.row_for(row)?;
        let new = Arc::into_raw(v).cast_mut();
        let old = r.slots[col].swap(new, Ordering::SeqCst);
        if old.is_null() {
            self.w.counts[row] += 1;
            self.w.len += 1;
            return Ok(None);
        }
        Ok(Some(self.unlink_value(old)))
    }

    /// Empties (`row`, `col`); returns what was there (as [`Self::set`] does). A row left
    /// empty is given back, and an empty grid gives back its row array.
    pub fn take(&mut self, row: usize, col: usize) -> Option<Arc<T>> {
        let r = self.row(row)?;
        let old = r.slots.get(col)?.swap(ptr::null_mut(), Ordering::SeqCst);
        if old.is_null() {
            return None;
        }
        let v = self.unlink_value(old);
        self.w.counts[row] -= 1;
        self.w.len -= 1;
        if self.w.counts[row] == 0 {
            self.unlink_row(row);
        }
        Some(v)
    }

    /// Empties the grid: every value, row and the row array wait for their grace period.
    pub fn clear(&mut self) {
        let rows = self.grid.rows.swap(ptr::null_mut(), Ordering::SeqCst);
        if rows.is_null() {
            return;
        }
        let tag = self.tag();
        // SAFETY: the array was the current one (a `Box::into_raw`), now unlinked; readers
        // that still hold it are covered by `tag`.
        let rows = unsafe { Box::from_raw(rows) };
        for r in rows.rows.iter() {
            let r = r.swap(ptr::null_mut(), Ordering::SeqCst);
            if !r.is_null() {
                // SAFETY: the unlinked array owned this row (a `Box::into_raw`); the row's
                // values go with it when its grace period ends.
                let row = unsafe { Box::from_raw(r) };
                self.w.retired.push_back((tag, Unlinked::Row(row)));
            }
        }
        self.w.retired.push_back((tag, Unlinked::Rows(rows)));
        self.w.counts = Vec::new();
        self.w.live_rows = 0;
        self.w.len = 0;
        self.collect();
    }

    /// Drops what has waited out its grace period, starting a new one if the oldest waiting
    /// thing needs it. Never waits.
    pub fn collect(&mut self) {
        let grace = &self.grid.grace;
        // Bound: each pass pops an entry or stops.
        while let Some(&(tag, _)) = self.w.retired.front() {
            let due = grace.drained(tag) || grace.try_advance() && grace.drained(tag);
            if !due {
                break;
            }
            self.w.retired.pop_front();
        }
    }

    /// Things waiting for their grace period.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.w.retired.len()
    }

    /// Row `row`, allocating it (and growing the row array) if it is not in use.
    fn row_for(&mut self, row: usize) -> Result<&Row<T>, RowsExhausted> {
        if self.row(row).is_none() {
            if self.w.live_rows >= self.w.max_rows {
                return Err(RowsExhausted);
            }
            self.ensure_rows(row + 1);
            let r = Box::into_raw(Row::new(self.grid.cols));
            if let Some(slot) = self.rows().and_then(|a| a.rows.get(row)) {
                slot.store(r, Ordering::SeqCst);
            }
            self.w.live_rows += 1;
        }
        self.row(row).ok_or(RowsExhausted)
    }

    /// Makes the row array at least `len` long (doubling), copying the row pointers into the
    /// new one; the old one waits for its grace period.
    fn ensure_rows(&mut self, len: usize) {
        let cur = self.rows().map_or(0, |a| a.rows.len());
        if cur >= len {
            return;
        }
        let new = RowArray::new(len.max(2 * cur).max(4).min(self.grid.row_limit.max(len)));
        if let Some(old) = self.rows() {
            for (n, o) in new.rows.iter().zip(old.rows.iter()) {
                n.store(o.load(Ordering::SeqCst), Ordering::SeqCst);
            }
        }
        self.w.counts.resize(new.rows.len(), 0);
        let old = self.grid.rows.swap(Box::into_raw(new), Ordering::SeqCst);
        if !old.is_null() {
            let tag = self.tag();
            // SAFETY: the old array was the current one (a `Box::into_raw`), now unlinked; its
            // rows now belong to the new array, and an array does not drop its rows.
            let old = unsafe { Box::from_raw(old) };
            self.w.retired.push_back((tag, Unlinked::Rows(old)));
        }
    }

    /// The grace tag for what was just unlinked: read after the unlink, so that a reader
    /// that still found it is pinned in an epoch the tag covers (the unlink, then this read,
    /// against a reader's pin, then its loads; under loom a SeqCst fence stands in for the
    /// order the SeqCst accesses give).
    fn tag(&self) -> u64 {
        seqcst_point();
        self.grid.grace.current()
    }

    /// Hands the grid's reference of an unlinked value to the queue; returns another one.
    fn unlink_value(&mut self, old: *mut T) -> Arc<T> {
        let tag = self.tag();
        // SAFETY: `old` came out of a slot, which owned one strong count of it
        // (`Arc::into_raw`); it was swapped out above, so nothing else takes that count.
        let grid_ref = unsafe { Arc::from_raw(old) };
        let caller_ref = Arc::clone(&grid_ref);
        self.w.retired.push_back((tag, Unlinked::Value(grid_ref)));
        self.collect();
        caller_ref
    }

    /// Gives back row `row` (empty), and the row array when it was the last row in use.
    fn unlink_row(&mut self, row: usize) {
        let Some(slot) = self.rows().and_then(|a| a.rows.get(row)) else {
            return;
        };
        let r = slot.swap(ptr::null_mut(), Ordering::SeqCst);
        if r.is_null() {
            return;
        }
        let tag = self.tag();
        // SAFETY: the current array owned this row (a `Box::into_raw`); unlinked now.
        let r = unsafe { Box::from_raw(r) };
        self.w.retired.push_back((tag, Unlinked::Row(r)));
        self.w.live_rows -= 1;
        if self.w.live_rows == 0 {
            self.clear();
        }
    }
}

impl<T> Drop for GridWriter<'_, T> {
    fn drop(&mut self) {
        self.collect();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn grid(cols: usize, max_rows: usize) -> PinnedGrid<u64> {
        PinnedGrid::new(Arc::new(Grace::default()), cols, 1 << 20, max_rows)
    }

    #[test]
    fn values_are_found_where_they_were_put_and_only_there() {
        let g = grid(4, 8);
        let mut w = g.write();
        assert_eq!(w.set(7, 1, Arc::new(71)), Ok(None));
        assert_eq!(w.set(300, 3, Arc::new(3003)), Ok(None));
        assert_eq!(
            w.set(7, 1, Arc::new(72)).expect("set").as_deref(),
            Some(&71)
        );
        assert_eq!(w.set(7, 4, Arc::new(0)), Err(RowsExhausted), "past a row");
        assert_eq!(w.len(), 2);
        drop(w);
        let pin = g.grace().pin();
        let p = pin.pinned();
        assert_eq!(g.get(&p, 7, 1), Some(&72));
        assert_eq!(g.get(&p, 300, 3), Some(&3003));
        assert_eq!(g.get(&p, 7, 0), None);
        assert_eq!(g.get(&p, 8, 1), None);
        assert_eq!(g.get(&p, 7, 9), None, "past a row");
        assert_eq!(g.get(&p, 100_000, 0), None, "past the rows");
    }

    #[test]
    fn rows_past_the_limit_are_refused_and_the_row_array_stops_there() {
        let g = PinnedGrid::new(Arc::new(Grace::default()), 1, 6, 8);
        let mut w = g.write();
        assert_eq!(w.set(6, 0, Arc::new(1u64)), Err(RowsExhausted));
        w.set(4, 0, Arc::new(2)).expect("row 4");
        w.set(5, 0, Arc::new(3))
            .expect("row 5, past the first array of 5");
        assert_eq!(
            w.rows().map(|a| a.rows.len()),
            Some(6),
            "doubling stops at the limit"
        );
    }

    #[test]
    fn a_pin_of_another_grace_finds_nothing() {
        let g = grid(2, 2);
        g.write().set(0, 0, Arc::new(1)).expect("set");
        let other = Grace::default();
        let pin = other.pin();
        assert_eq!(g.get(&pin.pinned(), 0, 0), None);
    }

    #[test]
    fn rows_are_bounded_and_given_back_when_empty() {
        let g = grid(2, 2);
        let mut w = g.write();
        w.set(0, 0, Arc::new(1)).expect("row 0");
        w.set(5, 1, Arc::new(2)).expect("row 5");
        assert_eq!(w.set(9, 0, Arc::new(3)), Err(RowsExhausted), "a third row");
        assert_eq!(w.take(0, 0).as_deref(), Some(&1));
        assert_eq!(w.take(0, 0), None, "taken twice");
        w.set(9, 0, Arc::new(3)).expect("the emptied row's place");
        w.take(5, 1);
        w.take(9, 0);
        assert!(w.is_empty());
        assert!(w.rows().is_none(), "an empty grid has no row array");
    }

    #[test]
    fn an_unlinked_value_outlives_the_pins_that_could_see_it() {
        let g = grid(1, 1);
        let v = Arc::new(5u64);
        g.write().set(0, 0, Arc::clone(&v)).expect("set");
        let pin = g.grace().pin();
        let p = pin.pinned();
        let seen = g.get(&p, 0, 0).expect("published");
        let mut w = g.write();
        drop(w.take(0, 0));
        w.collect();
        assert_eq!(
            Arc::strong_count(&v),
            2,
            "the grid's reference waits for the reader"
        );
        drop(w);
        assert_eq!(*seen, 5);
        drop(pin);
        let mut w = g.write();
        w.collect();
        assert_eq!(Arc::strong_count(&v), 1, "dropped once the reader is gone");
        assert_eq!(w.waiting(), 0, "the emptied row and row array too");
    }

    #[test]
    fn dropping_the_grid_drops_its_values() {
        let v = Arc::new(9u64);
        {
            let g = grid(3, 4);
            let mut w = g.write();
            for r in 0..4 {
                w.set(r * 10, r % 3, Arc::clone(&v)).expect("set");
            }
            assert_eq!(Arc::strong_count(&v), 5);
        }
        assert_eq!(Arc::strong_count(&v), 1);
    }

    #[test]
    fn readers_on_other_threads_see_values_or_nothing_while_writers_churn() {
        let g = Arc::new(grid(4, 4));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (g, stop) = (Arc::clone(&g), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let pin = g.grace().pin();
                        let p = pin.pinned();
                        for r in 0..8 {
                            if let Some(v) = g.get(&p, r, r % 4) {
                                assert_eq!(*v % 1000, r as u64, "a value of its own slot");
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        for i in 0..20_000u64 {
            let r = (i % 8) as usize;
            let mut w = g.write();
            if i % 3 == 0 {
                w.take(r, r % 4);
            } else {
                let _ = w.set(r, r % 4, Arc::new(i * 1000 + r as u64));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        let mut w = g.write();
        w.clear();
        w.collect();
        assert_eq!(
            w.waiting(),
            0,
            "everything dropped once no reader is pinned"
        );
    }
}

#[cfg(all(test, loom))]
#[path = "pinned_loom.rs"]
mod loom_tests;
