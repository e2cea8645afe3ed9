//! Live refcount structures: lookups, increments and decrements through a block cache, cluster
//! allocation, and growth of the refcount table.
//!
//! Crash safety rules kept here: a new refcount block describes itself and is written before
//! the table entry that points at it (the caller's write-back order); a grown refcount table is
//! written and synced before the header points at it, and the old table is freed only after.

use super::cache::TableCache;
use crate::error::ErrorKind;
use crate::error::{corrupt, Error, Result};
use crate::format::be::{u64_table, u64_table_bytes};
use crate::format::entry::RefcountTableEntry;
use crate::format::header::{layout, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::format::refcount;
use crate::format::{Geometry, HostCluster, HostOffset};
use crate::storage::{HostFile, MetaKind, WriteKind};
use std::collections::{BTreeSet, HashSet, VecDeque};

/// The refcount table and a cache of refcount blocks.
pub struct Refcounts {
    geo: Geometry,
    /// Refcount table entries (block offsets, reserved bits kept).
    table: Vec<u64>,
    table_offset: HostOffset,
    /// Indices of refcount-table clusters that differ from disk.
    table_dirty: BTreeSet<u64>,
    /// Cached slices of refcount blocks, keyed by the slice's host offset.
    blocks: TableCache<Vec<u8>>,
    /// Bytes per cached slice (a power of two, at most a cluster).
    slice_bytes: u64,
    /// Every cluster below this index has been examined by the allocator: the free ones are
    /// in `free_set` (or were allocated since).
    cursor: u64,
    /// Known free clusters below `cursor`: holes skipped by the scan and clusters whose
    /// refcount dropped to zero.
    free_set: BTreeSet<u64>,
    /// Clusters freed while requests that may still touch them run (see
    /// [`crate::storage::Grace`]): tagged with the epoch of the free, in order.
    quarantine: VecDeque<(u64, u64)>,
    /// The clusters in `quarantine`: free on disk, but not to be handed out yet.
    held: HashSet<u64>,
    /// Lazy refcounts (compatible bit 0) on a writable image.
    lazy: Lazy,
    /// The image version while `lazy` is on (the dirty bit's header word exists there).
    lazy_version: u32,
    /// discard=unmap: punch the host range of every cluster leaving quarantine.
    punch_freed: bool,
}

/// Where a lazy-refcounts image stands with its dirty bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lazy {
    /// Refcounts are written back in crash-safe order (not lazy, or a read-only image).
    Off,
    /// Lazy, and the on-disk header is clean: the next refcount change must first set the
    /// dirty bit durably. Holds the on-disk incompatible-features word.
    Clean { incompatible: u64 },
    /// The dirty bit is set on disk: refcount write-back needs no ordering until
    /// [`Refcounts::lazy_clean_done`].
    Dirty { incompatible: u64 },
}

impl Refcounts {
    /// Loads the refcount table described by the header, caching up to `cache_tables` whole
    /// blocks.
    pub fn load(
        file: &HostFile,
        geo: Geometry,
        table_offset: HostOffset,
        table_clusters: u32,
        cache_tables: usize,
    ) -> Result<Refcounts> {
        let cs = geo.cluster_size();
        Self::load_sliced(file, geo, table_offset, table_clusters, cache_tables, cs)
    }

    /// Loads the refcount table described by the header, caching up to `slices` slices of
    /// `slice_bytes` (a power of two from 512 up to the cluster size; clamped into it).
    pub fn load_sliced(
        file: &HostFile,
        geo: Geometry,
        table_offset: HostOffset,
        table_clusters: u32,
        slices: usize,
        slice_bytes: u64,
    ) -> Result<Refcounts> {
        let bytes = (table_clusters as u64) << geo.cluster_bits;
        let mut raw = vec![0u8; bytes as usize];
        file.read_zero_padded(&mut raw, table_offset, "refcount table")?;
        let rc = Refcounts {
            geo,
            table: u64_table(&raw),
            table_offset,
            table_dirty: BTreeSet::new(),
            blocks: TableCache::new(slices),
            slice_bytes: slice_bytes
                .clamp(super::cache::MIN_SLICE_BYTES, geo.cluster_size())
                .next_power_of_two()
                .min(geo.cluster_size()),
            cursor: 1,
            free_set: BTreeSet::new(),
            quarantine: VecDeque::new(),
            held: HashSet::new(),
            lazy: Lazy::Off,
            lazy_version: 0,
            punch_freed: false,
        };
        file.guard().insert(
            table_offset.cluster(&geo).0,
            table_clusters as u64,
            MetaKind::RefcountTable,
        );
        for i in 0..rc.table.len() as u64 {
            let off = rc.block_offset(i)?;
            if off != HostOffset::ZERO {
                file.guard()
                    .insert(off.cluster(&geo).0, 1, MetaKind::RefcountBlock);
            }
        }
        Ok(rc)
    }

    /// Offset of refcount block `idx` (0 when absent), with its alignment checked.
    pub fn block_offset(&self, idx: u64) -> Result<HostOffset> {
        let Some(&e) = usize::try_from(idx).ok().and_then(|i| self.table.get(i)) else {
            return Ok(HostOffset::ZERO);
        };
        let off = RefcountTableEntry(e).block_offset();
        if off != HostOffset::ZERO && !off.is_cluster_aligned(&self.geo) {
            return corrupt!("Refblock offset {off:#x} unaligned (reftable index: {idx:#x})");
        }
        Ok(off)
    }

    /// Where entry `idx` of the refcount block at `block` is cached: the slice's host offset
    /// (its cache key) and the entry's index within the slice.
    fn slice_of(&self, block: HostOffset, idx: u64) -> (HostOffset, usize) {
        let per = (self.slice_bytes * 8) >> self.geo.refcount_order;
        let slice = idx / per;
        (block + slice * self.slice_bytes, (idx % per) as usize)
    }

    /// Makes sure the slice holding entry `idx` of the block at `block` is cached and returns
    /// its key and the entry's index in it.
    fn ensure_block(
        &mut self,
        file: &HostFile,
        block: HostOffset,
        idx: u64,
    ) -> Result<(HostOffset, usize)> {
        let (off, i) = self.slice_of(block, idx);
        if self.blocks.contains(off) {
            return Ok((off, i));
        }
        self.make_room(file)?;
        if block.get() >= file.len()? {
            return corrupt!("Refcount block at {block:#x} is beyond the end of the file");
        }
        let mut data = vec![0u8; self.slice_bytes as usize];
        file.read_zero_padded(&mut data, off, "refcount block")?;
        self.blocks.insert(off, data, false);
        Ok((off, i))
    }

    /// Drops the cached slices nobody used since the previous call (idle clean).
    pub fn clean_idle(&mut self) {
        self.blocks.clean_idle(|_| false);
    }

    /// Forgets every cached slice of the block at `block` without writing it.
    fn forget_block(&mut self, block: HostOffset) {
        for i in 0..self.geo.cluster_size() / self.slice_bytes {
            self.blocks.remove(block + i * self.slice_bytes);
        }
    }

    /// Frees a slot in the block cache. Bound: at most two rounds, because writing every
    /// dirty block back leaves only clean ones, and a clean one can always be evicted.
    fn make_room(&mut self, file: &HostFile) -> Result<()> {
        for _ in 0..2 {
            if !self.blocks.is_full() || self.blocks.evict_one_clean() {
                return Ok(());
            }
            // Every cached block is dirty: write them back (blocks have no ordering
            // dependency among themselves) and sync before dropping any.
            self.write_dirty_blocks(file)?;
            file.sync()?;
        }
        if self.blocks.is_full() && !self.blocks.evict_one_clean() {
            return Err(Error::new(
                ErrorKind::NoMemory,
                "the refcount block cache cannot make room",
            ));
        }
        Ok(())
    }

    /// Refcount of the host cluster `cluster`.
    pub fn get(&mut self, file: &HostFile, cluster: HostCluster) -> Result<u64> {
        let block = self.block_offset(cluster.refblock_index(&self.geo))?;
        if block == HostOffset::ZERO {
            return Ok(0);
        }
        let (slice, i) = self.ensure_block(file, block, cluster.refblock_entry(&self.geo))?;
        let data = self
            .blocks
            .get(slice)
            .ok_or_else(|| Error::corrupt("refcount block vanished from cache"))?;
        Ok(refcount::get(data, self.geo.refcount_order, i))
    }

    /// Turns lazy refcounts on for a writable image of `version` whose header has the
    /// lazy-refcounts bit and is clean; `incompatible` is the header's incompatible-features
    /// word on disk. An image version without that word (2) has no dirty bit to set, so it
    /// stays off.
    pub fn enable_lazy(&mut self, version: u32, incompatible: u64) {
        if layout::INCOMPATIBLE_FEATURES.exists_in(version) {
            self.lazy_version = version;
            self.lazy = Lazy::Clean { incompatible };
        }
    }

    /// Whether the dirty bit has been set on disk for lazily counted changes.
    pub fn lazy_dirty(&self) -> bool {
        matches!(self.lazy, Lazy::Dirty { .. })
    }

    /// After the caller made every refcount durable and cleared the dirty bit on disk: the
    /// next refcount change sets it again.
    pub fn lazy_clean_done(&mut self) {
        if let Lazy::Dirty { incompatible } = self.lazy {
            self.lazy = Lazy::Clean { incompatible };
        }
    }

    /// The incompatible-features word to write when clearing the dirty bit.
    pub fn lazy_clean_word(&self) -> Option<u64> {
        match self.lazy {
            Lazy::Dirty { incompatible } => Some(incompatible & !INCOMPAT_DIRTY),
            _ => None,
        }
    }

    /// Called before any refcount changes: on a clean lazy image, sets the dirty bit and
    /// makes it durable first, so that a crash with stale refcounts on disk is always
    /// detected and repaired.
    fn before_change(&mut self, file: &HostFile) -> Result<()> {
        if let Lazy::Clean { incompatible } = self.lazy {
            let word = incompatible | INCOMPAT_DIRTY;
            let update = layout::INCOMPATIBLE_FEATURES.update(self.lazy_version, word)?;
            file.write_header_fields(&update)?;
            file.sync()?;
            self.lazy = Lazy::Dirty { incompatible: word };
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of `cluster`. The block covering it must exist when
    /// `delta > 0` (allocation creates it first).
    pub fn update(&mut self, file: &HostFile, cluster: HostCluster, delta: i64) -> Result<()> {
        self.change(file, cluster.0, delta, false)
    }

    /// Drops one reference of a cluster that guest mappings used: if it becomes free, it is
    /// held back until every request that may still read or write it has finished.
    pub fn retire(&mut self, file: &HostFile, cluster: HostCluster) -> Result<()> {
        self.change(file, cluster.0, -1, true)
    }

    fn change(&mut self, file: &HostFile, cluster: u64, delta: i64, retire: bool) -> Result<()> {
        self.before_change(file)?;
        let per = self.geo.refblock_entries();
        let block = self.block_offset(cluster / per)?;
        if block == HostOffset::ZERO {
            return corrupt!(
                "Refcount update for cluster {cluster:#x} which no refcount block covers"
            );
        }
        let (slice, idx) = self.ensure_block(file, block, cluster % per)?;
        let order = self.geo.refcount_order;
        let max = self.geo.refcount_max();
        let data = self
            .blocks
            .get_mut(slice)
            .ok_or_else(|| Error::corrupt("refcount block vanished from cache"))?;
        let old = refcount::get(data, order, idx);
        let new = if delta >= 0 {
            match old.checked_add(delta as u64) {
                Some(n) if n <= max => n,
                _ => {
                    return corrupt!("Refcount overflow for cluster {cluster:#x} (refcount {old})")
                }
            }
        } else {
            match old.checked_sub(delta.unsigned_abs()) {
                Some(n) => n,
                None => {
                    return corrupt!("Refcount underflow for cluster {cluster:#x} (refcount {old})")
                }
            }
        };
        refcount::set(data, order, idx, new);
        if new == 0 && retire {
            if self.held.insert(cluster) {
                self.quarantine.push_back((file.grace().current(), cluster));
            }
        } else if new == 0 && cluster < self.cursor {
            self.free_set.insert(cluster);
        }
        Ok(())
    }

    /// discard=unmap: whether clusters freed by guest discards and unmapping write_zeroes
    /// have their host ranges punched when their grace period ends (see [`Self::retire`]).
    pub fn set_punch_freed(&mut self, on: bool) {
        self.punch_freed = on;
    }

    /// Whether freed clusters are punched (discard=unmap).
    pub fn punches_freed(&self) -> bool {
        self.punch_freed
    }

    /// Returns to the allocator the quarantined clusters whose grace period is over, and
    /// starts a new grace period for the rest. With discard=unmap, their host ranges are
    /// punched first: a quarantined cluster was retired only after the metadata that dropped
    /// its last reference was durable (see `Meta::writeback`), no request can still touch it
    /// once drained, and it cannot be handed out before it reaches the free set.
    pub fn release_drained(&mut self, file: &HostFile) {
        if self.quarantine.is_empty() {
            return;
        }
        let grace = file.grace();
        grace.try_advance();
        let mut punch = Vec::new();
        while let Some(&(tag, c)) = self.quarantine.front() {
            if !grace.drained(tag) {
                break;
            }
            self.quarantine.pop_front();
            self.held.remove(&c);
            if self.punch_freed {
                punch.push(c);
            }
            if c < self.cursor {
                // pop_free re-checks the refcount, in case the cluster was reused meanwhile.
                self.free_set.insert(c);
            }
        }
        self.punch_runs(file, punch);
    }

    /// Punches the host ranges of `clusters`, one call per run of adjacent clusters. Best
    /// effort: a cluster that keeps its blocks (no file-system support, an error) only costs
    /// space; it reads as whatever the next allocation writes or zeroes there.
    fn punch_runs(&self, file: &HostFile, mut clusters: Vec<u64>) {
        clusters.sort_unstable();
        let cs = self.geo.cluster_size();
        let mut i = 0;
        while i < clusters.len() {
            let mut j = i + 1;
            while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
                j += 1;
            }
            let at = HostCluster(clusters[i]).offset(&self.geo);
            if !matches!(file.punch_hole(at, (j - i) as u64 * cs), Ok(true)) {
                return; // unsupported or failing: the rest would fail the same way
            }
            i = j;
        }
    }

    /// Allocates `n` contiguous free clusters (refcount set to 1) and returns the host offset
    /// of the first. Single clusters reuse known holes first; runs are taken from the scan
    /// frontier. Each cluster is examined by the scan at most once over the image's life.
    ///
    /// Fails with [`Error::CorruptionPrevented`] instead of looping when the refcount
    /// structures contradict the rest of the metadata (a free cluster or the home of a new
    /// refcount block holds metadata, or a new block does not cover what it should).
    pub fn alloc(&mut self, file: &HostFile, n: u64) -> Result<HostOffset> {
        if n == 0 {
            return Err(Error::invalid("allocation of 0 clusters"));
        }
        self.release_drained(file);
        // Bound: every pass that does not return creates one refcount block, and
        // `create_block` fails unless the block's table entry becomes non-zero, so each pass
        // covers one more block. The run that is finally returned spans at most
        // n/per + 2 blocks; each block created inside a candidate run takes its first cluster
        // and can push the run forward across at most one more block boundary. Twice that,
        // plus slack, is generous for a sound image and still finite for a broken one.
        let per = self.geo.refblock_entries();
        let max_passes = 2 * (n.div_ceil(per) + 2) + 8;
        for _ in 0..max_passes {
            let start = match if n == 1 { self.pop_free(file)? } else { None } {
                Some(c) => c,
                None => self.scan_run(file, n)?,
            };
            if let Some(b) = self.first_uncovered_block(start, n)? {
                self.create_block(file, b, start, n)?;
                continue;
            }
            self.refuse_metadata(
                file,
                start,
                n,
                "allocation of a cluster with refcount 0 that holds",
            )?;
            for c in start..start + n {
                self.change(file, c, 1, false)?;
            }
            self.cursor = self.cursor.max(start + n);
            return Ok(HostCluster(start).offset(&self.geo));
        }
        Err(Error::new(ErrorKind::CorruptionPrevented, format!(
            "Preventing invalid allocation: the refcount structures make no progress after {max_passes} new refcount blocks for a run of {n} clusters"
        )))
    }

    /// Fails (through the overlap guard, so the corruption event names the structure) when
    /// any of clusters `[first, first+n)` holds metadata the guard knows about.
    fn refuse_metadata(&self, file: &HostFile, first: u64, n: u64, action: &str) -> Result<()> {
        let guard = file.guard();
        for c in first..first + n {
            if let Some(kind) = guard.kind_of(c) {
                let cs = self.geo.cluster_size();
                let at = HostCluster(c).offset(&self.geo).get();
                return Err(guard.refuse(at, cs, kind, action));
            }
        }
        Ok(())
    }

    /// The lowest known hole that is still free.
    fn pop_free(&mut self, file: &HostFile) -> Result<Option<u64>> {
        while let Some(c) = self.free_set.pop_first() {
            if !self.held.contains(&c) && self.get(file, HostCluster(c))? == 0 {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Finds `n` free clusters in a row at or after the cursor, remembering the holes it
    /// passes. Does not move the cursor (the caller commits the allocation).
    fn scan_run(&mut self, file: &HostFile, n: u64) -> Result<u64> {
        // Host offsets are below 2^56; the search cannot run past that.
        let limit = (1u64 << 56) >> self.geo.cluster_bits;
        let per = self.geo.refblock_entries();
        // Bound: past the clusters the table covers every block is absent, so every cluster
        // there is free and a run of n completes within n + per more clusters. Each step
        // below advances `c` by at least one, so the loop ends by `bound` whatever the
        // (possibly damaged) blocks claim; reaching it means the structures lie.
        let bound = (self.table.len() as u64 + 1)
            .saturating_mul(per)
            .saturating_add(n)
            .saturating_add(per);
        let mut start = self.cursor;
        let mut c = start;
        while c - start < n {
            if c >= limit {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "image address space exhausted",
                ));
            }
            if c >= bound {
                return Err(Error::new(ErrorKind::CorruptionPrevented, format!(
                    "Preventing invalid allocation: the free-cluster scan passed cluster {c:#x}, beyond what the refcount table covers"
                )));
            }
            // Skip whole uncovered blocks in one step: everything there is free.
            if c % per == 0 && self.block_offset(c / per)? == HostOffset::ZERO {
                c += per;
                continue;
            }
            if self.get(file, HostCluster(c))? == 0 && !self.held.contains(&c) {
                c += 1;
            } else {
                for hole in start..c {
                    self.free_set.insert(hole);
                }
                c += 1;
                start = c;
            }
        }
        Ok(start)
    }

    fn first_uncovered_block(&self, start: u64, n: u64) -> Result<Option<u64>> {
        let per = self.geo.refblock_entries();
        for b in start / per..=(start + n - 1) / per {
            if self.block_offset(b)? == HostOffset::ZERO {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// Creates refcount block `b`, growing the table if needed, for the candidate run of
    /// `n` clusters at `start`.
    ///
    /// The block normally goes in the first cluster of the range it covers (its home: free
    /// because no block counts anything there yet, and the block counts itself). Two
    /// exceptions: when the home lies inside a multi-cluster run, the block would split every
    /// run that crosses a block boundary, so it takes a single cluster from the allocator
    /// instead (counted by an existing block); and when the home holds metadata, the
    /// refcount table entry was lost on a damaged image (entry 0 would even put the block on
    /// the header), so the allocation is refused as a corruption instead of looping.
    fn create_block(&mut self, file: &HostFile, b: u64, start: u64, n: u64) -> Result<()> {
        self.before_change(file)?;
        if b >= self.table.len() as u64 {
            self.grow_table(file, b + 1)?;
            if self.block_offset(b)? != HostOffset::ZERO {
                return Ok(());
            }
        }
        let per = self.geo.refblock_entries();
        let home = b * per;
        let mut data = vec![0u8; self.geo.cluster_size() as usize];
        let cluster = if n > 1 && (start..start + n).contains(&home) {
            // alloc(1) places any block it needs at that block's home (n == 1), so this
            // recursion is one level deep.
            let c = self.alloc(file, 1)?.cluster(&self.geo);
            if self.block_offset(b)? != HostOffset::ZERO {
                // That allocation created block b itself: give the cluster back.
                self.update(file, c, -1)?;
                self.free_set.insert(c.0);
                return Ok(());
            }
            c.0
        } else {
            self.refuse_metadata(file, home, 1, "allocation of a refcount block on")?;
            refcount::set(&mut data, self.geo.refcount_order, 0, 1);
            home
        };
        let off = HostCluster(cluster).offset(&self.geo);
        if off == HostOffset::ZERO {
            // Cluster 0 is the header even when the guard's index does not say so, and a
            // table entry of 0 means "no block": the block would never become visible.
            return Err(Error::new(ErrorKind::CorruptionPrevented, format!(
                "Preventing invalid allocation of refcount block at offset 0 (reftable index: {b:#x})"
            )));
        }
        file.guard().insert(cluster, 1, MetaKind::RefcountBlock);
        // Written whole now (nothing points at it until the table entry below is written
        // back, after this), so the cache only ever holds slices of it.
        if let Err(e) = file.write(&data, off, WriteKind::RefcountBlock) {
            file.guard().remove(cluster, 1, MetaKind::RefcountBlock);
            return Err(e);
        }
        self.forget_block(off);
        self.table[b as usize] = off.get();
        self.table_dirty.insert(b * 8 / self.geo.cluster_size());
        Ok(())
    }

    /// Replaces the refcount table with a larger one holding at least `min_entries`.
    ///
    /// The new table and the blocks that count it go into a fresh region past everything the
    /// old table covers; they are written and synced, then the header is switched with one
    /// synced write, then the old table's clusters are freed.
    fn grow_table(&mut self, file: &HostFile, min_entries: u64) -> Result<()> {
        let old_len = self.table.len() as u64;
        // The region starts at the first block the old table cannot describe.
        let region_block = old_len;
        let (new_entries, blocks_needed, table_clusters) = self.table_growth(min_entries)?;
        let per = self.geo.refblock_entries();
        let region = region_block * per; // first cluster of the region
        let used = blocks_needed + table_clusters;
        // The region lies past everything the old table can count, so on a sound image no
        // structure lives there; on a damaged one (a table too small for the file) it may.
        self.refuse_metadata(file, region, used, "allocation of refcount structures on")?;
        // Dirty blocks must be on disk before a table that points at them is.
        self.write_dirty_blocks(file)?;
        let mut new_table = self.table.clone();
        new_table.resize(new_entries as usize, 0);
        self.write_region_blocks(file, &mut new_table, region_block, blocks_needed, used)?;
        let table_off = HostCluster(region + blocks_needed).offset(&self.geo);
        let mut bytes = u64_table_bytes(&new_table);
        bytes.resize((table_clusters * self.geo.cluster_size()) as usize, 0);
        file.write(&bytes, table_off, WriteKind::RefcountTable)?;
        file.sync()?;
        file.write_header_fields(&layout::reftable_update(table_off, table_clusters)?)?;
        file.sync()?;
        self.switch_table(file, new_table, table_off, table_clusters)
    }

    /// Sizes a grown table of at least `min_entries`: (entries, blocks at the start of the new
    /// region, table clusters after them), all counted by those blocks and covered by the
    /// table. Bound: the entry count only grows, by the region's blocks per round, and past
    /// MAX_REFTABLE_BYTES / 8 the table could not be written anyway; in practice one or two
    /// rounds settle it.
    fn table_growth(&self, min_entries: u64) -> Result<(u64, u64, u64)> {
        let cs = self.geo.cluster_size();
        let per = self.geo.refblock_entries();
        let old_len = self.table.len() as u64;
        let too_big = || {
            Error::new(
                ErrorKind::NoSpace,
                "refcount table would exceed 8 MiB; image too large for its cluster size",
            )
        };
        let mut new_entries = min_entries.max(old_len + old_len / 2).max(old_len + 1);
        loop {
            if new_entries > MAX_REFTABLE_BYTES / 8 {
                return Err(too_big());
            }
            let table_clusters = (new_entries * 8).div_ceil(cs);
            let k = (table_clusters + 1).div_ceil(per).max(1);
            let k = if k * per < k + table_clusters {
                k + 1
            } else {
                k
            };
            if old_len + k <= new_entries {
                if table_clusters * cs > MAX_REFTABLE_BYTES {
                    return Err(too_big());
                }
                return Ok((new_entries, k, table_clusters));
            }
            new_entries = old_len + k;
        }
    }

    /// Writes the `count` refcount blocks that start the new region (refcount block index
    /// `first_block` on), counting the first `used` clusters of the region, and enters them in
    /// `new_table`.
    fn write_region_blocks(
        &mut self,
        file: &HostFile,
        new_table: &mut [u64],
        first_block: u64,
        count: u64,
        used: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per = self.geo.refblock_entries();
        let region = first_block * per;
        for i in 0..count {
            let mut data = vec![0u8; cs as usize];
            let counted = (region + used)
                .saturating_sub((first_block + i) * per)
                .min(per);
            for j in 0..counted as usize {
                refcount::set(&mut data, self.geo.refcount_order, j, 1);
            }
            let off = HostCluster(region + i).offset(&self.geo);
            file.write(&data, off, WriteKind::RefcountBlock)?;
            new_table[(first_block + i) as usize] = off.get();
            self.forget_block(off);
            file.guard().insert(region + i, 1, MetaKind::RefcountBlock);
        }
        Ok(())
    }

    /// Starts using the new table (already durable and pointed at by the header) and frees the
    /// old one, which the durable header no longer references.
    fn switch_table(
        &mut self,
        file: &HostFile,
        new_table: Vec<u64>,
        table_off: HostOffset,
        table_clusters: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old_off = self.table_offset;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(cs);
        self.table = new_table;
        self.table_offset = table_off;
        self.table_dirty.clear();
        let old_first = old_off.cluster(&self.geo).0;
        file.guard()
            .remove(old_first, old_clusters, MetaKind::RefcountTable);
        file.guard().insert(
            table_off.cluster(&self.geo).0,
            table_clusters,
            MetaKind::RefcountTable,
        );
        for c in 0..old_clusters {
            self.change(file, old_first + c, -1, false)?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block. Returns whether anything was written.
    pub fn write_dirty_blocks(&mut self, file: &HostFile) -> Result<bool> {
        let dirty = self.blocks.dirty_offsets();
        for off in &dirty {
            if let Some(data) = self.blocks.peek(*off) {
                file.write(data, *off, WriteKind::RefcountBlock)?;
            }
            self.blocks.mark_clean(*off);
        }
        Ok(!dirty.is_empty())
    }

    /// Whether any refcount block is dirty.
    pub fn has_dirty_blocks(&self) -> bool {
        self.blocks.has_dirty()
    }

    /// Writes the dirty clusters of the refcount table. Returns whether anything was written.
    pub fn write_dirty_table(&mut self, file: &HostFile) -> Result<bool> {
        if self.table_dirty.is_empty() {
            return Ok(false);
        }
        let per_cluster = self.geo.u64_per_cluster() as usize;
        let cs = self.geo.cluster_size();
        // An index leaves the dirty set only once written, so a failed write-back (full
        // disk) is retried by the next flush instead of being forgotten.
        while let Some(&idx) = self.table_dirty.first() {
            let start = idx as usize * per_cluster;
            let end = (start + per_cluster).min(self.table.len());
            let bytes = u64_table_bytes(&self.table[start..end]);
            file.write(
                &bytes,
                self.table_offset + idx * cs,
                WriteKind::RefcountTable,
            )?;
            self.table_dirty.remove(&idx);
        }
        Ok(true)
    }

    /// Whether the table has unwritten entries.
    pub fn has_dirty_table(&self) -> bool {
        !self.table_dirty.is_empty()
    }
}
