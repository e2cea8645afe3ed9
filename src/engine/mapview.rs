//! The lock-free view of the active mapping (L1 and cached L2 tables) that reads and in-place
//! overwrites use without the metadata mutex.
//!
//! The L1 table is an array of atomics. Cached L2 slices (a power-of-two part of a table,
//! keyed by its own host offset) are shared (`Arc`) between the metadata cache, which owns
//! and mutates them under the metadata mutex, and this view, where readers find them by L1
//! index and slice index in a directory of pointer arrays ([`super::slicedir`]: no hash
//! probe, no lock; the request's grace pin keeps what it reaches alive). Each slice is a
//! seqlock: the single writer (the metadata mutex holder) bumps the sequence around every
//! entry update, and readers retry until they read a pair of words that no update
//! overlapped, so an extended-L2 entry (descriptor plus subcluster bitmap) is never torn.
//!
//! The L1 table can grow and shrink on a live handle (resize): its entries live in fixed-size
//! chunks that never move once allocated, behind a length that readers load first, so a
//! lookup is one extra load and never sees an entry migrate.
//!
//! A reader that finds no table falls back to the metadata mutex; a reader holding a table
//! that was evicted meanwhile sees the mapping as it was when it found the slice, which is
//! what a request overlapping a concurrent write may see. Host clusters it maps, and the
//! slice itself, stay valid for the request's duration thanks to [`crate::storage::Grace`]:
//! every lookup takes the request's proof of pinning ([`crate::storage::Pinned`]).

use super::cache::CacheConfig;
use super::slicedir::SliceDir;
use crate::error::Result;
use crate::format::entry::{decode_l2, L1Entry, L2Entry, Mapping, COMPRESSED, COPIED, ZERO};
use crate::format::{Geometry, GuestOffset, HostOffset};
use crate::storage::{Grace, HostFile, Pinned};
#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// L1 entries per chunk (32 KiB of atomics; a few under loom, where every atomic is a
/// modelled object).
#[cfg(not(loom))]
const L1_CHUNK: usize = 4096;
#[cfg(loom)]
const L1_CHUNK: usize = 4;
/// Chunks: enough for the largest L1 table (a few entries under loom).
#[cfg(not(loom))]
const L1_CHUNKS: usize = MAX_L1_ENTRIES.div_ceil(L1_CHUNK);
#[cfg(loom)]
const L1_CHUNKS: usize = 4;
/// Where slices' words come from: a slab of chunks in production; under loom (whose atomics
/// are modelled objects) each slice has its own.
#[cfg(not(loom))]
pub type Slab = crate::storage::WordSlab;
/// Where slices' words come from (loom: each slice has its own).
#[cfg(loom)]
#[derive(Debug, Clone)]
pub struct Slab(usize);
#[cfg(not(loom))]
type Words = crate::storage::SlabWords;
#[cfg(loom)]
type Words = Box<[AtomicU64]>;

/// Bytes of slice memory carved at once: one arena growth for this many bytes of slices
/// instead of one per slice (see [`crate::storage::slab`]).
#[cfg(not(loom))]
const SLAB_CHUNK_BYTES: u64 = 64 << 10;

/// The slab of slices of `cache`'s size: chunks of [`SLAB_CHUNK_BYTES`], but no more slices
/// to a chunk than the cache holds.
#[cfg(not(loom))]
fn new_slab(cache: &CacheConfig) -> Slab {
    let per_chunk = (SLAB_CHUNK_BYTES / cache.slice_bytes.max(8)).max(1) as usize;
    Slab::new(
        (cache.slice_bytes / 8) as usize,
        per_chunk.min(cache.l2_slices),
    )
}

/// Loom: no slab.
#[cfg(loom)]
fn new_slab(cache: &CacheConfig) -> Slab {
    Slab(cache.slice_bytes as usize)
}

#[cfg(loom)]
impl Slab {
    /// Words per slice.
    pub fn words(&self) -> usize {
        self.0 / 8
    }

    /// Bytes per slice.
    pub fn bytes(&self) -> usize {
        self.0
    }
}

/// Most L1 entries any image may have (QEMU's 32 MiB L1 limit).
pub const MAX_L1_ENTRIES: usize = (crate::format::header::MAX_L1_BYTES / 8) as usize;

/// A cached L2 slice (a whole table when the slice size is the cluster size): entries as
/// atomics behind a sequence counter.
#[derive(Debug)]
pub struct L2Table {
    /// The slice's host offset (its cache key): readers check it against the one their L1
    /// entry gives.
    key: HostOffset,
    seq: AtomicU64,
    /// Set by lock-free readers; eviction gives referenced tables a second chance.
    referenced: AtomicBool,
    /// Where the slice is published in the view's directory (L1 index << 32 | slice index;
    /// [`NOWHERE`] when it is not). Written only by metadata mutex holders.
    home: AtomicU64,
    /// The entries as stored on disk (big-endian): filling a slice from disk is a plain copy,
    /// and the byte swap happens per entry read.
    words: Words,
}

/// What [`MapView::probe_data`] found for a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProbe {
    /// Plain data at this host cluster.
    Data(HostOffset),
    /// The L2 slice that maps it is not cached (or not published).
    Uncached,
    /// Anything else (zero, unallocated, compressed, an entry the slow path must judge).
    Other,
}

/// [`L2Table::home`] of a slice that is not published.
const NOWHERE: u64 = u64::MAX;

/// Copies `raw` (whole words; a trailing partial word is ignored) into `words` nobody else
/// sees (loom's atomics have no byte view: stores nobody can observe yet).
#[cfg(loom)]
fn fill_words(words: &[AtomicU64], raw: &[u8]) {
    for (w, c) in words.iter().zip(raw.chunks_exact(8)) {
        w.store(
            u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])),
            Ordering::Relaxed,
        );
    }
}

impl L2Table {
    /// The slice at host offset `key` holding `words` (decoded big-endian L2 words).
    #[cfg(test)]
    pub fn new(key: HostOffset, words: Vec<u64>) -> Arc<L2Table> {
        let raw: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        Arc::new(Self::unpublished(key, Self::filled(&raw)))
    }

    /// Words of their own holding `raw`'s whole words.
    #[cfg(all(test, not(loom)))]
    fn filled(raw: &[u8]) -> Words {
        let n = raw.len() / 8;
        let mut words = Words::standalone(n);
        words.as_mut_bytes().copy_from_slice(&raw[..n * 8]);
        words
    }

    /// Words of their own holding `raw`'s whole words.
    #[cfg(loom)]
    fn filled(raw: &[u8]) -> Words {
        let words: Words = (0..raw.len() / 8).map(|_| AtomicU64::new(0)).collect();
        fill_words(&words, raw);
        words
    }

    fn unpublished(key: HostOffset, words: Words) -> L2Table {
        L2Table {
            key,
            seq: AtomicU64::new(0),
            referenced: AtomicBool::new(false),
            home: AtomicU64::new(NOWHERE),
            words,
        }
    }

    /// The slice at host offset `key` of `file` (bytes past the end of the file read as
    /// zeros, as QEMU reads a table there), read straight into memory from `slab`.
    pub fn read_zero_padded(file: &HostFile, key: HostOffset, slab: &Slab) -> Result<Arc<L2Table>> {
        Ok(Arc::new(Self::read_new(file, key, slab)?.0))
    }

    /// The slice of `slab`'s size at host offset `key` of `file`, read straight into the
    /// memory of `spare` (a slice an earlier miss evicted) when nobody else holds it and it
    /// has the size, else into a new one: a cache miss then allocates and copies nothing.
    /// Bytes past the end of the file read as zeros; None when the slice lies wholly past it.
    pub fn read_from(
        file: &HostFile,
        key: HostOffset,
        slab: &Slab,
        spare: Option<Arc<L2Table>>,
    ) -> Result<Option<Arc<L2Table>>> {
        let mut spare = spare.filter(|old| old.words.len() == slab.words());
        if let Some(t) = spare.as_mut().and_then(Arc::get_mut) {
            let n = t.refill_from(file, key)?;
            return Ok(spare.filter(|_| n > 0));
        }
        // No spare of this size, or somebody still holds it.
        let (t, n) = Self::read_new(file, key, slab)?;
        Ok((n > 0).then(|| Arc::new(t)))
    }

    /// A new unpublished slice at `key` of `file`, in memory from `slab`, and the bytes the
    /// file had (the rest read as zeros).
    #[cfg(not(loom))]
    fn read_new(file: &HostFile, key: HostOffset, slab: &Slab) -> Result<(L2Table, usize)> {
        let mut t = Self::unpublished(key, slab.take());
        let n = t.refill_from(file, key)?;
        Ok((t, n))
    }

    /// Under loom (whose atomics are not plain words) the slice goes through a buffer.
    #[cfg(loom)]
    fn read_new(file: &HostFile, key: HostOffset, slab: &Slab) -> Result<(L2Table, usize)> {
        let mut raw = vec![0u8; slab.bytes()];
        let n = file.read_some(&mut raw, key, "L2 table")?;
        Ok((Self::unpublished(key, Self::filled(&raw)), n))
    }

    /// Makes this (unshared) slice the one at `key` of `file`, as read from disk; returns
    /// the bytes the file had (the rest read as zeros).
    #[cfg(not(loom))]
    fn refill_from(&mut self, file: &HostFile, key: HostOffset) -> Result<usize> {
        self.key = key;
        *self.seq.get_mut() = 0;
        *self.referenced.get_mut() = false;
        *self.home.get_mut() = NOWHERE;
        file.read_words_zero_padded(&mut self.words, key, "L2 table")
    }

    /// Under loom a spare is never refilled (its atomics have no byte view).
    #[cfg(loom)]
    fn refill_from(&mut self, file: &HostFile, key: HostOffset) -> Result<usize> {
        let (t, n) = Self::read_new(file, key, &Slab(self.words.len() * 8))?;
        *self = t;
        Ok(n)
    }

    /// The slice's host offset (its cache key).
    pub fn key(&self) -> HostOffset {
        self.key
    }

    /// Where the slice is published: (L1 index, slice index).
    pub fn home(&self) -> Option<(usize, usize)> {
        match self.home.load(Ordering::Relaxed) {
            NOWHERE => None,
            h => Some(((h >> 32) as usize, (h & 0xffff_ffff) as usize)),
        }
    }

    /// Records where the slice is published (None: withdrawn). Callers hold the metadata
    /// mutex and pass indices below 2^32 (the directory refuses others).
    pub fn set_home(&self, at: Option<(usize, usize)>) {
        let h = at.map_or(NOWHERE, |(l1, s)| ((l1 as u64) << 32) | s as u64);
        self.home.store(h, Ordering::Relaxed);
    }

    /// Entry `i` as (descriptor, bitmap word); the bitmap is 0 without extended L2.
    #[inline(always)]
    pub fn entry(&self, i: usize, ext: bool) -> (u64, u64) {
        let (a, b) = if ext { (2 * i, 2 * i + 1) } else { (i, i) };
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                spin();
                continue;
            }
            let w0 = u64::from_be(self.words[a].load(Ordering::Relaxed));
            let w1 = if ext {
                u64::from_be(self.words[b].load(Ordering::Relaxed))
            } else {
                0
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return (w0, w1);
            }
        }
    }

    /// Updates entry `i`. Callers serialise updates of one table (the metadata mutex).
    pub fn set_entry(&self, i: usize, ext: bool, w0: u64, w1: u64) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        if ext {
            self.words[2 * i].store(w0.to_be(), Ordering::Relaxed);
            self.words[2 * i + 1].store(w1.to_be(), Ordering::Relaxed);
        } else {
            self.words[i].store(w0.to_be(), Ordering::Relaxed);
        }
        self.seq.store(s + 2, Ordering::Release);
    }

    /// The words, for write-back or copying. Called by the (only) writer, so no update can
    /// overlap.
    pub fn to_vec(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| u64::from_be(w.load(Ordering::Relaxed)))
            .collect()
    }

    /// The slice as stored on disk, for write-back (same caller rule as [`Self::to_vec`]).
    pub fn to_disk_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes())
            .collect()
    }

    /// Marks the table as used by a reader.
    pub fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Clears and returns the referenced bit (second-chance eviction). Reads first, so that
    /// sweeping over unreferenced slices dirties no cache line.
    pub fn take_referenced(&self) -> bool {
        self.referenced.load(Ordering::Relaxed) && self.referenced.swap(false, Ordering::Relaxed)
    }
}

/// Waits a moment for a writer in the middle of an update (under loom: lets it run).
#[inline]
fn spin() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// The active L1 table and the cached L2 tables, readable without the metadata mutex.
#[derive(Debug)]
pub struct MapView {
    /// L1 entries in chunks of [`L1_CHUNK`], allocated on first use and never moved, so a
    /// length change never races a reader holding an entry's address.
    l1: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Entries in force; indices at or past it read as absent.
    l1_len: AtomicUsize,
    /// Serialises the control operations that change the guest extent (resize): each runs
    /// in phases with the write gate released in between.
    resizing: Mutex<()>,
    /// Published slices by L1 index and slice index, read by pinned readers without a lock.
    dir: SliceDir,
    /// Bumped whenever a table's on-disk contents change (write-back), so that a table read
    /// from disk without the mutex can be checked for staleness before it is installed.
    generation: AtomicU64,
    /// The handle's cache sizes (fixed for its life but for `l2_slices`, which grows with
    /// the image when it is the default cover).
    cache: CacheConfig,
    /// The L2 cache's current number of slices.
    l2_slices: AtomicUsize,
    /// Slices per table (slots per directory block).
    per_table: usize,
    /// log2 of L2 entries per slice.
    per_slice_shift: u32,
    /// log2 of the slice size.
    slice_shift: u32,
    /// log2 of the guest bytes one L1 entry maps, and the mask of an L2 index (the
    /// geometry's, computed once rather than per lookup).
    l1_shift: u32,
    l2_mask: u64,
    /// The memory of the slices this view's cache reads.
    slab: Slab,
}

impl MapView {
    /// An empty view for an L1 table of `l1_len` entries (at most [`MAX_L1_ENTRIES`]; the
    /// header parser enforces it), caching slices as `cache` says for the L2 tables of `geo`,
    /// for readers pinned in `grace` (the image file's: the pins of its requests).
    pub fn new(l1_len: usize, cache: CacheConfig, geo: &Geometry, grace: Arc<Grace>) -> MapView {
        let slice_shift = cache.slice_bytes.trailing_zeros();
        let per_slice_shift = slice_shift - geo.l2_entry_size().trailing_zeros();
        // Slices per table (a table is one cluster; a slice at most one).
        let per_table = 1usize << geo.cluster_bits.saturating_sub(slice_shift).min(31);
        let v = MapView {
            l1: (0..L1_CHUNKS).map(|_| OnceLock::new()).collect(),
            l1_len: AtomicUsize::new(0),
            resizing: Mutex::new(()),
            dir: SliceDir::new(grace, per_table, max_blocks(&cache, per_table)),
            generation: AtomicU64::new(0),
            cache,
            l2_slices: AtomicUsize::new(cache.l2_slices),
            per_table,
            per_slice_shift,
            slice_shift,
            l1_shift: geo.l2_coverage_bits(),
            l2_mask: geo.l2_entries() - 1,
            slab: new_slab(&cache),
        };
        v.set_l1_len(l1_len);
        v
    }

    /// The handle's cache sizes.
    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            l2_slices: self.l2_slices.load(Ordering::Relaxed),
            ..self.cache
        }
    }

    /// Where the cache's slices take their memory.
    pub fn slab(&self) -> &Slab {
        &self.slab
    }

    /// Records a larger L2 cache (a grown image; callers hold the metadata mutex) and lets
    /// the slice directory hold as many more tables.
    pub fn grow_l2_slices(&self, n: usize) {
        self.l2_slices.store(n, Ordering::Relaxed);
        let max = max_blocks(&self.cache(), self.per_table);
        self.dir.grow_max_blocks(max);
    }

    /// Where entry `index` of the L2 table at `table` is cached: the slice's host offset
    /// (its cache key) and the entry's index within the slice.
    #[inline]
    pub fn slice_of(&self, table: HostOffset, index: usize) -> (HostOffset, usize) {
        let slice = (index >> self.per_slice_shift) as u64;
        let within = index & ((1usize << self.per_slice_shift) - 1);
        (table + (slice << self.slice_shift), within)
    }

    /// The host offsets of the slices of the table at `table` (one cluster of `geo`).
    pub fn slices_of(&self, geo: &Geometry, table: HostOffset) -> impl Iterator<Item = HostOffset> {
        let step = self.cache.slice_bytes;
        (0..geo.cluster_size() / step).map(move |i| table + i * step)
    }

    /// Held for a whole resize (see the `resizing` field).
    pub fn resizing(&self) -> MutexGuard<'_, ()> {
        // Poisoning means a panic elsewhere; the mutex guards no data.
        self.resizing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of L1 entries.
    pub fn l1_len(&self) -> usize {
        self.l1_len.load(Ordering::Acquire)
    }

    /// The slot of entry `i`, allocating its chunk when `create` (callers then hold the
    /// metadata mutex); None past the chunk array or for a chunk never allocated.
    fn slot(&self, i: usize, create: bool) -> Option<&AtomicU64> {
        let chunk = self.l1.get(i / L1_CHUNK)?;
        let words = if create {
            chunk.get_or_init(|| (0..L1_CHUNK).map(|_| AtomicU64::new(0)).collect())
        } else {
            chunk.get()?
        };
        words.get(i % L1_CHUNK)
    }

    /// Changes the number of L1 entries (resize, metadata reload). Entries that come into
    /// force read as zero (unallocated) until set; callers serialise length changes and
    /// entry updates (the metadata mutex). Lengths past [`MAX_L1_ENTRIES`] are capped.
    pub fn set_l1_len(&self, len: usize) {
        let len = len.min(MAX_L1_ENTRIES);
        let old = self.l1_len();
        // Zero the entries that come into force before readers can see them; a shrink leaves
        // the entries past the end to the next growth to clear.
        for i in old..len {
            if let Some(e) = self.slot(i, true) {
                e.store(0, Ordering::Relaxed);
            }
        }
        self.l1_len.store(len, Ordering::Release);
    }

    /// L1 entry `i` (None past the end).
    pub fn l1_entry(&self, i: usize) -> Option<u64> {
        if i >= self.l1_len() {
            return None;
        }
        self.slot(i, false).map(|e| e.load(Ordering::Acquire))
    }

    /// Sets L1 entry `i` (below the length); publish the table it points to first.
    pub fn set_l1(&self, i: usize, v: u64) {
        debug_assert!(i < self.l1_len(), "L1 index {i} past the end");
        if let Some(e) = self.slot(i, true) {
            e.store(v, Ordering::Release);
        }
    }

    /// L1 entries `[start, end)` (clamped to the length), for write-back.
    pub fn l1_words(&self, start: usize, end: usize) -> Vec<u64> {
        (start..end.min(self.l1_len()))
            .map(|i| self.l1_entry(i).unwrap_or(0))
            .collect()
    }

    /// Whether slice `slice` of the table at `table` is published under L1 entry `l1`.
    pub fn published(&self, l1: usize, table: HostOffset, slice: usize) -> bool {
        self.dir.key_at(l1, slice) == Some(self.slice_key(table, slice))
    }

    /// Publishes a cached slice for lock-free readers ([`SliceDir::publish`]); the caller
    /// holds the metadata mutex, under which L1 entry `l1` points at the slice's table.
    pub fn publish(&self, l1: usize, slice: usize, t: &Arc<L2Table>) -> bool {
        self.dir.publish(l1, slice, t)
    }

    /// [`SliceDir::replace`]: withdraws `evicted` and publishes `t`, as one writer.
    pub fn replace(
        &self,
        evicted: Option<&Arc<L2Table>>,
        l1: usize,
        slice: usize,
        t: &Arc<L2Table>,
    ) -> bool {
        self.dir.replace(evicted, l1, slice, t)
    }

    /// Withdraws a slice (evicted from or dropped by the cache), if published.
    pub fn unpublish(&self, t: &Arc<L2Table>) {
        self.dir.unpublish(t);
    }

    /// Drops what the slice directory withdrew once no request can still read it (never
    /// waits; see [`crate::storage::PinnedGrid`]).
    pub fn collect(&self) {
        self.dir.collect();
    }

    /// Forgets every table and loads `l1` (a metadata reload), taking its length.
    pub fn reset(&self, l1: &[u64]) {
        self.dir.clear();
        self.set_l1_len(l1.len());
        for (i, &v) in l1.iter().enumerate().take(MAX_L1_ENTRIES) {
            self.set_l1(i, v);
        }
        self.bump_generation();
    }

    /// The index of the slice holding entry `index` of a table.
    #[inline]
    pub fn slice_index(&self, index: usize) -> usize {
        index >> self.per_slice_shift
    }

    /// The host offset (cache key) of slice `slice` of the table at `table`.
    #[inline]
    fn slice_key(&self, table: HostOffset, slice: usize) -> HostOffset {
        table + ((slice as u64) << self.slice_shift)
    }

    /// See the `generation` field.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records that on-disk L2 contents changed.
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The mapping of the guest cluster containing `guest`, without any lock, for a reader
    /// pinned in the image file's grace periods (`pinned`; a pin of any other `Grace` finds
    /// nothing): `None` when the L2 table is not cached or the entry does not decode (the
    /// caller then takes the metadata mutex, which also produces the proper error).
    pub fn lookup(
        &self,
        pinned: &Pinned<'_>,
        geo: &Geometry,
        version: u32,
        guest: GuestOffset,
    ) -> Option<Mapping> {
        let (l1, table) = self.l2_table(geo, guest)?;
        if table == HostOffset::ZERO {
            return Some(Mapping::Unallocated { zero: 0 });
        }
        let (w0, w1) = self.cached_entry(pinned, geo, l1, table, guest)?;
        decode_l2(geo, version, w0, w1).ok()
    }

    /// The host cluster of the guest cluster containing `guest` when the view maps it to
    /// ordinary data (allocated, neither compressed nor zero, cluster-aligned) of an image
    /// with standard L2 entries and no external data file: what [`Self::lookup`] returns as
    /// [`Mapping::Data`], found without decoding anything else (the common cached read).
    /// `None` for everything else, which the caller maps with [`Self::lookup`]. (The read
    /// path uses [`Self::probe_data`]; the loom models check this view of it.)
    #[cfg(all(test, loom))]
    pub fn lookup_data(&self, geo: &Geometry, guest: GuestOffset) -> Option<HostOffset> {
        let pin = self.dir.grace().pin();
        match self.probe_data(&pin.pinned(), geo, guest) {
            DataProbe::Data(host) => Some(host),
            DataProbe::Uncached | DataProbe::Other => None,
        }
    }

    /// [`Self::lookup_data`], telling apart a slice that is not cached (the caller may load
    /// it and probe again) from a mapping that is not plain data.
    #[inline]
    pub fn probe_data(&self, pinned: &Pinned<'_>, geo: &Geometry, guest: GuestOffset) -> DataProbe {
        self.probe(pinned, geo, guest, 0)
    }

    /// [`Self::probe_data`] for a write in place: `Data` only for a cluster the image also
    /// owns (COPIED), i.e. exactly where [`Self::lookup`] returns `Mapping::Data` with
    /// `copied` set (every subcluster of a standard entry is allocated).
    #[inline]
    pub fn probe_owned_data(
        &self,
        pinned: &Pinned<'_>,
        geo: &Geometry,
        guest: GuestOffset,
    ) -> DataProbe {
        self.probe(pinned, geo, guest, COPIED)
    }

    /// The probe of [`Self::probe_data`], `Data` only where the entry also has every flag
    /// of `required`.
    #[inline(always)]
    fn probe(
        &self,
        pinned: &Pinned<'_>,
        geo: &Geometry,
        guest: GuestOffset,
        required: u64,
    ) -> DataProbe {
        if geo.extended_l2 || geo.external_data {
            return DataProbe::Other;
        }
        let Some((l1, table)) = self.l2_table(geo, guest) else {
            return DataProbe::Other;
        };
        if table == HostOffset::ZERO {
            return DataProbe::Other;
        }
        let Some((w0, _)) = self.cached_entry(pinned, geo, l1, table, guest) else {
            return DataProbe::Uncached;
        };
        // The kind test of `L2Entry::kind` for a standard entry: no flag, some offset.
        let host = L2Entry::new(w0, 0).host();
        let plain = w0 & (COMPRESSED | ZERO | required) == required;
        if plain && host != HostOffset::ZERO && host.is_cluster_aligned(geo) {
            DataProbe::Data(host)
        } else {
            DataProbe::Other
        }
    }

    /// [`Self::lookup`] under a pin of its own (tests).
    #[cfg(all(test, not(loom)))]
    pub fn lookup_now(&self, geo: &Geometry, version: u32, guest: GuestOffset) -> Option<Mapping> {
        let pin = self.dir.grace().pin();
        self.lookup(&pin.pinned(), geo, version, guest)
    }

    /// [`Self::probe_owned_data`] under a pin of its own (tests).
    #[cfg(all(test, not(loom)))]
    pub fn probe_owned_now(&self, geo: &Geometry, guest: GuestOffset) -> DataProbe {
        let pin = self.dir.grace().pin();
        self.probe_owned_data(&pin.pinned(), geo, guest)
    }

    /// The L1 index of `guest` and the L2 table its entry points at (zero: none); None past
    /// the L1 table or for an unaligned table offset (left to the metadata mutex's path).
    #[inline]
    fn l2_table(&self, geo: &Geometry, guest: GuestOffset) -> Option<(usize, HostOffset)> {
        // `guest.l1_index(geo)`, for the geometry the view was made for.
        let l1 = (guest.get() >> self.l1_shift) as usize;
        let off = L1Entry(self.l1_entry(l1)?).l2_offset();
        (off == HostOffset::ZERO || off.is_cluster_aligned(geo)).then_some((l1, off))
    }

    /// The raw words of the L2 entry of `guest` in the table at `table` (under L1 entry
    /// `l1`), if its slice is published.
    // Always inlined: as a call it cost a cached 4 KiB overwrite 24 of its 581 instructions.
    #[inline(always)]
    fn cached_entry(
        &self,
        pinned: &Pinned<'_>,
        geo: &Geometry,
        l1: usize,
        table: HostOffset,
        guest: GuestOffset,
    ) -> Option<(u64, u64)> {
        // `guest.l2_index(geo)`, for the geometry the view was made for.
        let index = ((guest.get() >> geo.cluster_bits) & self.l2_mask) as usize;
        let slice = self.slice_index(index);
        let key = self.slice_key(table, slice);
        let within = index & ((1usize << self.per_slice_shift) - 1);
        // The slot may hold a slice of the table this L1 entry pointed at before: the key
        // tells.
        let t = self.dir.get(pinned, l1, slice).filter(|t| t.key == key)?;
        t.touch();
        Some(t.entry(within, geo.extended_l2))
    }
}

/// Most tables the slice directory holds at once: every cached slice in its own table fits,
/// unless the slots would cost more than a quarter of the cache itself (only with many
/// slices per table, i.e. small slices of large clusters; readers of a table left out take
/// the metadata mutex).
fn max_blocks(cache: &CacheConfig, per_table: usize) -> usize {
    let budget = (cache.l2_slices as u64 * cache.slice_bytes / 4) / (per_table as u64 * 8);
    cache.l2_slices.min(budget.max(64) as usize)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn test_cache() -> CacheConfig {
        CacheConfig {
            slice_bytes: 4096,
            l2_slices: 16,
            refcount_slices: 4,
            clean_interval: None,
            l2_cover: true,
        }
    }

    fn geo(extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended_l2,
            refcount_order: 4,
            external_data: false,
        }
    }

    #[test]
    fn entries_map_to_their_slice_and_index_within_it() {
        let v = MapView::new(1, test_cache(), &geo(false), Arc::default());
        let t = HostOffset::new(0x5_0000);
        assert_eq!(v.slice_of(t, 0), (t, 0));
        assert_eq!(v.slice_of(t, 511), (t, 511));
        assert_eq!(v.slice_of(t, 512), (t + 4096, 0));
        assert_eq!(v.slice_of(t, 8191), (t + 15 * 4096, 511));
        let ext = MapView::new(1, test_cache(), &geo(true), Arc::default());
        assert_eq!(ext.slice_of(t, 256), (t + 4096, 0));
    }

    #[test]
    fn extended_entries_are_never_torn_under_concurrent_updates() {
        let t = L2Table::new(HostOffset::new(0x1_0000), vec![0; 16]);
        let reads = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let t = Arc::clone(&t);
            let (reads, stop) = (Arc::clone(&reads), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (w0, w1) = t.entry(3, true);
                    assert_eq!(w1, w0.wrapping_mul(3), "torn entry {w0:#x}/{w1:#x}");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Keep updating until the reader has raced many updates (bounded in time).
        let t0 = std::time::Instant::now();
        let mut v = 1u64;
        while reads.load(Ordering::Relaxed) < 200_000 && t0.elapsed().as_secs() < 20 {
            t.set_entry(3, true, v, v.wrapping_mul(3));
            v += 1;
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader saw a torn entry");
        assert!(reads.load(Ordering::Relaxed) > 0, "the reader never ran");
    }

    #[test]
    fn a_slice_read_into_a_spare_holds_the_file_bytes_and_zeros_past_its_end() {
        // 4 KiB slice at 0x1000 of a file ending 12 bytes into it: one whole word, half of
        // the next, the rest past the end.
        let mut bytes = vec![0u8; 0x1000 + 12];
        bytes[0x1000..0x1008].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        bytes[0x1008..].copy_from_slice(&[0xaa; 4]);
        let sim = Arc::new(crate::storage::sim::SimFile::new(bytes));
        let file = HostFile::new(sim, String::from("sim"));
        // A spare full of another slice's entries, published elsewhere before.
        let spare = L2Table::new(HostOffset::new(0x9000), vec![u64::MAX; 512]);
        spare.set_home(Some((3, 1)));
        let spare_words = spare.words.as_ptr();
        let key = HostOffset::new(0x1000);
        let slab = Slab::new(512, 4);
        let t = L2Table::read_from(&file, key, &slab, Some(spare))
            .expect("read")
            .expect("within the file");
        assert_eq!(
            t.words.as_ptr(),
            spare_words,
            "the spare's memory is reused"
        );
        assert_eq!((t.key(), t.home()), (key, None));
        assert_eq!(t.entry(0, false).0, 0x1122_3344_5566_7788);
        assert_eq!(t.entry(1, false).0, 0xaaaa_aaaa_0000_0000);
        assert!(
            (2..512).all(|i| t.entry(i, false).0 == 0),
            "zeros past the end"
        );
        // A spare somebody else still holds is left alone.
        let held = Arc::clone(&t);
        let u = L2Table::read_from(&file, key, &slab, Some(Arc::clone(&t)))
            .expect("read")
            .expect("within the file");
        assert!(!Arc::ptr_eq(&u, &held));
        assert_eq!(u.to_vec(), held.to_vec());
        assert_eq!(
            slab.held_bytes(),
            4096,
            "a new slice's memory is the slab's (its first chunk: one slice)"
        );
        // Wholly past the end of the file: nothing to install.
        assert!(
            L2Table::read_from(&file, HostOffset::new(0x2000), &slab, None)
                .expect("read")
                .is_none()
        );
    }

    #[test]
    fn a_replacement_withdraws_the_evicted_slice_and_publishes_the_new_one() {
        let v = MapView::new(4, test_cache(), &geo(false), Arc::default());
        let a = L2Table::new(HostOffset::new(0x5_0000), vec![0; 512]);
        let b = L2Table::new(HostOffset::new(0x9_1000), vec![0; 512]);
        assert!(v.publish(1, 0, &a));
        assert!(v.replace(Some(&a), 2, 1, &b));
        assert_eq!(a.home(), None, "the evicted slice is withdrawn");
        assert!(!v.published(1, HostOffset::new(0x5_0000), 0));
        assert_eq!(b.home(), Some((2, 1)));
        assert!(v.published(2, HostOffset::new(0x9_0000), 1));
        // Without an evicted slice it is a plain publication.
        let c = L2Table::new(HostOffset::new(0x5_0000), vec![0; 512]);
        assert!(v.replace(None, 1, 0, &c));
        assert!(v.published(1, HostOffset::new(0x5_0000), 0));
        assert!(v.published(2, HostOffset::new(0x9_0000), 1));
    }

    #[test]
    fn lookups_find_published_slices_by_l1_and_slice_index_checking_their_key() {
        let g = geo(false);
        let v = MapView::new(4, test_cache(), &g, Arc::default());
        let table = HostOffset::new(0x1_0000);
        let copied = 1u64 << 63;
        v.reset(&[0, table.get() | copied, 0, 0]);
        assert_eq!(v.l1_entry(1), Some(table.get() | copied));
        assert_eq!(v.l1_entry(4), None);
        // Entry 600 of the table under L1 entry 1: slice 1, entry 88 in it.
        let guest = GuestOffset::new((8192 + 600) << 16);
        assert_eq!(v.lookup_now(&g, 3, guest), None, "nothing published");
        let mut words = vec![0u64; 512];
        words[88] = 0x20_0000 | copied;
        let t = L2Table::new(table + 4096, words);
        assert!(v.publish(1, 1, &t));
        assert_eq!(t.home(), Some((1, 1)));
        assert!(v.published(1, table, 1));
        let data =
            |m| matches!(m, Some(Mapping::Data { host, .. }) if host == HostOffset::new(0x20_0000));
        assert!(data(v.lookup_now(&g, 3, guest)));
        // The L1 entry moves to another table: the slot's slice is not used for it.
        v.set_l1(1, 0x9_0000 | copied);
        assert_eq!(v.lookup_now(&g, 3, guest), None);
        assert!(!v.published(1, HostOffset::new(0x9_0000), 1));
        v.set_l1(1, table.get() | copied);
        assert!(data(v.lookup_now(&g, 3, guest)));
        v.unpublish(&t);
        assert_eq!(v.lookup_now(&g, 3, guest), None);
        assert_eq!(t.home(), None);
    }

    #[test]
    fn the_owned_data_probe_answers_exactly_where_lookup_finds_copied_data() {
        let g = geo(false);
        let v = MapView::new(1, test_cache(), &g, Arc::default());
        let table = HostOffset::new(0x1_0000);
        v.reset(&[table.get() | COPIED]);
        let entries = [
            0x20_0000 | COPIED,              // data the image owns: in place
            0x20_0000,                       // shared data (a snapshot's): copy on write
            0x20_0000 | COPIED | ZERO,       // preallocated zero cluster
            0x20_0000 | ZERO,                // zero cluster without COPIED
            ZERO,                            // plain zero
            0,                               // unallocated
            COPIED,                          // COPIED without an offset
            0x20_0200 | COPIED,              // unaligned host offset
            COMPRESSED | 0x20_0000,          // compressed
            COMPRESSED | COPIED | (5 << 54), // compressed with stray bits
            0x20_0000 | COPIED | (1 << 60),  // reserved bit 60 with data
            0x20_0000 | COPIED | 0x1fe,      // reserved low bits with data
        ];
        let mut words = vec![0u64; 512];
        words[..entries.len()].copy_from_slice(&entries);
        let t = L2Table::new(table, words);
        assert!(v.publish(0, 0, &t));
        for (i, &e) in entries.iter().enumerate() {
            let guest = GuestOffset::new((i as u64) << 16);
            let owned = matches!(
                v.lookup_now(&g, 3, guest),
                Some(Mapping::Data { copied: true, .. })
            );
            let probe = v.probe_owned_now(&g, guest);
            assert_eq!(
                matches!(probe, DataProbe::Data(_)),
                owned,
                "entry {e:#x}: probe {probe:?}"
            );
            if let DataProbe::Data(host) = probe {
                assert_eq!(host, HostOffset::new(0x20_0000), "entry {e:#x}");
            }
        }
        let past = GuestOffset::new(1 << 40);
        assert_eq!(v.probe_owned_now(&g, past), DataProbe::Other, "past the L1");
        let uncached = GuestOffset::new(600 << 16);
        assert_eq!(v.probe_owned_now(&g, uncached), DataProbe::Uncached);
    }

    #[test]
    fn the_l1_grows_and_shrinks_keeping_entries_and_zeroing_new_ones() {
        let v = MapView::new(3, test_cache(), &geo(false), Arc::default());
        v.set_l1(2, 0x3_0000);
        v.set_l1_len(L1_CHUNK * 2 + 5);
        assert_eq!(v.l1_len(), L1_CHUNK * 2 + 5);
        assert_eq!(v.l1_entry(2), Some(0x3_0000));
        assert_eq!(v.l1_entry(L1_CHUNK * 2 + 4), Some(0));
        v.set_l1(L1_CHUNK + 1, 0x5_0000);
        v.set_l1_len(2);
        assert_eq!(v.l1_entry(2), None, "past the end after a shrink");
        assert_eq!(v.l1_words(0, 10).len(), 2);
        v.set_l1_len(L1_CHUNK + 2);
        assert_eq!(
            v.l1_entry(2),
            Some(0),
            "an entry back in force reads as zero"
        );
        assert_eq!(v.l1_entry(L1_CHUNK + 1), Some(0));
        v.set_l1_len(usize::MAX);
        assert_eq!(v.l1_len(), MAX_L1_ENTRIES);
    }

    #[test]
    fn readers_see_old_entries_while_the_l1_grows() {
        let v = Arc::new(MapView::new(1, test_cache(), &geo(false), Arc::default()));
        v.set_l1(0, 0x7_0000);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(v.l1_entry(0), Some(0x7_0000));
                    let n = v.l1_len();
                    assert!(v.l1_entry(n - 1).is_some());
                }
            })
        };
        for n in (1..40).map(|k| k * 1000) {
            v.set_l1_len(n);
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader");
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Exhaustive interleavings (loom) of lock-free lookups against what the metadata mutex
    //! holder does to the view meanwhile: move an L1 entry to another table and publish its
    //! slice (copy-on-write of a shared table), evict a slice and publish another table's,
    //! update an entry in place. Run with
    //! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
    use super::*;
    use crate::format::entry::COPIED;
    use loom::thread;

    /// 4 KiB clusters, 512-byte slices: 64 entries per slice, 8 slices per table (few
    /// modelled atomics per slice).
    fn geo() -> Geometry {
        Geometry {
            cluster_bits: 12,
            extended_l2: false,
            refcount_order: 4,
            external_data: false,
        }
    }

    fn view(l1_len: usize) -> Arc<MapView> {
        let cache = CacheConfig {
            slice_bytes: 512,
            l2_slices: 4,
            refcount_slices: 2,
            clean_interval: None,
            l2_cover: false,
        };
        Arc::new(MapView::new(l1_len, cache, &geo(), Arc::default()))
    }

    /// Slice 0 of the table at `table`, mapping its first guest cluster to `data`.
    fn slice(table: u64, data: u64) -> Arc<L2Table> {
        let mut words = vec![0u64; 64];
        words[0] = data | COPIED;
        L2Table::new(HostOffset::new(table), words)
    }

    const A: u64 = 0x1_0000;
    const B: u64 = 0x5_0000;
    const DATA_A: u64 = 0x20_0000;
    const DATA_B: u64 = 0x30_0000;
    /// First guest byte of L1 entry 1 (2 MiB per table).
    const SECOND: u64 = 2 << 20;

    /// The L1 entry moves from table A to its copy B while a reader maps guest 0: whatever
    /// the interleaving, the reader maps through the table its L1 entry pointed at, never
    /// through a slice of the other one left in (or not yet in) the directory slot.
    fn l1_move(publish_first: bool) {
        loom::model(move || {
            let g = geo();
            let v = view(1);
            v.set_l1(0, A | COPIED);
            assert!(v.publish(0, 0, &slice(A, DATA_A)));
            let writer = {
                let v = Arc::clone(&v);
                thread::spawn(move || {
                    let b = slice(B, DATA_B);
                    if publish_first {
                        assert!(v.publish(0, 0, &b));
                        v.set_l1(0, B | COPIED);
                    } else {
                        v.set_l1(0, B | COPIED);
                        assert!(v.publish(0, 0, &b));
                    }
                })
            };
            let before = v.l1_entry(0);
            let m = v.lookup_data(&g, GuestOffset::new(0));
            let after = v.l1_entry(0);
            if before == Some(B | COPIED) {
                assert_ne!(m, Some(HostOffset::new(DATA_A)), "the old table's slice");
            }
            if after == Some(A | COPIED) {
                assert_ne!(
                    m,
                    Some(HostOffset::new(DATA_B)),
                    "the new table before its L1 entry"
                );
            }
            writer.join().expect("writer");
            assert_eq!(
                v.lookup_data(&g, GuestOffset::new(0)),
                Some(HostOffset::new(DATA_B))
            );
        });
    }

    #[test]
    fn loom_an_l1_entry_moving_to_a_published_copy_never_maps_through_the_other_table() {
        l1_move(true);
    }

    #[test]
    fn loom_an_l1_entry_moving_before_its_copy_is_published_never_maps_the_old_slice() {
        l1_move(false);
    }

    /// Slice A is evicted (and dropped by the cache) and table B's slice published while a
    /// reader maps through both tables: it finds each table's own entry or nothing (then the
    /// mutex).
    #[test]
    fn loom_an_evicted_slice_is_never_found_and_a_new_one_only_for_its_table() {
        evict_and_publish(false);
    }

    /// The same with the withdrawal and the publication by one writer of the directory
    /// ([`MapView::replace`], what a cache miss does).
    #[test]
    fn loom_a_slice_replaced_by_one_writer_is_never_found_and_the_new_one_only_for_its_table() {
        evict_and_publish(true);
    }

    fn evict_and_publish(one_writer: bool) {
        loom::model(move || {
            let g = geo();
            let v = view(2);
            v.set_l1(0, A | COPIED);
            v.set_l1(1, B | COPIED);
            let a = slice(A, DATA_A);
            assert!(v.publish(0, 0, &a));
            // Another slice of table A keeps its directory block in use.
            assert!(v.publish(0, 1, &slice(A + 512, DATA_A + 4096)));
            let writer = {
                let v = Arc::clone(&v);
                thread::spawn(move || {
                    let b = slice(B, DATA_B);
                    if one_writer {
                        assert!(v.replace(Some(&a), 1, 0, &b));
                        drop(a);
                    } else {
                        v.unpublish(&a);
                        drop(a);
                        assert!(v.publish(1, 0, &b));
                    }
                })
            };
            let first = v.lookup_data(&g, GuestOffset::new(0));
            let second = v.lookup_data(&g, GuestOffset::new(SECOND));
            assert!(
                first.is_none() || first == Some(HostOffset::new(DATA_A)),
                "{first:?}"
            );
            assert!(
                second.is_none() || second == Some(HostOffset::new(DATA_B)),
                "{second:?}"
            );
            writer.join().expect("writer");
            assert_eq!(v.lookup_data(&g, GuestOffset::new(0)), None);
            assert_eq!(
                v.lookup_data(&g, GuestOffset::new(SECOND)),
                Some(HostOffset::new(DATA_B))
            );
        });
    }

    /// An extended entry (descriptor and bitmap) updated twice in place while a reader reads
    /// it: the reader gets one update's pair, never halves of two.
    #[test]
    fn loom_in_place_entry_updates_are_never_seen_torn() {
        loom::model(|| {
            let t = L2Table::new(HostOffset::new(A), vec![0; 8]);
            let writer = {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    t.set_entry(1, true, 5, 15);
                    t.set_entry(1, true, 7, 21);
                })
            };
            let (w0, w1) = t.entry(1, true);
            assert_eq!(w1, w0 * 3, "torn entry {w0}/{w1}");
            writer.join().expect("writer");
            assert_eq!(t.entry(1, true), (7, 21));
        });
    }
}
