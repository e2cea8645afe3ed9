//! Amend's refcount-width change: every refcount is read into memory, new refcount blocks
//! and a new table of the new width are written past the end of the file (counting
//! themselves, and no longer counting the old structures), synced, and then the header is
//! switched to them (order, table offset and size) in one write. A crash before the switch
//! leaves the old structures untouched; after it, the old ones are free space.

use super::amend::rewrite_header;
use crate::error::{corrupt, invalid, unsupported, Error, ErrorKind, Result};
use crate::format::header::{Header, MAX_REFTABLE_BYTES};
use crate::format::{be, refcount, HostOffset};
use crate::storage::{HostFile, WriteKind};

/// Most host clusters whose refcounts are held in memory (256 MiB of counts).
const MAX_CLUSTERS: u64 = 1 << 25;

/// Every host cluster's refcount (index = host cluster) and the clusters of the refcount
/// structures that hold them.
pub(super) struct Refcounts {
    /// Refcounts by host cluster; clusters past the end are 0.
    pub counts: Vec<u64>,
    /// Host clusters of the refcount table and blocks.
    pub structures: Vec<u64>,
}

/// Reads every refcount of the image described by `h`.
pub(super) fn read_all(file: &HostFile, h: &Header) -> Result<Refcounts> {
    let cs = h.cluster_size();
    let per_block = (cs * 8) >> h.refcount_order;
    let table_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    let mut raw = vec![0u8; (table_entries * 8) as usize]; // at most MAX_REFTABLE_BYTES
    let rt = HostOffset::new(h.refcount_table_offset);
    file.read_zero_padded(&mut raw, rt, "refcount table")?;
    let table = be::u64_table(&raw);
    let file_clusters = file.len()?.div_ceil(cs);
    if file_clusters > MAX_CLUSTERS {
        return too_big(file_clusters);
    }
    let mut counts = vec![0u64; file_clusters as usize];
    let first = h.refcount_table_offset / cs;
    let mut structures: Vec<u64> = (first..first + u64::from(h.refcount_table_clusters)).collect();
    let mut block = vec![0u8; cs as usize];
    for (i, &e) in table.iter().enumerate() {
        let at = e & 0xffff_ffff_ffff_fe00;
        if at == 0 {
            continue;
        }
        // Bounded by the clusters amend can hold, not by the (hostile) table's length.
        if i as u64 * per_block >= MAX_CLUSTERS {
            return too_big(i as u64 * per_block + 1);
        }
        if at % cs != 0 {
            return corrupt!("Refcount block offset {at:#x} is not cluster-aligned");
        }
        structures.push(at / cs);
        file.read_zero_padded(&mut block, HostOffset::new(at), "refcount block")?;
        for j in 0..per_block {
            let v = refcount::get(&block, h.refcount_order, j as usize);
            if v == 0 {
                continue;
            }
            let idx = i as u64 * per_block + j;
            if idx >= MAX_CLUSTERS {
                return too_big(idx + 1);
            }
            if idx as usize >= counts.len() {
                counts.resize(idx as usize + 1, 0);
            }
            counts[idx as usize] = v;
        }
    }
    Ok(Refcounts { counts, structures })
}

fn too_big<T>(clusters: u64) -> Result<T> {
    unsupported!("amend holds every refcount in memory: {clusters} host clusters is more than {MAX_CLUSTERS}")
}

/// Rewrites the refcount structures with entries of `2^new_order` bits (see the module
/// documentation).
pub(super) fn change_refcount_order(file: &HostFile, h: &Header, new_order: u32) -> Result<()> {
    let cs = h.cluster_size();
    let Refcounts { counts, structures } = read_all(file, h)?;
    let bits = 1u32 << new_order;
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if let Some((i, &v)) = counts.iter().enumerate().find(|(_, &v)| v > max) {
        return invalid!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {v}",
            i as u64 * cs
        );
    }
    let counts = Refcounts { counts, structures }.without_structures();
    write_structures(file, h, new_order, counts)
}

impl Refcounts {
    /// The counts with the current refcount structures' clusters free (the counts a new
    /// set of structures records once the header points at it).
    pub(super) fn without_structures(mut self) -> Vec<u64> {
        for &c in &self.structures {
            if let Some(v) = self.counts.get_mut(c as usize) {
                *v = 0;
            }
        }
        self.counts
    }
}

/// Writes refcount structures of `2^new_order` bits recording `counts` (index = host
/// cluster) past them, plus themselves, syncs, and switches the header to them.
pub(super) fn write_structures(
    file: &HostFile,
    h: &Header,
    new_order: u32,
    mut counts: Vec<u64>,
) -> Result<()> {
    let cs = h.cluster_size();
    let start = counts.len() as u64;
    let per_block = (cs * 8) >> new_order;
    let (blocks, table_clusters) = layout(start, per_block, cs)?;
    let end = start + blocks + table_clusters;
    counts.resize(end as usize, 0);
    counts[start as usize..].fill(1);
    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    for r in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        let from = (r * per_block) as usize;
        let to = (from + per_block as usize).min(counts.len());
        for (j, &v) in counts[from..to].iter().enumerate() {
            refcount::set(&mut block, new_order, j, v);
        }
        let at = HostOffset::new((start + r) * cs);
        file.write(&block, at, WriteKind::RefcountBlock)?;
        table[r as usize] = at.get();
    }
    let table_at = HostOffset::new((start + blocks) * cs);
    file.write(
        &be::u64_table_bytes(&table),
        table_at,
        WriteKind::RefcountTable,
    )?;
    file.sync()?;
    rewrite_header(file, |h| {
        h.refcount_order = new_order;
        h.refcount_table_offset = table_at.get();
        h.refcount_table_clusters = table_clusters as u32;
        Ok(())
    })?;
    Ok(())
}

/// How many refcount blocks and table clusters cover `start` clusters plus themselves.
fn layout(start: u64, per_block: u64, cs: u64) -> Result<(u64, u64)> {
    let (mut blocks, mut table) = (0u64, 0u64);
    // Converges in a few rounds: each round adds at most a block and a table cluster.
    for _ in 0..64 {
        let total = start + blocks + table;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, table) {
            if t * cs > MAX_REFTABLE_BYTES {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("a refcount table of {t} clusters is past QEMU's limit"),
                ));
            }
            return Ok((b, t));
        }
        (blocks, table) = (b, t);
    }
    unsupported!("refcount structure sizes do not converge")
}

#[cfg(test)]
mod tests {
    use super::layout;

    #[test]
    fn the_new_structures_cover_themselves() {
        for (start, per_block) in [(10, 32768), (32767, 32768), (32768, 32768), (5000, 4096)] {
            let (b, t) = layout(start, per_block, 65536).unwrap();
            assert!(
                b * per_block >= start + b + t,
                "{start} {per_block}: {b} {t}"
            );
            assert!(t * 65536 / 8 >= b);
        }
    }
}
