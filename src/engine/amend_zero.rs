//! Amend's downgrade to version 2: zero clusters, which version 2 cannot express, are
//! expanded first. An unallocated zero cluster of an image without a backing file becomes
//! unallocated (it reads as zeros either way), over a backing file it gets a new cluster of
//! zeros (see [`allocate`]); a zero cluster with a host cluster gets that
//! cluster filled with zeros (made durable) before the zero flag is cleared. Every entry
//! change keeps what the entry reads as, so any crash (even a torn table write) leaves the
//! guest content intact. Like QEMU, compressed clusters refuse a downgrade of a zstd image.

use super::amend_refcount::{read_all, write_structures};
use crate::error::{corrupt, unsupported, Result};
use crate::format::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::format::header::Header;
use crate::format::{be, HostOffset};
use crate::storage::{HostFile, WriteKind};
use std::collections::{BTreeMap, HashSet};

/// The L2 tables to rewrite (host offset -> new entries) and the host clusters to zero.
#[derive(Default)]
struct Plan {
    tables: BTreeMap<u64, Vec<u64>>,
    zero_clusters: Vec<u64>,
    compressed: bool,
    /// Zero clusters over a backing file (L2 table, index): each gets a new cluster.
    allocs: Vec<(u64, usize)>,
}

/// Expands the zero clusters of every L2 table (active and snapshots) of the image `h`.
pub(super) fn expand_zero_clusters(file: &HostFile, h: &Header) -> Result<()> {
    let plan = plan(file, h)?;
    if plan.compressed && h.compression_type != 0 {
        return unsupported!(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters"
        );
    }
    if plan.tables.is_empty() {
        return Ok(());
    }
    let mut plan = plan;
    allocate(file, h, &mut plan)?;
    let cs = h.cluster_size();
    let zeros = vec![0u8; cs as usize];
    for &c in &plan.zero_clusters {
        file.write(&zeros, HostOffset::new(c), WriteKind::Data)?;
    }
    file.sync()?;
    for (at, entries) in &plan.tables {
        file.write(
            &be::u64_table_bytes(entries),
            HostOffset::new(*at),
            WriteKind::L2,
        )?;
    }
    file.sync()
}

/// Walks every L2 table once and plans the entry changes.
fn plan(file: &HostFile, h: &Header) -> Result<Plan> {
    let cs = h.cluster_size();
    let (snapshots, _) = super::snapshot::read_table(file, h)?;
    let mut l1s = vec![(h.l1_table_offset, h.l1_size)];
    for s in &snapshots {
        // The snapshot table reader does not validate entries: a hostile L1 size must not
        // size an allocation.
        if let Some(problem) = s.l1_problem(cs) {
            return corrupt!("{problem}");
        }
        l1s.push((s.l1_table_offset, s.l1_size));
    }
    let has_backing = h.backing_file.is_some();
    let mut seen = HashSet::new();
    let mut plan = Plan::default();
    let mut counts = None;
    for (off, size) in l1s {
        // Sizes were validated at open (active) and just above (snapshots).
        let mut raw = vec![0u8; size as usize * 8];
        file.read_zero_padded(&mut raw, HostOffset::new(off), "L1 table")?;
        for e in be::u64_table(&raw) {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 || !seen.insert(l2) {
                continue;
            }
            let mut t = vec![0u8; cs as usize];
            file.read_zero_padded(&mut t, HostOffset::new(l2), "L2 table")?;
            let mut entries = be::u64_table(&t);
            let mut changed = false;
            for (i, w) in entries.iter_mut().enumerate() {
                if *w & COMPRESSED != 0 {
                    plan.compressed = true;
                    continue;
                }
                if *w & ZERO == 0 {
                    continue;
                }
                let host = *w & OFFSET_MASK;
                if host == 0 && has_backing {
                    // Filled in once the new cluster is allocated (see `allocate`).
                    plan.allocs.push((l2, i));
                } else if host == 0 {
                    *w = 0;
                } else {
                    if counts.is_none() {
                        counts = Some(read_all(file, h)?.counts);
                    }
                    let rc = counts.as_ref().and_then(|c| c.get((host / cs) as usize));
                    if rc != Some(&1) {
                        return unsupported!(
                            "Cannot downgrade: the zero cluster at {host:#x} is shared"
                        );
                    }
                    plan.zero_clusters.push(host);
                    *w = host | COPIED;
                }
                changed = true;
            }
            if changed {
                plan.tables.insert(l2, entries);
            }
        }
    }
    Ok(plan)
}

/// Gives every zero cluster over a backing file a new cluster past the end of the file, as
/// QEMU does: the clusters are left as a hole (reading as zeros) below new refcount
/// structures that count them (with their L2 table's refcount, so that every snapshot
/// sharing the table owns them), and the header is switched to those structures before
/// any L2 entry points at them; a crash in between leaks them at worst.
fn allocate(file: &HostFile, h: &Header, plan: &mut Plan) -> Result<()> {
    if plan.allocs.is_empty() {
        return Ok(());
    }
    let cs = h.cluster_size();
    let mut counts = read_all(file, h)?.without_structures();
    let start = counts.len() as u64;
    for (k, &(l2, i)) in plan.allocs.iter().enumerate() {
        let shared = counts.get((l2 / cs) as usize).copied().unwrap_or(0);
        if shared == 0 {
            return corrupt!("L2 table at {l2:#x} is in use but has refcount 0");
        }
        let at = (start + k as u64) * cs;
        counts.push(shared);
        let copied = if shared == 1 { COPIED } else { 0 };
        if let Some(w) = plan.tables.get_mut(&l2).and_then(|t| t.get_mut(i)) {
            *w = at | copied;
        }
    }
    write_structures(file, h, h.refcount_order, counts)
}
