//! Word memory for cached metadata slices, carved out of chunks of several slices.
//!
//! A cold cache takes new memory at every miss. Asked for one 4 KiB slice at a time, glibc
//! grows a thread's arena one page at a time, with an `mprotect` per page: measured as a
//! quarter of a cold miss on a 1 TiB image (BENCHMARKS.md, session 12). A chunk of several
//! slices costs one growth. A slot its slice gives up goes back to the slab for the next
//! slice, and a chunk whose slots are all free goes back to the allocator, so a cache the
//! idle clean empties still gives its memory back.
//!
//! The memory lives here, beside the host file's reads, because filling a slot straight from
//! the file needs the one `unsafe` step: a mutable view of a slot inside a shared chunk.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Hands out [`SlabWords`] of one length, carved out of chunks of at most `per_chunk`
/// slots. A new chunk has as many slots as the live chunks together (1, 1, 2, 4, ... up to
/// `per_chunk`), so a cache that holds a few slices holds little more, and the first
/// slices, which a handle often keeps using, sit in small chunks an idle clean can free
/// around them. Cloning shares the slab.
#[derive(Debug, Clone)]
pub struct WordSlab {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Words per slot.
    words: usize,
    /// Most slots per chunk.
    per_chunk: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Chunks by index; None once given back (the index is reused by the next chunk).
    chunks: Vec<Option<Chunk>>,
    /// Indices of the chunks that have a free slot, each listed once.
    open: Vec<usize>,
    /// Indices of `chunks` that hold no chunk (reused before the vector grows).
    vacant: Vec<usize>,
    /// Slots of the live chunks (kept, not summed: a cache of thousands of chunks adds one
    /// at every sixteenth miss).
    slots: usize,
}

#[derive(Debug)]
struct Chunk {
    mem: Arc<[AtomicU64]>,
    /// First words of the free slots.
    free: Vec<usize>,
    /// Slots handed out and not yet given back.
    live: usize,
    /// Slots of the chunk.
    slots: usize,
}

impl Chunk {
    /// A chunk of `slots` zeroed slots of `words` words, all free.
    fn new(words: usize, slots: usize) -> Chunk {
        Chunk {
            mem: zeroed(words * slots),
            // Popped from the end: slots are handed out in address order.
            free: (0..slots).rev().map(|i| i * words).collect(),
            live: 0,
            slots,
        }
    }
}

/// One slot's words: readable by anyone who holds it, writable in place through
/// [`SlabWords::as_mut_bytes`] by its only holder. Dropping it gives the slot back.
#[derive(Debug)]
pub struct SlabWords {
    mem: Arc<[AtomicU64]>,
    start: usize,
    len: usize,
    /// The slab and chunk index to give the slot back to (None: memory of its own).
    home: Option<(Arc<Shared>, usize)>,
}

/// `words` zeroed words, cleared with one `memset`: building the slice word by word (a
/// collected iterator) cost a cold cache miss on a 1 TiB image 65,000 instructions per
/// 64 KiB chunk, a fifth of the miss.
fn zeroed(words: usize) -> Arc<[AtomicU64]> {
    let mut mem = Arc::<[AtomicU64]>::new_uninit_slice(words);
    let Some(m) = Arc::get_mut(&mut mem) else {
        // A new allocation has one owner; should that ever not hold, build it word by word.
        return (0..words).map(|_| AtomicU64::new(0)).collect();
    };
    // SAFETY: `m` is the whole uninitialised slice (the only reference to the new
    // allocation), valid for writes of `m.len()` elements.
    unsafe { std::ptr::write_bytes(m.as_mut_ptr(), 0, m.len()) };
    // SAFETY: every byte was zeroed above, and all-zero bytes are a valid `AtomicU64` (it
    // has the size and bit validity of `u64`, as std documents).
    unsafe { mem.assume_init() }
}

impl WordSlab {
    /// A slab of slots of `words` words, `per_chunk` (at least 1) to a chunk.
    pub fn new(words: usize, per_chunk: usize) -> WordSlab {
        WordSlab {
            shared: Arc::new(Shared {
                words,
                per_chunk: per_chunk.max(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Words per slot.
    pub fn words(&self) -> usize {
        self.shared.words
    }

    /// A slot: a freed one if any (its words hold what its last holder left), else one of
    /// a new chunk (zeros). A new chunk is allocated and zeroed without the slab's lock: its
    /// first-touch page faults took the lock long enough that a second thread missing the
    /// cache at the same time slept on it (measured on a cold 1 TiB cache at two threads,
    /// BENCHMARKS.md, session 18).
    pub fn take(&self) -> SlabWords {
        let shared = &self.shared;
        let mut fresh: Option<Chunk> = None;
        // Two rounds at most: the second lists the chunk the first allocated, which has a
        // free slot, under the same lock as the take.
        loop {
            let mut st = shared.lock();
            if let Some(chunk) = fresh.take() {
                // Even when another thread listed one meanwhile: the list is taken from its
                // end, so this take uses the new chunk, which goes back with its last slot
                // like any other (a growing cache soon fills both).
                st.add_chunk(chunk);
            }
            if let Some((c, start, mem)) = st.take_open() {
                return SlabWords {
                    mem,
                    start,
                    len: shared.words,
                    home: Some((Arc::clone(shared), c)),
                };
            }
            let slots = st.slots().clamp(1, shared.per_chunk);
            drop(st);
            fresh = Some(Chunk::new(shared.words, slots));
        }
    }

    /// Bytes of chunk memory held (slots in use and free ones of live chunks).
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.shared.lock().slots() * self.shared.words * 8
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Slots of the live chunks.
    fn slots(&self) -> usize {
        self.slots
    }

    /// A free slot of a listed chunk, if any: its chunk's index, first word and memory.
    /// Every listed chunk should have a free slot; one that does not is dropped from the list.
    fn take_open(&mut self) -> Option<(usize, usize, Arc<[AtomicU64]>)> {
        while let Some(&c) = self.open.last() {
            let Some(chunk) = self.chunks.get_mut(c).and_then(Option::as_mut) else {
                self.open.pop();
                continue;
            };
            let Some(start) = chunk.free.pop() else {
                self.open.pop();
                continue;
            };
            chunk.live += 1;
            if chunk.free.is_empty() {
                self.open.pop();
            }
            return Some((c, start, Arc::clone(&chunk.mem)));
        }
        None
    }

    /// Lists `chunk` (all its slots free) as open, in a vacant index if there is one.
    fn add_chunk(&mut self, chunk: Chunk) {
        self.slots += chunk.slots;
        let c = match self.vacant.pop() {
            Some(c) => {
                self.chunks[c] = Some(chunk);
                c
            }
            None => {
                self.chunks.push(Some(chunk));
                self.chunks.len() - 1
            }
        };
        self.open.push(c);
    }

    fn give_back(&mut self, c: usize, start: usize) {
        let Some(chunk) = self.chunks.get_mut(c).and_then(Option::as_mut) else {
            return;
        };
        chunk.live -= 1;
        if chunk.live == 0 {
            self.slots -= chunk.slots;
            self.chunks[c] = None;
            self.vacant.push(c);
            self.open.retain(|&o| o != c);
            return;
        }
        if chunk.free.is_empty() {
            self.open.push(c);
        }
        chunk.free.push(start);
    }
}

impl SlabWords {
    /// `len` zeroed words of their own, outside any slab.
    pub fn standalone(len: usize) -> SlabWords {
        SlabWords {
            mem: zeroed(len),
            start: 0,
            len,
            home: None,
        }
    }

    /// The words as bytes (in memory order), to fill in place: the exclusive borrow of the
    /// only handle to this slot means nobody can read or write them meanwhile.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        let words = &self.mem[self.start..self.start + self.len];
        let len = std::mem::size_of_val(words);
        let ptr = words.as_ptr().cast_mut().cast::<u8>();
        // SAFETY: `AtomicU64` has the size and bit validity of `u64` (std documents it) and
        // sits in an `UnsafeCell`, so writing its bytes through a pointer derived from a
        // shared reference is allowed, any byte pattern is a valid value, and `u8` needs no
        // alignment; `len` bytes from `ptr` are this slot's initialised words. No other
        // access can overlap: the slab hands each slot to one `SlabWords` at a time
        // (slots are disjoint ranges of the chunk), other holders of the chunk touch only
        // their own slots, and the `&mut self` borrow excludes every reader of this one for
        // as long as the returned slice lives.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

impl std::ops::Deref for SlabWords {
    type Target = [AtomicU64];

    #[inline]
    fn deref(&self) -> &[AtomicU64] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl std::ops::Index<usize> for SlabWords {
    type Output = AtomicU64;

    /// Word `i` of the slot (panics past its end, as a slice does), without building the
    /// slot's slice first: the lookup on every cached read.
    #[inline]
    fn index(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len, "word {i} of a {}-word slot", self.len);
        &self.mem[self.start + i]
    }
}

impl Drop for SlabWords {
    fn drop(&mut self) {
        if let Some((shared, c)) = self.home.take() {
            shared.lock().give_back(c, self.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn chunks_double_up_to_the_largest_and_their_slots_are_disjoint() {
        let slab = WordSlab::new(4, 4);
        let mut held = Vec::new();
        let mut sizes = Vec::new();
        for i in 0..12u8 {
            let mut w = slab.take();
            assert!(
                w.iter().all(|x| x.load(Ordering::Relaxed) == 0),
                "a new slot is zeros"
            );
            w.as_mut_bytes().fill(i);
            held.push(w);
            sizes.push(slab.held_bytes() / (4 * 8));
        }
        // Chunks of 1, 1, 2, 4, then 4 slots (the largest) each.
        assert_eq!(sizes, [1, 2, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12]);
        for (i, w) in held.iter().enumerate() {
            let want = u64::from_ne_bytes([i as u8; 8]);
            assert!(
                w.iter().all(|x| x.load(Ordering::Relaxed) == want),
                "slot {i}"
            );
        }
    }

    #[test]
    fn a_freed_slot_is_reused_before_any_new_chunk() {
        let slab = WordSlab::new(2, 4);
        // Chunks of 1, 1 and 2 slots: c and d share the third.
        let [a, b, c, d] = [slab.take(), slab.take(), slab.take(), slab.take()];
        let c_at = c.as_ptr();
        drop(c);
        let again = slab.take();
        assert_eq!(again.as_ptr(), c_at, "the freed slot comes back");
        assert_eq!(slab.held_bytes(), 4 * 2 * 8, "no new chunk");
        drop((a, b, d, again));
    }

    #[test]
    fn a_chunk_whose_slots_are_all_free_is_given_back() {
        let slab = WordSlab::new(512, 4);
        // Chunks of 1, 1, 2 and 4 slots.
        let held: Vec<_> = (0..8).map(|_| slab.take()).collect();
        assert_eq!(slab.held_bytes(), 8 * 512 * 8);
        let mut held = held.into_iter();
        for w in held.by_ref().take(4) {
            drop(w);
        }
        assert_eq!(
            slab.held_bytes(),
            4 * 512 * 8,
            "the emptied chunks are gone"
        );
        let mut rest: Vec<_> = held.collect();
        rest.truncate(2);
        // The two free slots of the live chunk serve the next two takes.
        let more = [slab.take(), slab.take()];
        assert_eq!(slab.held_bytes(), 4 * 512 * 8);
        drop((rest, more));
        assert_eq!(slab.held_bytes(), 0, "an emptied slab holds nothing");
    }

    #[test]
    fn a_chunk_listed_while_another_is_open_serves_the_next_take() {
        // The race of two takes that each allocated a chunk: the second to list its chunk
        // takes its slot from that chunk, so no listed chunk sits unused.
        let mut st = State::default();
        st.add_chunk(Chunk::new(2, 2));
        st.add_chunk(Chunk::new(2, 2));
        let (c, start, _) = st.take_open().expect("a free slot");
        assert_eq!(c, 1, "the chunk listed last");
        // Given back, the emptied chunk leaves; the other stays listed.
        st.give_back(c, start);
        assert_eq!(st.slots(), 2);
        assert!(st.chunks[1].is_none());
        assert_eq!(st.take_open().map(|(c, _, _)| c), Some(0));
    }

    #[test]
    fn standalone_words_are_zeroed_and_belong_to_no_slab() {
        let mut w = SlabWords::standalone(3);
        assert!(w.iter().all(|x| x.load(Ordering::Relaxed) == 0));
        w.as_mut_bytes()[..8].copy_from_slice(&7u64.to_ne_bytes());
        assert_eq!(w[0].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn slots_are_taken_and_given_back_from_many_threads() {
        let slab = WordSlab::new(8, 5);
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let slab = slab.clone();
                s.spawn(move || {
                    for _ in 0..500 {
                        let mut w = slab.take();
                        w.as_mut_bytes().fill(t);
                        std::thread::yield_now();
                        let want = u64::from_ne_bytes([t; 8]);
                        assert!(w.iter().all(|x| x.load(Ordering::Relaxed) == want));
                    }
                });
            }
        });
        assert_eq!(slab.held_bytes(), 0);
    }
}
