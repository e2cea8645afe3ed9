//! Rewriting the snapshot table crash-safely, and keeping the overlap guard's view of the
//! snapshots current.

use super::super::meta::{index_snapshot, Meta};
use super::super::Image;
use super::Snapshots;
use crate::error::{Error, Result};
use crate::format::entry::L1Entry;
use crate::format::header::{layout, MAX_L1_BYTES};
use crate::format::snapshot::{serialize_table, Snapshot};
use crate::format::HostOffset;
use crate::storage::{MetaKind, WriteKind};

/// Replaces the snapshot table with `list`: the new table is allocated (its refcounts made
/// durable), written and synced; then one header write points at it (`nb_snapshots` and
/// `snapshots_offset` together) and is synced; the old table is freed after. An empty list
/// leaves both fields 0, as QEMU does.
pub(super) fn replace(
    img: &Image,
    m: &mut Meta,
    state: &mut Snapshots,
    list: Vec<Snapshot>,
) -> Result<()> {
    let file = &img.file;
    let bytes = serialize_table(&list, img.virtual_size());
    // At most 65536 entries of at most ~1.6 KiB: far below 4 GiB.
    let len = bytes.len() as u64;
    let nb = u32::try_from(list.len()).map_err(|_| Error::invalid("too many snapshots"))?;
    let new_off = if bytes.is_empty() {
        HostOffset::ZERO
    } else {
        m.rc.alloc(file, img.geo.clusters_for(len))?
    };
    // The new clusters are counted durably before anything points at them.
    m.writeback(file)?;
    if !bytes.is_empty() {
        file.write(&bytes, new_off, WriteKind::Data)?;
    }
    file.sync()?;
    let v = m.header.version;
    let update = layout::NB_SNAPSHOTS.update(v, nb)?.followed_by(
        layout::SNAPSHOTS_OFFSET,
        v,
        new_off.get(),
    )?;
    switch_header(img, &update)?;
    let old = HostOffset::new(m.header.snapshots_offset);
    m.header.nb_snapshots = nb;
    m.header.snapshots_offset = new_off.get();
    let geo = img.geo;
    if state.table_len > 0 {
        let n = geo.clusters_for(state.table_len);
        file.guard()
            .remove(old.cluster(&geo).0, n, MetaKind::SnapshotTable);
        m.deferred_frees.push((old, state.table_len));
    }
    if len > 0 {
        file.guard().insert(
            new_off.cluster(&geo).0,
            geo.clusters_for(len),
            MetaKind::SnapshotTable,
        );
    }
    *state = Snapshots {
        list,
        table_len: len,
    };
    Ok(())
}

/// Writes and syncs a header update that switches to a new structure. A failure leaves the
/// header on disk unknown (old or new), so the handle, whose memory holds the old state, is
/// fenced: nothing it writes later can be misplaced.
pub(super) fn switch_header(img: &Image, update: &layout::FieldUpdate) -> Result<()> {
    let r = img
        .file
        .write_header_fields(update)
        .and_then(|()| img.file.sync());
    if r.is_err() {
        img.fence.fence();
    }
    r
}

/// The L1 table of snapshot `s` (validated by the caller), `len` entries (zero padded).
pub(super) fn read_l1(img: &Image, s: &Snapshot, len: usize) -> Result<Vec<u64>> {
    let n = (s.l1_size as usize).min(len);
    let mut raw = vec![0u8; n * 8];
    img.file.read_zero_padded(
        &mut raw,
        HostOffset::new(s.l1_table_offset),
        "snapshot L1 table",
    )?;
    let mut l1 = crate::format::be::u64_table(&raw);
    l1.resize(len, 0);
    Ok(l1)
}

/// Withdraws the snapshots' L1 and L2 tables from the overlap guard while an operation
/// rewrites shared L2 tables' flags and moves tables around (writers are quiesced; only the
/// operation itself writes). [`reindex`] puts back what still exists.
pub(super) fn unindex(img: &Image, list: &[Snapshot]) -> Result<()> {
    let geo = img.geo;
    let guard = img.file.guard();
    for s in list {
        let l1_bytes = (u64::from(s.l1_size) * 8).min(MAX_L1_BYTES);
        let first = HostOffset::new(s.l1_table_offset).cluster(&geo).0;
        guard.remove(first, geo.clusters_for(l1_bytes), MetaKind::InactiveL1);
        if s.l1_problem(geo.cluster_size()).is_some() {
            continue;
        }
        for e in read_l1(img, s, s.l1_size as usize)? {
            let off = L1Entry(e).l2_offset();
            if off != HostOffset::ZERO && off.is_cluster_aligned(&geo) {
                guard.remove(off.cluster(&geo).0, 1, MetaKind::InactiveL2);
            }
        }
    }
    Ok(())
}

/// Puts every snapshot of `list` back into the overlap guard.
pub(super) fn reindex(img: &Image, list: &[Snapshot]) -> Result<()> {
    for s in list {
        index_snapshot(&img.file, &img.geo, s)?;
    }
    Ok(())
}

/// Moves the guard's active-table entries from the tables of `old` (an L1 table at
/// `old_off`) to those of the current active L1 at `new_off`.
pub(super) fn move_active(img: &Image, old_off: HostOffset, old: &[u64], new_off: HostOffset) {
    let geo = img.geo;
    let guard = img.file.guard();
    let l1_clusters = geo.clusters_for(old.len() as u64 * 8);
    guard.remove(old_off.cluster(&geo).0, l1_clusters, MetaKind::ActiveL1);
    guard.insert(new_off.cluster(&geo).0, l1_clusters, MetaKind::ActiveL1);
    let each = |l1: &[u64], f: &dyn Fn(u64)| {
        for &e in l1 {
            let off = L1Entry(e).l2_offset();
            if off != HostOffset::ZERO && off.is_cluster_aligned(&geo) {
                f(off.cluster(&geo).0);
            }
        }
    };
    each(old, &|c| guard.remove(c, 1, MetaKind::ActiveL2));
    let new = img.view.l1_words(0, img.view.l1_len());
    each(&new, &|c| guard.insert(c, 1, MetaKind::ActiveL2));
}
