//! The second half of a check: comparing computed references with the on-disk refcounts,
//! fixing them in place or rebuilding the whole refcount structure, the COPIED-flag pass,
//! and clearing the dirty and corrupt bits once the image is clean.

use super::refs::RefArray;
use super::walk::{read_l1_table, read_l2_run, Checker, BATCH_BYTES};
use super::{CheckFix, CheckReport};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::format::be::put_u64;
use crate::format::entry::{l2_entry_bytes, L1Entry, L2Entry, L2Kind, RefcountTableEntry};
use crate::format::header::{layout, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::format::refcount;
use crate::format::{HostCluster, HostOffset};
use crate::storage::WriteKind;
use std::collections::BTreeMap;

/// Where an L1 entry lives: the table's host offset and the entry's index in it.
#[derive(Clone, Copy)]
struct L1Slot {
    table: HostOffset,
    index: usize,
}

impl L1Slot {
    /// The host offset of the entry.
    fn entry_offset(self) -> HostOffset {
        // An L1 table holds at most 4 Mi entries.
        self.table + self.index as u64 * 8
    }
}

impl Checker<'_> {
    /// One full check pass with the repairs `fix` allows (QEMU's `qcow2_check_refcounts`
    /// followed by the dirty/corrupt bit handling of `qcow2_co_check_locked`).
    pub(super) fn run(&mut self, fix: CheckFix) -> Result<CheckReport> {
        let mut res = CheckReport {
            total_clusters: self.geo.clusters_for(self.header.size),
            ..CheckReport::default()
        };
        self.rebuild = false;
        self.calculate(&mut res, fix)?;
        let pre = res.clone();
        let mut highest = self.compare(&mut res, CheckFix::None)?;
        if self.rebuild && fix == CheckFix::All {
            self.msg("Rebuilding refcount structure".into());
            let old = res.clone();
            self.rebuild_structure()?;
            res.corruptions = 0;
            res.leaks = 0;
            res.allocated_clusters = 0;
            res.fragmented_clusters = 0;
            res.compressed_clusters = 0;
            self.rebuild = false;
            self.calculate(&mut res, CheckFix::None)?;
            // The old structures are leaks now: free them. Leaks that remain were created by
            // the rebuild itself.
            let mut tmp = CheckReport::default();
            highest = self.compare(&mut tmp, CheckFix::Leaks)?;
            if self.rebuild {
                self.msg("ERROR rebuilt refcount structure is still broken".into());
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += tmp.leaks;
            // What the rebuilt structure still cannot express (a cluster referenced more often
            // than the refcount width allows) remains, as a fresh check will find it.
            res.corruptions += tmp.corruptions;
        } else if fix != CheckFix::None {
            if self.rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                res.check_errors += 1;
                res.image_end_offset = (highest + 1) << self.geo.cluster_bits;
                return Ok(res);
            }
            if res.leaks > 0 || res.corruptions > 0 {
                res = pre;
                highest = self.compare(&mut res, fix)?;
            }
        }
        self.oflag_copied(&mut res, fix)?;
        res.image_end_offset = (highest + 1) << self.geo.cluster_bits;
        let clean = res.check_errors == 0 && res.corruptions == 0;
        if fix != CheckFix::None && clean && self.snapshot_corruptions == 0 {
            self.mark_clean()?;
        }
        Ok(res)
    }

    /// Compares the computed references with the on-disk refcounts of every cluster,
    /// repairing what `fix` allows; fills `self.disk`. Returns the highest cluster in use.
    fn compare(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<u64> {
        let geo = self.geo;
        let per = geo.refblock_entries();
        let n = self.refs.len();
        self.disk = RefArray::zeroed(n)?;
        self.bad_blocks.clear();
        let nblocks = n.div_ceil(per);
        self.expect(nblocks);
        let mut highest = 0u64;
        // Bound: `n` is the file's cluster count (at most MAX_CHECK_CLUSTERS, checked by
        // `calculate`) and every round advances `b` by at least one block.
        let mut b = 0u64;
        while b < nblocks {
            let off = self.reftable_entry(b).block_offset();
            let clusters = b * per..((b + 1) * per).min(n);
            if off == HostOffset::ZERO {
                for i in clusters {
                    self.compare_one(res, fix, i, 0, false, &mut highest);
                }
                b += 1;
                self.tick(1);
                continue;
            }
            if !off.is_cluster_aligned(&geo) {
                for i in clusters {
                    self.msg(format!(
                        "Can't get refcount for cluster {i}: Input/output error"
                    ));
                    res.check_errors += 1;
                }
                self.bad_blocks.insert(b);
                b += 1;
                self.tick(1);
                continue;
            }
            let run = self.contiguous_blocks(b, nblocks, off);
            self.compare_blocks(res, fix, b..b + run, off, &mut highest)?;
            b += run;
        }
        if self.wrote {
            self.file.sync()?;
        }
        Ok(highest)
    }

    /// The refcount table entry of refcount block `b` (an empty one past the table's end).
    fn reftable_entry(&self, b: u64) -> RefcountTableEntry {
        usize::try_from(b)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .copied()
            .unwrap_or_default()
    }

    /// How many refcount blocks from `b`, which is at `off`, follow each other on the host
    /// (to be read at once, at most [`BATCH_BYTES`]).
    fn contiguous_blocks(&self, b: u64, nblocks: u64, off: HostOffset) -> u64 {
        let cs = self.geo.cluster_size();
        let max_run = (BATCH_BYTES / cs).max(1);
        let mut run = 1u64;
        while run < max_run
            && b + run < nblocks
            // A block offset near the top of the address space must not wrap around.
            && Some(self.reftable_entry(b + run).block_offset()) == off.checked_add(run * cs)
        {
            run += 1;
        }
        run
    }

    /// Compares the clusters counted by the refcount blocks `blocks`, which lie one after
    /// the other from `off`, and writes back the blocks in which a mismatch was repaired.
    fn compare_blocks(
        &mut self,
        res: &mut CheckReport,
        fix: CheckFix,
        blocks: std::ops::Range<u64>,
        off: HostOffset,
        highest: &mut u64,
    ) -> Result<()> {
        let geo = self.geo;
        let per = geo.refblock_entries();
        let n = self.refs.len();
        let block_bytes = 1usize << geo.cluster_bits;
        // At most BATCH_BYTES (see `contiguous_blocks`).
        let mut buf = vec![0u8; (blocks.end - blocks.start) as usize * block_bytes];
        self.file
            .read_zero_padded(&mut buf, off, "refcount block")?;
        for (k, (b, blk)) in blocks.zip(buf.chunks_exact_mut(block_bytes)).enumerate() {
            // Below 2^64: `contiguous_blocks` only joined blocks whose offsets do not wrap.
            let at = HostOffset::new(off.get() + k as u64 * geo.cluster_size());
            let mut dirty = false;
            for (j, i) in (b * per..((b + 1) * per).min(n)).enumerate() {
                let on = refcount::get(blk, geo.refcount_order, j);
                if let Some(v) = self.compare_one(res, fix, i, on, true, highest) {
                    refcount::set(blk, geo.refcount_order, j, v);
                    dirty = true;
                }
            }
            if dirty {
                self.file.write(blk, at, WriteKind::RefcountBlock)?;
                self.wrote = true;
            }
            self.tick(1);
        }
        Ok(())
    }

    /// Compares one cluster; returns the value to store when the mismatch was repaired.
    /// `in_block` is false when no refcount block covers the cluster (nothing can be fixed
    /// in place then).
    fn compare_one(
        &mut self,
        res: &mut CheckReport,
        fix: CheckFix,
        i: u64,
        on: u64,
        in_block: bool,
        highest: &mut u64,
    ) -> Option<u64> {
        let comp = self.refs.get(i);
        if on > 0 || comp > 0 {
            *highest = i;
        }
        if on == comp {
            self.disk.set(i, on);
            return None;
        }
        let mut fixed = None;
        if on == 0 {
            self.rebuild = true;
        } else if on > comp && fix != CheckFix::None {
            fixed = Some(true);
        } else if on < comp && fix == CheckFix::All {
            fixed = Some(false);
        }
        let fixed = fixed.filter(|_| in_block);
        let what = if fixed.is_some() {
            "Repairing"
        } else if on < comp {
            "ERROR"
        } else {
            "Leaked"
        };
        self.msg(format!("{what} cluster {i} refcount={on} reference={comp}"));
        match fixed {
            Some(true) => {
                res.leaks_fixed += 1;
                self.disk.set(i, comp);
                Some(comp)
            }
            Some(false) => {
                res.corruptions_fixed += 1;
                self.disk.set(i, comp);
                Some(comp)
            }
            None => {
                if on < comp {
                    res.corruptions += 1;
                } else {
                    res.leaks += 1;
                }
                self.disk.set(i, on);
                None
            }
        }
    }

    /// The on-disk refcount of a cluster as the last comparison left it; `None` when it
    /// cannot be read.
    fn disk_refcount(&self, cluster: HostCluster) -> Result<Option<u64>> {
        let geo = self.geo;
        let b = cluster.refblock_index(&geo);
        if self.bad_blocks.contains(&b) {
            return Ok(None);
        }
        if cluster.0 < self.disk.len() {
            return Ok(Some(self.disk.get(cluster.0)));
        }
        let off = self.reftable_entry(b).block_offset();
        if off == HostOffset::ZERO {
            return Ok(Some(0));
        }
        if !off.is_cluster_aligned(&geo) {
            return Ok(None);
        }
        let mut blk = vec![0u8; 1usize << geo.cluster_bits];
        self.file
            .read_zero_padded(&mut blk, off, "refcount block")?;
        // Below the entries of one block (at most 2^24).
        let j = cluster.refblock_entry(&geo) as usize;
        Ok(Some(refcount::get(&blk, geo.refcount_order, j)))
    }

    /// First-fit allocation of `count` clusters that no structure references, in the
    /// computed array (which grows past the end of the file as needed).
    fn alloc(&mut self, cursor: &mut u64, count: u64) -> Result<u64> {
        let floor = self.geo.clusters_for(self.past_eof_floor);
        let limit = (1u64 << 56) >> self.geo.cluster_bits;
        // Placing the new structure past a reference far beyond the end of the file would
        // make the in-memory refcount array (two bytes per cluster) and the file huge.
        let reach = self.geo.clusters_for(self.growth_limit());
        let avoid = self.skipped_clusters();
        let mut start = *cursor;
        let mut c = start;
        // Bound: `c` grows every round (or jumps to `floor`, once); past the end of `refs`
        // every cluster is free, so the loop ends by max(refs.len(), floor) + count, and the
        // 2^56 limit stops it in any case.
        while c - start < count {
            if let Some(end) = inside(&avoid, c) {
                c = end;
                start = c;
                continue;
            }
            if c >= limit {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "no room for a new refcount structure below 2^56",
                ));
            }
            if c >= self.refs.len() && c < floor {
                // Past the end of the file everything is free up to the first region
                // referenced there: growing the file into that gap touches no reference.
                if !self.skipped_overflow && start.saturating_add(count) <= self.gap_end() {
                    c = start + count;
                    continue;
                }
                if floor.saturating_add(count) > reach || self.skipped_overflow {
                    return Err(Error::new(ErrorKind::NoSpace, format!(
                        "no room for a new refcount structure: a cluster referenced at {:#x} lies too far beyond the end of the file",
                        self.past_eof_floor
                    )));
                }
                // The file will grow over every skipped region: they become real clusters.
                self.count_skipped_below(self.past_eof_floor)?;
                c = floor;
                start = c;
                continue;
            }
            if self.refs.get(c) != 0 {
                c += 1;
                start = c;
            } else {
                c += 1;
            }
        }
        self.refs.grow(start + count)?;
        for k in start..start + count {
            self.refs.set(k, 1);
        }
        if count == 1 {
            *cursor = start + 1;
        }
        Ok(start)
    }

    /// The clusters inside the file of the regions referenced past its end (skipped by the
    /// check, see `Checker::inc`), as sorted, merged `[first, end)` cluster ranges. A table
    /// the check skipped (an L1 table too long for the file, say) may still be written by a
    /// later repair step, so nothing new is placed on its clusters.
    fn skipped_clusters(&self) -> Vec<(u64, u64)> {
        let geo = self.geo;
        // Past the end of the file the growth rules in `alloc` apply (the file grows over a
        // skipped region only after counting it).
        let in_file = self.refs.len();
        let mut v: Vec<(u64, u64)> = self
            .skipped
            .iter()
            .map(|&(s, e)| {
                let first = HostOffset::new(s).cluster(&geo).0;
                (first, geo.clusters_for(e).min(in_file))
            })
            .filter(|&(first, end)| first < end)
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// The first cluster past the end of the file (`refs`) that a region referenced past the
    /// end of the file covers (the furthest such reference's end when none does).
    fn gap_end(&self) -> u64 {
        let geo = self.geo;
        let eof = self.refs.len();
        self.skipped
            .iter()
            .filter(|&&(_, e)| geo.clusters_for(e) > eof)
            .map(|&(s, _)| HostOffset::new(s).cluster(&geo).0.max(eof))
            .min()
            .unwrap_or_else(|| geo.clusters_for(self.past_eof_floor))
    }

    /// Counts the parts below `new_len` of the regions referenced past the end of the file,
    /// because a repair is about to grow the file to `new_len`: unless counted, they would
    /// become clusters in use that no refcount covers. What lies beyond stays skipped.
    pub(super) fn count_skipped_below(&mut self, new_len: u64) -> Result<()> {
        let geo = self.geo;
        let skipped = std::mem::take(&mut self.skipped);
        for (start, end) in skipped {
            if start >= new_len {
                self.skipped.push((start, end));
                continue;
            }
            let inside = end.min(new_len);
            let first = HostOffset::new(start).cluster(&geo).0;
            let last = HostOffset::new(inside - 1).cluster(&geo).0;
            self.refs.grow(last + 1)?;
            // Bound: the regions lie below the growth limit (checked by the callers).
            for k in first..=last {
                let r = self.refs.get(k);
                self.refs
                    .set(k, r.saturating_add(1).min(geo.refcount_max()));
            }
            if end > new_len {
                self.skipped.push((new_len, end));
            }
        }
        Ok(())
    }

    /// Writes a brand-new refcount table and blocks describing `self.refs` into clusters no
    /// structure uses, syncs them, then switches the header to them with one synced write.
    /// The old structures stay untouched (they become leaks).
    fn rebuild_structure(&mut self) -> Result<()> {
        let (blocks, table_first, table_clusters) = self.place_structure()?;
        let table_off = self.write_structure(&blocks, table_first, table_clusters)?;
        self.file
            .write_header_fields(&layout::reftable_update(table_off, table_clusters)?)?;
        self.file.sync()?;
        self.header.refcount_table_offset = table_off.get();
        // At most MAX_REFTABLE_BYTES of table (checked by `place_structure`).
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(())
    }

    /// Chooses free clusters for the new refcount blocks (one per block of clusters in use)
    /// and for a table pointing at them all. These allocations use clusters too, so it
    /// repeats until nothing more is needed. Returns the blocks by refcount table index, and
    /// the first cluster and length of the table.
    fn place_structure(&mut self) -> Result<(BTreeMap<u64, HostOffset>, HostCluster, u64)> {
        let cs = self.geo.cluster_size();
        let mut blocks = BTreeMap::new();
        let mut table: Option<(u64, u64)> = None;
        let mut cursor = 0u64;
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 64 {
                return Err(Error::corrupt(
                    "rebuilding the refcount structure did not converge",
                ));
            }
            if self.place_blocks(&mut blocks, &mut cursor)? {
                continue;
            }
            let entries = blocks.keys().next_back().map_or(1, |&b| b + 1);
            let need = (entries * 8).div_ceil(cs);
            if need * cs > MAX_REFTABLE_BYTES {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "the rebuilt refcount table would exceed 8 MiB",
                ));
            }
            match table {
                Some((_, have)) if have >= need => break,
                Some((first, have)) => {
                    for c in first..first + have {
                        let r = self.refs.get(c);
                        self.refs.set(c, r.saturating_sub(1));
                    }
                }
                None => {}
            }
            let first = self.alloc(&mut cursor, need)?;
            table = Some((first, need));
        }
        let Some((table_first, table_clusters)) = table else {
            return Err(Error::corrupt("no refcount table was allocated"));
        };
        Ok((blocks, HostCluster(table_first), table_clusters))
    }

    /// Allocates a cluster for every refcount block that counts a cluster in use and has
    /// none yet. Returns whether it allocated any.
    fn place_blocks(
        &mut self,
        blocks: &mut BTreeMap<u64, HostOffset>,
        cursor: &mut u64,
    ) -> Result<bool> {
        let per = self.geo.refblock_entries();
        let mut added = false;
        // Bound: `refs` only grows by the clusters this loop allocates (one per new block),
        // so the block count grows by at most one per `per` new blocks; the caller's loop is
        // capped at 64 rounds.
        let mut b = 0;
        while b < self.refs.len().div_ceil(per) {
            if !blocks.contains_key(&b) && self.refs.any_in(b * per, (b + 1) * per) {
                let c = HostCluster(self.alloc(cursor, 1)?);
                blocks.insert(b, c.offset(&self.geo));
                added = true;
            }
            b += 1;
        }
        Ok(added)
    }

    /// Writes the refcount blocks and the table [`Self::place_structure`] placed, and syncs
    /// them. Returns the table's offset.
    fn write_structure(
        &mut self,
        blocks: &BTreeMap<u64, HostOffset>,
        table_first: HostCluster,
        table_clusters: u64,
    ) -> Result<HostOffset> {
        let geo = self.geo;
        let per = geo.refblock_entries();
        // At most MAX_REFTABLE_BYTES / 8 entries (checked by `place_structure`).
        let mut new_table = vec![0u64; (table_clusters * geo.u64_per_cluster()) as usize];
        for (&b, &off) in blocks {
            let mut data = vec![0u8; 1usize << geo.cluster_bits];
            for (j, i) in (b * per..(b + 1) * per).enumerate() {
                let v = self.refs.get(i);
                if v != 0 {
                    refcount::set(&mut data, geo.refcount_order, j, v);
                }
            }
            self.file.write(&data, off, WriteKind::RefcountBlock)?;
            // Below the table's entries: `b` is the largest key at most.
            new_table[b as usize] = RefcountTableEntry::new(off).0;
        }
        let table_off = table_first.offset(&geo);
        let bytes = crate::format::be::u64_table_bytes(&new_table);
        self.file
            .write(&bytes, table_off, WriteKind::RefcountTable)?;
        self.wrote = true;
        self.file.sync()?;
        Ok(table_off)
    }

    /// Checks (and with `fix`, repairs) the COPIED flags of the active L1 entries and of the
    /// active L2 data entries against the refcounts.
    fn oflag_copied(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let may_repair = match fix {
            CheckFix::All => true,
            CheckFix::Leaks => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
            CheckFix::None => false,
        };
        let l1_off = HostOffset::new(self.header.l1_table_offset);
        let mut l1 = read_l1_table(self.file, l1_off, self.header.l1_size)?;
        let mut wrote = false;
        let mut i = 0;
        while i < l1.len() {
            if l1[i].l2_offset() == HostOffset::ZERO {
                i += 1;
                self.tick(1);
                continue;
            }
            let (n, mut buf) = read_l2_run(self.file, &self.geo, &l1, i)?;
            let tables = buf.chunks_exact_mut(1usize << self.geo.cluster_bits);
            for (k, t) in tables.enumerate() {
                let slot = L1Slot {
                    table: l1_off,
                    index: i + k,
                };
                wrote |= self.oflag_copied_table(res, slot, &mut l1[i + k], t, may_repair)?;
                self.tick(1);
            }
            i += n;
        }
        if wrote {
            self.wrote = true;
            self.file.sync()?;
        }
        Ok(())
    }

    /// The COPIED flags of the L1 entry `e` (at `slot`) and of the L2 table `t` it points at.
    /// The L1 entry itself may be repaired; the table only when it is not the header, the L1
    /// or the refcount table posing as an L2 table. Returns whether it wrote anything.
    fn oflag_copied_table(
        &mut self,
        res: &mut CheckReport,
        slot: L1Slot,
        e: &mut L1Entry,
        t: &mut [u8],
        may_repair: bool,
    ) -> Result<bool> {
        let l2 = e.l2_offset();
        let repair_l2 = may_repair && self.fixed_metadata_at(l2).is_none();
        let Some(rc) = self.disk_refcount(l2.cluster(&self.geo))? else {
            return Ok(false);
        };
        let mut wrote = false;
        if (rc == 1) != e.copied() {
            res.corruptions += 1;
            self.msg(format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={rc}",
                if may_repair { "Repairing" } else { "ERROR" },
                slot.index,
                e.0
            ));
            if may_repair {
                *e = e.with_copied(rc == 1);
                self.file
                    .write(&e.0.to_be_bytes(), slot.entry_offset(), WriteKind::L1)?;
                wrote = true;
                res.corruptions -= 1;
                res.corruptions_fixed += 1;
            }
        }
        Ok(self.oflag_copied_l2(res, l2, t, repair_l2)? || wrote)
    }

    /// The COPIED flags of the data entries of the L2 table `t` at `l2`, written back when
    /// `repair` and one was wrong. Returns whether it wrote the table.
    fn oflag_copied_l2(
        &mut self,
        res: &mut CheckReport,
        l2: HostOffset,
        t: &mut [u8],
        repair: bool,
    ) -> Result<bool> {
        let geo = self.geo;
        let mut dirty = 0u64;
        for slot in t.chunks_exact_mut(l2_entry_bytes(&geo)) {
            let e = L2Entry::from_bytes(geo.extended_l2, slot);
            if !matches!(e.kind(&geo), L2Kind::Normal | L2Kind::ZeroAlloc) {
                continue;
            }
            // A cluster of an external data file is owned by this image alone.
            let rc = if geo.external_data {
                1
            } else {
                match self.disk_refcount(e.host().cluster(&geo))? {
                    Some(rc) => rc,
                    None => continue,
                }
            };
            if (rc == 1) != e.copied() {
                res.corruptions += 1;
                self.msg(format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                    if repair { "Repairing" } else { "ERROR" },
                    e.word0
                ));
                if repair {
                    put_u64(slot, 0, e.with_copied(rc == 1).word0);
                    dirty += 1;
                }
            }
        }
        if dirty == 0 {
            return Ok(false);
        }
        self.file.write(t, l2, WriteKind::L2)?;
        res.corruptions -= dirty;
        res.corruptions_fixed += dirty;
        Ok(true)
    }

    /// Clears the dirty and corrupt bits (v3 headers only) after everything else is durable.
    pub(super) fn mark_clean(&mut self) -> Result<()> {
        let bits = self.header.incompatible_features;
        if self.header.version < 3 || bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) == 0 {
            return Ok(());
        }
        self.file.sync()?;
        let new = bits & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        let update = layout::INCOMPATIBLE_FEATURES.update(self.header.version, new)?;
        self.file.write_header_fields(&update)?;
        self.file.sync()?;
        self.header.incompatible_features = new;
        self.wrote = true;
        Ok(())
    }
}

/// The end of the range of `ranges` (sorted, disjoint `[first, end)`) that holds `c`, if any.
fn inside(ranges: &[(u64, u64)], c: u64) -> Option<u64> {
    let i = ranges.partition_point(|&(first, _)| first <= c);
    ranges[..i]
        .last()
        .filter(|&&(_, end)| c < end)
        .map(|&(_, end)| end)
}
