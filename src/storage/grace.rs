//! Grace periods for host clusters: a cluster that a request may still be reading or writing
//! is never handed out again, even after the metadata change that freed it is durable.
//!
//! Every request that maps guest offsets to host clusters and then does I/O without the
//! metadata lock holds a [`Pin`] for its whole duration. Freed clusters are tagged with the
//! epoch current when they were freed (after the mapping that used them was replaced, so no
//! request starting later can find them) and become reusable once every request pinned in
//! that epoch or before has finished. Two counters suffice: the epoch only advances when the
//! older of the two slots has drained (the scheme of sleepable RCU).
//!
//! Pinning is an increment and a decrement of a per-thread-shard counter (no cache line shared
//! by all threads); nothing blocks.

use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counter shards: threads spread over them so that concurrent requests do not all bounce
/// one cache line.
const SHARDS: usize = 16;

thread_local! {
    /// This thread's shard; [`UNASSIGNED`] until its first pin. Constant-initialised, so that
    /// reading it is one load (a lazily initialised thread-local costs a call per access).
    static SHARD: Cell<usize> = const { Cell::new(UNASSIGNED) };
}

/// [`SHARD`] before the thread's first pin.
const UNASSIGNED: usize = usize::MAX;

/// The calling thread's shard: threads take shards round-robin on their first pin.
#[inline]
fn my_shard() -> usize {
    SHARD.with(|s| match s.get() {
        UNASSIGNED => {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let shard = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(shard);
            shard
        }
        shard => shard,
    })
}

/// Epoch counter plus, per shard, the number of pinned requests in the current and previous
/// epoch.
#[derive(Debug, Default)]
pub struct Grace {
    epoch: AtomicU64,
    active: [CachePadded<[AtomicU64; 2]>; SHARDS],
}

/// A pinned request; unpins on drop.
#[derive(Debug)]
pub struct Pin<'a> {
    grace: &'a Grace,
    shard: usize,
    slot: usize,
}

/// A detached pin (see [`Grace::pin_detached`]): not tied to a borrow, released explicitly.
#[derive(Debug)]
#[must_use = "a detached pin must be released with Grace::unpin"]
pub struct PinToken {
    shard: usize,
    slot: usize,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.grace.active[self.shard][self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl Grace {
    /// Pins the calling request in the current epoch.
    pub fn pin(&self) -> Pin<'_> {
        let shard = my_shard();
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let slot = (e & 1) as usize;
            self.active[shard][slot].fetch_add(1, Ordering::SeqCst);
            // If the epoch moved between the load and the increment, the advance may not
            // have seen us in the slot it checked: retry in the new epoch.
            if self.epoch.load(Ordering::SeqCst) == e {
                return Pin {
                    grace: self,
                    shard,
                    slot,
                };
            }
            self.active[shard][slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Pins a request whose I/O outlives the call that started it (an asynchronous queue's
    /// io_uring reads): the same pin as [`Self::pin`], released by [`Self::unpin`] exactly
    /// once. A token never released keeps freed clusters from reuse (a leak, never a
    /// corruption).
    pub fn pin_detached(&self) -> PinToken {
        let p = self.pin();
        let t = PinToken {
            shard: p.shard,
            slot: p.slot,
        };
        std::mem::forget(p);
        t
    }

    /// Releases a pin taken with [`Self::pin_detached`] on this `Grace`.
    pub fn unpin(&self, t: PinToken) {
        self.active[t.shard][t.slot].fetch_sub(1, Ordering::SeqCst);
    }

    /// Requests pinned in `slot`, over all shards. A request pinned for good is counted; one
    /// retrying into a newer epoch may or may not be, which is harmless.
    fn pinned(&self, slot: usize) -> u64 {
        self.active
            .iter()
            .map(|s| s[slot].load(Ordering::SeqCst))
            .sum()
    }

    /// The tag for clusters freed now.
    pub fn current(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Starts a new epoch if the previous one has drained (callers serialise advances, e.g.
    /// under the metadata lock). Returns whether the epoch advanced.
    pub fn try_advance(&self) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        // Slot (e+1)&1 holds requests of epoch e-1; it is reused by epoch e+1.
        if self.pinned(((e + 1) & 1) as usize) == 0 {
            self.epoch.store(e + 1, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Whether every request that could have seen a cluster freed with `tag` has finished.
    pub fn drained(&self, tag: u64) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        if e >= tag + 2 {
            // Advancing to tag+2 required slot tag&1 to be empty.
            return true;
        }
        e == tag + 1 && self.pinned((tag & 1) as usize) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_cluster_waits_for_requests_pinned_before_the_free() {
        let g = Grace::default();
        let old = g.pin(); // a reader that mapped the cluster before it was freed
        let tag = g.current();
        assert!(g.try_advance());
        assert!(
            !g.drained(tag),
            "a request pinned in the freeing epoch is still running"
        );
        let young = g.pin(); // started after the free: cannot see the cluster
        assert!(!g.try_advance(), "the old slot is not drained yet");
        drop(old);
        assert!(g.drained(tag));
        assert!(g.try_advance());
        drop(young);
        assert!(g.drained(tag));
    }

    #[test]
    fn a_detached_pin_holds_the_free_back_until_released_on_another_thread() {
        let g = Grace::default();
        let t = g.pin_detached(); // an io_uring read in flight
        let tag = g.current();
        assert!(g.try_advance());
        assert!(
            !g.drained(tag),
            "the read in flight may still touch the cluster"
        );
        std::thread::scope(|s| {
            s.spawn(|| g.unpin(t)); // reaped on another thread than the submitter's
        });
        assert!(g.drained(tag));
    }

    #[test]
    fn nothing_pinned_drains_after_one_advance() {
        let g = Grace::default();
        let tag = g.current();
        assert!(!g.drained(tag));
        assert!(g.try_advance());
        assert!(g.drained(tag));
    }

    #[test]
    fn pins_from_many_threads_balance() {
        let g = std::sync::Arc::new(Grace::default());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let g = std::sync::Arc::clone(&g);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let _p = g.pin();
                    }
                })
            })
            .collect();
        for _ in 0..1000 {
            g.try_advance();
        }
        for h in hs {
            h.join().expect("pinning thread");
        }
        assert!(g.try_advance() || g.try_advance());
        assert_eq!(g.pinned(0) + g.pinned(1), 0);
    }
}
