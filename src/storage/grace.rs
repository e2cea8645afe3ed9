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
//!
//! The same counters are the handle's write gate: a writer's pin ([`Grace::pin_writer`])
//! also counts it in the high half of its slot, and a control operation that must see no
//! write in flight ([`Grace::exclude_writers`]) closes the gate and waits until no slot counts
//! a writer. A synchronous write thus pays for one pin (two atomic read-modify-writes on its
//! shard's line) instead of a pin plus a reader-writer lock.

use crossbeam_utils::CachePadded;
#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
use std::cell::Cell;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

/// Counter shards: threads spread over them so that concurrent requests do not all bounce
/// one cache line. (Two under loom, whose models need not scan sixteen.)
const SHARDS: usize = if cfg!(loom) { 2 } else { 16 };

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

/// Where a thread's SeqCst write must be ordered before its next SeqCst read of another
/// location (a pin's increment before its read of the epoch or the gate; closing the gate
/// before reading the counts). The SeqCst accesses already order it: all SeqCst operations
/// form one total order. Loom models SeqCst accesses as AcqRel only, so under loom the
/// SeqCst fence it does model stands in for that order.
#[inline(always)]
pub(crate) fn seqcst_point() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// What a reader's pin adds to its slot.
const READER: u64 = 1;
/// What a writer adds to its slot's high half.
const GATE: u64 = 1 << 32;
/// What a writer's pin adds to its slot: one pin (low half) and one writer (high half).
const WRITER: u64 = GATE | READER;
/// The low half of a slot: the pins it counts.
const PINS: u64 = (1 << 32) - 1;

/// Epoch counter plus, per shard, the number of pinned requests in the current and previous
/// epoch (low half of each slot) and how many of them are writers (high half); and the write
/// gate those writer counts answer to.
#[derive(Debug, Default)]
pub struct Grace {
    /// Names this `Grace` in its detached pins.
    id: GraceId,
    epoch: AtomicU64,
    active: [CachePadded<[AtomicU64; 2]>; SHARDS],
    /// Set while an operation excludes writers (new writers wait until it is cleared).
    closed: AtomicBool,
    /// Held by the operation excluding writers (one at a time).
    exclusion: Mutex<()>,
    /// Where a closing operation waits for writers to leave and writers wait for the gate to
    /// open again (guarding nothing: waiters re-check the atomics under it).
    gate: Mutex<()>,
    changed: Condvar,
}

/// A pinned request; unpins on drop. A writer's pin also holds the write gate open.
#[derive(Debug)]
pub struct Pin<'a> {
    grace: &'a Grace,
    shard: usize,
    slot: usize,
    weight: u64,
}

/// Keeps writers out until dropped (see [`Grace::exclude_writers`]).
#[must_use = "writers are excluded only while the guard lives"]
pub struct WritersExcluded<'a> {
    grace: &'a Grace,
    _exclusive: MutexGuard<'a, ()>,
}

impl Drop for WritersExcluded<'_> {
    fn drop(&mut self) {
        self.grace.closed.store(false, Ordering::SeqCst);
        // Under the gate mutex: a writer that saw the gate closed re-checks it under that
        // mutex before waiting, so it cannot miss this wake-up.
        let _g = self.grace.lock_gate();
        self.grace.changed.notify_all();
    }
}

/// A process-unique number naming a [`Grace`]: a detached pin carries it, so that it proves
/// nothing to another `Grace`, not even one later allocated at the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GraceId(u64);

impl Default for GraceId {
    fn default() -> GraceId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        GraceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A detached pin (see [`Grace::pin_detached`]): not tied to a borrow, released explicitly.
#[derive(Debug)]
#[must_use = "a detached pin must be released with Grace::unpin"]
pub struct PinToken {
    shard: usize,
    slot: usize,
    /// The `Grace` it pins.
    grace: GraceId,
}

/// Proof that a request is pinned in a `Grace` for `'a` (from [`Pin::pinned`] or
/// [`Grace::pinned_by`]): what lets it read memory that writers free a grace period after
/// unlinking it ([`super::PinnedGrid`]).
#[derive(Debug, Clone, Copy)]
pub struct Pinned<'a> {
    grace: &'a Grace,
}

impl Pinned<'_> {
    /// Whether the pin is one of `grace`'s.
    #[inline(always)]
    pub fn is_of(&self, grace: &Grace) -> bool {
        std::ptr::eq(self.grace, grace)
    }
}

impl Pin<'_> {
    /// The proof that this pin holds back grace periods.
    #[inline(always)]
    pub fn pinned(&self) -> Pinned<'_> {
        Pinned { grace: self.grace }
    }
}

/// A writer inside the write gate without a grace pin (see
/// [`Grace::enter_writer_unpinned`]); leaves the gate on drop. Unlike a [`Pin`] it proves
/// nothing about grace periods.
#[derive(Debug)]
#[must_use = "the writer is inside the gate only while this lives"]
pub struct GateEntry<'a> {
    _entry: Pin<'a>,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.grace.active[self.shard][self.slot].fetch_sub(self.weight, Ordering::SeqCst);
        seqcst_point();
        if self.weight >= GATE && self.grace.closed.load(Ordering::SeqCst) {
            self.grace.writer_left();
        }
    }
}

impl Grace {
    /// Pins the calling request in the current epoch.
    #[inline]
    pub fn pin(&self) -> Pin<'_> {
        self.pin_as(READER)
    }

    /// Pins a request that writes (or flushes), entering the write gate: waits while an
    /// operation excludes writers, and keeps the next one waiting until the pin is dropped.
    /// Must not be called by a thread that excludes writers (it would wait for itself).
    #[inline]
    pub fn pin_writer(&self) -> Pin<'_> {
        self.pin_as(WRITER)
    }

    /// Enters the write gate as [`Self::pin_writer`] does, without pinning the grace period:
    /// for a writer that maps no host cluster itself (a flush), whose pin would only hold
    /// back the grace periods its own write-back ends.
    #[inline]
    pub fn enter_writer_unpinned(&self) -> GateEntry<'_> {
        GateEntry {
            _entry: self.pin_as(GATE),
        }
    }

    #[inline]
    fn pin_as(&self, weight: u64) -> Pin<'_> {
        let shard = my_shard();
        // Bound: a retry follows an epoch advance (serialised, each needing the older slot
        // drained) or a closed gate, which the writer waits out before trying again.
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let slot = (e & 1) as usize;
            self.active[shard][slot].fetch_add(weight, Ordering::SeqCst);
            seqcst_point();
            // If the epoch moved between the load and the increment, the advance may not
            // have seen us in the slot it checked: retry in the new epoch. A writer counted
            // before the gate closed is seen by the closing operation's wait; one counted
            // after sees the gate closed here (both sides are SeqCst), and backs out.
            let closed = weight >= GATE && self.closed.load(Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == e && !closed {
                return Pin {
                    grace: self,
                    shard,
                    slot,
                    weight,
                };
            }
            self.active[shard][slot].fetch_sub(weight, Ordering::SeqCst);
            if closed {
                self.writer_left();
                self.wait_gate_open();
            }
        }
    }

    /// Closes the write gate and waits until no writer is pinned: until the guard is dropped,
    /// no write runs (new writers wait in [`Self::pin_writer`]). Operations excluding writers
    /// run one at a time. Must not be called while holding a writer's pin.
    pub fn exclude_writers(&self) -> WritersExcluded<'_> {
        let exclusive = self.exclusion.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        seqcst_point();
        let mut g = self.lock_gate();
        // Bound: writers already pinned finish their requests; new ones back out.
        while self.writers() > 0 {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        WritersExcluded {
            grace: self,
            _exclusive: exclusive,
        }
    }

    /// Writers pinned now, over all shards and both slots.
    fn writers(&self) -> u64 {
        self.active
            .iter()
            .flat_map(|s| s.iter())
            .map(|c| c.load(Ordering::SeqCst) >> 32)
            .sum()
    }

    /// Wakes the closing operation after a writer left a closed gate (under the gate mutex:
    /// it re-checks the writer counts under that mutex before waiting).
    #[cold]
    fn writer_left(&self) {
        let _g = self.lock_gate();
        self.changed.notify_all();
    }

    /// Waits until the write gate is open again.
    #[cold]
    fn wait_gate_open(&self) {
        let mut g = self.lock_gate();
        while self.closed.load(Ordering::SeqCst) {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn lock_gate(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data (waiters re-check the atomics), so poisoning is harmless.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins a request whose I/O outlives the call that started it (an asynchronous queue's
    /// io_uring reads): the same pin as [`Self::pin`], released by [`Self::unpin`] exactly
    /// once. A token never released keeps freed clusters from reuse (a leak, never a
    /// corruption).
    pub fn pin_detached(&self) -> PinToken {
        let p = self.pin_as(READER);
        let t = PinToken {
            shard: p.shard,
            slot: p.slot,
            grace: self.id,
        };
        std::mem::forget(p);
        t
    }

    /// The proof of pinning that detached pin `t` gives, if it is one of this `Grace`'s.
    pub fn pinned_by<'a>(&'a self, t: &'a PinToken) -> Option<Pinned<'a>> {
        (t.grace == self.id).then_some(Pinned { grace: self })
    }

    /// Releases a pin taken with [`Self::pin_detached`] on this `Grace`.
    pub fn unpin(&self, t: PinToken) {
        self.active[t.shard][t.slot].fetch_sub(READER, Ordering::SeqCst);
    }

    /// Requests pinned in `slot`, over all shards. A request pinned for good is counted; one
    /// retrying into a newer epoch may or may not be, which is harmless.
    fn pinned(&self, slot: usize) -> u64 {
        self.active
            .iter()
            .map(|s| s[slot].load(Ordering::SeqCst) & PINS)
            .sum()
    }

    /// The tag for clusters freed now.
    pub fn current(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Starts a new epoch if the previous one has drained. Returns whether the epoch
    /// advanced (here or, concurrently, by another caller).
    pub fn try_advance(&self) -> bool {
        let e = self.epoch.load(Ordering::SeqCst);
        // Slot (e+1)&1 holds requests of epoch e-1; it is reused by epoch e+1.
        if self.pinned(((e + 1) & 1) as usize) != 0 {
            return false;
        }
        // A compare-exchange, not a store: two callers that both found epoch e drained move
        // it to e+1 once, never back from e+2 to e+1 (the refcount allocator advances under
        // the metadata mutex, the pinned grid's writers under their own).
        match self
            .epoch
            .compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(now) => now > e,
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_detached_pin_proves_pinning_to_its_own_grace_only() {
        let (a, b) = (Grace::default(), Grace::default());
        let t = a.pin_detached();
        assert!(a.pinned_by(&t).is_some_and(|p| p.is_of(&a)));
        assert!(b.pinned_by(&t).is_none(), "another grace");
        assert!(!a.pin().pinned().is_of(&b));
        a.unpin(t);
    }

    /// Whether `flag` is still unset after a while (a thread that should be waiting).
    fn still_waiting(flag: &AtomicBool) -> bool {
        std::thread::sleep(Duration::from_millis(50));
        !flag.load(Ordering::SeqCst)
    }

    /// Whether `flag` gets set within ten seconds (a thread that should get through). The
    /// threads of these tests are detached, so that a thread stuck at the gate fails the
    /// test instead of hanging it.
    fn gets_set(flag: &AtomicBool) -> bool {
        let t0 = std::time::Instant::now();
        while !flag.load(Ordering::SeqCst) {
            if t0.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn excluding_writers_waits_for_the_writer_in_flight_and_keeps_new_ones_out() {
        let g = Arc::new(Grace::default());
        let excluded = Arc::new(AtomicBool::new(false));
        let end_exclusion = Arc::new(AtomicBool::new(false));
        let excluder_done = Arc::new(AtomicBool::new(false));
        let second_writer_in = Arc::new(AtomicBool::new(false));
        let writer = g.pin_writer(); // a write in flight
        {
            let (g, excluded, end, done) = (
                Arc::clone(&g),
                Arc::clone(&excluded),
                Arc::clone(&end_exclusion),
                Arc::clone(&excluder_done),
            );
            std::thread::spawn(move || {
                let guard = g.exclude_writers();
                excluded.store(true, Ordering::SeqCst);
                while !end.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(guard);
                done.store(true, Ordering::SeqCst);
            });
        }
        assert!(
            still_waiting(&excluded),
            "exclusion did not wait for the writer"
        );
        drop(writer);
        assert!(gets_set(&excluded), "the writer's exit was missed");
        {
            let (g, inside) = (Arc::clone(&g), Arc::clone(&second_writer_in));
            std::thread::spawn(move || {
                let _w = g.pin_writer();
                inside.store(true, Ordering::SeqCst);
            });
        }
        assert!(
            still_waiting(&second_writer_in),
            "a writer entered while writers were excluded"
        );
        end_exclusion.store(true, Ordering::SeqCst);
        assert!(gets_set(&excluder_done));
        assert!(gets_set(&second_writer_in), "the gate never opened again");
    }

    #[test]
    fn readers_pass_a_closed_gate_and_writers_count_as_pinned() {
        let g = Arc::new(Grace::default());
        let tag = g.current();
        let w = g.pin_writer();
        assert!(g.try_advance());
        assert!(
            !g.drained(tag),
            "a writer's pin holds the grace period like a reader's"
        );
        drop(w);
        assert!(g.drained(tag));
        let unpinned = g.enter_writer_unpinned();
        assert!(
            g.try_advance() && g.try_advance(),
            "a flush does not hold grace periods"
        );
        assert_eq!(g.writers(), 1);
        drop(unpinned);
        let _closed = g.exclude_writers();
        let read = Arc::new(AtomicBool::new(false));
        {
            let (g, read) = (Arc::clone(&g), Arc::clone(&read));
            std::thread::spawn(move || {
                drop(g.pin());
                read.store(true, Ordering::SeqCst);
            });
        }
        assert!(gets_set(&read), "a reader waited at the closed gate");
        assert_eq!(g.writers(), 0);
    }

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

#[cfg(all(test, loom))]
#[path = "grace_loom.rs"]
mod loom_tests;
