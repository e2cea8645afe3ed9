//! The mutable metadata of an open image (L1, cached L2 tables, refcounts, in-flight
//! allocations, deferred frees) and its crash-safe write-back.
//!
//! Everything here runs under the image's metadata mutex; no guest data I/O happens here.

use super::cache::{CacheConfig, TableCache};
use super::mapview::{L2Table, MapView};
use super::refcount::Refcounts;
use crate::error::{corrupt, Error, ErrorKind, Result};
use crate::format::be::u64_table_bytes;
use crate::format::entry::{decode_l2, encode_l2, EntryError, L1Entry, Mapping};
use crate::format::{Geometry, GuestOffset, Header, HostCluster, HostOffset};
use crate::storage::{HostFile, MetaKind, WriteKind};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// Mutable metadata state, guarded by the image's mutex.
pub struct Meta {
    /// The header as last written.
    pub header: Header,
    /// The active L1 table and the cached L2 tables, shared with lock-free readers.
    view: Arc<MapView>,
    l1_dirty: BTreeSet<u64>,
    /// Cached L2 slices by their host offset (see [`MapView::slice_of`]).
    l2: TableCache<Arc<L2Table>>,
    /// When idle cache entries were last dropped (see [`CacheConfig::clean_interval`]).
    last_clean: Instant,
    /// An idle clean ran and the image has not released its tracker pages since.
    tracker_idle: bool,
    /// Refcount structures and allocator.
    pub rc: Refcounts,
    /// Host byte ranges whose clusters lose one reference once the metadata change that
    /// dropped the reference is durable (start, length).
    pub deferred_frees: Vec<(HostOffset, u64)>,
    /// Next free byte for packing compressed clusters, inside a host cluster this image holds
    /// a reference on; `None` when the next compressed cluster starts a fresh host cluster.
    compressed_tail: Option<HostOffset>,
    geo: Geometry,
    /// The external data file, synced before any table is written back so that data is
    /// durable before the entries that point at it (`None`: data lives in the image file).
    pub data: Option<Arc<HostFile>>,
}

/// Adds the bitmap directory and every bitmap table to the overlap guard's index. A stale
/// extension (autoclear bit clear) is ignored as QEMU ignores it: its clusters are leaks that
/// `check -r leaks` may free and the allocator may then reuse, so guarding them would turn a
/// legitimate reuse into a false corruption. A directory that does not parse is skipped
/// (open already refused it when it matters).
fn index_bitmaps(file: &HostFile, header: &Header) -> Result<()> {
    let Some(ext) = header.bitmaps_in_use() else {
        return Ok(());
    };
    let geo = header.geometry();
    let cb = geo.cluster_bits;
    file.guard().insert(
        ext.directory_offset >> cb,
        geo.clusters_for(ext.directory_size),
        MetaKind::BitmapDirectory,
    );
    // directory_size is bounded by the header parser (64 MiB).
    let mut dir = vec![0u8; ext.directory_size as usize];
    let dir_offset = HostOffset::new(ext.directory_offset);
    file.read_zero_padded(&mut dir, dir_offset, "bitmap directory")?;
    if let Ok(entries) =
        crate::format::bitmap::parse_directory(&dir, ext.nb_bitmaps, &geo, header.size)
    {
        for e in entries {
            file.guard().insert(
                e.table_offset >> cb,
                geo.clusters_for(e.table_size as u64 * 8),
                MetaKind::BitmapTable,
            );
            index_bitmap_data(file, &geo, &e)?;
        }
    }
    Ok(())
}

/// Adds the data clusters of one bitmap to the overlap guard's index. The table is bounded by
/// the directory parser (at most 512 MiB of bitmap data, so at most 1 Mi entries); entries
/// that do not decode point at nothing the guard should hold.
fn index_bitmap_data(
    file: &HostFile,
    geo: &Geometry,
    e: &crate::format::bitmap::BitmapEntry,
) -> Result<()> {
    use crate::format::bitmap::TableEntry;
    let mut raw = vec![0u8; e.table_size as usize * 8];
    file.read_zero_padded(&mut raw, HostOffset::new(e.table_offset), "bitmap table")?;
    for w in crate::format::be::u64_table(&raw) {
        if let Ok(TableEntry::Data(off)) = TableEntry::decode(w, geo) {
            file.guard()
                .insert(off >> geo.cluster_bits, 1, MetaKind::BitmapData);
        }
    }
    Ok(())
}

/// Reads the active L1 table; its length must be the one the lock-free view was made for.
fn read_active_l1(file: &HostFile, header: &Header, view: &MapView) -> Result<Vec<u64>> {
    // The header parser bounded the L1 table to 32 MiB.
    let mut raw = vec![0u8; header.l1_size as usize * 8];
    file.read_zero_padded(
        &mut raw,
        HostOffset::new(header.l1_table_offset),
        "L1 table",
    )?;
    let l1 = crate::format::be::u64_table(&raw);
    if l1.len() != view.l1_len() {
        return corrupt!(
            "the L1 table has {} entries, not the {} it had when the image was opened",
            l1.len(),
            view.l1_len()
        );
    }
    Ok(l1)
}

/// Adds the header, the active L1 table and its L2 tables to the overlap guard's index. An
/// unaligned entry does not fail the open (QEMU opens the image too): the requests that go
/// through it fail in `l2_offset`.
fn index_active_tables(file: &HostFile, header: &Header, l1: &[u64]) {
    let geo = header.geometry();
    let ix = file.guard();
    ix.insert(0, 1, MetaKind::Header);
    let l1_offset = HostOffset::new(header.l1_table_offset);
    ix.insert(
        l1_offset.cluster(&geo).0,
        geo.clusters_for(l1.len() as u64 * 8),
        MetaKind::ActiveL1,
    );
    for &e in l1 {
        let off = L1Entry(e).l2_offset();
        if off != HostOffset::ZERO && off.is_cluster_aligned(&geo) {
            ix.insert(off.cluster(&geo).0, 1, MetaKind::ActiveL2);
        }
    }
}

/// Adds a snapshot's L1 table and L2 tables to the overlap guard's index: nothing may write
/// there while the snapshot exists. A damaged entry's L1 range is guarded like QEMU guards it,
/// but capped at the largest valid L1 so that the index stays bounded; its L2 tables are not
/// read (QEMU validates a snapshot L1 before it reads it too).
pub(super) fn index_snapshot(
    file: &HostFile,
    geo: &Geometry,
    s: &crate::format::snapshot::Snapshot,
) -> Result<()> {
    let l1_bytes = (u64::from(s.l1_size) * 8).min(crate::format::header::MAX_L1_BYTES);
    let snap_l1 = HostOffset::new(s.l1_table_offset);
    file.guard().insert(
        snap_l1.cluster(geo).0,
        geo.clusters_for(l1_bytes),
        MetaKind::InactiveL1,
    );
    if s.l1_problem(geo.cluster_size()).is_some() {
        return Ok(());
    }
    // Bounded by the check above.
    let mut raw = vec![0u8; l1_bytes as usize];
    file.read_zero_padded(&mut raw, snap_l1, "snapshot L1 table")?;
    for e in crate::format::be::u64_table(&raw) {
        let off = L1Entry(e).l2_offset();
        if off != HostOffset::ZERO && off.is_cluster_aligned(geo) {
            file.guard()
                .insert(off.cluster(geo).0, 1, MetaKind::InactiveL2);
        }
    }
    Ok(())
}

/// Where the refcount table is read from. A table at offset 0 overlaps the header, whose
/// bytes are no refcount table: an all-zero table is loaded instead (read from past the end of
/// the file), so reads and in-place overwrites work and every allocation is refused as a
/// corruption, as QEMU's first allocating write is.
fn refcount_table_as_loaded(file: &HostFile, header: &Header) -> Result<HostOffset> {
    if header.refcount_table_offset != 0 {
        return Ok(HostOffset::new(header.refcount_table_offset));
    }
    Ok(HostOffset::new(file.len()?).align_up(header.cluster_size()))
}

/// Where a guest cluster's L2 entry lives.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Host offset of the L2 table (zero = no table).
    pub table: HostOffset,
    /// Entry index in the table.
    pub index: usize,
}

impl Meta {
    /// Loads the L1 and refcount tables of a validated header. The caches are sized as the
    /// view's [`CacheConfig`] says and start empty.
    pub fn load(
        file: &HostFile,
        header: Header,
        snapshots: &[crate::format::snapshot::Snapshot],
        snapshot_table_len: u64,
        view: Arc<MapView>,
    ) -> Result<Meta> {
        let geo = header.geometry();
        let cache: CacheConfig = view.cache();
        // The overlap guard's index is rebuilt from scratch along with the tables.
        file.guard().reset(geo.cluster_bits);
        let l1 = read_active_l1(file, &header, &view)?;
        let rc = Refcounts::load_sliced(
            file,
            geo,
            refcount_table_as_loaded(file, &header)?,
            header.refcount_table_clusters,
            cache.refcount_slices,
            cache.slice_bytes,
        )?;
        index_active_tables(file, &header, &l1);
        if snapshot_table_len > 0 {
            let table = HostOffset::new(header.snapshots_offset);
            file.guard().insert(
                table.cluster(&geo).0,
                geo.clusters_for(snapshot_table_len),
                MetaKind::SnapshotTable,
            );
        }
        for s in snapshots {
            index_snapshot(file, &geo, s)?;
        }
        index_bitmaps(file, &header)?;
        view.reset(&l1);
        Ok(Meta {
            header,
            view,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(cache.l2_slices),
            last_clean: Instant::now(),
            tracker_idle: false,
            rc,
            deferred_frees: Vec::new(),
            compressed_tail: None,
            geo,
            data: None,
        })
    }

    /// The L2 table offset an L1 entry points at, validated (zero: no table).
    fn l2_offset(&self, l1_index: usize) -> Result<HostOffset> {
        let Some(e) = self.view.l1_entry(l1_index) else {
            return Ok(HostOffset::ZERO);
        };
        let off = L1Entry(e).l2_offset();
        if off != HostOffset::ZERO && !off.is_cluster_aligned(&self.geo) {
            return corrupt!("L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})");
        }
        Ok(off)
    }

    /// Makes room for one more L2 slice: evicts a clean one (second chance for slices that
    /// lock-free readers use) and withdraws it from the view, writing dirty ones back first
    /// when all are dirty. Returns the evicted slice, for its memory to be reused.
    fn make_room_l2(&mut self, file: &HostFile) -> Result<Option<Arc<L2Table>>> {
        let evicted = self.make_room_l2_published(file)?;
        if let Some(t) = &evicted {
            self.view.unpublish(t);
        }
        Ok(evicted)
    }

    /// [`Self::make_room_l2`], but the evicted slice (out of the cache, clean) is left
    /// published: the caller withdraws it, before it next releases the metadata mutex.
    fn make_room_l2_published(&mut self, file: &HostFile) -> Result<Option<Arc<L2Table>>> {
        // Bound: two rounds. A successful write-back leaves every cached table clean, and a
        // clean table can always be evicted.
        for _ in 0..2 {
            if !self.l2.is_full() {
                return Ok(None);
            }
            match self.evict_l2() {
                Some(t) => return Ok(Some(t)),
                None => self.writeback(file)?,
            }
        }
        if self.l2.is_full() {
            return match self.evict_l2() {
                Some(t) => Ok(Some(t)),
                None => Err(Error::new(
                    ErrorKind::NoMemory,
                    "the L2 table cache cannot make room",
                )),
            };
        }
        Ok(None)
    }

    /// Evicts a clean L2 slice by CLOCK (still published: the caller withdraws it from the
    /// view); None when all are dirty.
    fn evict_l2(&mut self) -> Option<Arc<L2Table>> {
        let (_, t) = self.l2.evict_clean_second_chance(|t| t.take_referenced())?;
        Some(t)
    }

    /// Drops the cached slices of the table at `table` without writing them (the table is
    /// gone, or its cluster holds a new table).
    fn forget_l2_table(&mut self, table: HostOffset) {
        let geo = self.geo;
        let slices: Vec<HostOffset> = self.view.slices_of(&geo, table).collect();
        for slice in slices {
            if let Some(t) = self.l2.remove(slice) {
                self.view.unpublish(&t);
            }
        }
    }

    /// Caches a slice for this (mutex-holding) side only; [`Self::publish_l2`] shows it to
    /// lock-free readers once an L1 index for it is known.
    fn cache_l2(&mut self, off: HostOffset, table: Arc<L2Table>, dirty: bool) {
        self.l2.insert(off, table, dirty);
    }

    /// Publishes the cached slice `slice` (slice index `s` of the table under L1 entry `l1`,
    /// which points at that table now) for lock-free readers, unless it is already.
    fn publish_l2(&mut self, l1: usize, s: usize, slice: HostOffset) {
        if let Some(t) = self.l2.peek(slice) {
            if t.home() != Some((l1, s)) {
                self.view.publish(l1, s, t);
            }
        }
    }

    /// Makes sure the L2 slice holding entry `index` of the table at `table` is cached
    /// (evicting, after write-back if needed), and returns its key and the entry's index in
    /// it.
    fn ensure_l2(
        &mut self,
        file: &HostFile,
        table: HostOffset,
        index: usize,
    ) -> Result<(HostOffset, usize)> {
        let (slice, i) = self.view.slice_of(table, index);
        if self.l2.contains(slice) {
            return Ok((slice, i));
        }
        self.clean_if_due();
        self.make_room_l2(file)?;
        // A table past the end of the file reads as zeros (unallocated), as in QEMU; `check`
        // reports the entry.
        let t = L2Table::read_zero_padded(file, slice, self.view.slab())?;
        self.cache_l2(slice, t, false);
        Ok((slice, i))
    }

    /// The cached slice at `slice` (ensured just before).
    fn l2_slice(&mut self, slice: HostOffset) -> Result<&Arc<L2Table>> {
        self.l2
            .get(slice)
            .ok_or_else(|| Error::corrupt("L2 table vanished from cache"))
    }

    /// The words of the whole L2 table at `table` (two per entry with extended L2), read
    /// slice by slice through the cache (so dirty slices count).
    fn l2_words(&mut self, file: &HostFile, table: HostOffset) -> Result<Vec<u64>> {
        let mut words = Vec::with_capacity(self.geo.u64_per_cluster() as usize);
        let per_slice = (self.view.cache().slice_bytes / self.geo.l2_entry_size()) as usize;
        for first in (0..self.geo.l2_entries() as usize).step_by(per_slice) {
            let (slice, _) = self.ensure_l2(file, table, first)?;
            words.extend(self.l2_slice(slice)?.to_vec());
        }
        Ok(words)
    }

    /// Lets the L2 cache grow to the default cover of an image of `virtual_size` (a resize),
    /// unless the caller chose its size.
    pub fn fit_l2_cache(&mut self, virtual_size: u64) {
        let c = self.view.cache();
        let n = c.cover_slices(&self.geo, virtual_size);
        if c.l2_cover && n > c.l2_slices {
            self.l2.grow_capacity(n);
            self.view.grow_l2_slices(n);
        }
    }

    /// Drops idle cache entries when the clean interval has passed (QEMU's
    /// cache-clean-interval): called on cache misses and flushes, and every few hundred
    /// requests (see `Image::idle_tick`), so an idle handle gives its cache memory back at its
    /// next request and no timer thread is needed. Returns whether it cleaned.
    pub fn clean_if_due(&mut self) -> bool {
        let Some(every) = self.view.cache().clean_interval else {
            return false;
        };
        if self.last_clean.elapsed() < every {
            return false;
        }
        self.last_clean = Instant::now();
        self.tracker_idle = true;
        for t in self.l2.clean_idle(|t| t.take_referenced()) {
            self.view.unpublish(&t);
        }
        self.rc.clean_idle();
        true
    }

    /// Whether the L2 slice at `slice` is cached (tests).
    #[cfg(all(test, not(loom)))]
    pub fn l2_cached(&self, slice: HostOffset) -> bool {
        self.l2.contains(slice)
    }

    /// Whether an idle clean ran since the last call (the image then releases the in-flight
    /// tracker's idle pages too).
    pub fn take_tracker_idle(&mut self) -> bool {
        std::mem::take(&mut self.tracker_idle)
    }

    /// Installs and publishes the L2 slice `t` at `key` that a reader read from disk and
    /// filled without the mutex (slice index `s` of the table under L1 entry `l1`, which the
    /// caller checked still points at it), unless the on-disk tables changed since
    /// `generation` (the read may be stale); a slice cached already is published instead.
    /// Returns whether the slice is cached now, and a slice nobody needs any more (the one
    /// evicted to make room, or `t` when it was not installed) for the caller to refill at
    /// its next miss. The mutex is held only to evict and link: with several threads
    /// missing at once it is the point they queue on.
    pub fn install_l2(
        &mut self,
        file: &HostFile,
        at: (usize, usize),
        key: HostOffset,
        t: Arc<L2Table>,
        generation: u64,
    ) -> Result<(bool, Option<Arc<L2Table>>)> {
        let (l1, s) = at;
        if self.l2.contains(key) {
            self.publish_l2(l1, s, key);
            return Ok((true, Some(t)));
        }
        if self.view.generation() != generation {
            return Ok((false, Some(t)));
        }
        // A full cache with a clean slice to evict (the rule under a steady miss load): the
        // new slice takes its slot, and the directory swaps them under one write lock.
        // Until then readers may still find the evicted one: it is clean and nothing
        // changes it while the mutex is held.
        if self.l2.is_full() {
            let new = Arc::clone(&t);
            if let Ok((_, evicted)) =
                self.l2
                    .replace_clean_second_chance(|old| old.take_referenced(), key, new)
            {
                self.view.replace(Some(&evicted), l1, s, &t);
                return Ok((true, Some(evicted)));
            }
        }
        // Otherwise (room left, or only dirty slices: one is written back first) the evicted
        // slice, if any, leaves the directory together with the new one's publication.
        let evicted = self.make_room_l2_published(file)?;
        if self.view.generation() != generation {
            // make_room_l2 may have written tables back.
            if let Some(e) = &evicted {
                self.view.unpublish(e);
            }
            return Ok((false, Some(t)));
        }
        self.view.replace(evicted.as_ref(), l1, s, &t);
        self.cache_l2(key, t, false);
        Ok((true, evicted))
    }

    /// The L2 slot of a guest offset (table zero when the L1 entry is empty).
    pub fn slot(&self, guest: GuestOffset) -> Result<Slot> {
        Ok(Slot {
            table: self.l2_offset(guest.l1_index(&self.geo))?,
            index: guest.l2_index(&self.geo),
        })
    }

    /// Whether the cluster holding `guest` can be looked up and then linked with no disk
    /// I/O: its L2 table is this image's own (COPIED: linking allocates or copies no table)
    /// and the slice holding its entry is cached. The ring path of the asynchronous queue
    /// plans allocating writes only then, on a thread that must not wait for the disk.
    pub fn maps_from_cache(&self, guest: GuestOffset) -> bool {
        let l1 = guest.l1_index(&self.geo);
        let Some(e) = self.view.l1_entry(l1) else {
            return false;
        };
        let table = match self.l2_offset(l1) {
            Ok(t) if t != HostOffset::ZERO && L1Entry(e).copied() => t,
            _ => return false,
        };
        let (slice, _) = self.view.slice_of(table, guest.l2_index(&self.geo));
        self.l2.contains(slice)
    }

    /// Decoded mapping of the guest cluster containing `guest`.
    /// The slice it was found in is published for lock-free readers (so later reads and
    /// overwrites of the cluster need no mutex).
    pub fn lookup(&mut self, file: &HostFile, guest: GuestOffset) -> Result<Mapping> {
        let slot = self.slot(guest)?;
        if slot.table == HostOffset::ZERO {
            return Ok(Mapping::Unallocated { zero: 0 });
        }
        let ext = self.geo.extended_l2;
        let (slice, i) = self.ensure_l2(file, slot.table, slot.index)?;
        let (w0, w1) = self.l2_slice(slice)?.entry(i, ext);
        let s = self.view.slice_index(slot.index);
        self.publish_l2(guest.l1_index(&self.geo), s, slice);
        self.decode(w0, w1, slot)
    }

    fn decode(&self, w0: u64, w1: u64, slot: Slot) -> Result<Mapping> {
        decode_l2(&self.geo, self.header.version, w0, w1).map_err(|e| {
            let msg = match e {
                EntryError::Unaligned(off) => format!(
                    "Cluster allocation offset {off:#x} unaligned (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                ),
                EntryError::ZeroInV2 => format!(
                    "Zero cluster entry found in pre-v3 image (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                ),
                EntryError::InvalidBitmap => format!(
                    "Invalid cluster entry found (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                ),
                EntryError::CompressedWithDataFile => format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                ),
            };
            Error::corrupt(msg)
        })
    }

    /// Returns an L2 table for `l1_index` that this image owns exclusively: allocates an
    /// empty one when there is none, copies a table shared with a snapshot. The old shared
    /// table loses its reference once the new L1 entry is durable.
    pub fn l2_for_write(&mut self, file: &HostFile, l1_index: usize) -> Result<HostOffset> {
        let e = self
            .view
            .l1_entry(l1_index)
            .ok_or_else(|| Error::invalid(format!("L1 index {l1_index} out of range")))?;
        let old = self.l2_offset(l1_index)?;
        if old != HostOffset::ZERO && L1Entry(e).copied() {
            return Ok(old);
        }
        let words = self.geo.u64_per_cluster() as usize;
        let table = if old == HostOffset::ZERO {
            vec![0u64; words]
        } else {
            self.l2_words(file, old)?
        };
        let new = self.rc.alloc(file, 1)?;
        let geo = self.geo;
        file.guard()
            .insert(new.cluster(&geo).0, 1, MetaKind::ActiveL2);
        // The new table is written whole now, like a new data cluster: nothing on disk
        // points at it until the L1 entry below is written back (after this write and the
        // refcount that counts it), so a crash in between leaves at worst a leak. Its slices
        // are then read back (from the page cache) as they are needed, so a table never has
        // to fit the cache whole.
        if let Err(e) = file.write(&u64_table_bytes(&table), new, WriteKind::L2) {
            file.guard()
                .remove(new.cluster(&geo).0, 1, MetaKind::ActiveL2);
            let _ = self.rc.update(file, new.cluster(&geo), -1);
            return Err(e);
        }
        // Slices of this offset read without the mutex before now are stale, and so are
        // cached slices of a table that lived here before its cluster was freed and reused.
        self.view.bump_generation();
        self.forget_l2_table(new);
        if old != HostOffset::ZERO {
            // The old table stays a snapshot's (inactive) L2 table, if it is one.
            file.guard()
                .remove(old.cluster(&geo).0, 1, MetaKind::ActiveL2);
        }
        self.view.set_l1(l1_index, L1Entry::new(new, true).0);
        self.l1_dirty
            .insert(l1_index as u64 / geo.u64_per_cluster());
        if old != HostOffset::ZERO {
            self.deferred_frees.push((old, self.geo.cluster_size()));
        }
        Ok(new)
    }

    /// Writes a mapping into an owned L2 table (from [`Self::l2_for_write`]).
    pub fn set_mapping(
        &mut self,
        file: &HostFile,
        table: HostOffset,
        index: usize,
        m: Mapping,
    ) -> Result<()> {
        let (slice, i) = self.ensure_l2(file, table, index)?;
        let (w0, w1) = encode_l2(&self.geo, m);
        let ext = self.geo.extended_l2;
        let t = self
            .l2
            .get_mut(slice)
            .ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        t.set_entry(i, ext, w0, w1);
        Ok(())
    }

    /// Unhooks the L2 table under L1 entry `l1_index` from the active L1 table (resize):
    /// the table and every cluster it maps lose this image's reference once the cleared L1
    /// entry is durable (a table or cluster shared with a snapshot stays the snapshot's).
    pub fn drop_l2_table(&mut self, file: &HostFile, l1_index: usize) -> Result<()> {
        let off = self.l2_offset(l1_index)?;
        if off == HostOffset::ZERO {
            return Ok(());
        }
        let words = self.l2_words(file, off)?;
        let ext = self.geo.extended_l2;
        let mut mappings = Vec::new();
        for index in 0..self.geo.l2_entries() as usize {
            let (w0, w1) = if ext {
                (words[2 * index], words[2 * index + 1])
            } else {
                (words[index], 0)
            };
            mappings.push(self.decode(w0, w1, Slot { table: off, index })?);
        }
        self.view.set_l1(l1_index, 0);
        self.l1_dirty
            .insert(l1_index as u64 / self.geo.u64_per_cluster());
        // The table is no longer written back: its clusters are released below instead.
        let geo = self.geo;
        self.forget_l2_table(off);
        file.guard()
            .remove(off.cluster(&geo).0, 1, MetaKind::ActiveL2);
        for mapping in mappings {
            self.release(mapping);
        }
        self.deferred_frees.push((off, geo.cluster_size()));
        Ok(())
    }

    /// Queues the release of every host cluster a mapping references.
    pub fn release(&mut self, m: Mapping) {
        match m {
            // Clusters of an external data file have no refcounts.
            Mapping::Data { .. } | Mapping::Zero { .. } if self.geo.external_data => {}
            Mapping::Data { host, .. } | Mapping::Zero { host, .. } if host != HostOffset::ZERO => {
                self.deferred_frees.push((host, self.geo.cluster_size()));
            }
            Mapping::Compressed { host, csize } => {
                // The descriptor counts whole 512-byte sectors from the one holding `host`.
                let start = HostOffset::new(host.get() & !511);
                self.deferred_frees
                    .push((start, (host + csize).since(start)));
            }
            _ => {}
        }
    }

    /// Writes back all dirty metadata in crash-safe order, syncing between the stages, then
    /// applies the deferred frees (now safe) and writes those back too.
    ///
    /// Order: (data and) refcount blocks, sync; refcount table, sync; L2 tables, sync;
    /// L1 table, sync. Refcounts are durable before any table that uses the clusters, data
    /// before the L2 entries that point at it, new tables before the pointers to them.
    pub fn writeback(&mut self, file: &HostFile) -> Result<()> {
        self.clean_if_due();
        // With lazy refcounts and the dirty bit on disk, a crash is repaired from the tables,
        // so the stages need no syncs between them: one at the end makes the flush durable.
        // Lazy refcounts drop only the refcount orderings: guest data (and tables written
        // whole at allocation) must still be durable before the L2 or L1 entries that point
        // at them, or a crash leaves entries pointing at garbage or past the end of the file.
        let lazy = self.rc.lazy_dirty();
        let stage_done = |file: &HostFile| if lazy { Ok(()) } else { file.sync() };
        if let Some(d) = &self.data {
            d.sync()?;
        }
        let pointers_dirty = self.l2.has_dirty() || !self.l1_dirty.is_empty();
        self.rc.write_dirty_blocks(file)?;
        if !lazy || pointers_dirty {
            file.sync()?;
        }
        if self.rc.write_dirty_table(file)? {
            stage_done(file)?;
        }
        let l1_dirty = !self.l1_dirty.is_empty();
        if self.write_dirty_l2(file)? && (!lazy || l1_dirty) {
            file.sync()?;
        }
        if self.write_dirty_l1(file)? {
            stage_done(file)?;
        }
        if lazy {
            // Everything above becomes durable at once; the deferred frees below must not
            // run before the tables that dropped those references are on disk.
            file.sync()?;
        }
        self.apply_deferred_frees(file)?;
        if self.rc.punches_freed() {
            // discard=unmap: the frees just made durable are punched as soon as no request
            // can touch them, rather than at the next allocation.
            self.rc.release_drained(file);
        }
        Ok(())
    }

    /// Writes every dirty L2 slice; true when there was any.
    fn write_dirty_l2(&mut self, file: &HostFile) -> Result<bool> {
        let dirty = self.l2.dirty_offsets();
        for off in &dirty {
            if let Some(t) = self.l2.peek(*off) {
                file.write(&t.to_disk_bytes(), *off, WriteKind::L2)?;
            }
            self.l2.mark_clean(*off);
        }
        if !dirty.is_empty() {
            // Tables read from disk without the mutex before this point may be stale.
            self.view.bump_generation();
        }
        Ok(!dirty.is_empty())
    }

    /// Writes every dirty cluster of the active L1 table; true when there was any. Indices
    /// leave the dirty set only once written: a failed write-back is retried.
    fn write_dirty_l1(&mut self, file: &HostFile) -> Result<bool> {
        let any = !self.l1_dirty.is_empty();
        let per = self.geo.u64_per_cluster() as usize;
        let cs = self.geo.cluster_size();
        while let Some(&idx) = self.l1_dirty.first() {
            let start = idx as usize * per;
            let end = (start + per).min(self.view.l1_len());
            let bytes = u64_table_bytes(&self.view.l1_words(start, end));
            let at = HostOffset::new(self.header.l1_table_offset) + idx * cs;
            file.write(&bytes, at, WriteKind::L1)?;
            self.l1_dirty.remove(&idx);
        }
        Ok(any)
    }

    /// Drops the references that durable metadata changes gave up, and writes the refcount
    /// blocks back. A range leaves the queue only once all its decrements are applied; an
    /// error keeps the rest queued (at worst a leak, never a double free).
    fn apply_deferred_frees(&mut self, file: &HostFile) -> Result<()> {
        if self.deferred_frees.is_empty() {
            return Ok(());
        }
        // The packing cluster may lose its last reference below and be reused as anything:
        // never pack into it again.
        self.compressed_tail = None;
        let geo = self.geo;
        while let Some(&(start, len)) = self.deferred_frees.last() {
            let first = start.cluster(&geo).0;
            let last = (start + (len - 1)).cluster(&geo).0;
            for c in (first..=last).map(HostCluster) {
                if let Err(e) = self.rc.retire(file, c) {
                    // Clusters before `c` were released: keep only the remainder.
                    let rest = c.offset(&geo);
                    if let Some(r) = self.deferred_frees.last_mut() {
                        *r = (rest, (start + len).since(rest));
                    }
                    return Err(e);
                }
            }
            self.deferred_frees.pop();
        }
        self.rc.write_dirty_blocks(file)?;
        // Lazy: the dirty bit covers these until the image is marked clean.
        if self.rc.lazy_dirty() {
            Ok(())
        } else {
            file.sync()
        }
    }

    /// Turns lazy refcounts on when the header asks for them (for writable images).
    pub fn enable_lazy_refcounts(&mut self) {
        if self.header.compatible_features & crate::format::header::COMPAT_LAZY_REFCOUNTS != 0
            && self.header.incompatible_features & crate::format::header::INCOMPAT_DIRTY == 0
        {
            self.rc
                .enable_lazy(self.header.version, self.header.incompatible_features);
        }
    }

    /// Writes everything back and, on a lazy-refcounts image, clears the dirty bit once the
    /// refcounts are durable (clean close, reopen read-only). A plain flush leaves it set,
    /// like QEMU.
    pub fn writeback_and_mark_clean(&mut self, file: &HostFile) -> Result<()> {
        self.writeback(file)?;
        if let Some(word) = self.rc.lazy_clean_word() {
            file.sync()?;
            let update = crate::format::header::layout::INCOMPATIBLE_FEATURES
                .update(self.header.version, word)?;
            file.write_header_fields(&update)?;
            file.sync()?;
            self.header.incompatible_features = word;
            self.rc.lazy_clean_done();
        }
        Ok(())
    }

    /// Whether the image is dirty on disk (lazy refcounts not yet written back).
    pub fn dirty_on_disk(&self) -> bool {
        self.rc.lazy_dirty()
            || self.header.incompatible_features & crate::format::header::INCOMPAT_DIRTY != 0
    }

    /// Reserves `len` bytes (at most one cluster) for compressed data and returns their host
    /// offset, packed byte-aligned right after the previous compressed cluster as QEMU packs
    /// them. When the bytes do not fit in the rest of the packing cluster, the next cluster
    /// is allocated: if it is the one right after, the data spans both (no hole left behind),
    /// otherwise it starts at the new cluster. Every host cluster the bytes touch gains one
    /// reference (the allocation gives a new cluster its first one).
    pub fn alloc_compressed_bytes(&mut self, file: &HostFile, len: u64) -> Result<HostOffset> {
        let cs = self.geo.cluster_size();
        if len == 0 || len > cs {
            return Err(Error::invalid(format!(
                "compressed cluster of {len} bytes does not fit a {cs}-byte cluster"
            )));
        }
        let tail = match self.compressed_tail {
            Some(t) if self.rc.get(file, t.cluster(&self.geo))? < self.geo.refcount_max() => {
                Some(t)
            }
            _ => None,
        };
        let host = match tail {
            Some(t) if len <= cs - t.in_cluster(&self.geo) => {
                self.rc.update(file, t.cluster(&self.geo), 1)?;
                t
            }
            Some(t) => {
                let next = self.rc.alloc(file, 1)?;
                let contiguous = next.cluster(&self.geo).0 == t.cluster(&self.geo).0 + 1;
                if contiguous {
                    // The new cluster's reference came with the allocation.
                    if let Err(e) = self.rc.update(file, t.cluster(&self.geo), 1) {
                        let _ = self.rc.update(file, next.cluster(&self.geo), -1);
                        return Err(e);
                    }
                    t
                } else {
                    next
                }
            }
            None => self.rc.alloc(file, 1)?,
        };
        let end = host + len;
        self.compressed_tail = (end.in_cluster(&self.geo) != 0).then_some(end);
        Ok(host)
    }

    /// Drops the references a failed compressed write took on the clusters that
    /// `[host, host+len)` touches. Best effort: a failure here leaves a leak, never a
    /// corruption.
    pub fn give_back_compressed_bytes(&mut self, file: &HostFile, host: HostOffset, len: u64) {
        // The packing cursor may sit right after these bytes: never pack there again.
        self.compressed_tail = None;
        let first = host.cluster(&self.geo).0;
        let last = (host + (len.max(1) - 1)).cluster(&self.geo).0;
        for c in first..=last {
            let _ = self.rc.update(file, HostCluster(c), -1);
        }
    }

    /// Whether anything is waiting to be written back.
    pub fn is_dirty(&self) -> bool {
        self.rc.lazy_dirty()
            || self.rc.has_dirty_blocks()
            || self.rc.has_dirty_table()
            || self.l2.has_dirty()
            || !self.l1_dirty.is_empty()
            || !self.deferred_frees.is_empty()
    }

    // Internal snapshots (engine::snapshot) edit the active tree's COPIED flags and replace
    // the active L1 table; these are their only ways in.

    /// The words of the L2 table at `off` (two per entry with extended L2), through the
    /// cache.
    pub fn l2_table(&mut self, file: &HostFile, off: HostOffset) -> Result<Vec<u64>> {
        self.l2_words(file, off)
    }

    /// Replaces the descriptor word of entry `i` of the L2 table at `off` (a flag change),
    /// keeping its subcluster bitmap; the table is written back with the next write-back.
    pub fn set_l2_descriptor(
        &mut self,
        file: &HostFile,
        off: HostOffset,
        i: usize,
        w0: u64,
    ) -> Result<()> {
        let (slice, i) = self.ensure_l2(file, off, i)?;
        let ext = self.geo.extended_l2;
        let t = self
            .l2
            .get_mut(slice)
            .ok_or_else(|| Error::corrupt("L2 table vanished from cache"))?;
        let (_, w1) = t.entry(i, ext);
        t.set_entry(i, ext, w0, w1);
        Ok(())
    }

    /// Sets active L1 entry `i` (a flag change); written back with the next write-back.
    pub fn set_l1_entry(&mut self, i: usize, v: u64) {
        self.view.set_l1(i, v);
        self.l1_dirty.insert(i as u64 / self.geo.u64_per_cluster());
    }

    /// Switches to an active L1 table already durable at `offset` with the header pointing
    /// at it. Call after a write-back (every cached table clean): drops the cached L2 tables
    /// and loads `l1` into the lock-free view, whose generation bump keeps readers from
    /// installing a table they read under the old mapping.
    pub fn replace_active_l1(&mut self, offset: HostOffset, l1: &[u64]) {
        self.l2.clear();
        self.l1_dirty.clear();
        self.compressed_tail = None;
        self.header.l1_table_offset = offset.get();
        self.view.reset(l1);
    }
}
