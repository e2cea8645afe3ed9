//! Exhaustive interleavings (loom) of the pinned grid: a reader pinned in the grid's grace
//! periods against a writer that unlinks the value the reader found and collects. The value
//! is a loom `UnsafeCell` that its drop overwrites: loom fails the test when the reader's read
//! and the drop are not ordered by happens-before, in any interleaving (a reader reading
//! freed memory). Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.

use super::*;
use loom::cell::UnsafeCell;
use loom::thread;
use std::sync::Arc;

/// A value whose drop writes it.
struct Probe(UnsafeCell<u8>);

// SAFETY: accesses are checked by loom's UnsafeCell, which reports (instead of allowing) any
// two unordered accesses from different threads: the point of the model.
unsafe impl Sync for Probe {}

impl Probe {
    fn read(&self) -> u8 {
        // SAFETY: loom's UnsafeCell panics on an access that races another one.
        self.0.with(|p| unsafe { *p })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: as in `read`.
        self.0.with_mut(|p| unsafe { *p = 0xdd });
    }
}

/// The writer withdraws (or replaces) the value while a reader may hold it, then collects
/// twice (a collect advances the grace epoch at most once per waiting entry).
fn unlink_while_read(replace: bool) {
    loom::model(move || {
        let grace = Arc::new(Grace::default());
        let grid = Arc::new(PinnedGrid::new(Arc::clone(&grace), 1, 1, 1));
        grid.write()
            .set(0, 0, Arc::new(Probe(UnsafeCell::new(7))))
            .expect("set");
        let writer = {
            let grid = Arc::clone(&grid);
            thread::spawn(move || {
                let mut w = grid.write();
                let old = if replace {
                    w.set(0, 0, Arc::new(Probe(UnsafeCell::new(8))))
                        .expect("replace")
                } else {
                    w.take(0, 0)
                };
                drop(old);
                w.collect();
                drop(w);
                grid.write().collect();
            })
        };
        {
            let pin = grace.pin();
            if let Some(v) = grid.get(&pin.pinned(), 0, 0) {
                let b = v.read();
                assert!(b == 7 || b == 8, "read {b:#x}");
            }
        }
        writer.join().expect("writer");
    });
}

#[test]
fn loom_a_withdrawn_value_is_never_dropped_under_a_pinned_reader() {
    unlink_while_read(false);
}

#[test]
fn loom_a_replaced_value_is_never_dropped_under_a_pinned_reader() {
    unlink_while_read(true);
}
