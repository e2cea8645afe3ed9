//! Writes whose I/O outlives the call that started them (an asynchronous queue's io_uring
//! overwrites), and the operations that must not run beside them.
//!
//! A synchronous writer holds the image's write gate for its whole call; a write on a ring
//! cannot hold a lock guard until its completion is reaped. It registers here instead
//! ([`RingWrites::try_enter`], released by [`RingWrites::leave`]), and whoever needs it gone
//! excludes ring writes ([`RingWrites::exclude`]): the quiescing control operations (reopen,
//! snapshot, resize, commit, bitmap changes) and an O_DIRECT read-modify-write of data,
//! which would otherwise put back stale bytes of a block a ring write is changing.
//!
//! The completion of a ring write is reaped only when its queue is polled, possibly by the
//! very thread that now excludes; so an excluding thread drives the queues itself through
//! their drain hooks while it waits, instead of waiting for a poll that may never come.

#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
use std::sync::{Arc, Weak};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Reaps whatever completions a queue's ring has ready, without blocking on a lock another
/// thread holds; called by threads waiting in [`RingWrites::exclude`].
pub trait Drain: Send + Sync {
    /// Makes what progress it can now (submits queued entries, reaps ready completions).
    fn drain_ready(&self);
}

#[derive(Default)]
struct State {
    /// Ring writes in flight.
    writes: usize,
    /// Threads excluding ring writes (new ones are refused while any does).
    excluders: usize,
}

/// The ring writes in flight on one host file.
#[derive(Default)]
pub struct RingWrites {
    state: Mutex<State>,
    changed: Condvar,
    drains: Mutex<Vec<Weak<dyn Drain>>>,
}

/// Keeps ring writes out until dropped (see [`RingWrites::exclude`]).
#[must_use = "ring writes are excluded only while the guard lives"]
pub struct Excluded<'a> {
    writes: &'a RingWrites,
}

impl Drop for Excluded<'_> {
    fn drop(&mut self) {
        self.writes.lock().excluders -= 1;
    }
}

impl RingWrites {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The counters stay consistent across a panic (single increments and decrements).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a ring write about to be submitted; false (nothing registered) while an
    /// operation excludes ring writes: the caller then takes the synchronous path, which
    /// waits for that operation as every synchronous writer does.
    pub fn try_enter(&self) -> bool {
        let mut s = self.lock();
        if s.excluders > 0 {
            return false;
        }
        s.writes += 1;
        true
    }

    /// Ends a write registered by [`Self::try_enter`] (its completion was reaped, or it was
    /// never submitted).
    pub fn leave(&self) {
        let mut s = self.lock();
        s.writes -= 1;
        // Only excluders wait on `changed`, and they count themselves under this lock first:
        // without one, a notify would be a futex system call per drained batch for nobody.
        if s.writes == 0 && s.excluders > 0 {
            self.changed.notify_all();
        }
    }

    /// Ring writes in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().writes
    }

    /// Refuses new ring writes and waits until none is in flight, driving the registered
    /// queues meanwhile; ring writes stay refused until the guard is dropped.
    pub fn exclude(&self) -> Excluded<'_> {
        let mut s = self.lock();
        s.excluders += 1;
        while s.writes > 0 {
            drop(s);
            self.drain_all();
            s = self.lock();
            if s.writes > 0 {
                // The kernel completes the writes on its own; only their reaping needs us,
                // so a short wait between drains bounds the delay.
                s = self
                    .changed
                    .wait_timeout(s, Duration::from_micros(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        drop(s);
        Excluded { writes: self }
    }

    /// Drives every registered queue once (submits what is queued, reaps what is ready),
    /// for a thread waiting for something a ring write's reaping releases (the in-flight
    /// claim of a ring allocating write) whose queue's owner may be that very thread.
    /// Must not be called with the image's metadata mutex held: reaping links allocating
    /// writes, which takes it.
    pub fn drive(&self) {
        self.drain_all();
    }

    /// Registers a queue's drain hook (kept weakly: a dropped queue drops out).
    pub fn register(&self, d: &Arc<dyn Drain>) {
        let mut v = self.drains.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(d));
    }

    fn drain_all(&self) {
        let live: Vec<Arc<dyn Drain>> = self
            .drains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for d in live {
            d.drain_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Finisher {
        writes: Arc<RingWrites>,
        pending: AtomicBool,
    }

    impl Drain for Finisher {
        fn drain_ready(&self) {
            if self.pending.swap(false, Ordering::AcqRel) {
                self.writes.leave();
            }
        }
    }

    #[test]
    fn exclude_refuses_new_writes_and_drives_the_ones_in_flight_to_completion() {
        let w = Arc::new(RingWrites::default());
        assert!(w.try_enter());
        let f: Arc<dyn Drain> = Arc::new(Finisher {
            writes: Arc::clone(&w),
            pending: AtomicBool::new(true),
        });
        w.register(&f);
        // The same thread excludes: only the drain hook can finish the write.
        let g = w.exclude();
        assert_eq!(w.in_flight(), 0);
        assert!(!w.try_enter(), "a ring write entered while excluded");
        drop(g);
        assert!(w.try_enter());
        w.leave();
    }
}

#[cfg(all(test, loom))]
#[path = "ringwrites_loom.rs"]
mod loom_tests;
