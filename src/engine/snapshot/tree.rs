//! Walks over a mapping tree (an L1 table, its L2 tables and the clusters they reference)
//! that snapshot operations need: reference counting of a whole tree and QEMU's COPIED-flag
//! rules (an L1 or L2 entry carries COPIED exactly when the cluster it points at has
//! refcount 1).
//!
//! Every loop here is bounded by the L1 table (at most 32 MiB, validated before) and the L2
//! tables (one cluster each).

use super::super::meta::Meta;
use super::super::Image;
use crate::error::{corrupt, Error, ErrorKind, Result};
use crate::format::entry::{decode_l2, L1Entry, L2Entry, Mapping};
use crate::format::{Geometry, HostCluster, HostOffset};

/// The COPIED flag, bit 63 of L1 and L2 descriptors.
const COPIED: u64 = 1 << 63;

/// The L2 tables an L1 table points at: (L1 index, table offset), validated.
pub(super) fn tables(geo: &Geometry, l1: &[u64]) -> Result<Vec<(usize, HostOffset)>> {
    let mut out = Vec::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = L1Entry(e).l2_offset();
        if off == HostOffset::ZERO {
            continue;
        }
        if !off.is_cluster_aligned(geo) {
            return corrupt!("L2 table offset {off:#x} unaligned (L1 index: {i:#x})");
        }
        out.push((i, off));
    }
    Ok(out)
}

/// The (descriptor, bitmap) pairs of an L2 table's words.
fn entries(geo: &Geometry, words: &[u64]) -> Vec<(u64, u64)> {
    if geo.extended_l2 {
        words.chunks_exact(2).map(|w| (w[0], w[1])).collect()
    } else {
        words.iter().map(|&w| (w, 0)).collect()
    }
}

/// Decodes an L2 entry of table `table`, naming it in the error as `check` does.
fn mapping(img: &Image, table: HostOffset, i: usize, w0: u64, w1: u64) -> Result<Mapping> {
    decode_l2(&img.geo, img.version, w0, w1).map_err(|e| {
        Error::corrupt(format!(
            "Invalid L2 entry {w0:#x} ({e:?}) (L2 offset: {table:#x}, L2 index: {i:#x})"
        ))
    })
}

/// The host bytes a mapping holds a reference on (refcounts count the clusters they touch).
fn referenced(geo: &Geometry, m: Mapping) -> Option<(HostOffset, u64)> {
    match m {
        Mapping::Data { host, .. } | Mapping::Zero { host, .. } if host != HostOffset::ZERO => {
            Some((host, geo.cluster_size()))
        }
        Mapping::Compressed { host, csize } => {
            // The descriptor counts whole 512-byte sectors from the one holding `host`.
            let start = HostOffset::new(host.get() & !511);
            Some((start, (host + csize).since(start)))
        }
        _ => None,
    }
}

/// Host clusters `[first, last]` of a byte range.
fn clusters(geo: &Geometry, (start, len): (HostOffset, u64)) -> std::ops::RangeInclusive<u64> {
    start.cluster(geo).0..=(start + (len - 1)).cluster(geo).0
}

/// Clears COPIED in every L2 entry of the tree and, when `active`, in the active L1
/// entries: done before the references that make the clusters shared are counted, so a
/// crash in between leaves refcount 1 without COPIED (a needless copy-on-write at worst).
pub(super) fn clear_copied(img: &Image, m: &mut Meta, l1: &[u64], active: bool) -> Result<()> {
    for (l1_index, table) in tables(&img.geo, l1)? {
        let words = m.l2_table(&img.file, table)?;
        for (i, (w0, _)) in entries(&img.geo, &words).into_iter().enumerate() {
            if w0 & COPIED != 0 {
                m.set_l2_descriptor(&img.file, table, i, w0 & !COPIED)?;
            }
        }
        if active && l1[l1_index] & COPIED != 0 {
            m.set_l1_entry(l1_index, l1[l1_index] & !COPIED);
        }
    }
    Ok(())
}

/// Adds one reference to every cluster the tree uses (L2 tables, data, preallocated zero
/// and compressed clusters). All or nothing: on an error (a refcount at its maximum) the
/// references already added are taken back.
pub(super) fn add_refs(img: &Image, m: &mut Meta, l1: &[u64]) -> Result<()> {
    let mut done: Vec<u64> = Vec::new();
    let r = add_refs_logged(img, m, l1, &mut done);
    if r.is_err() {
        for &c in done.iter().rev() {
            let _ = m.rc.update(&img.file, HostCluster(c), -1);
        }
    }
    r
}

fn add_refs_logged(img: &Image, m: &mut Meta, l1: &[u64], done: &mut Vec<u64>) -> Result<()> {
    let geo = img.geo;
    for (_, table) in tables(&geo, l1)? {
        let words = m.l2_table(&img.file, table)?;
        let mut targets = Vec::new();
        for (i, (w0, w1)) in entries(&geo, &words).into_iter().enumerate() {
            if let Some(r) = referenced(&geo, mapping(img, table, i, w0, w1)?) {
                targets.extend(clusters(&geo, r));
            }
        }
        targets.push(table.cluster(&geo).0);
        for c in targets {
            m.rc.update(&img.file, HostCluster(c), 1).map_err(|e| {
                // QEMU fails the same way (EINVAL), e.g. on 1-bit refcounts.
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("cannot share cluster {c:#x} once more: {e}"),
                )
            })?;
            done.push(c);
        }
    }
    Ok(())
}

/// Queues the release of one reference on every cluster the tree uses; the references are
/// dropped by the next write-back (freed clusters wait out the grace period).
pub(super) fn drop_refs(img: &Image, m: &mut Meta, l1: &[u64]) -> Result<()> {
    let geo = img.geo;
    for (_, table) in tables(&geo, l1)? {
        let words = m.l2_table(&img.file, table)?;
        for (i, (w0, w1)) in entries(&geo, &words).into_iter().enumerate() {
            if let Some(r) = referenced(&geo, mapping(img, table, i, w0, w1)?) {
                m.deferred_frees.push(r);
            }
        }
        m.deferred_frees.push((table, geo.cluster_size()));
    }
    Ok(())
}

/// Sets COPIED exactly where the refcount is 1 in the active tree (QEMU's pass with addend
/// 0): L1 entries after their L2 table's refcount, and the entries of tables this image
/// owns alone (a shared table's clusters are shared too, so its entries stay clear).
pub(super) fn fix_copied(img: &Image, m: &mut Meta) -> Result<()> {
    let geo = img.geo;
    let l1 = img.view.l1_words(0, img.view.l1_len());
    for (l1_index, table) in tables(&geo, &l1)? {
        let owned = m.rc.get(&img.file, table.cluster(&geo))? == 1;
        let want = L1Entry(l1[l1_index]).with_copied(owned).0;
        if want != l1[l1_index] {
            m.set_l1_entry(l1_index, want);
        }
        if !owned {
            continue;
        }
        let words = m.l2_table(&img.file, table)?;
        for (i, (w0, w1)) in entries(&geo, &words).into_iter().enumerate() {
            let one = match mapping(img, table, i, w0, w1)? {
                Mapping::Data { host, .. } | Mapping::Zero { host, .. }
                    if host != HostOffset::ZERO =>
                {
                    m.rc.get(&img.file, host.cluster(&geo))? == 1
                }
                _ => false,
            };
            let want = L2Entry::new(w0, 0).with_copied(one).word0;
            if want != w0 {
                m.set_l2_descriptor(&img.file, table, i, want)?;
            }
        }
    }
    Ok(())
}
