//! The second half of a check: comparing computed references with the on-disk refcounts,
//! fixing them in place or rebuilding the whole refcount structure, the COPIED-flag pass,
//! and clearing the dirty and corrupt bits once the image is clean.

use super::refs::RefArray;
use super::walk::{kind, l2_words, read_l2_run, read_u64_table, Checker, Kind, BATCH_BYTES};
use super::{CheckFix, CheckReport};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::format::be::put_u64;
use crate::format::entry::{COPIED, OFFSET_MASK};
use crate::format::header::{layout, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::format::HostOffset;
use crate::storage::WriteKind;
use std::collections::BTreeMap;

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
        let cs = geo.cluster_size();
        let per = geo.refblock_entries();
        let order = geo.refcount_order;
        let n = self.refs.len();
        self.disk = RefArray::zeroed(n)?;
        self.bad_blocks.clear();
        let nblocks = n.div_ceil(per);
        self.expect(nblocks);
        let mut highest = 0u64;
        // Bound: `n` is the file's cluster count (at most MAX_CHECK_CLUSTERS, checked by
        // `calculate`) and every round advances `b` by at least one block.
        let mut b = 0u64;
        let max_run = (BATCH_BYTES / cs).max(1);
        while b < nblocks {
            let e = self.reftable.get(b as usize).copied().unwrap_or(0);
            let off = e & REFTABLE_OFFSET_MASK;
            let first = b * per;
            let end = (first + per).min(n);
            if off == 0 {
                for i in first..end {
                    self.compare_one(res, fix, i, 0, false, &mut highest);
                }
                b += 1;
                self.tick(1);
                continue;
            }
            if !geo.is_aligned(off) {
                for i in first..end {
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
            // Coalesce blocks that follow each other on the host into one read.
            let mut run = 1u64;
            while run < max_run && b + run < nblocks {
                let next = self.reftable.get((b + run) as usize).copied().unwrap_or(0);
                // A block offset near the top of the address space must not wrap around.
                if Some(next & REFTABLE_OFFSET_MASK) != off.checked_add(run * cs) {
                    break;
                }
                run += 1;
            }
            let mut buf = vec![0u8; (run * cs) as usize];
            self.file
                .read_zero_padded(&mut buf, HostOffset::new(off), "refcount block")?;
            for k in 0..run {
                let blk = &mut buf[(k * cs) as usize..((k + 1) * cs) as usize];
                let first = (b + k) * per;
                let end = (first + per).min(n);
                let mut dirty = false;
                for i in first..end {
                    let on = refcount::get(blk, order, (i - first) as usize);
                    if let Some(v) = self.compare_one(res, fix, i, on, true, &mut highest) {
                        refcount::set(blk, order, (i - first) as usize, v);
                        dirty = true;
                    }
                }
                if dirty {
                    self.file.write(
                        blk,
                        HostOffset::new(off + k * cs),
                        WriteKind::RefcountBlock,
                    )?;
                    self.wrote = true;
                }
                self.tick(1);
            }
            b += run;
        }
        if self.wrote {
            self.file.sync()?;
        }
        Ok(highest)
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
    fn disk_refcount(&self, cluster: u64) -> Result<Option<u64>> {
        let per = self.geo.refblock_entries();
        if self.bad_blocks.contains(&(cluster / per)) {
            return Ok(None);
        }
        if cluster < self.disk.len() {
            return Ok(Some(self.disk.get(cluster)));
        }
        let e = self
            .reftable
            .get((cluster / per) as usize)
            .copied()
            .unwrap_or(0);
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(Some(0));
        }
        if !self.geo.is_aligned(off) {
            return Ok(None);
        }
        let mut blk = vec![0u8; self.geo.cluster_size() as usize];
        self.file
            .read_zero_padded(&mut blk, HostOffset::new(off), "refcount block")?;
        Ok(Some(refcount::get(
            &blk,
            self.geo.refcount_order,
            (cluster % per) as usize,
        )))
    }

    /// First-fit allocation of `count` clusters that no structure references, in the
    /// computed array (which grows past the end of the file as needed).
    fn alloc(&mut self, cursor: &mut u64, count: u64) -> Result<u64> {
        let floor = self.geo.clusters_for(self.past_eof_floor);
        let limit = (1u64 << 56) >> self.geo.cluster_bits;
        // Placing the new structure past a reference far beyond the end of the file would
        // make the in-memory refcount array (two bytes per cluster) and the file huge.
        let reach = self.geo.clusters_for(self.growth_limit());
        let mut start = *cursor;
        let mut c = start;
        // Bound: `c` grows every round (or jumps to `floor`, once); past the end of `refs`
        // every cluster is free, so the loop ends by max(refs.len(), floor) + count, and the
        // 2^56 limit stops it in any case.
        while c - start < count {
            if c >= limit {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "no room for a new refcount structure below 2^56",
                ));
            }
            if c >= self.refs.len() && c < floor {
                if floor.saturating_add(count) > reach {
                    return Err(Error::new(ErrorKind::NoSpace, format!(
                        "no room for a new refcount structure: a cluster referenced at {:#x} lies too far beyond the end of the file",
                        self.past_eof_floor
                    )));
                }
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

    /// Writes a brand-new refcount table and blocks describing `self.refs` into clusters no
    /// structure uses, syncs them, then switches the header to them with one synced write.
    /// The old structures stay untouched (they become leaks).
    fn rebuild_structure(&mut self) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cb = geo.cluster_bits;
        let per = geo.refblock_entries();
        let mut blocks: BTreeMap<u64, u64> = BTreeMap::new();
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
            let mut added = false;
            // Bound: `refs` only grows by the clusters this loop allocates (one per new
            // block), so the block count grows by at most one per `per` new blocks; the
            // outer loop is capped at 64 rounds.
            let mut b = 0;
            while b < self.refs.len().div_ceil(per) {
                if !blocks.contains_key(&b) && self.refs.any_in(b * per, (b + 1) * per) {
                    let c = self.alloc(&mut cursor, 1)?;
                    blocks.insert(b, c << cb);
                    added = true;
                }
                b += 1;
            }
            if added {
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
        let order = geo.refcount_order;
        let mut new_table = vec![0u64; (table_clusters * cs / 8) as usize];
        for (&b, &off) in &blocks {
            let mut data = vec![0u8; cs as usize];
            for j in 0..per {
                let v = self.refs.get(b * per + j);
                if v != 0 {
                    refcount::set(&mut data, order, j as usize, v);
                }
            }
            self.file
                .write(&data, HostOffset::new(off), WriteKind::RefcountBlock)?;
            new_table[b as usize] = off;
        }
        let table_off = table_first << cb;
        let bytes = crate::format::be::u64_table_bytes(&new_table);
        self.file
            .write(&bytes, HostOffset::new(table_off), WriteKind::RefcountTable)?;
        self.wrote = true;
        self.file.sync()?;
        self.file.write_header_fields(&layout::reftable_update(
            HostOffset::new(table_off),
            table_clusters,
        )?)?;
        self.file.sync()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(())
    }

    /// Checks (and with `fix`, repairs) the COPIED flags of the active L1 entries and of the
    /// active L2 data entries against the refcounts.
    fn oflag_copied(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let may_repair = match fix {
            CheckFix::All => true,
            CheckFix::Leaks => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
            CheckFix::None => false,
        };
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cb = geo.cluster_bits;
        let l1_off = self.header.l1_table_offset;
        let mut l1 = read_u64_table(self.file, l1_off, self.header.l1_size as u64, "L1 table")?;
        let mut wrote = false;
        let mut i = 0;
        while i < l1.len() {
            if l1[i] & OFFSET_MASK == 0 {
                i += 1;
                self.tick(1);
                continue;
            }
            let (n, mut buf) = read_l2_run(self.file, &geo, &l1, i)?;
            for k in 0..n {
                let idx = i + k;
                let e = l1[idx];
                let l2 = e & OFFSET_MASK;
                // The L1 entry itself may be fixed; the table it points at only when it is
                // not the header, the L1 or the refcount table posing as an L2 table.
                let repair = may_repair;
                let repair_l2 = may_repair && self.fixed_metadata_at(l2).is_none();
                let Some(rc) = self.disk_refcount(l2 >> cb)? else {
                    self.tick(1);
                    continue;
                };
                if (rc == 1) != (e & COPIED != 0) {
                    res.corruptions += 1;
                    self.msg(format!(
                        "{} OFLAG_COPIED L2 cluster: l1_index={idx} l1_entry={e:x} refcount={rc}",
                        if repair { "Repairing" } else { "ERROR" }
                    ));
                    if repair {
                        let new = if rc == 1 { e | COPIED } else { e & !COPIED };
                        l1[idx] = new;
                        self.file.write(
                            &new.to_be_bytes(),
                            HostOffset::new(l1_off + idx as u64 * 8),
                            WriteKind::L1,
                        )?;
                        wrote = true;
                        res.corruptions -= 1;
                        res.corruptions_fixed += 1;
                    }
                }
                let t = &mut buf[k * cs as usize..(k + 1) * cs as usize];
                let mut dirty = 0u64;
                for j in 0..geo.l2_entries() as usize {
                    let (w, _) = l2_words(&geo, t, j);
                    if !matches!(kind(&geo, w), Kind::Normal | Kind::ZeroAlloc) {
                        continue;
                    }
                    let Some(rc) = self.disk_refcount((w & OFFSET_MASK) >> cb)? else {
                        continue;
                    };
                    if (rc == 1) != (w & COPIED != 0) {
                        res.corruptions += 1;
                        self.msg(format!(
                            "{} OFLAG_COPIED data cluster: l2_entry={w:x} refcount={rc}",
                            if repair_l2 { "Repairing" } else { "ERROR" }
                        ));
                        if repair_l2 {
                            let new = if rc == 1 { w | COPIED } else { w & !COPIED };
                            let at = j * geo.l2_entry_size() as usize;
                            put_u64(t, at, new);
                            dirty += 1;
                        }
                    }
                }
                if dirty > 0 {
                    self.file.write(t, HostOffset::new(l2), WriteKind::L2)?;
                    wrote = true;
                    res.corruptions -= dirty;
                    res.corruptions_fixed += dirty;
                }
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
