//! A small write-back cache of metadata slices keyed by host offset, with LRU eviction of
//! clean entries. Dirty entries are never evicted: the owner writes them back in crash-safe
//! order first (see `Meta::writeback`).
//!
//! The L2 and refcount caches hold slices of tables (a power of two from 512 bytes up to a
//! whole cluster), keyed by the slice's own host offset (table offset + slice index * slice
//! size): a miss reads one slice, so a scattered working set over a large image costs one
//! small read per slice instead of a whole table.

use crate::format::{Geometry, HostOffset};
use crate::storage::guard::U64BuildHasher;
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

/// Default slice size (QEMU's default L2 cache entry size on 4 KiB-page hosts).
pub const DEFAULT_SLICE_BYTES: u64 = 4096;
/// Smallest slice (one sector).
pub const MIN_SLICE_BYTES: u64 = 512;
/// Cap of the default L2 cache (QEMU 10's default maximum on Linux): covers 256 GiB of guest
/// at 64 KiB clusters. A larger image gets this much and evicts.
pub const DEFAULT_MAX_L2_BYTES: u64 = 32 << 20;
/// Default refcount cache, in clusters (QEMU's rule: four clusters).
pub const DEFAULT_REFCOUNT_CLUSTERS: u64 = 4;
/// Default idle interval after which unused cache entries are dropped (QEMU's
/// cache-clean-interval default).
pub const DEFAULT_CLEAN_INTERVAL: Duration = Duration::from_secs(600);
/// Most slices one cache holds, whatever is asked: bounds the bookkeeping.
const MAX_SLICES: u64 = 1 << 20;

/// Requests of one thread between two checks of whether an idle clean is due: reading the
/// clock costs about as much as a small request's whole engine overhead, so it is sampled.
pub(super) const TICK_REQUESTS: u32 = 256;

/// Counts a request of the calling thread; true every [`TICK_REQUESTS`] requests, when the
/// caller checks whether an idle clean is due.
#[inline]
pub fn tick() -> bool {
    thread_local! {
        static REQUESTS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    REQUESTS.with(|n| {
        let v = n.get().wrapping_add(1);
        n.set(v);
        v % TICK_REQUESTS == 0
    })
}

/// The metadata cache sizes of one open image, resolved from [`crate::OpenOptions`]
/// against its geometry and virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Slice size in bytes: a power of two, 512 up to the cluster size.
    pub slice_bytes: u64,
    /// Slices the L2 cache holds (at least 2).
    pub l2_slices: usize,
    /// Slices the refcount cache holds (at least 2).
    pub refcount_slices: usize,
    /// Entries unused for this long are dropped at the next miss, flush or periodic check
    /// (None: never).
    pub clean_interval: Option<Duration>,
    /// The L2 size is the default cover of the image (nobody asked for a size): it grows
    /// with the image (resize).
    pub l2_cover: bool,
}

impl CacheConfig {
    /// Resolves the caller's settings (0 = default) for an image of `geo` and `virtual_size`.
    ///
    /// Defaults follow QEMU: an L2 cache large enough to map the whole image, capped at
    /// [`DEFAULT_MAX_L2_BYTES`]; a refcount cache of four clusters; 4 KiB slices. A slice
    /// size must be a power of two from 512 bytes up to the cluster size (`InvalidArgument`
    /// otherwise, as qemu's l2-cache-entry-size); `OXCOW_L2_SLICE_SIZE`,
    /// `OXCOW_L2_CACHE_SIZE` and `OXCOW_REFCOUNT_CACHE_SIZE` in the environment override the
    /// defaults (the test suites run with several slice sizes through them; "cluster" means
    /// whole tables).
    pub fn resolve(
        geo: &Geometry,
        virtual_size: u64,
        l2_bytes: u64,
        refcount_bytes: u64,
        slice_bytes: u64,
        clean_interval: Option<Duration>,
    ) -> crate::Result<CacheConfig> {
        let cs = geo.cluster_size();
        let slice = match slice_bytes {
            0 => env_bytes("OXCOW_L2_SLICE_SIZE", cs).unwrap_or(DEFAULT_SLICE_BYTES.min(cs)),
            s => s,
        };
        if !slice.is_power_of_two() || !(MIN_SLICE_BYTES..=cs).contains(&slice) {
            return Err(crate::Error::invalid(format!(
                "L2 cache entry size must be a power of two between {MIN_SLICE_BYTES} and the cluster size ({cs})"
            )));
        }
        let l2 = match l2_bytes {
            0 => env_bytes("OXCOW_L2_CACHE_SIZE", cs),
            b => Some(b),
        };
        let l2_cover = l2.is_none();
        let l2 = l2.unwrap_or_else(|| l2_cover_bytes(geo, virtual_size));
        let rc = match refcount_bytes {
            0 => {
                env_bytes("OXCOW_REFCOUNT_CACHE_SIZE", cs).unwrap_or(DEFAULT_REFCOUNT_CLUSTERS * cs)
            }
            b => b,
        };
        Ok(CacheConfig {
            slice_bytes: slice,
            l2_slices: slices(l2, slice),
            refcount_slices: slices(rc, slice),
            clean_interval: clean_interval.filter(|d| !d.is_zero()),
            l2_cover,
        })
    }

    /// The L2 slices the default cover needs for an image of `virtual_size` (a resize).
    pub fn cover_slices(&self, geo: &Geometry, virtual_size: u64) -> usize {
        slices(l2_cover_bytes(geo, virtual_size), self.slice_bytes)
    }
}

/// Slices of `slice` bytes in a cache of `bytes` (at least two, at most [`MAX_SLICES`]).
fn slices(bytes: u64, slice: u64) -> usize {
    (bytes / slice).clamp(2, MAX_SLICES) as usize
}

/// QEMU's default L2 cache: enough to map the whole image, at most [`DEFAULT_MAX_L2_BYTES`].
fn l2_cover_bytes(geo: &Geometry, virtual_size: u64) -> u64 {
    let entry = if geo.extended_l2 { 16 } else { 8 };
    virtual_size
        .div_ceil(geo.cluster_size())
        .saturating_mul(entry)
        .min(DEFAULT_MAX_L2_BYTES)
}

/// A byte count from the environment ("cluster" = `cluster`), for the test suites' overrides.
fn env_bytes(name: &str, cluster: u64) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim() {
        "cluster" | "table" => Some(cluster),
        n => n.parse().ok().filter(|&b| b > 0),
    }
}

struct Slot<T> {
    key: HostOffset,
    data: T,
    dirty: bool,
    /// Used through this cache since the clock hand last passed (second chance).
    recent: bool,
    /// Value of the use counter at the last use (idle cleaning).
    last_use: u64,
}

/// Cached slices of type `T` (decoded L2 words, raw refcount block bytes), evicted by CLOCK
/// (second chance): a hit is a hash lookup and a flag store, and an eviction moves a hand
/// over the slots, so both cost O(1) on average whatever the cache size (a cache of tens of
/// thousands of slices is normal for a large image).
pub struct TableCache<T> {
    slots: Vec<Slot<T>>,
    /// Slot of each cached offset (keys are aligned offsets of the image's own tables: the
    /// cheap multiplicative hash spreads them).
    index: HashMap<HostOffset, usize, U64BuildHasher>,
    capacity: usize,
    /// Next slot the clock hand looks at.
    hand: usize,
    /// Use counter: bumped on every use.
    clock: u64,
    /// The counter at the last idle clean: entries not used since are idle.
    clean_mark: u64,
    /// Number of dirty slots.
    dirty: usize,
    /// The key and slot of the last lookup: an allocating write looks the same L2 and
    /// refcount slices up several times in a row, and a compare is cheaper than a hash
    /// probe. Checked against the slot's own key, so it never needs invalidating.
    last: Cell<(HostOffset, usize)>,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` slices (at least 2). Filled lazily: an idle cache
    /// costs nothing but its map header.
    pub fn new(capacity: usize) -> TableCache<T> {
        TableCache {
            slots: Vec::new(),
            index: HashMap::default(),
            capacity: capacity.max(2),
            hand: 0,
            clock: 0,
            clean_mark: 0,
            dirty: 0,
            last: Cell::new((HostOffset::ZERO, usize::MAX)),
        }
    }

    /// The slot of the slice at `offset`, if cached.
    #[inline]
    fn find(&self, offset: HostOffset) -> Option<usize> {
        let (key, i) = self.last.get();
        if key == offset && self.slots.get(i).is_some_and(|s| s.key == offset) {
            return Some(i);
        }
        let i = *self.index.get(&offset)?;
        self.last.set((offset, i));
        Some(i)
    }

    /// Number of cached slices.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the slice at `offset` is cached.
    pub fn contains(&self, offset: HostOffset) -> bool {
        self.find(offset).is_some()
    }

    fn slot_mut(&mut self, offset: HostOffset) -> Option<&mut Slot<T>> {
        let i = self.find(offset)?;
        Some(self.use_slot(i))
    }

    /// Slot `i`, marked as used now.
    fn use_slot(&mut self, i: usize) -> &mut Slot<T> {
        self.clock += 1;
        let clock = self.clock;
        let s = &mut self.slots[i];
        s.recent = true;
        s.last_use = clock;
        s
    }

    /// The cached slice, marked as recently used.
    pub fn get(&mut self, offset: HostOffset) -> Option<&T> {
        self.slot_mut(offset).map(|s| &s.data)
    }

    /// The cached slice for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: HostOffset) -> Option<&mut T> {
        let i = self.find(offset)?;
        if !self.slots[i].dirty {
            self.dirty += 1;
        }
        let s = self.use_slot(i);
        s.dirty = true;
        Some(&mut s.data)
    }

    /// Raises the number of slices the cache may hold (a grown image).
    pub fn grow_capacity(&mut self, capacity: usize) {
        self.capacity = self.capacity.max(capacity);
    }

    /// Whether inserting another slice needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Evicts a clean slice (second chance for recently used ones). Returns false if every
    /// slice is dirty.
    pub fn evict_one_clean(&mut self) -> bool {
        self.evict_clean_second_chance(|_| false).is_some()
    }

    /// Evicts a clean slice chosen by CLOCK: a candidate used since the hand last passed
    /// (through this cache, or as `used(data)` reports for lock-free readers; `used` may
    /// clear that mark) is kept this time. Returns the evicted slice, or None if every slice
    /// is dirty.
    pub fn evict_clean_second_chance(
        &mut self,
        used: impl FnMut(&T) -> bool,
    ) -> Option<(HostOffset, T)> {
        let i = self.clock_victim(used)?;
        Some(self.remove_at(i))
    }

    /// Evicts a clean slice chosen as [`Self::evict_clean_second_chance`] does and caches
    /// `data` (clean) at `offset` (not cached) in its slot, with the hand moved past it as
    /// CLOCK does: a miss in a full cache moves no other slot and rehashes only the two
    /// keys. Returns the evicted slice, or gives `data` back when every slice is dirty.
    pub fn replace_clean_second_chance(
        &mut self,
        used: impl FnMut(&T) -> bool,
        offset: HostOffset,
        data: T,
    ) -> Result<(HostOffset, T), T> {
        let Some(i) = self.clock_victim(used) else {
            return Err(data);
        };
        self.clock += 1;
        let new = Slot {
            key: offset,
            data,
            dirty: false,
            recent: false,
            last_use: self.clock,
        };
        let old = std::mem::replace(&mut self.slots[i], new);
        self.index.remove(&old.key);
        self.index.insert(offset, i);
        self.hand = i + 1;
        Ok((old.key, old.data))
    }

    /// The slot of the clean slice CLOCK evicts next: a candidate used since the hand last
    /// passed (through this cache, or as `used(data)` reports; `used` may clear that mark) is
    /// kept this time. None if every slice is dirty.
    fn clock_victim(&mut self, mut used: impl FnMut(&T) -> bool) -> Option<usize> {
        if self.dirty >= self.slots.len() {
            return None;
        }
        // Bound: one sweep clears every mark; readers may mark slices as fast as we clear
        // them, so after two sweeps the first clean slice goes regardless.
        let n = self.slots.len();
        for _ in 0..2 * n {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let s = &mut self.slots[self.hand];
            if !s.dirty {
                let referenced = std::mem::take(&mut s.recent) | used(&s.data);
                if !referenced {
                    return Some(self.hand);
                }
            }
            self.hand += 1;
        }
        self.slots.iter().position(|s| !s.dirty)
    }

    /// Removes slot `i` (moving the last slot into its place) and returns its key and data.
    fn remove_at(&mut self, i: usize) -> (HostOffset, T) {
        let s = self.slots.swap_remove(i);
        self.index.remove(&s.key);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.key, i);
        }
        if s.dirty {
            self.dirty -= 1;
        }
        (s.key, s.data)
    }

    /// Drops the clean entries not used since the previous call (by this cache or, as
    /// `used(data)` reports, by lock-free readers) and returns them; the owner calls it once
    /// per clean interval. Dirty entries stay.
    pub fn clean_idle(&mut self, mut used: impl FnMut(&T) -> bool) -> Vec<T> {
        let mark = self.clean_mark;
        let mut keep = Vec::with_capacity(self.slots.len());
        let mut idle = Vec::new();
        for s in self.slots.drain(..) {
            // Ask about every entry, so that a lock-free reader's use before this clean is
            // consumed now and does not spare the entry at the next one too.
            let referenced = used(&s.data);
            if s.dirty || s.last_use > mark || referenced {
                keep.push(s);
            } else {
                idle.push(s.data);
            }
        }
        // Give the memory of a once-larger cache back too.
        keep.shrink_to_fit();
        self.slots = keep;
        self.hand = 0;
        self.index = HashMap::with_capacity_and_hasher(self.slots.len(), U64BuildHasher::default());
        for (i, s) in self.slots.iter().enumerate() {
            self.index.insert(s.key, i);
        }
        self.clean_mark = self.clock;
        idle
    }

    /// Inserts a slice (replacing any cached one at the same offset).
    pub fn insert(&mut self, offset: HostOffset, data: T, dirty: bool) {
        self.clock += 1;
        let slot = Slot {
            key: offset,
            data,
            dirty,
            recent: false,
            last_use: self.clock,
        };
        if dirty {
            self.dirty += 1;
        }
        match self.find(offset) {
            Some(i) => {
                if self.slots[i].dirty {
                    self.dirty -= 1;
                }
                self.slots[i] = slot;
            }
            None => {
                self.index.insert(offset, self.slots.len());
                self.slots.push(slot);
            }
        }
    }

    /// Drops every slice without writing it (the owner wrote the dirty ones back first).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.dirty = 0;
        self.hand = 0;
    }

    /// Drops a slice from the cache without writing it; returns it.
    pub fn remove(&mut self, offset: HostOffset) -> Option<T> {
        let i = self.find(offset)?;
        Some(self.remove_at(i).1)
    }

    /// Offsets of the dirty slices, in ascending order (sequential write-back).
    pub fn dirty_offsets(&self) -> Vec<HostOffset> {
        if self.dirty == 0 {
            return Vec::new();
        }
        let mut v: Vec<HostOffset> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.key)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any slice is dirty.
    pub fn has_dirty(&self) -> bool {
        self.dirty > 0
    }

    /// The slice at `offset` without touching the use marks or dirtiness.
    pub fn peek(&self, offset: HostOffset) -> Option<&T> {
        self.find(offset).map(|i| &self.slots[i].data)
    }

    /// Marks a slice clean after it was written.
    pub fn mark_clean(&mut self, offset: HostOffset) {
        if let Some(i) = self.find(offset) {
            if std::mem::take(&mut self.slots[i].dirty) {
                self.dirty -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> HostOffset {
        HostOffset::new(n)
    }

    #[test]
    fn second_chance_spares_used_tables_but_always_makes_progress() {
        let mut c = TableCache::new(4);
        c.insert(h(1), 1u32, false);
        c.insert(h(2), 2u32, false);
        c.insert(h(3), 3u32, true);
        // Table 1 is in use (lock-free readers): table 2 goes instead.
        assert_eq!(c.evict_clean_second_chance(|&v| v == 1), Some((h(2), 2)));
        // Everything clean is always in use: something is evicted anyway.
        assert_eq!(c.evict_clean_second_chance(|_| true), Some((h(1), 1)));
        // Only a dirty table is left.
        assert_eq!(c.evict_clean_second_chance(|_| false), None);
    }

    #[test]
    fn a_replacement_takes_the_victims_slot_and_is_the_last_the_hand_reaches() {
        let mut c = TableCache::new(3);
        c.insert(h(1), 1u32, false);
        c.insert(h(2), 2u32, true);
        c.insert(h(3), 3u32, false);
        // Table 1 is the clean victim; 4 takes its slot and is clean.
        assert_eq!(
            c.replace_clean_second_chance(|_| false, h(4), 4),
            Ok((h(1), 1))
        );
        assert!(!c.contains(h(1)));
        assert_eq!(c.peek(h(4)), Some(&4));
        assert_eq!((c.len(), c.dirty_offsets()), (3, vec![h(2)]));
        // The hand moved past the newcomer: 3 goes before it, then 4 (2 is dirty).
        assert_eq!(
            c.replace_clean_second_chance(|_| false, h(5), 5),
            Ok((h(3), 3))
        );
        assert_eq!(
            c.replace_clean_second_chance(|_| false, h(6), 6),
            Ok((h(4), 4))
        );
        assert_eq!(
            [h(2), h(5), h(6)].map(|k| c.peek(k).copied()),
            [Some(2), Some(5), Some(6)]
        );
        // Only dirty tables: the new one is handed back.
        c.get_mut(h(5));
        c.get_mut(h(6));
        assert_eq!(c.replace_clean_second_chance(|_| false, h(7), 7), Err(7));
        assert!(!c.contains(h(7)));
    }

    #[test]
    fn eviction_spares_recently_used_tables_and_never_takes_a_dirty_one() {
        let mut c = TableCache::new(4);
        c.insert(h(1), 1, false);
        c.insert(h(2), 2, true);
        c.insert(h(3), 3, false);
        c.insert(h(4), 4, false);
        c.get(h(1));
        assert!(c.is_full());
        assert!(c.evict_one_clean());
        assert!(
            c.contains(h(1)),
            "used since the hand passed: second chance"
        );
        assert!(!c.contains(h(3)));
        assert!(c.evict_one_clean());
        assert!(c.evict_one_clean());
        assert!(!c.evict_one_clean());
        assert!(c.contains(h(2)));
        assert_eq!(c.dirty_offsets(), vec![h(2)]);
        c.mark_clean(h(2));
        assert!(!c.has_dirty());
        assert!(c.evict_one_clean());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn idle_clean_drops_only_clean_entries_unused_since_the_last_clean() {
        let mut c = TableCache::new(8);
        c.insert(h(1), 1u32, false);
        c.insert(h(2), 2u32, true);
        c.insert(h(3), 3u32, false);
        // Everything was used since the (initial) mark: the first clean keeps it all but a
        // reader-referenced check is not even needed.
        assert!(c.clean_idle(|_| false).is_empty());
        c.get(h(3));
        let mut dropped = c.clean_idle(|&v| v == 4);
        dropped.sort_unstable();
        assert_eq!(dropped, vec![1], "3 was used, 2 is dirty");
        // Used by a lock-free reader: spared.
        assert!(c.clean_idle(|&v| v == 3).is_empty());
        assert_eq!(c.clean_idle(|_| false), vec![3]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn idle_clean_drops_entries_a_reader_last_used_before_the_previous_clean() {
        let mut c = TableCache::new(8);
        c.insert(h(1), 1u32, false);
        c.insert(h(2), 2u32, false);
        // Both were read lock-free right after loading (reference bits set), then entry 2
        // kept being read; entry 1 was never read again.
        let referenced = std::cell::RefCell::new(vec![1u32, 2]);
        let take = |v: &u32| {
            let mut r = referenced.borrow_mut();
            let hit = r.contains(v);
            r.retain(|x| x != v);
            hit
        };
        assert!(c.clean_idle(take).is_empty(), "both used since the open");
        referenced.borrow_mut().push(2);
        assert_eq!(c.clean_idle(take), vec![1], "idle for a whole interval");
        assert!(c.contains(h(2)));
    }

    #[test]
    fn slice_sizes_follow_qemu_rules() {
        let geo = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
            external_data: false,
        };
        // The test suites may override the defaults through the environment.
        if [
            "OXCOW_L2_CACHE_SIZE",
            "OXCOW_L2_SLICE_SIZE",
            "OXCOW_REFCOUNT_CACHE_SIZE",
        ]
        .iter()
        .all(|v| std::env::var_os(v).is_none())
        {
            let c = CacheConfig::resolve(&geo, 1 << 40, 0, 0, 0, None).unwrap();
            assert_eq!(c.l2_slices as u64, DEFAULT_MAX_L2_BYTES / 4096);
            let small = CacheConfig::resolve(&geo, 1 << 30, 0, 0, 4096, None).unwrap();
            assert_eq!(
                small.l2_slices, 32,
                "1 GiB needs 128 KiB of L2: 32 slices of 4 KiB"
            );
            assert_eq!(small.refcount_slices, 64);
        }
        assert!(CacheConfig::resolve(&geo, 1 << 30, 0, 0, 1000, None).is_err());
        assert!(CacheConfig::resolve(&geo, 1 << 30, 0, 0, 256, None).is_err());
        assert!(CacheConfig::resolve(&geo, 1 << 30, 0, 0, 1 << 17, None).is_err());
        let two = CacheConfig::resolve(&geo, 1 << 30, 1, 1, 512, None).unwrap();
        assert_eq!((two.l2_slices, two.refcount_slices), (2, 2));
    }
}
