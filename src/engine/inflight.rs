//! The in-flight allocation tracker: which guest clusters have an allocating write (or a
//! compressed write, or a zeroing of a cluster being allocated) between "planned" and
//! "linked". A writer claims the cluster before it allocates; any other writer of that
//! cluster waits until the claim is released and then finds the cluster allocated, so a guest
//! cluster is never allocated twice and concurrent partial writes of one new cluster both
//! survive.
//!
//! Claims are single atomic bit operations in a two-level bitmap with one bit per guest
//! cluster (pages allocated on first use), so claiming, releasing and testing never take a
//! lock. Only a writer that must wait sleeps on a condition variable, with a Dekker-style
//! handshake (waiter count vs. bit) that cannot lose a wake-up.
//!
//! An image's tracker covers every guest cluster its geometry allows (the largest L1 table
//! QEMU accepts), with only the top level allocated up front: a resize on a live handle
//! therefore never moves, re-indexes or reallocates it, and requests racing a resize keep
//! their cluster's bit. Claims work under the read side of a sharded lock (each thread its
//! own shard: no shared cache line); the idle clean takes the write side to free the pages
//! in which nothing is claimed, so a handle that once wrote all over a large image does not
//! keep the pages.

use crate::format::GuestCluster;
#[cfg(loom)]
use loom::sync::{
    atomic::{fence, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{fence, AtomicU64, AtomicUsize, Ordering},
    Condvar, Mutex, OnceLock,
};

/// Guest clusters per bitmap page (4 KiB of bits).
const PAGE_BITS: u64 = 32768;
const PAGE_WORDS: usize = (PAGE_BITS / 64) as usize;
/// Pages per middle-level chunk: the top level stays small even for the largest images
/// (2^46 clusters need 2^19 top entries), and only touched chunks and pages are allocated.
#[cfg(not(loom))]
const CHUNK_PAGES: u64 = 4096;

#[cfg(not(loom))]
type Page = Box<[AtomicU64]>;
#[cfg(not(loom))]
type Chunk = Box<[OnceLock<Page>]>;

/// The tracker for one image.
pub struct Inflight {
    #[cfg(not(loom))]
    chunks: crossbeam_utils::sync::ShardedLock<Box<[OnceLock<Chunk>]>>,
    #[cfg(loom)]
    pages: Box<[Box<[AtomicU64]>]>,
    /// Number of claims held (for "wait until nothing is in flight").
    claims: AtomicUsize,
    /// Threads sleeping (or about to) on `wake`.
    waiters: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Result of [`Inflight::try_claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the cluster until it calls [`Inflight::release`].
    Claimed,
    /// Another writer holds it.
    Busy,
}

impl Inflight {
    /// A tracker for `clusters` guest clusters.
    pub fn new(clusters: u64) -> Inflight {
        let pages = clusters.div_ceil(PAGE_BITS).max(1) as usize;
        Inflight {
            #[cfg(not(loom))]
            chunks: crossbeam_utils::sync::ShardedLock::new(
                (0..(pages as u64).div_ceil(CHUNK_PAGES))
                    .map(|_| OnceLock::new())
                    .collect(),
            ),
            #[cfg(loom)]
            pages: (0..pages)
                .map(|_| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            claims: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// A tracker for every guest cluster an image of geometry `geo` can ever have, whatever
    /// its virtual size becomes: growing or shrinking the image needs no change here. Only
    /// the top level (a few KiB for usual cluster sizes) is allocated now.
    pub fn for_geometry(geo: &crate::format::Geometry) -> Inflight {
        Self::new(max_guest_clusters(geo))
    }

    /// Runs `f` on the word holding `cluster`'s bit, and the bit; allocates its page when
    /// `create`, else returns None for a page that does not exist (no bit set there).
    /// Clusters past the end share the last word of the last page (callers only pass
    /// in-range clusters).
    fn with_word<R>(
        &self,
        cluster: u64,
        create: bool,
        f: impl FnOnce(&AtomicU64, u64) -> R,
    ) -> Option<R> {
        let idx = ((cluster % PAGE_BITS) / 64) as usize;
        let bit = 1u64 << (cluster % 64);
        #[cfg(not(loom))]
        {
            let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
            let page = cluster / PAGE_BITS;
            let chunk = &chunks[((page / CHUNK_PAGES) as usize).min(chunks.len() - 1)];
            let page = (page % CHUNK_PAGES) as usize;
            let words = if create {
                chunk.get_or_init(|| (0..CHUNK_PAGES).map(|_| OnceLock::new()).collect())[page]
                    .get_or_init(|| (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect())
            } else {
                chunk.get()?[page].get()?
            };
            Some(f(&words[idx], bit))
        }
        #[cfg(loom)]
        {
            let _ = create;
            let words = &self.pages[((cluster / PAGE_BITS) as usize).min(self.pages.len() - 1)];
            Some(f(&words[idx], bit))
        }
    }

    /// Claims `cluster` for an allocation.
    pub fn try_claim(&self, cluster: GuestCluster) -> Claim {
        // Count first, so that "nothing in flight" can never be observed while a claim is
        // being made.
        self.claims.fetch_add(1, Ordering::SeqCst);
        let busy = self.with_word(cluster.0, true, |w, bit| {
            w.fetch_or(bit, Ordering::SeqCst) & bit != 0
        });
        if busy == Some(true) {
            self.claims.fetch_sub(1, Ordering::SeqCst);
            return Claim::Busy;
        }
        Claim::Claimed
    }

    /// Whether `cluster` is claimed.
    pub fn is_claimed(&self, cluster: GuestCluster) -> bool {
        self.with_word(cluster.0, false, |w, bit| {
            w.load(Ordering::SeqCst) & bit != 0
        })
        .unwrap_or(false)
    }

    /// Releases a claim and wakes waiters. Releasing an unclaimed cluster does nothing.
    pub fn release(&self, cluster: GuestCluster) {
        let held = self.with_word(cluster.0, false, |w, bit| {
            w.fetch_and(!bit, Ordering::SeqCst) & bit != 0
        });
        if held != Some(true) {
            return;
        }
        self.claims.fetch_sub(1, Ordering::SeqCst);
        // Store-load handshake with `wait_until`: our clear, then their count, or their
        // count, then our clear; the full fences make one side see the other.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notify after any waiter's check-then-wait.
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
    }

    /// Frees every page in which no cluster is claimed, and every chunk left without pages
    /// (the idle clean): claims made later allocate them again. Returns the number of pages
    /// freed.
    #[cfg(not(loom))]
    pub fn release_idle_pages(&self) -> usize {
        let mut chunks = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        let mut freed = 0;
        for chunk in chunks.iter_mut() {
            let Some(pages) = chunk.get_mut() else {
                continue;
            };
            let mut kept = 0;
            for page in pages.iter_mut() {
                // Under the write lock nobody holds a word: plain reads see every claim.
                let idle = match page.get_mut() {
                    Some(words) => words.iter_mut().all(|w| *w.get_mut() == 0),
                    None => continue,
                };
                if idle {
                    page.take();
                    freed += 1;
                } else {
                    kept += 1;
                }
            }
            if kept == 0 {
                chunk.take();
            }
        }
        freed
    }

    /// Nothing to free in the loom model's fixed pages.
    #[cfg(loom)]
    pub fn release_idle_pages(&self) -> usize {
        0
    }

    /// Pages allocated now (tests).
    #[cfg(all(test, not(loom)))]
    pub(super) fn pages(&self) -> usize {
        let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
        chunks
            .iter()
            .filter_map(|c| c.get())
            .map(|p| p.iter().filter(|p| p.get().is_some()).count())
            .sum()
    }

    /// Number of claims currently held.
    pub fn claims(&self) -> usize {
        self.claims.load(Ordering::SeqCst)
    }

    /// Sleeps until `done()` holds. `done` must become true only through releases.
    fn wait_until(&self, done: impl Fn() -> bool) {
        self.wait_until_deadline(done, None);
    }

    /// [`Self::wait_until`], giving up at `deadline` (`None`: never); returns whether
    /// `done()` held.
    fn wait_until_deadline(
        &self,
        done: impl Fn() -> bool,
        deadline: Option<std::time::Instant>,
    ) -> bool {
        // A claim is usually held for one cluster write: spin and yield briefly before paying
        // for a sleep and a wake-up (which costs more than the wait itself on a busy core).
        #[cfg(not(loom))]
        for i in 0..256 {
            if done() {
                return true;
            }
            if i < 192 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        while !done() {
            let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.waiters.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            // Re-check after announcing ourselves: a release that cleared the state before
            // our announcement is seen here; one after it sees the waiter and notifies.
            while !done() {
                g = match deadline {
                    None => self.wake.wait(g).unwrap_or_else(|p| p.into_inner()),
                    Some(d) => {
                        let now = std::time::Instant::now();
                        if now >= d {
                            self.waiters.fetch_sub(1, Ordering::SeqCst);
                            return false;
                        }
                        self.wake
                            .wait_timeout(g, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            drop(g);
        }
        true
    }

    /// Sleeps until `cluster` is not claimed (the engine waits with
    /// [`Self::wait_released_for`], driving ring queues in between).
    #[cfg(test)]
    pub fn wait_released(&self, cluster: GuestCluster) {
        self.wait_until(|| !self.is_claimed(cluster));
    }

    /// Sleeps until `cluster` is not claimed or `timeout` has passed; returns whether it is
    /// released. For waiters that must do something else now and then (drive the rings
    /// whose reaping releases a claim, see `Image::wait_claim_released`).
    pub fn wait_released_for(&self, cluster: GuestCluster, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        self.wait_until_deadline(|| !self.is_claimed(cluster), Some(deadline))
    }

    /// Sleeps until no cluster is claimed.
    pub fn wait_idle(&self) {
        self.wait_until(|| self.claims() == 0);
    }
}

/// Guest clusters addressable by the largest L1 table QEMU allows for geometry `geo`.
fn max_guest_clusters(geo: &crate::format::Geometry) -> u64 {
    let l1 = crate::format::header::MAX_L1_BYTES / 8;
    l1.saturating_mul(geo.l2_entries())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_geometry_tracker_covers_clusters_far_past_any_open_size() {
        let geo = crate::format::Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
            external_data: false,
        };
        let max = max_guest_clusters(&geo);
        assert_eq!(max, (1 << 22) * 8192);
        let t = Inflight::for_geometry(&geo);
        // Distinct clusters at the far end do not share a bit with the start.
        assert_eq!(t.try_claim(GuestCluster(max - 1)), Claim::Claimed);
        assert_eq!(
            t.try_claim(GuestCluster(max - 1 - PAGE_BITS)),
            Claim::Claimed
        );
        assert_eq!(t.try_claim(GuestCluster(1)), Claim::Claimed);
        assert!(!t.is_claimed(GuestCluster(max - 2)));
        assert_eq!(t.claims(), 3);
    }

    #[test]
    fn idle_pages_are_freed_and_claimed_ones_kept() {
        let t = Inflight::new(PAGE_BITS * CHUNK_PAGES * 3);
        let far = GuestCluster(PAGE_BITS * CHUNK_PAGES * 2 + 5);
        for c in [GuestCluster(1), GuestCluster(PAGE_BITS + 1), far] {
            assert_eq!(t.try_claim(c), Claim::Claimed);
        }
        t.release(GuestCluster(1));
        t.release(far);
        assert_eq!(t.pages(), 3);
        assert!(
            !t.is_claimed(GuestCluster(PAGE_BITS * 5)),
            "a test allocates nothing"
        );
        assert_eq!(t.pages(), 3);
        assert_eq!(t.release_idle_pages(), 2, "the pages of released claims go");
        assert_eq!(t.pages(), 1);
        assert!(
            t.is_claimed(GuestCluster(PAGE_BITS + 1)),
            "a held claim survives"
        );
        assert!(!t.is_claimed(far));
        t.release(GuestCluster(PAGE_BITS + 1));
        assert_eq!(t.release_idle_pages(), 1);
        assert_eq!(t.pages(), 0);
        assert_eq!(
            t.try_claim(far),
            Claim::Claimed,
            "pages come back on demand"
        );
    }
    use std::sync::Arc;

    #[test]
    fn a_cluster_is_claimed_once_until_released() {
        let t = Inflight::new(100_000);
        assert_eq!(t.try_claim(GuestCluster(70_000)), Claim::Claimed);
        assert_eq!(t.try_claim(GuestCluster(70_000)), Claim::Busy);
        assert_eq!(t.try_claim(GuestCluster(70_001)), Claim::Claimed);
        assert_eq!(t.claims(), 2);
        t.release(GuestCluster(70_000));
        t.release(GuestCluster(70_000)); // idempotent
        assert_eq!(t.claims(), 1);
        assert!(!t.is_claimed(GuestCluster(70_000)));
        assert!(t.is_claimed(GuestCluster(70_001)));
    }

    #[test]
    fn racing_claimers_never_both_win_and_waiters_wake() {
        let t = Arc::new(Inflight::new(64));
        let wins = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (t, wins) = (Arc::clone(&t), Arc::clone(&wins));
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        loop {
                            if t.try_claim(GuestCluster(5)) == Claim::Claimed {
                                let n = wins.fetch_add(1, Ordering::SeqCst);
                                assert_eq!(n, 0, "two writers own one cluster");
                                wins.fetch_sub(1, Ordering::SeqCst);
                                t.release(GuestCluster(5));
                                break;
                            }
                            t.wait_released(GuestCluster(5));
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("claimer");
        }
        assert_eq!(t.claims(), 0);
        t.wait_idle();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Exhaustive interleavings (loom) of the claim / wait / release protocol.
    //! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_two_writers_of_one_cluster_serialise() {
        loom::model(|| {
            let t = Arc::new(Inflight::new(64));
            let owners = Arc::new(AtomicUsize::new(0));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (t, owners) = (Arc::clone(&t), Arc::clone(&owners));
                    thread::spawn(move || loop {
                        if t.try_claim(GuestCluster(3)) == Claim::Claimed {
                            assert_eq!(owners.fetch_add(1, Ordering::SeqCst), 0);
                            owners.fetch_sub(1, Ordering::SeqCst);
                            t.release(GuestCluster(3));
                            return;
                        }
                        t.wait_released(GuestCluster(3));
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("writer");
            }
            assert_eq!(t.claims(), 0);
        });
    }

    #[test]
    fn loom_disjoint_claims_and_idle_wait() {
        // Three threads with blocking waits: bound preemptions to keep the search to seconds.
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(|| {
            let t = Arc::new(Inflight::new(64));
            assert_eq!(t.try_claim(GuestCluster(1)), Claim::Claimed);
            let t2 = Arc::clone(&t);
            let other = thread::spawn(move || {
                // A writer of another cluster is not held up by the first claim.
                assert_eq!(t2.try_claim(GuestCluster(2)), Claim::Claimed);
                t2.release(GuestCluster(2));
            });
            let t3 = Arc::clone(&t);
            let checker = thread::spawn(move || t3.wait_idle());
            t.release(GuestCluster(1));
            other.join().expect("other");
            checker.join().expect("checker never woke");
            assert_eq!(t.claims(), 0);
        });
    }

    #[test]
    fn loom_three_writers_one_cluster() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(|| {
            let t = Arc::new(Inflight::new(64));
            let owners = Arc::new(AtomicUsize::new(0));
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let (t, owners) = (Arc::clone(&t), Arc::clone(&owners));
                    thread::spawn(move || loop {
                        if t.try_claim(GuestCluster(9)) == Claim::Claimed {
                            assert_eq!(owners.fetch_add(1, Ordering::SeqCst), 0);
                            owners.fetch_sub(1, Ordering::SeqCst);
                            t.release(GuestCluster(9));
                            return;
                        }
                        t.wait_released(GuestCluster(9));
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("writer");
            }
        });
    }
}
