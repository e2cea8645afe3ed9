//! Resize on a live handle, with `qemu-img resize` (QEMU 10) as the oracle.
//!
//! Growing quiesces writers once: the L1 table is relocated when it is too small (the new
//! table written and synced before the header points at it, the old one freed only after),
//! the new area is zeroed when a longer backing file would otherwise show through (as QEMU
//! does), and the new size is written last. A crash leaves the old or the new size, at worst
//! with the clusters of one of the two L1 tables leaked.
//!
//! Shrinking writes the new size first, so a crash leaves the old or the new guest-visible
//! state: mappings past the end are invisible, and they stay counted until they are dropped.
//! Readers never take the write gate, so a reader may have checked its range against the old
//! size: the mappings past the new end are dropped only after every request that started
//! before the new size was published has finished (a grace period, see
//! [`crate::storage::Grace`]). Freed clusters then go through the usual deferred-free path.
//!
//! Like QEMU, shrinking keeps the L1 table's length, and the cluster that straddles the new
//! end keeps its bytes past the end (a later growth shows them again, as in QEMU).

use super::meta::Meta;
use super::{write, zero, Image};
use crate::error::{invalid, unsupported, Error, ErrorKind, Result};
use crate::format::be::u64_table_bytes;
use crate::format::entry::Mapping;
use crate::format::header::layout;
use crate::format::{GuestOffset, HostCluster, HostOffset};
use crate::storage::{MetaKind, WriteKind};
use std::sync::atomic::Ordering;

/// Granularity of virtual sizes (QEMU's sector).
const SECTOR: u64 = 512;

impl Image {
    /// Changes the virtual size to `new_size` bytes on a live read-write handle, like
    /// `qemu-img resize` (QEMU 10).
    ///
    /// * `new_size` must be a multiple of 512 (-EINVAL, QEMU's message), and a size smaller
    ///   than the current one needs `shrink_allowed` (-EINVAL otherwise, like `--shrink`).
    /// * Growing: the L1 table grows when needed (-EINVAL past QEMU's 32 MiB L1 limit); the
    ///   new area reads as zeros, also over a backing file longer than the old size (refused
    ///   with -ENOTSUP on version-2 images, which cannot express it, as QEMU refuses).
    /// * Shrinking: every cluster past the new end loses this image's reference (clusters
    ///   shared with snapshots stay theirs); data inside the new size is unchanged.
    /// * Persistent bitmaps are resized with the image (bits past a shrunk end dropped, the
    ///   grown area clean); a bitmap found inconsistent at open refuses the resize with
    ///   -EBUSY, as QEMU refuses it.
    ///
    /// Writers are quiesced while the mapping changes; readers are never blocked. A request
    /// checked against the old size either completes or fails with -EINVAL; no request
    /// touches bytes past the size in force when it was checked. Resizes are serialised.
    /// Errors: -EROFS read-only, -ENOMEDIUM fenced, -EIO/-ENOSPC from the host file.
    pub fn resize(&self, new_size: u64, shrink_allowed: bool) -> Result<()> {
        self.check_writable()?;
        let _serial = self.view.resizing();
        let old = self.virtual_size();
        validate(old, new_size, shrink_allowed, &self.geo)?;
        // Like QEMU: consistent bitmaps follow the new size, an inconsistent one refuses.
        if let Some(name) = self.bitmaps.first_inconsistent() {
            return Err(super::bitmap::api::busy(&name));
        }
        let r = if new_size > old {
            self.grow(old, new_size)
        } else if new_size < old {
            self.shrink(new_size)
        } else {
            Ok(())
        };
        let r = r.and_then(|()| self.resize_data_file(old, new_size));
        self.finish(r)
    }

    /// Grows the image from `old` to `new` bytes (see [`Self::resize`]).
    fn grow(&self, old: u64, new: u64) -> Result<()> {
        let zero_new = self.backing_shows_through(old)?;
        let _gate = self.quiesce();
        self.wait_claims_idle();
        {
            let mut m = self.lock_meta();
            self.grow_l1(&mut m, new)?;
        }
        if zero_new {
            self.zero_new_area(old, new)?;
        }
        let mut m = self.lock_meta();
        m.writeback(&self.file)?;
        self.publish_size(&mut m, new)
    }

    /// Whether growing past `old` must zero the new area: QEMU does when the backing file is
    /// longer than the old size (so that its data does not appear). A version-2 image has no
    /// zero flag to do it with: refused like QEMU refuses it.
    fn backing_shows_through(&self, old: u64) -> Result<bool> {
        let Some(b) = self.backing() else {
            return Ok(false);
        };
        let len = b.size();
        if len <= old {
            return Ok(false);
        }
        if self.version < 3 {
            return unsupported!("Failed to zero out new clusters: Operation not supported");
        }
        Ok(true)
    }

    /// Makes `[old, new)` read as zeros before the size grows (the area is not yet
    /// guest-visible, so a crash before the size write leaves the old state): explicit zeros
    /// up to the next metadata granule, zero flags from there on (QEMU sets them up to the
    /// granule past the new end, as the tail is the end of the image).
    fn zero_new_area(&self, old: u64, new: u64) -> Result<()> {
        let gran = self.geo.subcluster_size();
        let start = GuestOffset::new(old);
        let aligned = start.align_up(gran);
        let head_end = aligned.get().min(new);
        if head_end > old {
            let zeros = vec![0u8; (head_end - old) as usize];
            let pin = self.file.grace().pin();
            write::write(self, &pin.pinned(), &zeros, start)?;
        }
        let end = GuestOffset::new(new).align_up(gran);
        if end > aligned {
            zero::write_zeroes(self, aligned, end.since(aligned), false)?;
        }
        Ok(())
    }

    /// Relocates the active L1 table to one with room for `new` bytes of guest space, when
    /// the current one is too small. New table durable, then the header switch (length and
    /// offset in one write), then the old table freed once that is durable.
    fn grow_l1(&self, m: &mut Meta, new: u64) -> Result<()> {
        let geo = self.geo;
        let need = geo.l1_entries_for(new);
        let cur = u64::from(m.header.l1_size);
        if need <= cur {
            return Ok(());
        }
        // Everything cached is written back first, so the copy below is what is on disk.
        m.writeback(&self.file)?;
        let clusters = geo.clusters_for(need * 8);
        let new_off = m.rc.alloc(&self.file, clusters)?;
        // The refcounts of the new table are durable before anything points at it.
        m.writeback(&self.file)?;
        let mut words = self.view.l1_words(0, cur as usize);
        words.resize((clusters * geo.cluster_size() / 8) as usize, 0);
        self.file
            .write(&u64_table_bytes(&words), new_off, WriteKind::L1)?;
        self.file.sync()?;
        let version = m.header.version;
        // `need` is at most MAX_L1_ENTRIES (validate), so it fits the u32 field.
        let update = layout::L1_SIZE.update(version, need as u32)?.followed_by(
            layout::L1_TABLE_OFFSET,
            version,
            new_off.get(),
        )?;
        self.file.write_header_fields(&update)?;
        self.file.sync()?;
        let old_off = HostOffset::new(m.header.l1_table_offset);
        m.header.l1_size = need as u32;
        m.header.l1_table_offset = new_off.get();
        self.view.set_l1_len(need as usize);
        let guard = self.file.guard();
        guard.insert(new_off.cluster(&geo).0, clusters, MetaKind::ActiveL1);
        if cur > 0 && old_off != HostOffset::ZERO {
            let old_clusters = geo.clusters_for(cur * 8);
            guard.remove(old_off.cluster(&geo).0, old_clusters, MetaKind::ActiveL1);
            // Freed once the header switch is durable (it is): at the next write-back.
            m.deferred_frees
                .push((old_off, old_clusters * geo.cluster_size()));
        }
        Ok(())
    }

    /// Writes the new size to the header, makes it durable and publishes it to requests.
    fn publish_size(&self, m: &mut Meta, new: u64) -> Result<()> {
        let update = layout::SIZE.update(m.header.version, new)?;
        self.file.write_header_fields(&update)?;
        self.file.sync()?;
        m.header.size = new;
        m.fit_l2_cache(new);
        self.virtual_size.store(new, Ordering::SeqCst);
        // Writers are quiesced: no write lands between the new size and the bitmaps' size.
        self.bitmaps.resize(new);
        Ok(())
    }

    /// Shrinks the image to `new` bytes (see [`Self::resize`]).
    fn shrink(&self, new: u64) -> Result<()> {
        {
            let _gate = self.quiesce();
            self.wait_claims_idle();
            let mut m = self.lock_meta();
            self.publish_size(&mut m, new)?;
        }
        // Writers blocked on the gate above check against the new size once it opens;
        // readers that checked the old one finish before their mappings go.
        self.wait_for_older_requests();
        let _gate = self.quiesce();
        self.wait_claims_idle();
        let mut m = self.lock_meta();
        // The size in force now (a snapshot switch may have changed it meanwhile).
        let from = GuestOffset::new(self.virtual_size()).align_up(self.geo.cluster_size());
        self.drop_mappings_from(&mut m, from)?;
        m.writeback(&self.file)?;
        // Best effort: the shrink is complete and durable; a file that cannot be trimmed
        // (an odd tail, a refusing file system) only keeps its unused bytes.
        let _ = self.trim_file(&mut m);
        Ok(())
    }

    /// Gives the file's unused tail back to the file system, as QEMU does after a shrink:
    /// the file ends after the last cluster that has a reference (or that the overlap guard
    /// knows as metadata). Runs after the write-back that made the frees durable, with
    /// writers quiesced and every reader of the dropped clusters gone, so nothing can still
    /// touch the bytes cut off; a crash before or after leaves a consistent file.
    fn trim_file(&self, m: &mut Meta) -> Result<()> {
        let geo = self.geo;
        let len = self.file.len()?;
        let mut end = len.div_ceil(geo.cluster_size());
        // Bound: one step per cluster of the file.
        while end > 1 {
            let last = HostCluster(end - 1);
            if m.rc.get(&self.file, last)? != 0 || self.file.guard().kind_of(last.0).is_some() {
                break;
            }
            end -= 1;
        }
        let new_len = end * geo.cluster_size();
        if new_len < len {
            self.file.set_len(new_len)?;
        }
        Ok(())
    }

    /// Waits (without any lock) until every request pinned before this call has finished.
    fn wait_for_older_requests(&self) {
        let grace = self.file.grace();
        let tag = grace.current();
        loop {
            {
                // Advances are serialised by the metadata mutex.
                let _m = self.lock_meta();
                grace.try_advance();
                if grace.drained(tag) {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Waits until no allocation is between plan and link (with the gate held, none starts).
    fn wait_claims_idle(&self) {
        while self.inflight.claims() > 0 {
            self.inflight.wait_idle();
        }
    }

    /// Drops this image's references to every guest cluster from `from` (cluster-aligned)
    /// on: entries of the table that straddles `from` are cleared (a shared table is copied
    /// first), tables wholly past it are unhooked from the L1 table with their clusters.
    fn drop_mappings_from(&self, m: &mut Meta, from: GuestOffset) -> Result<()> {
        let geo = self.geo;
        let per_table = geo.l2_entries();
        let first = from.cluster(&geo).0;
        let mut l1_index = first / per_table;
        if first % per_table != 0 {
            self.clear_table_tail(m, l1_index as usize, (first % per_table) as usize)?;
            l1_index += 1;
        }
        let len = self.view.l1_len() as u64;
        for i in l1_index..len {
            m.drop_l2_table(&self.file, i as usize)?;
        }
        Ok(())
    }

    /// Clears entries `[from_entry, end)` of the L2 table under L1 entry `l1_index`.
    fn clear_table_tail(&self, m: &mut Meta, l1_index: usize, from_entry: usize) -> Result<()> {
        let geo = self.geo;
        if m.slot(GuestOffset::new(l1_index as u64 * geo.l2_coverage()))?
            .table
            == HostOffset::ZERO
        {
            return Ok(());
        }
        let per_table = geo.l2_entries() as usize;
        let unallocated = Mapping::Unallocated { zero: 0 };
        for j in from_entry..per_table {
            let guest = GuestOffset::new(
                (l1_index as u64 * geo.l2_entries() + j as u64) * geo.cluster_size(),
            );
            let old = m.lookup(&self.file, guest)?;
            if old == unallocated {
                continue;
            }
            let table = m.l2_for_write(&self.file, l1_index)?;
            m.set_mapping(&self.file, table, j, unallocated)?;
            m.release(old);
        }
        Ok(())
    }
}

/// Checks a resize request against the rules `qemu-img resize` and QEMU's qcow2 driver
/// apply, in their order.
fn validate(old: u64, new: u64, shrink_allowed: bool, geo: &crate::format::Geometry) -> Result<()> {
    if new < old && !shrink_allowed {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "shrinking the image from {old} to {new} bytes deletes the data past the new end; it needs the shrink flag (qemu-img resize --shrink)"
            ),
        ));
    }
    if new % SECTOR != 0 {
        return invalid!("The new size must be a multiple of {SECTOR}");
    }
    if geo.l1_entries_for(new) > super::mapview::MAX_L1_ENTRIES as u64 {
        return invalid!("Failed to grow the L1 table: File too large");
    }
    Ok(())
}

#[cfg(test)]
#[path = "resize_crash_tests.rs"]
mod crash_tests;
