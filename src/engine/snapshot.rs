//! Reading and validating the internal snapshot table at open.

use crate::error::{corrupt, Result};
use crate::format::snapshot::{self, Snapshot, FIXED_LEN, MAX_TABLE_BYTES};
use crate::format::Header;
use crate::format::HostOffset;
use crate::storage::HostFile;

/// Reads every snapshot table entry, bounding the table to QEMU's 64 MiB limit. Returns the
/// entries and the table's length in bytes.
pub fn read_table(file: &HostFile, header: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut off = header.snapshots_offset;
    let mut total = 0u64;
    // Bound: nb_snapshots is at most MAX_SNAPSHOTS (header validation) and the bytes read
    // at most MAX_TABLE_BYTES (checked per entry below), so neither the loop nor the memory
    // it takes depends on anything unchecked.
    for i in 0..header.nb_snapshots as usize {
        let mut fixed = [0u8; FIXED_LEN];
        file.read_zero_padded(&mut fixed, HostOffset::new(off), "snapshot table")?;
        let len = snapshot::entry_len(&fixed);
        total += len;
        if total > MAX_TABLE_BYTES {
            return corrupt!("Snapshot table is too big");
        }
        let mut entry = vec![0u8; len as usize];
        file.read_zero_padded(&mut entry, HostOffset::new(off), "snapshot table")?;
        out.push(snapshot::parse(
            &entry,
            i,
            header.version,
            header.cluster_size(),
        )?);
        off += len;
    }
    Ok((out, total))
}
