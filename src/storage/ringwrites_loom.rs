//! Exhaustive interleavings (loom) of the ring-write registration protocol (and of the
//! link of a ring allocating write before its registration ends): ring writes
//! registered with [`RingWrites::try_enter`] / [`RingWrites::leave`] against operations that
//! [`RingWrites::exclude`] them, and the drain hook through which an excluding thread reaps
//! the writes of a queue nobody polls. A shared host block is a loom `UnsafeCell`: loom
//! fails a test when a ring write's device write and the excluding operation's access to the
//! block are not ordered by happens-before, in any interleaving. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.
//!
//! Under loom, `RingWrites` runs on loom's `Mutex` and `Condvar` (the `cfg(loom)` imports at
//! the top of `ringwrites.rs`, as in `engine::inflight`); the drain hooks stay in a std
//! `Arc`/`Weak` (loom's `Arc` cannot hold a `dyn Drain`), which loom need not see: only the
//! hook's own atomics carry the protocol. Loom's `Condvar::wait_timeout` never times out,
//! so the 200 us re-drain of `exclude` is modelled by a drain hook that keeps trying until
//! the kernel has finished the write (each try standing for one timed re-drain).

use super::*;
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

/// A host block that ring writes and excluding operations both touch.
struct Block(UnsafeCell<u8>);

// SAFETY: accesses are checked by loom's UnsafeCell, which is the point of the model: it
// reports (instead of allowing) any two unordered accesses from different threads.
unsafe impl Sync for Block {}

impl Block {
    fn new() -> Arc<Block> {
        Arc::new(Block(UnsafeCell::new(0)))
    }
    /// The device write of a ring write, or a read-modify-write of the block.
    fn write(&self, v: u8) {
        // SAFETY: loom's UnsafeCell panics on an access that races another one.
        self.0.with_mut(|p| unsafe { *p = v });
    }
    /// What an excluding operation that only reads (a snapshot copying the block) sees.
    fn read(&self) -> u8 {
        // SAFETY: as in `write`.
        self.0.with(|p| unsafe { *p })
    }
}

/// A queue's ring holding one write: the kernel finishes it (`done`), and whoever drains or
/// polls first reaps it, which ends its registration exactly once. An allocating write
/// (`link` present) is linked first: its L2 entry set under the mutex standing for the
/// metadata mutex, then its registration ended, as `engine::aio::ring` does.
struct OneWrite {
    writes: Arc<RingWrites>,
    /// The metadata mutex of an allocating write, guarding whether its L2 entry is linked.
    link: Option<Arc<Mutex<bool>>>,
    done: AtomicBool,
    reaped: AtomicBool,
}

impl OneWrite {
    fn new(writes: &Arc<RingWrites>, link: Option<&Arc<Mutex<bool>>>) -> Arc<OneWrite> {
        Arc::new(OneWrite {
            writes: Arc::clone(writes),
            link: link.cloned(),
            done: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
        })
    }

    fn reap_if_done(&self) -> bool {
        if !self.done.load(Ordering::Acquire) {
            return false;
        }
        if !self.reaped.swap(true, Ordering::AcqRel) {
            if let Some(meta) = &self.link {
                *meta.lock().expect("meta") = true;
            }
            self.writes.leave();
        }
        true
    }
}

impl Drain for OneWrite {
    fn drain_ready(&self) {
        // Stands for exclude's timed re-drains until the kernel has completed the write.
        while !self.reap_if_done() {
            thread::yield_now();
        }
    }
}

/// A thread that writes the block under a ring-write registration when one is granted.
fn spawn_submitter(w: &Arc<RingWrites>, block: &Arc<Block>) -> thread::JoinHandle<()> {
    let (w, block) = (Arc::clone(w), Arc::clone(block));
    thread::spawn(move || {
        if w.try_enter() {
            block.write(1);
            w.leave();
        }
    })
}

/// A ring write submitted on another thread runs wholly before or wholly after an
/// excluding operation: refused while it excludes, waited for (woken by `leave`) when
/// already in flight. Covers: try_enter's refusal while excluded, exclude's count of
/// excluders before its wait, its wait for the writes in flight, leave's wake-up.
#[test]
fn loom_a_ring_write_never_overlaps_an_operation_that_excludes_ring_writes() {
    loom::model(|| {
        let w = Arc::new(RingWrites::default());
        let block = Block::new();
        let submitter = spawn_submitter(&w, &block);
        {
            let _g = w.exclude();
            block.write(2);
        }
        submitter.join().expect("submitter");
        assert_eq!(w.in_flight(), 0);
    });
}

/// The thread that excludes owns the queue and never polls: only the drain hook can reap
/// the write the kernel completes meanwhile, so exclude must drive it. Covers: exclude's
/// calls of the registered drain hooks.
#[test]
fn loom_an_excluding_owner_reaps_its_own_ring_write_through_the_drain_hook() {
    loom::model(|| {
        let w = Arc::new(RingWrites::default());
        let block = Block::new();
        assert!(w.try_enter());
        let ring = OneWrite::new(&w, None);
        let hook: Arc<dyn Drain> = ring.clone();
        w.register(&hook);
        let kernel = {
            let (ring, block) = (Arc::clone(&ring), Arc::clone(&block));
            thread::spawn(move || {
                block.write(1);
                ring.done.store(true, Ordering::Release);
            })
        };
        {
            let _g = w.exclude();
            block.write(2);
        }
        kernel.join().expect("kernel");
        assert!(ring.reaped.load(Ordering::Acquire));
    });
}

/// Two operations exclude at once (the write gate orders them in the engine; here both only
/// read the block): a ring write stays refused until the last of them ends. Covers: the
/// count of excluders (one ending must not readmit ring writes while the other runs).
#[test]
fn loom_ring_writes_stay_refused_until_the_last_excluding_operation_ends() {
    loom::model(|| {
        let w = Arc::new(RingWrites::default());
        let block = Block::new();
        let other = {
            let (w, block) = (Arc::clone(&w), Arc::clone(&block));
            thread::spawn(move || {
                let _g = w.exclude();
                block.read()
            })
        };
        let submitter = spawn_submitter(&w, &block);
        {
            let _g = w.exclude();
            block.read();
        }
        other.join().expect("other excluder");
        submitter.join().expect("submitter");
        assert!(
            w.try_enter(),
            "ring writes refused after every exclusion ended"
        );
        w.leave();
    });
}

/// An allocating ring write completes while an operation quiesces (exclude, then the
/// metadata mutex, as `Image::quiesce` callers do); the owner polls concurrently, so
/// either the owner or the excluder (through the drain hook) reaps and links it. The
/// excluder must find it linked once it holds the metadata mutex, and neither thread may
/// wait for the other forever (the reaper takes the metadata mutex, which the excluder
/// takes only after its exclusion). Covers: link before leave, the quiesce order.
#[test]
fn loom_an_allocating_ring_write_is_linked_before_a_quiescing_operation_reads_the_metadata() {
    loom::model(|| {
        let w = Arc::new(RingWrites::default());
        let meta = Arc::new(Mutex::new(false));
        assert!(w.try_enter());
        let ring = OneWrite::new(&w, Some(&meta));
        let hook: Arc<dyn Drain> = ring.clone();
        w.register(&hook);
        // The kernel completes the write, then the owner polls and reaps it if still there.
        let owner = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                ring.done.store(true, Ordering::Release);
                ring.reap_if_done();
            })
        };
        {
            let _g = w.exclude();
            assert!(
                *meta.lock().expect("meta"),
                "a quiescing operation saw the allocation unlinked"
            );
        }
        owner.join().expect("owner");
        assert_eq!(w.in_flight(), 0);
    });
}
