//! Rewriting a damaged snapshot table after a repair, as `qemu-img check -r all` does
//! (QEMU's `qcow2_check_fix_snapshot_table` → `qcow2_write_snapshots`): the entries are
//! written completely (v3 extra data included, excess extra data dropped) into newly
//! allocated clusters, the header is switched to them with one synced write, and only then
//! are the old table's clusters freed.

use super::walk::Checker;
use crate::engine::refcount::Refcounts;
use crate::error::{Error, Result};
use crate::format::header::layout;
use crate::format::snapshot::serialize_table;
use crate::format::{HostCluster, HostOffset};
use crate::storage::WriteKind;

/// Refcount blocks the rewrite keeps cached (it touches a handful).
const CACHE_BLOCKS: usize = 16;

impl Checker<'_> {
    /// Writes the snapshot table anew from `self.snapshots`. Runs after the refcount repair,
    /// so the refcounts it allocates from are consistent.
    pub(super) fn rewrite_snapshot_table(&mut self) -> Result<()> {
        let file = self.file;
        let geo = self.geo;
        let bytes = serialize_table(&self.snapshots, self.header.size);
        // A table of at most 64 MiB.
        let table_len = bytes.len() as u64;
        let nb_snapshots = u32::try_from(self.snapshots.len())
            .map_err(|_| Error::corrupt("too many snapshots for a snapshot table"))?;
        let mut rc = Refcounts::load(
            file,
            geo,
            HostOffset::new(self.header.refcount_table_offset),
            self.header.refcount_table_clusters,
            CACHE_BLOCKS,
        )?;
        let new_off = if bytes.is_empty() {
            HostOffset::ZERO
        } else {
            rc.alloc(file, geo.clusters_for(table_len))?
        };
        // The new clusters are counted durably before anything points at them.
        rc.write_dirty_blocks(file)?;
        file.sync()?;
        if rc.write_dirty_table(file)? {
            file.sync()?;
        }
        if !bytes.is_empty() {
            file.write(&bytes, new_off, WriteKind::Data)?;
        }
        file.sync()?;
        self.wrote = true;
        let v = self.header.version;
        let update = layout::NB_SNAPSHOTS.update(v, nb_snapshots)?.followed_by(
            layout::SNAPSHOTS_OFFSET,
            v,
            new_off.get(),
        )?;
        file.write_header_fields(&update)?;
        file.sync()?;
        let old_off = HostOffset::new(self.header.snapshots_offset);
        let old_len = self.snapshot_table_len;
        self.header.nb_snapshots = nb_snapshots;
        self.header.snapshots_offset = new_off.get();
        self.snapshot_table_len = table_len;
        self.free_old_table(&mut rc, old_off, old_len)
    }

    /// Drops the old table's references: exactly those the check counted. A table that
    /// reached a cluster or more past the end of the file was skipped, like QEMU skips it,
    /// unless a repair grew the file over part of it, which counted that part; the clusters
    /// of a skipped table may even hold the new table now.
    fn free_old_table(&mut self, rc: &mut Refcounts, off: HostOffset, len: u64) -> Result<()> {
        let file = self.file;
        let geo = self.geo;
        let Some((start, end)) = self.counted_part(off.get(), off.get().saturating_add(len)) else {
            return Ok(());
        };
        if end <= start {
            return Ok(());
        }
        let (first, last) = (HostOffset::new(start), HostOffset::new(end - 1));
        // Bound: the old table is at most 64 MiB (checked when it was read).
        for c in (first.cluster(&geo).0..=last.cluster(&geo).0).map(HostCluster) {
            if c != HostCluster(0) && rc.get(file, c)? > 0 {
                rc.update(file, c, -1)?;
            }
        }
        rc.write_dirty_blocks(file)?;
        file.sync()
    }

    /// The part of the region `[start, end)` that the check counted a reference for, or
    /// `None` when it counted none (see [`Self::free_old_table`]).
    fn counted_part(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        if self.skipped.iter().any(|&(s, e)| s == start && e == end) {
            return None; // skipped whole
        }
        if let Some(&(s, _)) = self.skipped.iter().find(|&&(s, e)| e == end && s > start) {
            return Some((start, s)); // the file grew over its first part
        }
        let past_eof = end.saturating_sub(self.file_len) >= self.geo.cluster_size();
        if self.skipped_overflow && past_eof {
            return None; // skipped, not recorded
        }
        Some((start, end))
    }
}
