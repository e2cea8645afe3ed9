//! The metadata-overlap guard: every write to an image file is checked here against an index
//! of the host clusters that hold qcow2 metadata, so that no bug and no bad image can make
//! the engine write guest data (or the wrong table) over the header, an L1/L2 table, the
//! refcount structures, the snapshot table and its tables, or the bitmap directory/tables.
//!
//! The index maps a host cluster to the set of structures it belongs to (a cluster can be an
//! active and a snapshot L2 table at once). A write of kind K may overlap only the structure
//! K updates (QEMU's ignore mask). Lookups are O(1) per cluster touched, under a read lock
//! that writers of the index (allocation of new tables, under the metadata mutex) rarely hold.
//!
//! The engine builds the index at open and keeps it current; the guard itself only answers
//! "may this write happen" and remembers the hit for the event it causes.

use crate::error::ErrorKind;
use crate::error::{Error, Result};
pub use crate::format::MetaKind;
use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// The bit of `kind` in the index's per-cluster masks.
fn bit(kind: MetaKind) -> u16 {
    1 << kind as u8
}

/// A fast hasher for u64 keys that the engine derives from its own tables (cluster indices,
/// aligned host offsets): a multiplication spreads the entropy of the key upwards and the
/// fold brings the high bits back down, so aligned keys (low bits all zero) still fill the
/// table evenly. SipHash would cost more than the lookups it protects, and these keys are not
/// chosen by an adversary who could do more than slow one image down.
#[derive(Default)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map keyed by u64 with [`U64Hasher`].
pub type U64Map<V> = HashMap<u64, V, U64BuildHasher>;

/// Builds [`U64Hasher`]s: for maps keyed by u64 or by a newtype over one (offsets, clusters).
pub type U64BuildHasher = BuildHasherDefault<U64Hasher>;

/// How much the guard checks, as QEMU's `overlap-check` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlapCheck {
    /// No checks.
    None,
    /// The structures that never move while the image is open: header, active L1, refcount
    /// table, snapshot table, bitmap directory.
    Constant,
    /// Constant plus active L2 tables, refcount blocks, snapshot L1 tables, bitmap tables and
    /// bitmap data clusters.
    Cached,
    /// Everything, snapshot L2 tables included. The default: the index makes it cheap.
    #[default]
    All,
}

impl OverlapCheck {
    fn mask(self) -> u16 {
        let constant = bit(MetaKind::Header)
            | bit(MetaKind::ActiveL1)
            | bit(MetaKind::RefcountTable)
            | bit(MetaKind::SnapshotTable)
            | bit(MetaKind::BitmapDirectory);
        let cached = constant
            | bit(MetaKind::ActiveL2)
            | bit(MetaKind::RefcountBlock)
            | bit(MetaKind::InactiveL1)
            | bit(MetaKind::BitmapTable)
            | bit(MetaKind::BitmapData);
        match self {
            OverlapCheck::None => 0,
            OverlapCheck::Constant => constant,
            OverlapCheck::Cached => cached,
            OverlapCheck::All => cached | bit(MetaKind::InactiveL2),
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> OverlapCheck {
        match v {
            0 => OverlapCheck::None,
            1 => OverlapCheck::Constant,
            2 => OverlapCheck::Cached,
            _ => OverlapCheck::All,
        }
    }
}

/// A prevented write: what it would have hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlapHit {
    /// Host offset of the refused write (or allocation).
    pub offset: u64,
    /// Its length in bytes.
    pub size: u64,
    /// The structure it overlaps.
    pub kind: MetaKind,
}

/// log2 of the clusters per region of the negative filter (64: 4 MiB at 64 KiB clusters).
const REGION_BITS: u32 = 6;
/// Words of the negative filter: 65,536 bits, 8 KiB per image.
const FILTER_WORDS: usize = 1024;
/// Bits of the negative filter.
const FILTER_BITS: u64 = FILTER_WORDS as u64 * 64;

/// The filter bit of region `region` (clusters `region << REGION_BITS` on): word index and
/// mask.
fn filter_bit(region: u64) -> (usize, u64) {
    let h = region.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
    ((h >> 6) as usize, 1 << (h & 63))
}

/// The index of metadata clusters plus the check mode; shared by the engine (which
/// maintains it) and the host file (which consults it on every write).
#[derive(Debug)]
pub struct OverlapGuard {
    cluster_bits: AtomicU8,
    mode: AtomicU8,
    /// Sharded: every host write reads it, from any thread; only table allocation writes it.
    clusters: ShardedLock<U64Map<u16>>,
    /// A negative filter in front of the index: regions of 2^[`REGION_BITS`] clusters
    /// hashed to bits, set for every region where a cluster was inserted. A clear bit
    /// answers "no metadata here" without the lock and the hash probe (most data writes:
    /// the guard was a tenth of an allocating write's instructions); a set bit, also one a
    /// removal or a hash collision left, only means the index decides. Cleared by `reset`.
    filter: Box<[AtomicU64]>,
    last_hit: Mutex<Option<OverlapHit>>,
}

impl Default for OverlapGuard {
    fn default() -> Self {
        OverlapGuard {
            cluster_bits: AtomicU8::new(16),
            mode: AtomicU8::new(OverlapCheck::All.to_u8()),
            clusters: ShardedLock::new(U64Map::default()),
            filter: (0..FILTER_WORDS).map(|_| AtomicU64::new(0)).collect(),
            last_hit: Mutex::new(None),
        }
    }
}

impl OverlapGuard {
    /// Forgets every entry and sets the cluster size (log2) for a fresh build of the index.
    pub fn reset(&self, cluster_bits: u32) {
        self.cluster_bits
            .store(cluster_bits as u8, Ordering::Release);
        let mut ix = self.write_index();
        ix.clear();
        for w in self.filter.iter() {
            w.store(0, Ordering::Relaxed);
        }
        drop(ix);
    }

    /// Whether any cluster of `[first, last]` may hold metadata (false: none does).
    #[inline]
    fn may_hold(&self, first: u64, last: u64) -> bool {
        let (r0, r1) = (first >> REGION_BITS, last >> REGION_BITS);
        let bit_set = |r| {
            let (w, m) = filter_bit(r);
            self.filter[w].load(Ordering::Acquire) & m != 0
        };
        if r0 == r1 {
            // Most writes: one region, one bit.
            return bit_set(r0);
        }
        if r1 - r0 >= FILTER_BITS {
            return true;
        }
        (r0..=r1).any(bit_set)
    }

    /// Selects how much is checked.
    pub fn set_mode(&self, mode: OverlapCheck) {
        self.mode.store(mode.to_u8(), Ordering::Release);
    }

    /// The current check mode.
    pub fn mode(&self) -> OverlapCheck {
        OverlapCheck::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Records clusters `[first, first+count)` as (also) holding `kind`.
    pub fn insert(&self, first: u64, count: u64, kind: MetaKind) {
        let mut ix = self.write_index();
        let end = first.saturating_add(count);
        if count > 0 {
            // Set before the index holds them, so no check can skip a registered cluster.
            let (r0, r1) = (first >> REGION_BITS, (end - 1) >> REGION_BITS);
            for r in r0..=r1.min(r0 + FILTER_BITS) {
                let (w, m) = filter_bit(r);
                self.filter[w].fetch_or(m, Ordering::Release);
            }
        }
        for c in first..end {
            *ix.entry(c).or_insert(0) |= bit(kind);
        }
    }

    /// Records that clusters `[first, first+count)` no longer hold `kind`.
    pub fn remove(&self, first: u64, count: u64, kind: MetaKind) {
        let mut ix = self.write_index();
        for c in first..first.saturating_add(count) {
            if let Some(bits) = ix.get_mut(&c) {
                *bits &= !bit(kind);
                if *bits == 0 {
                    ix.remove(&c);
                }
            }
        }
    }

    /// The first structure (in a fixed order) a host cluster belongs to, whatever the mode.
    pub fn kind_of(&self, cluster: u64) -> Option<MetaKind> {
        if !self.may_hold(cluster, cluster) {
            return None;
        }
        let bits = *self.read_index().get(&cluster)?;
        MetaKind::ALL.into_iter().find(|&k| bits & bit(k) != 0)
    }

    /// Refuses a write of `len` bytes at `offset` that would overlap metadata other than
    /// `exempt` (checked per the mode). On a hit, remembers it and returns
    /// [`Error::CorruptionPrevented`] with QEMU's wording.
    // Inlined up to the filter, which answers for most data writes (every host write
    // checks); the index and the error path stay out of line (callgrind: the call's
    // register saves and the mode decoding were most of the check's cost).
    #[inline(always)]
    pub fn check_write(&self, offset: u64, len: u64, exempt: Option<MetaKind>) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cb = u32::from(self.cluster_bits.load(Ordering::Acquire));
        let first = offset >> cb;
        let last = (offset + len - 1) >> cb;
        if !self.may_hold(first, last) {
            return Ok(());
        }
        self.check_index(offset, len, exempt, first, last)
    }

    /// [`Self::check_write`] past the filter: clusters `[first, last]` against the index.
    #[inline(never)]
    fn check_index(
        &self,
        offset: u64,
        len: u64,
        exempt: Option<MetaKind>,
        first: u64,
        last: u64,
    ) -> Result<()> {
        let mask = self.mode().mask() & !exempt.map_or(0, bit);
        if mask == 0 {
            return Ok(());
        }
        let ix = self.read_index();
        if ix.is_empty() {
            return Ok(());
        }
        for c in first..=last {
            if let Some(&bits) = ix.get(&c) {
                if let Some(kind) = MetaKind::ALL
                    .into_iter()
                    .find(|&k| bits & mask & bit(k) != 0)
                {
                    drop(ix);
                    return Err(self.refuse(offset, len, kind, "write on"));
                }
            }
        }
        Ok(())
    }

    /// Records a prevented action on `kind` and builds its error (also used by the
    /// allocator when it finds metadata with refcount 0).
    pub fn refuse(&self, offset: u64, len: u64, kind: MetaKind, action: &str) -> Error {
        *self.last_hit.lock().unwrap_or_else(|p| p.into_inner()) = Some(OverlapHit {
            offset,
            size: len,
            kind,
        });
        Error::new(ErrorKind::CorruptionPrevented, format!(
            "Preventing invalid {action} metadata (overlaps with {}) at host offset {offset:#x}, {len} bytes",
            kind.name()
        ))
        .with_structure(kind, Some(offset))
    }

    /// Takes the last recorded hit (for the event that reports it).
    pub fn take_hit(&self) -> Option<OverlapHit> {
        self.last_hit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn read_index(&self) -> ShardedLockReadGuard<'_, U64Map<u16>> {
        // A panic while holding the lock fences the image; the map itself stays consistent.
        self.clusters.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> ShardedLockWriteGuard<'_, U64Map<u16>> {
        self.clusters.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> OverlapGuard {
        let g = OverlapGuard::default();
        g.reset(16);
        g
    }

    #[test]
    fn aligned_keys_spread_over_the_low_and_high_hash_bits() {
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<U64Hasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for i in 0..1024u64 {
            let h = b.hash_one(i << 16); // 64 KiB-aligned offsets
            low.insert(h & 1023);
            high.insert(h >> 57);
        }
        assert!(low.len() > 600, "low bits collide: {} of 1024", low.len());
        assert!(
            high.len() > 100,
            "control bits collide: {} of 128",
            high.len()
        );
    }

    #[test]
    fn writes_are_refused_on_metadata_except_the_structure_they_update() {
        let g = guard();
        g.insert(0, 1, MetaKind::Header);
        g.insert(3, 2, MetaKind::ActiveL1);
        g.insert(7, 1, MetaKind::ActiveL2);
        let cs = 1u64 << 16;
        assert!(g.check_write(5 * cs, cs, None).is_ok());
        let e = g.check_write(4 * cs + 100, 10, None).expect_err("hit L1");
        assert!(e.to_string().contains("active L1 table"), "{e}");
        assert_eq!(g.take_hit().map(|h| h.kind), Some(MetaKind::ActiveL1));
        assert!(g
            .check_write(3 * cs, 2 * cs, Some(MetaKind::ActiveL1))
            .is_ok());
        assert!(g.check_write(7 * cs, cs, Some(MetaKind::ActiveL1)).is_err());
        // A write spanning several clusters is refused when any of them is metadata.
        assert!(g.check_write(5 * cs, 3 * cs, None).is_err());
        assert!(g.check_write(0, 8, Some(MetaKind::Header)).is_ok());
    }

    #[test]
    fn shared_clusters_keep_their_other_kinds_and_modes_select_what_is_checked() {
        let g = guard();
        let cs = 1u64 << 16;
        g.insert(9, 1, MetaKind::ActiveL2);
        g.insert(9, 1, MetaKind::InactiveL2);
        g.remove(9, 1, MetaKind::ActiveL2);
        assert_eq!(g.kind_of(9), Some(MetaKind::InactiveL2));
        assert!(g.check_write(9 * cs, 1, Some(MetaKind::ActiveL2)).is_err());
        g.set_mode(OverlapCheck::Cached);
        assert!(
            g.check_write(9 * cs, 1, None).is_ok(),
            "cached skips inactive L2"
        );
        g.insert(2, 1, MetaKind::ActiveL2);
        assert!(g.check_write(2 * cs, 1, None).is_err());
        g.set_mode(OverlapCheck::Constant);
        assert!(g.check_write(2 * cs, 1, None).is_ok());
        g.insert(0, 1, MetaKind::Header);
        assert!(g.check_write(0, 1, None).is_err());
        g.set_mode(OverlapCheck::None);
        assert!(g.check_write(0, 1, None).is_ok());
        g.remove(9, 1, MetaKind::InactiveL2);
        assert_eq!(g.kind_of(9), None);
    }

    #[test]
    fn the_filter_never_hides_a_registered_cluster_and_passes_far_ones() {
        let g = guard();
        let cs = 1u64 << 16;
        // Scattered tables, as a large image allocates them; some regions collide in the
        // filter, which must only send the check to the index.
        let tables: Vec<u64> = (0..5000u64).map(|i| i * 8191 + 7).collect();
        for &t in &tables {
            g.insert(t, 1, MetaKind::ActiveL2);
        }
        for &t in &tables {
            assert!(g.check_write(t * cs + 512, 4096, None).is_err());
            assert_eq!(g.kind_of(t), Some(MetaKind::ActiveL2));
            assert!(g.check_write((t + 1) * cs, 4096, None).is_ok());
        }
        // A region nobody registered anything in answers from the filter alone.
        let far = 1u64 << 40;
        assert!(!g.may_hold(far, far + 10));
        assert!(g.check_write(far * cs, cs, None).is_ok());
        // A write spanning more regions than the filter has bits still meets the index.
        assert!(g
            .check_write(0, (FILTER_BITS + 2) << (REGION_BITS + 16), None)
            .is_err());
        g.reset(16);
        assert!(!g.may_hold(7, 7), "reset clears the filter");
        assert!(g.check_write(7 * cs, cs, None).is_ok());
    }
}
