//! Exhaustive interleavings (loom) of the write gate kept in the grace counters: writers
//! entering with [`Grace::pin_writer`] against an operation that [`Grace::exclude_writers`].
//! A shared host block is a loom `UnsafeCell`: loom fails a test when a writer's access and
//! the excluding operation's are not ordered by happens-before, in any interleaving. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.

use super::*;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// A block that writers and the excluding operation both change.
struct Block(UnsafeCell<u8>);

// SAFETY: accesses are checked by loom's UnsafeCell, which reports (instead of allowing) any
// two unordered accesses from different threads: the point of the model.
unsafe impl Sync for Block {}

impl Block {
    fn bump(&self) {
        // SAFETY: loom's UnsafeCell panics on an access that races another one.
        self.0.with_mut(|p| unsafe { *p += 1 });
    }
    fn get(&self) -> u8 {
        // SAFETY: as in `bump`.
        self.0.with(|p| unsafe { *p })
    }
}

#[test]
fn loom_an_excluding_operation_never_runs_beside_a_writer() {
    loom::model(|| {
        let g = Arc::new(Grace::default());
        let block = Arc::new(Block(UnsafeCell::new(0)));
        let writer = {
            let (g, block) = (Arc::clone(&g), Arc::clone(&block));
            thread::spawn(move || {
                let _w = g.pin_writer();
                block.bump();
            })
        };
        {
            let _excluded = g.exclude_writers();
            block.bump();
        }
        writer.join().expect("writer");
        assert_eq!(block.get(), 2);
    });
}

#[test]
fn loom_a_writer_at_a_closed_gate_enters_once_it_opens_and_readers_never_wait() {
    // Loom reports a deadlock if some interleaving leaves every thread waiting (the writer
    // missing the wake-up of the reopened gate, or the excluder missing the writer's exit).
    loom::model(|| {
        let g = Arc::new(Grace::default());
        let writer = {
            let g = Arc::clone(&g);
            thread::spawn(move || drop(g.pin_writer()))
        };
        {
            let _excluded = g.exclude_writers();
            drop(g.pin());
        }
        writer.join().expect("writer");
        assert_eq!(g.writers(), 0);
        assert_eq!(g.pinned(0) + g.pinned(1), 0);
    });
}
