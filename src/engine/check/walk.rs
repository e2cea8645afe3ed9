//! Rebuilding every host cluster's reference count from the image's structures (the first
//! half of a check): header, active and snapshot L1/L2 tables and their data, snapshot table,
//! refcount table and blocks, crypto header, bitmaps. Per-entry problems are reported in
//! `qemu-img check`'s words.

use super::refs::RefArray;
use super::{CheckFix, CheckReport};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, TABLE_ENTRY_OFFSET, TABLE_ENTRY_RESERVED};
use crate::format::entry::{l2_table_entries, L1Entry, L2Entry, L2Kind, RefcountTableEntry, ZERO};
use crate::format::header::MAX_L1_BYTES;
use crate::format::snapshot::Snapshot;
use crate::format::HostOffset;
use crate::format::{Geometry, Header};
use crate::storage::{HostFile, WriteKind};
use std::collections::HashSet;

/// Largest number of host clusters a check handles (QEMU's limit too, `INT_MAX`).
const MAX_CHECK_CLUSTERS: u64 = 0x7fff_ffff;
/// Upper bound of one coalesced metadata read.
pub(super) const BATCH_BYTES: u64 = 8 << 20;

/// How many referenced regions past the end of the file a check remembers (for counting them
/// if a repair grows the file over them): enough for any image a repair can sensibly grow.
pub(super) const MAX_SKIPPED: usize = 4096;

/// The state of one check pass over one image file.
pub(super) struct Checker<'a> {
    pub(super) file: &'a HostFile,
    pub(super) header: Header,
    pub(super) geo: Geometry,
    pub(super) snapshots: Vec<Snapshot>,
    pub(super) snapshot_table_len: u64,
    /// References computed from the structures.
    pub(super) refs: RefArray,
    /// On-disk refcounts as seen (and possibly fixed) by the last comparison.
    pub(super) disk: RefArray,
    /// Refcount blocks whose entries could not be read (unaligned offsets).
    pub(super) bad_blocks: HashSet<u64>,
    /// The refcount table as on disk.
    pub(super) reftable: Vec<RefcountTableEntry>,
    /// Length of the file when the last calculation started.
    pub(super) file_len: u64,
    /// Length of the file when this check started: growing the file to reach refcount blocks
    /// outside the image is bounded relative to it, not to the already grown file.
    pub(super) initial_file_len: Option<u64>,
    /// End of the furthest region that was referenced but lies past the end of the file;
    /// rebuilt refcount structures are never placed below it past the end of the file.
    pub(super) past_eof_floor: u64,
    /// The referenced regions past the end of the file, `[start, end)`, not counted: a
    /// repair that grows the file over them counts them then (they become real clusters).
    /// At most [`MAX_SKIPPED`] are kept; beyond that the repair does not grow the file.
    pub(super) skipped: Vec<(u64, u64)>,
    /// More regions were skipped than `skipped` holds.
    pub(super) skipped_overflow: bool,
    /// Diagnostics in order.
    pub(super) msgs: Vec<String>,
    /// Snapshot table corruptions the caller repairs after [`Checker::run`]: until then the
    /// image must not be marked clean.
    pub(super) snapshot_corruptions: u64,
    /// Whether anything was written to the file.
    pub(super) wrote: bool,
    /// The refcount table or a refcount block is broken beyond an in-place fix.
    pub(super) rebuild: bool,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
}

/// Where an L2 entry lives: the table's host offset and the entry's index in it.
#[derive(Clone, Copy)]
struct L2Slot {
    table: HostOffset,
    index: u64,
}

/// Reads the run of L2 tables starting at L1 index `i` whose offsets follow each other on
/// the host (at most [`BATCH_BYTES`]), returning how many tables the buffer holds.
pub(super) fn read_l2_run(
    file: &HostFile,
    geo: &Geometry,
    l1: &[L1Entry],
    i: usize,
) -> Result<(usize, Vec<u8>)> {
    let cs = geo.cluster_size();
    let first = l1[i].l2_offset();
    let max = usize::try_from(BATCH_BYTES / cs).unwrap_or(1).max(1);
    let mut n = 1;
    let mut next = first + cs;
    while n < max && l1.get(i + n).is_some_and(|e| e.l2_offset() == next) {
        n += 1;
        next += cs;
    }
    let mut buf = vec![0u8; n << geo.cluster_bits];
    file.read_zero_padded(&mut buf, first, "L2 table")?;
    Ok((n, buf))
}

/// Reads a table of `entries` big-endian u64 at `offset`, zero-padded past the end of file.
pub(super) fn read_u64_table(
    file: &HostFile,
    offset: HostOffset,
    entries: u64,
    what: &str,
) -> Result<Vec<u64>> {
    let bytes = usize::try_from(entries * 8)
        .map_err(|_| Error::new(ErrorKind::NoMemory, format!("{what} of {entries} entries")))?;
    let mut raw = vec![0u8; bytes];
    file.read_zero_padded(&mut raw, offset, what)?;
    Ok(crate::format::be::u64_table(&raw))
}

/// Reads an L1 table of `entries` entries at `offset`.
pub(super) fn read_l1_table(
    file: &HostFile,
    offset: HostOffset,
    entries: u32,
) -> Result<Vec<L1Entry>> {
    let raw = read_u64_table(file, offset, u64::from(entries), "L1 table")?;
    Ok(raw.into_iter().map(L1Entry).collect())
}

impl<'a> Checker<'a> {
    /// A pass over `file` described by `header`.
    pub(super) fn new(
        file: &'a HostFile,
        header: Header,
        snapshots: Vec<Snapshot>,
        snapshot_table_len: u64,
        progress: &'a mut dyn FnMut(u64, u64),
    ) -> Checker<'a> {
        let geo = header.geometry();
        let mut total = u64::from(header.l1_size) * 2;
        for s in &snapshots {
            total += u64::from(s.l1_size);
        }
        Checker {
            file,
            header,
            geo,
            snapshots,
            snapshot_table_len,
            refs: RefArray::default(),
            disk: RefArray::default(),
            bad_blocks: HashSet::new(),
            reftable: Vec::new(),
            file_len: 0,
            initial_file_len: None,
            past_eof_floor: 0,
            skipped: Vec::new(),
            skipped_overflow: false,
            msgs: Vec::new(),
            snapshot_corruptions: 0,
            wrote: false,
            rebuild: false,
            progress,
            done: 0,
            total,
        }
    }

    /// The fixed structure (header, active L1, refcount table, snapshot table) that holds
    /// the cluster at `offset`, if any. A damaged L1 entry can make one of them pose as an L2
    /// table; a repair must not write table entries into it. [`Image::check_path`] has no
    /// overlap-guard index, so repairs of L2 tables consult this (QEMU's overlap check stops
    /// the same writes).
    ///
    /// [`Image::check_path`]: crate::Image::check_path
    pub(super) fn fixed_metadata_at(&self, offset: HostOffset) -> Option<&'static str> {
        let geo = &self.geo;
        let c = offset.cluster(geo);
        let h = &self.header;
        let within = |start: u64, len: u64| {
            let start = HostOffset::new(start);
            len > 0
                && c >= start.cluster(geo)
                && c <= HostOffset::new(start.get().saturating_add(len) - 1).cluster(geo)
        };
        if c.0 == 0 {
            Some("qcow2_header")
        } else if within(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            Some("active L1 table")
        } else if within(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) << geo.cluster_bits,
        ) {
            Some("refcount table")
        } else if within(h.snapshots_offset, self.snapshot_table_len) {
            Some("snapshot table")
        } else {
            None
        }
    }

    /// Records a diagnostic.
    pub(super) fn msg(&mut self, m: String) {
        self.msgs.push(m);
    }

    /// Advances progress by `n` units (and the total when the estimate was short).
    pub(super) fn tick(&mut self, n: u64) {
        self.done += n;
        self.total = self.total.max(self.done);
        (self.progress)(self.done, self.total);
    }

    /// Adds `n` units of expected work.
    pub(super) fn expect(&mut self, n: u64) {
        self.total += n;
    }

    /// How far a repair may grow the file (and the in-memory refcount array with it): twice
    /// its length when the check started or 1 GiB more, whichever is larger, and never more
    /// clusters than a check handles.
    pub(super) fn growth_limit(&self) -> u64 {
        let base = self.initial_file_len.unwrap_or(self.file_len);
        (base.saturating_mul(2))
            .max(base.saturating_add(1 << 30))
            .min(MAX_CHECK_CLUSTERS << self.geo.cluster_bits)
    }

    /// Counts one reference to every cluster of `[offset, offset+size)`.
    pub(super) fn inc(
        &mut self,
        res: &mut CheckReport,
        offset: HostOffset,
        size: u64,
    ) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let geo = self.geo;
        let end = offset.get().saturating_add(size);
        // The last cluster of a file may be partly allocated: referencing it is fine.
        if end > self.file_len && end - self.file_len >= geo.cluster_size() {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            res.corruptions += 1;
            self.past_eof_floor = self.past_eof_floor.max(end);
            if self.skipped.len() < MAX_SKIPPED {
                self.skipped.push((offset.get(), end));
            } else {
                self.skipped_overflow = true;
            }
            return Ok(());
        }
        let first = offset.cluster(&geo);
        let last = HostOffset::new(end - 1).cluster(&geo);
        self.refs.grow(last.0 + 1)?;
        let max = geo.refcount_max();
        for k in first.0..=last.0 {
            let r = self.refs.get(k);
            if r == max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << geo.cluster_bits
                ));
                self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into());
                res.corruptions += 1;
                continue;
            }
            self.refs.set(k, r + 1);
        }
        Ok(())
    }

    /// Computes the references of every cluster into `self.refs` (QEMU's
    /// `calculate_refcounts`). `fix` allows repairing unaligned preallocated zero entries and
    /// refcount blocks past the end of the file.
    pub(super) fn calculate(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.file_len = self.file.len()?;
        self.initial_file_len.get_or_insert(self.file_len);
        let nb = self.geo.clusters_for(self.file_len);
        if nb > MAX_CHECK_CLUSTERS {
            res.check_errors += 1;
            return Err(Error::new(
                ErrorKind::NoMemory,
                format!(
                    "image file of {} bytes has too many clusters to check",
                    self.file_len
                ),
            ));
        }
        self.refs = RefArray::zeroed(nb)?;
        self.past_eof_floor = 0;
        self.skipped.clear();
        self.skipped_overflow = false;

        self.inc(res, HostOffset::ZERO, cs)?;
        let h = &self.header;
        let (l1_off, l1_size) = (HostOffset::new(h.l1_table_offset), h.l1_size);
        self.check_l1(res, l1_off, l1_size, true, fix)?;
        self.check_snapshot_l1s(res, fix)?;
        let h = &self.header;
        let snapshot_table = HostOffset::new(h.snapshots_offset);
        let reftable = HostOffset::new(h.refcount_table_offset);
        let reftable_len = u64::from(h.refcount_table_clusters) * cs;
        let crypto = h.crypto;
        self.inc(res, snapshot_table, self.snapshot_table_len)?;
        self.inc(res, reftable, reftable_len)?;
        if let Some((off, len)) = crypto {
            self.inc(res, HostOffset::new(off), len)?;
        }
        self.check_bitmaps(res)?;
        self.check_refblocks(res, fix)
    }

    /// Walks the L1 tables of the snapshots whose table entry describes a usable one.
    fn check_snapshot_l1s(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let snaps = std::mem::take(&mut self.snapshots);
        let walked = self.check_snapshot_l1s_of(res, fix, &snaps);
        self.snapshots = snaps;
        walked
    }

    /// Walks the L1 tables of `snaps`, reporting entries whose L1 table is unaligned or too
    /// large instead.
    fn check_snapshot_l1s_of(
        &mut self,
        res: &mut CheckReport,
        fix: CheckFix,
        snaps: &[Snapshot],
    ) -> Result<()> {
        for s in snaps {
            let l1_off = HostOffset::new(s.l1_table_offset);
            if !l1_off.is_cluster_aligned(&self.geo) {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name
                ));
                res.corruptions += 1;
                continue;
            }
            if u64::from(s.l1_size) > MAX_L1_BYTES / 8 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(res, l1_off, s.l1_size, false, fix)?;
        }
        Ok(())
    }

    /// Walks one L1 table and its L2 tables.
    fn check_l1(
        &mut self,
        res: &mut CheckReport,
        l1_off: HostOffset,
        l1_size: u32,
        active: bool,
        fix: CheckFix,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(res, l1_off, u64::from(l1_size) * 8)?;
        let l1 = read_l1_table(self.file, l1_off, l1_size)?;
        // Bound: l1_size is validated (at most MAX_L1_BYTES / 8 entries, by the header parser
        // or the snapshot check above) and every round advances `i` by at least one.
        let mut i = 0;
        while i < l1.len() {
            if l1[i] == L1Entry(0) {
                i += 1;
                self.tick(1);
                continue;
            }
            let (n, buf) = read_l2_run(self.file, &self.geo, &l1, i)?;
            let tables = buf.chunks_exact(1usize << self.geo.cluster_bits);
            for (&e, t) in l1[i..i + n].iter().zip(tables) {
                self.check_l1_entry(res, e, t, active, fix)?;
                self.tick(1);
            }
            i += n;
        }
        Ok(())
    }

    /// Checks one used L1 entry and the L2 table `t` it points at.
    fn check_l1_entry(
        &mut self,
        res: &mut CheckReport,
        e: L1Entry,
        t: &[u8],
        active: bool,
        fix: CheckFix,
    ) -> Result<()> {
        if e.reserved() != 0 {
            self.msg(format!(
                "ERROR found L1 entry with reserved bits set: {:x}",
                e.0
            ));
            res.corruptions += 1;
        }
        let l2 = e.l2_offset();
        self.inc(res, l2, self.geo.cluster_size())?;
        if !l2.is_cluster_aligned(&self.geo) {
            self.msg(format!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            res.corruptions += 1;
        }
        self.check_l2(res, t, l2, active, fix)
    }

    /// Checks one L2 table and counts the clusters it references.
    fn check_l2(
        &mut self,
        res: &mut CheckReport,
        t: &[u8],
        l2_off: HostOffset,
        active: bool,
        fix: CheckFix,
    ) -> Result<()> {
        let geo = self.geo;
        let mut next_contiguous = None;
        for (index, e) in (0u64..).zip(l2_table_entries(&geo, t)) {
            if e.reserved() != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {:x}",
                    e.word0
                ));
                res.corruptions += 1;
            }
            match e.kind(&geo) {
                L2Kind::Compressed => self.check_compressed(res, e, index, active)?,
                L2Kind::ZeroAlloc | L2Kind::Normal => {
                    let slot = L2Slot {
                        table: l2_off,
                        index,
                    };
                    if self.check_allocated(res, e, slot, fix)? {
                        let host = e.host();
                        if active {
                            res.allocated_clusters += 1;
                            if next_contiguous.is_some_and(|n| n != host) {
                                res.fragmented_clusters += 1;
                            }
                            next_contiguous = Some(host + geo.cluster_size());
                        }
                        // Clusters of an external data file are not refcounted.
                        if !geo.external_data {
                            self.inc(res, host, geo.cluster_size())?;
                        }
                    }
                }
                L2Kind::ZeroPlain => {}
                L2Kind::Unallocated => {
                    if e.alloc_bits() != 0 {
                        res.corruptions += 1;
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a compressed L2 entry (number `index` of its table) and counts its clusters.
    fn check_compressed(
        &mut self,
        res: &mut CheckReport,
        mut e: L2Entry,
        index: u64,
        active: bool,
    ) -> Result<()> {
        let c = e.compressed(&self.geo);
        if self.geo.external_data {
            self.msg(format!(
                "ERROR compressed cluster {index} with data file, entry={:#x}",
                e.word0
            ));
            res.corruptions += 1;
            return Ok(());
        }
        if e.copied() {
            self.msg(format!(
                "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                c.host
            ));
            e = e.with_copied(false);
            res.corruptions += 1;
        }
        if e.bitmap != 0 {
            self.msg(format!(
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={:#x}",
                e.word0
            ));
            res.corruptions += 1;
            return Ok(());
        }
        self.inc(res, c.host, c.csize())?;
        if active {
            res.allocated_clusters += 1;
            res.compressed_clusters += 1;
            res.fragmented_clusters += 1;
        }
        Ok(())
    }

    /// Checks the bitmap and alignment of an entry with a host cluster (data or preallocated
    /// zero). Returns whether the cluster is still referenced: false when an unaligned
    /// preallocated entry was repaired into a plain zero entry.
    fn check_allocated(
        &mut self,
        res: &mut CheckReport,
        e: L2Entry,
        slot: L2Slot,
        fix: CheckFix,
    ) -> Result<bool> {
        let geo = self.geo;
        let offset = e.host();
        if e.alloc_bits() & e.zero_bits() != 0 {
            res.corruptions += 1;
            self.msg(format!(
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
        }
        if offset.is_cluster_aligned(&geo) {
            return Ok(true);
        }
        res.corruptions += 1;
        let contains_data = if geo.extended_l2 {
            e.alloc_bits() != 0
        } else {
            e.kind(&geo) == L2Kind::Normal
        };
        if contains_data {
            self.msg(format!(
                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ));
            return Ok(true);
        }
        let repaired = self.repair_unaligned_prealloc(res, e, slot, fix)?;
        Ok(!repaired)
    }

    /// Reports an unaligned preallocated zero entry and, when `fix` allows and the table is
    /// a real L2 table, turns it into a plain zero entry. Returns whether it did.
    fn repair_unaligned_prealloc(
        &mut self,
        res: &mut CheckReport,
        e: L2Entry,
        slot: L2Slot,
        fix: CheckFix,
    ) -> Result<bool> {
        let geo = self.geo;
        let overlap = self.fixed_metadata_at(slot.table);
        if let (CheckFix::All, Some(name)) = (fix, overlap) {
            self.msg(format!(
                "ERROR l2_offset={:x}: not repairing an L2 table that overlaps the {name}",
                slot.table
            ));
        }
        let repair = fix == CheckFix::All && overlap.is_none();
        self.msg(format!(
            "{} offset={:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
            if repair { "Repairing" } else { "ERROR" },
            e.host()
        ));
        if !repair {
            return Ok(false);
        }
        // Extended L2 entries have no ZERO flag: an unallocated entry keeps its bitmap.
        let word0 = if geo.extended_l2 { 0 } else { ZERO };
        let bytes = L2Entry::new(word0, e.bitmap).to_bytes(geo.extended_l2);
        let at = slot.table + slot.index * geo.l2_entry_size();
        self.file.write(&bytes, at, WriteKind::L2)?;
        self.file.sync()?;
        self.wrote = true;
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        Ok(true)
    }

    /// Counts the bitmap directory, bitmap tables and bitmap data clusters (only when the
    /// bitmaps are valid, i.e. autoclear bit 0 is set, as QEMU ignores them otherwise).
    fn check_bitmaps(&mut self, res: &mut CheckReport) -> Result<()> {
        let Some(ext) = self.header.bitmaps_in_use() else {
            return Ok(());
        };
        let dir_off = HostOffset::new(ext.directory_offset);
        self.inc(res, dir_off, ext.directory_size)?;
        // The header parser bounds the directory size (at most 64 MiB).
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file
            .read_zero_padded(&mut dir, dir_off, "bitmap directory")?;
        let list = match bitmap::parse_directory(&dir, ext.nb_bitmaps, &self.geo, self.header.size)
        {
            Ok(l) => l,
            Err(e) => {
                self.msg(format!("ERROR bitmap directory is broken: {e}"));
                res.corruptions += 1;
                return Ok(());
            }
        };
        for bm in list {
            let table = HostOffset::new(bm.table_offset);
            let entries = u64::from(bm.table_size);
            self.inc(res, table, entries * 8)?;
            self.check_bitmap_table(res, table, entries)?;
        }
        Ok(())
    }

    /// Checks the entries of one bitmap table and counts the data clusters they point at.
    fn check_bitmap_table(
        &mut self,
        res: &mut CheckReport,
        table: HostOffset,
        entries: u64,
    ) -> Result<()> {
        // Read the table in bounded chunks: its size comes from disk.
        let chunk = BATCH_BYTES / 8;
        let mut done = 0u64;
        while done < entries {
            let n = chunk.min(entries - done);
            let Some(at) = table.checked_add(done * 8) else {
                res.corruptions += 1;
                break;
            };
            for e in read_u64_table(self.file, at, n, "bitmap table")? {
                let off = HostOffset::new(e & TABLE_ENTRY_OFFSET);
                let bad = e & TABLE_ENTRY_RESERVED != 0
                    || (off != HostOffset::ZERO
                        && (e & 1 != 0 || !off.is_cluster_aligned(&self.geo)));
                if bad {
                    res.corruptions += 1;
                    continue;
                }
                if off != HostOffset::ZERO {
                    self.inc(res, off, self.geo.cluster_size())?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Checks the refcount table's entries and counts the refcount blocks.
    fn check_refblocks(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let entries = u64::from(self.header.refcount_table_clusters) * self.geo.u64_per_cluster();
        let table = HostOffset::new(self.header.refcount_table_offset);
        let raw = read_u64_table(self.file, table, entries, "refcount table")?;
        self.reftable = raw.into_iter().map(RefcountTableEntry).collect();
        for i in 0..self.reftable.len() {
            self.check_refblock(res, fix, i)?;
        }
        Ok(())
    }

    /// Checks refcount table entry `i` and counts the block it points at.
    fn check_refblock(&mut self, res: &mut CheckReport, fix: CheckFix, i: usize) -> Result<()> {
        let e = self.reftable[i];
        let off = e.block_offset();
        if e.reserved() != 0 {
            self.msg(format!(
                "ERROR refcount table entry {i} has reserved bits set"
            ));
            res.corruptions += 1;
            self.rebuild = true;
            return Ok(());
        }
        if !off.is_cluster_aligned(&self.geo) {
            self.msg(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            res.corruptions += 1;
            self.rebuild = true;
            return Ok(());
        }
        if off.cluster(&self.geo).0 >= self.refs.len() {
            res.corruptions += 1;
            let repair = fix == CheckFix::All;
            self.msg(format!(
                "{} refcount block {i} is outside image",
                if repair { "Repairing" } else { "ERROR" }
            ));
            if repair {
                self.grow_to_refblock(res, off)?;
            }
            return Ok(());
        }
        if off != HostOffset::ZERO {
            self.inc(res, off, self.geo.cluster_size())?;
            let r = self.refs.get(off.cluster(&self.geo).0);
            if r != 1 {
                self.msg(format!("ERROR refcount block {i} refcount={r}"));
                res.corruptions += 1;
                self.rebuild = true;
            }
        }
        Ok(())
    }

    /// Grows the file so that the refcount block at `off`, past its end, exists (reading as
    /// zeros), unless the entry points absurdly far away: then the refcount structure is
    /// rebuilt without it instead of growing a huge sparse file.
    fn grow_to_refblock(&mut self, res: &mut CheckReport, off: HostOffset) -> Result<()> {
        let cs = self.geo.cluster_size();
        // Grow the file so that the block exists (reading as zeros), unless the entry points
        // absurdly far away: then the refcount structure is rebuilt without it instead. The
        // bound is taken from the file as it was, so that blocks one after the other, each
        // within reach of the last, cannot walk the file (and the in-memory refcount array,
        // two bytes per cluster) up to terabytes.
        let limit = self.growth_limit();
        let grown = match off.checked_add(cs).filter(|l| l.get() <= limit) {
            None => Err("the block is too far beyond the end of the file".to_string()),
            Some(_) if self.skipped_overflow => {
                Err("too many references lie beyond the end of the file".to_string())
            }
            Some(l) => self.file.set_len(l.get()).map_err(|e| e.to_string()),
        };
        if let Err(e) = grown {
            self.msg(format!("ERROR could not resize image: {e}"));
            self.rebuild = true;
            return Ok(());
        }
        self.wrote = true;
        self.file_len = self.file.len()?;
        self.refs.grow(self.geo.clusters_for(self.file_len))?;
        // Regions referenced past the old end that are now inside the file are real clusters.
        self.count_skipped_below(self.file_len)?;
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        self.inc(res, off, cs)
    }
}
