//! Rebuilding every host cluster's reference count from the image's structures (the first
//! half of a check): header, active and snapshot L1/L2 tables and their data, snapshot table,
//! refcount table and blocks, crypto header, bitmaps. Per-entry problems are reported in
//! `qemu-img check`'s words.

use super::refs::RefArray;
use super::{CheckFix, CheckReport};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::format::be::u64_at;
use crate::format::bitmap::{self, TABLE_ENTRY_OFFSET, TABLE_ENTRY_RESERVED};
use crate::format::entry::{
    COMPRESSED, COPIED, L1_RESERVED_MASK, L2_RESERVED_MASK, OFFSET_MASK, ZERO,
};
use crate::format::header::MAX_L1_BYTES;
use crate::format::refcount::{REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK};
use crate::format::snapshot::Snapshot;
use crate::format::HostOffset;
use crate::format::{Geometry, Header};
use crate::storage::{HostFile, WriteKind};
use std::collections::HashSet;

/// Largest number of host clusters a check handles (QEMU's limit too).
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// Upper bound of one coalesced metadata read.
pub(super) const BATCH_BYTES: u64 = 8 << 20;

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
    pub(super) reftable: Vec<u64>,
    /// Length of the file when the last calculation started.
    pub(super) file_len: u64,
    /// Length of the file when this check started: growing the file to reach refcount blocks
    /// outside the image is bounded relative to it, not to the already grown file.
    pub(super) initial_file_len: Option<u64>,
    /// End of the furthest region that was referenced but lies past the end of the file;
    /// rebuilt refcount structures are never placed below it past the end of the file.
    pub(super) past_eof_floor: u64,
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

/// Cluster types as the check sees them (the ZERO flag is ignored with extended L2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

/// Classifies a standard L2 entry word.
pub(super) fn kind(geo: &Geometry, e: u64) -> Kind {
    if e & COMPRESSED != 0 {
        Kind::Compressed
    } else if e & ZERO != 0 && !geo.extended_l2 {
        if e & OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if e & OFFSET_MASK == 0 {
        Kind::Unallocated
    } else {
        Kind::Normal
    }
}

/// The (word0, bitmap) of entry `i` of an L2 table.
pub(super) fn l2_words(geo: &Geometry, t: &[u8], i: usize) -> (u64, u64) {
    if geo.extended_l2 {
        (u64_at(t, i * 16), u64_at(t, i * 16 + 8))
    } else {
        (u64_at(t, i * 8), 0)
    }
}

/// Reads the run of L2 tables starting at L1 index `i` whose offsets follow each other on
/// the host (at most [`BATCH_BYTES`]), returning how many tables the buffer holds.
pub(super) fn read_l2_run(
    file: &HostFile,
    geo: &Geometry,
    l1: &[u64],
    i: usize,
) -> Result<(usize, Vec<u8>)> {
    let cs = geo.cluster_size();
    let first = l1[i] & OFFSET_MASK;
    let max = (BATCH_BYTES / cs).max(1) as usize;
    let mut n = 1;
    while n < max && i + n < l1.len() && l1[i + n] & OFFSET_MASK == first + n as u64 * cs {
        n += 1;
    }
    let mut buf = vec![0u8; n * cs as usize];
    file.read_zero_padded(&mut buf, HostOffset::new(first), "L2 table")?;
    Ok((n, buf))
}

/// Reads a table of `entries` big-endian u64 at `offset`, zero-padded past the end of file.
pub(super) fn read_u64_table(
    file: &HostFile,
    offset: u64,
    entries: u64,
    what: &str,
) -> Result<Vec<u64>> {
    let bytes = usize::try_from(entries * 8)
        .map_err(|_| Error::new(ErrorKind::NoMemory, format!("{what} of {entries} entries")))?;
    let mut raw = vec![0u8; bytes];
    file.read_zero_padded(&mut raw, HostOffset::new(offset), what)?;
    Ok(crate::format::be::u64_table(&raw))
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
        let mut total = header.l1_size as u64 * 2;
        for s in &snapshots {
            total += s.l1_size as u64;
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
    pub(super) fn fixed_metadata_at(&self, offset: u64) -> Option<&'static str> {
        let cb = self.geo.cluster_bits;
        let c = offset >> cb;
        let h = &self.header;
        let within = |start: u64, len: u64| {
            len > 0 && c >= start >> cb && c <= (start.saturating_add(len) - 1) >> cb
        };
        if c == 0 {
            Some("qcow2_header")
        } else if within(h.l1_table_offset, h.l1_size as u64 * 8) {
            Some("active L1 table")
        } else if within(
            h.refcount_table_offset,
            (h.refcount_table_clusters as u64) << cb,
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
    pub(super) fn inc(&mut self, res: &mut CheckReport, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let end = offset.saturating_add(size);
        // The last cluster of a file may be partly allocated: referencing it is fine.
        if end > self.file_len && end - self.file_len >= cs {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            res.corruptions += 1;
            self.past_eof_floor = self.past_eof_floor.max(end);
            return Ok(());
        }
        let first = offset >> self.geo.cluster_bits;
        let last = (end - 1) >> self.geo.cluster_bits;
        self.refs.grow(last + 1)?;
        let max = self.geo.refcount_max();
        for k in first..=last {
            let r = self.refs.get(k);
            if r == max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.geo.cluster_bits
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

        self.inc(res, 0, cs)?;
        let (l1_off, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        self.check_l1(res, l1_off, l1_size, true, fix)?;
        let snaps = std::mem::take(&mut self.snapshots);
        for s in &snaps {
            if !self.geo.is_aligned(s.l1_table_offset) {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_table_offset
                ));
                res.corruptions += 1;
                continue;
            }
            if s.l1_size as u64 > MAX_L1_BYTES / 8 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(res, s.l1_table_offset, s.l1_size, false, fix)?;
        }
        self.snapshots = snaps;
        let (so, sl) = (self.header.snapshots_offset, self.snapshot_table_len);
        self.inc(res, so, sl)?;
        let rt_off = self.header.refcount_table_offset;
        let rt_clusters = self.header.refcount_table_clusters as u64;
        self.inc(res, rt_off, rt_clusters * cs)?;
        if let Some((off, len)) = self.header.crypto {
            self.inc(res, off, len)?;
        }
        self.check_bitmaps(res)?;
        self.check_refblocks(res, fix)
    }

    /// Walks one L1 table and its L2 tables.
    fn check_l1(
        &mut self,
        res: &mut CheckReport,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        fix: CheckFix,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        self.inc(res, l1_off, l1_size as u64 * 8)?;
        let l1 = read_u64_table(self.file, l1_off, l1_size as u64, "L1 table")?;
        // Bound: l1_size is validated (at most MAX_L1_BYTES / 8 entries, by the header parser
        // or the snapshot check above) and every round advances `i` by at least one.
        let mut i = 0;
        while i < l1.len() {
            if l1[i] == 0 {
                i += 1;
                self.tick(1);
                continue;
            }
            let (n, buf) = read_l2_run(self.file, &self.geo, &l1, i)?;
            for k in 0..n {
                let e = l1[i + k];
                if e & L1_RESERVED_MASK != 0 {
                    self.msg(format!(
                        "ERROR found L1 entry with reserved bits set: {e:x}"
                    ));
                    res.corruptions += 1;
                }
                let l2 = e & OFFSET_MASK;
                self.inc(res, l2, cs)?;
                if !self.geo.is_aligned(l2) {
                    self.msg(format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    ));
                    res.corruptions += 1;
                }
                let t = &buf[k * cs as usize..(k + 1) * cs as usize];
                self.check_l2(res, t, l2, active, fix)?;
                self.tick(1);
            }
            i += n;
        }
        Ok(())
    }

    /// Checks one L2 table and counts the clusters it references.
    fn check_l2(
        &mut self,
        res: &mut CheckReport,
        t: &[u8],
        l2_off: u64,
        active: bool,
        fix: CheckFix,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut next_contiguous = 0u64;
        for i in 0..geo.l2_entries() as usize {
            let (mut e, bm) = l2_words(&geo, t, i);
            let k = kind(&geo, e);
            if k != Kind::Compressed && e & L2_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                res.corruptions += 1;
            }
            match k {
                Kind::Compressed => {
                    let x = 62 - (geo.cluster_bits - 8);
                    let coffset = e & ((1u64 << x) - 1);
                    if e & COPIED != 0 {
                        self.msg(format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters"
                        ));
                        e &= !COPIED;
                        res.corruptions += 1;
                    }
                    if bm != 0 {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let sectors = ((e >> x) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
                    let csize = sectors * 512 - (coffset & 511);
                    self.inc(res, coffset, csize)?;
                    if active {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let offset = e & OFFSET_MASK;
                    if (bm >> 32) & bm != 0 {
                        res.corruptions += 1;
                        self.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !geo.is_aligned(offset) {
                        res.corruptions += 1;
                        let contains_data = if geo.extended_l2 {
                            bm & 0xffff_ffff != 0
                        } else {
                            e & ZERO == 0
                        };
                        if !contains_data {
                            let overlap = self.fixed_metadata_at(l2_off);
                            if let (CheckFix::All, Some(name)) = (fix, overlap) {
                                self.msg(format!(
                                    "ERROR l2_offset={l2_off:x}: not repairing an L2 table that overlaps the {name}"
                                ));
                            }
                            let repair = fix == CheckFix::All && overlap.is_none();
                            self.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if repair { "Repairing" } else { "ERROR" }
                            ));
                            if repair {
                                let at = l2_off + i as u64 * geo.l2_entry_size();
                                let new = if geo.extended_l2 { 0 } else { ZERO };
                                let mut bytes = new.to_be_bytes().to_vec();
                                if geo.extended_l2 {
                                    bytes.extend_from_slice(&bm.to_be_bytes());
                                }
                                self.file
                                    .write(&bytes, HostOffset::new(at), WriteKind::L2)?;
                                self.file.sync()?;
                                self.wrote = true;
                                res.corruptions -= 1;
                                res.corruptions_fixed += 1;
                                continue;
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if active {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(cs);
                    }
                    self.inc(res, offset, cs)?;
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bm & 0xffff_ffff != 0 {
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

    /// Counts the bitmap directory, bitmap tables and bitmap data clusters (only when the
    /// bitmaps are valid, i.e. autoclear bit 0 is set, as QEMU ignores them otherwise).
    fn check_bitmaps(&mut self, res: &mut CheckReport) -> Result<()> {
        let Some(ext) = self.header.bitmaps_in_use() else {
            return Ok(());
        };
        self.inc(res, ext.directory_offset, ext.directory_size)?;
        // The header parser bounds the directory size (at most 64 MiB).
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file.read_zero_padded(
            &mut dir,
            HostOffset::new(ext.directory_offset),
            "bitmap directory",
        )?;
        let list = match bitmap::parse_directory(&dir, ext.nb_bitmaps, &self.geo, self.header.size)
        {
            Ok(l) => l,
            Err(e) => {
                self.msg(format!("ERROR bitmap directory is broken: {e}"));
                res.corruptions += 1;
                return Ok(());
            }
        };
        let cs = self.geo.cluster_size();
        for bm in list {
            let entries = bm.table_size as u64;
            self.inc(res, bm.table_offset, entries * 8)?;
            // Read the table in bounded chunks: its size comes from disk.
            let chunk = BATCH_BYTES / 8;
            let mut done = 0u64;
            while done < entries {
                let n = chunk.min(entries - done);
                let Some(at) = bm.table_offset.checked_add(done * 8) else {
                    res.corruptions += 1;
                    break;
                };
                let t = read_u64_table(self.file, at, n, "bitmap table")?;
                for e in t {
                    let off = e & TABLE_ENTRY_OFFSET;
                    let bad = e & TABLE_ENTRY_RESERVED != 0
                        || (off != 0 && (e & 1 != 0 || !self.geo.is_aligned(off)));
                    if bad {
                        res.corruptions += 1;
                        continue;
                    }
                    if off != 0 {
                        self.inc(res, off, cs)?;
                    }
                }
                done += n;
            }
        }
        Ok(())
    }

    /// Checks the refcount table's entries and counts the refcount blocks.
    fn check_refblocks(&mut self, res: &mut CheckReport, fix: CheckFix) -> Result<()> {
        let cs = self.geo.cluster_size();
        let entries = self.header.refcount_table_clusters as u64 * self.geo.u64_per_cluster();
        self.reftable = read_u64_table(
            self.file,
            self.header.refcount_table_offset,
            entries,
            "refcount table",
        )?;
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            let off = e & REFTABLE_OFFSET_MASK;
            let cluster = off >> self.geo.cluster_bits;
            if e & REFTABLE_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if !self.geo.is_aligned(off) {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                res.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len() {
                res.corruptions += 1;
                let repair = fix == CheckFix::All;
                self.msg(format!(
                    "{} refcount block {i} is outside image",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    // Grow the file so that the block exists (reading as zeros), unless the
                    // entry points absurdly far away: then the refcount structure is rebuilt
                    // without it instead of growing a huge sparse file. The bound is taken
                    // from the file as it was: one block after the other, each within reach
                    // of the last, must not walk the file (and the in-memory refcount array,
                    // two bytes per cluster) up to terabytes.
                    let limit = self.growth_limit();
                    let grown = match off.checked_add(cs).filter(|&l| l <= limit) {
                        None => Err("the block is too far beyond the end of the file".to_string()),
                        Some(l) => self.file.set_len(l).map_err(|e| e.to_string()),
                    };
                    if let Err(e) = grown {
                        self.msg(format!("ERROR could not resize image: {e}"));
                        self.rebuild = true;
                        continue;
                    }
                    self.wrote = true;
                    self.file_len = self.file.len()?;
                    self.refs.grow(self.geo.clusters_for(self.file_len))?;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                    self.inc(res, off, cs)?;
                }
                continue;
            }
            if off != 0 {
                self.inc(res, off, cs)?;
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={r}"));
                    res.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }
}
