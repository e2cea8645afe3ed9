//! Internal snapshots: the table as read at open and for a check ([`read`]), and the
//! operations on a live read-write handle: create, apply (revert the active state) and
//! delete, as `qemu-img snapshot -c/-a/-d` perform them.
//!
//! Create and apply quiesce writers for their whole duration (every write after them is a
//! copy-on-write, which needs the metadata mutex anyway); delete only holds the metadata
//! mutex, so overwrites of clusters the image owns go on. Reads go on throughout: they see
//! the old mapping until the switch, the new one after. Each operation writes everything
//! cached back first and orders its writes so that a crash leaves the old or the new state, at worst with leaked
//! clusters or a COPIED flag missing on a cluster with refcount 1 (a needless
//! copy-on-write, which `check -r all` repairs):
//! - create: the snapshot's L1 copy; COPIED cleared in the active tree; one more reference
//!   on everything the tree uses (durable); the new snapshot table (durable); the header
//!   switch; the old table freed;
//! - apply: COPIED cleared in the snapshot's tree; its references counted (durable); a new
//!   active L1 written elsewhere (durable); the header switch; then the old tree's
//!   references dropped and COPIED set where the count is 1;
//! - delete: the table without the entry (durable); the header switch; then the snapshot
//!   tree's references dropped and COPIED set where the count is 1.

#[cfg(test)]
mod crash_tests;
mod ops;
mod read;
mod table;
#[cfg(test)]
mod tests;
mod tree;

pub use read::{read_table, read_table_for_check};

use super::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::format::snapshot::Snapshot;
use crate::format::Header;
use std::sync::RwLockWriteGuard;

/// The snapshot table of an open image: its entries and its length on disk (what the
/// overlap guard protects).
#[derive(Debug, Default, Clone)]
pub(super) struct Snapshots {
    /// The entries, in table order.
    pub list: Vec<Snapshot>,
    /// Bytes of the table on disk.
    pub table_len: u64,
}

/// Longest snapshot name QEMU stores (its name buffer holds 256 bytes with the NUL).
pub const MAX_NAME_LEN: usize = 255;

/// Index of the snapshot whose id is `key`, else the first whose name is `key` (QEMU's
/// lookup for apply).
pub(super) fn find(list: &[Snapshot], key: &str) -> Option<usize> {
    list.iter()
        .position(|s| s.id == key)
        .or_else(|| list.iter().position(|s| s.name == key))
}

fn not_found(key: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("snapshot '{key}' not found"))
}

/// Points `header` at the L1 table of snapshot `key` (an id, else a name) for a read-only
/// view of that snapshot's disk: the open then loads the snapshot's mapping as the active
/// one, which is how `qemu-img convert -l` reads a snapshot. The virtual size stays the
/// image's, as in QEMU.
pub(super) fn view_header(
    header: &mut Header,
    list: &[Snapshot],
    key: &str,
    writable: bool,
) -> Result<()> {
    if writable {
        return Err(Error::invalid(
            "a snapshot can only be opened read-only (its view is not writable)",
        ));
    }
    let s = find(list, key)
        .map(|i| &list[i])
        .ok_or_else(|| not_found(key))?;
    if let Some(p) = s.l1_problem(header.cluster_size()) {
        return Err(Error::corrupt(format!("cannot open snapshot: {p}")));
    }
    header.l1_table_offset = s.l1_table_offset;
    header.l1_size = s.l1_size;
    Ok(())
}

impl Image {
    /// The internal snapshots, in table order (id, name, dates, VM clock and state size,
    /// disk size, icount). Reflects every snapshot operation made through this handle.
    pub fn snapshot_list(&self) -> Vec<Snapshot> {
        self.snapshots()
    }

    fn snapshots_mut(&self) -> RwLockWriteGuard<'_, Snapshots> {
        // A panic while holding it fences the image; the list itself stays whole.
        self.snapshots.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a snapshot of the current disk state named `name`, like `qemu-img snapshot
    /// -c`: the next free numeric id, the current time, no VM state. Names need not be
    /// unique (QEMU allows duplicates). Returns the new entry.
    ///
    /// Errors: `ReadOnly` on a read-only handle, `InvalidArgument` for an empty name or one
    /// over 255 bytes or when a refcount cannot take one more reference (e.g. 1-bit refcounts;
    /// QEMU fails with EINVAL too), I/O errors.
    pub fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.check_writable()?;
        self.refuse_with_data_file("an internal snapshot")?;
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(Error::invalid(format!(
                "snapshot name must be 1 to {MAX_NAME_LEN} bytes long, without NUL bytes"
            )));
        }
        let _quiet = self.quiesce();
        let r = {
            let mut m = self.lock_meta();
            let mut snaps = self.snapshots_mut();
            ops::create(self, &mut m, &mut snaps, name)
        };
        self.finish(r)
    }

    /// Reverts the disk to snapshot `key` (an id, else a name), like `qemu-img snapshot
    /// -a`. Reads racing the switch see the old or the new contents; later ones the new.
    /// When the snapshot's disk size differs from the current virtual size the image is
    /// first resized to it, as QEMU does (a separate step: a crash in between leaves the
    /// resized image with its old contents, as in QEMU).
    ///
    /// Errors: `ReadOnly`, `NotFound` (no such id or name), `Busy` when the image has
    /// persistent bitmaps (enabled or not: QEMU refuses them too), `Corrupt` when the
    /// snapshot's table entry is damaged (nothing is changed), `Unsupported` when the
    /// snapshot's L1 table is longer than the image's after that resize, I/O errors.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_apply_with_bitmaps()?;
        let s = {
            let snaps = self.snapshots_mut();
            find(&snaps.list, key)
                .map(|i| snaps.list[i].clone())
                .ok_or_else(|| not_found(key))?
        };
        ops::check_usable_entry(self, &s)?;
        if let Some(disk) = s.disk_size.filter(|&d| d != self.virtual_size()) {
            self.resize(disk, true)?;
        }
        let _quiet = self.quiesce();
        self.refuse_apply_with_bitmaps()?;
        let mut m = self.lock_meta();
        let mut snaps = self.snapshots_mut();
        let s = find(&snaps.list, key)
            .map(|i| snaps.list[i].clone())
            .ok_or_else(|| not_found(key))?;
        ops::check_applicable(self, &s)?;
        let r = ops::apply(self, &mut m, &mut snaps, &s);
        drop((snaps, m));
        // The whole disk may read differently now: write trackers (a commit's record of what
        // to copy again; persistent bitmaps were refused above) see it as written.
        self.bitmaps.mark(0, self.virtual_size());
        self.finish(r)
    }

    /// Like QEMU: reverting under a dirty bitmap would change data it never saw written.
    fn refuse_apply_with_bitmaps(&self) -> Result<()> {
        if self.bitmaps()?.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Busy,
            "Device has active dirty bitmaps",
        ))
    }

    /// Deletes snapshot `key` (an id, else a name), like `qemu-img snapshot -d`; the
    /// clusters only it used are freed (reused once no request that may use them runs).
    ///
    /// Errors: `ReadOnly`, `NotFound`, `Corrupt` when the entry is damaged (nothing is
    /// changed), I/O errors.
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        // No quiesce: delete never takes a COPIED flag away from the active tree, so
        // in-place overwrites may go on; everything else waits for the metadata mutex.
        let mut m = self.lock_meta();
        let mut snaps = self.snapshots_mut();
        let i = find(&snaps.list, key).ok_or_else(|| not_found(key))?;
        ops::check_usable_entry(self, &snaps.list[i])?;
        let r = ops::delete(self, &mut m, &mut snaps, i);
        drop((snaps, m));
        self.finish(r)
    }
}
