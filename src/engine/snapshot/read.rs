//! Reading the internal snapshot table: at open (QEMU's `qcow2_read_snapshots`) and for a
//! check, which may repair what QEMU's `check -r all` repairs.

use crate::error::{corrupt, Result};
use crate::format::header::MAX_SNAPSHOTS;
use crate::format::snapshot::{self, Snapshot, FIXED_LEN, MAX_EXTRA_DATA, MAX_TABLE_BYTES};
use crate::format::Header;
use crate::format::HostOffset;
use crate::storage::HostFile;

/// A snapshot table as read for a check.
#[derive(Debug, Default)]
pub struct CheckedTable {
    /// The entries (with excess extra data dropped when repairing).
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the table on disk, as read.
    pub len: u64,
    /// Repair diagnostics ("Discarding ...") and the number of entries they concern.
    pub messages: Vec<String>,
    /// Entries whose extra data was truncated (repairing only).
    pub extra_data_dropped: u64,
    /// Entries past QEMU's limits (more than 65536, or past 64 MiB of table) that a repair
    /// drops (`snapshots` holds the rest).
    pub overhanging: u32,
    /// The table breaks QEMU's limits and this is not a repair: the check cannot go on, and
    /// `messages` says so as `qemu-img check` does.
    pub unreadable: bool,
}

/// Reads every snapshot table entry like QEMU's open does: the table may lie past the end of
/// the file (it reads as zeros) and entries are not validated beyond what QEMU refuses (too
/// much extra data, a table over 64 MiB). Returns the entries and the table's length.
pub fn read_table(file: &HostFile, header: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let t = read_entries(file, header, false)?;
    if t.unreadable {
        return corrupt!("Snapshot table is too big");
    }
    Ok((t.snapshots, t.len))
}

/// Reads the table for a check; with `repair`, excess extra data is dropped with QEMU's
/// message instead of failing the read.
pub fn read_table_for_check(
    file: &HostFile,
    header: &Header,
    repair: bool,
) -> Result<CheckedTable> {
    read_entries(file, header, repair)
}

fn read_entries(file: &HostFile, header: &Header, repair: bool) -> Result<CheckedTable> {
    let mut t = CheckedTable::default();
    let mut nb = header.nb_snapshots;
    if nb > MAX_SNAPSHOTS {
        // Only a check's header admits this (an open refuses it).
        if !overhang(
            &mut t,
            nb - MAX_SNAPSHOTS,
            repair,
            "ERROR snapshot table too large",
            "",
        ) {
            return Ok(t);
        }
        nb = MAX_SNAPSHOTS;
    }
    let mut off = header.snapshots_offset;
    // Bound: at most MAX_SNAPSHOTS entries (above), and the bytes read at most
    // MAX_TABLE_BYTES (checked per entry below), so neither the loop nor the memory it takes
    // depends on anything unchecked.
    for i in 0..nb {
        let mut fixed = [0u8; FIXED_LEN];
        file.read_zero_padded(&mut fixed, HostOffset::new(off), "snapshot table")?;
        let len = snapshot::entry_len(&fixed);
        if t.len + len > MAX_TABLE_BYTES {
            let what = "ERROR failed to read the snapshot table: Snapshot table is too big";
            if !overhang(&mut t, nb - i, repair, what, " (snapshot table is too big)") {
                return Ok(t);
            }
            break;
        }
        t.len += len;
        let mut entry = vec![0u8; len as usize];
        file.read_zero_padded(&mut entry, HostOffset::new(off), "snapshot table")?;
        let extra = snapshot::variable_sizes(&fixed).0;
        if repair && extra > MAX_EXTRA_DATA {
            t.messages.push(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra} > {MAX_EXTRA_DATA})"
            ));
            t.extra_data_dropped += 1;
        }
        t.snapshots
            .push(snapshot::parse(&entry, i as usize, repair)?);
        // The table's offset comes from the header: a hostile one must not wrap around.
        off = off
            .checked_add(len)
            .ok_or_else(|| crate::Error::corrupt("Snapshot table offset invalid"))?;
    }
    Ok(t)
}

/// Records `count` snapshots past QEMU's limits with QEMU's messages: a repair discards them
/// (returns true: read on), a plain check cannot go on (marks the table unreadable).
fn overhang(t: &mut CheckedTable, count: u32, repair: bool, error: &str, why: &str) -> bool {
    if repair {
        t.messages
            .push(format!("Discarding {count} overhanging snapshots{why}"));
        t.overhanging = count;
        return true;
    }
    t.messages.push(error.to_string());
    t.messages.push(format!(
        "You can force-remove all {count} overhanging snapshots with 'oxcow check -r all' (or qemu-img check -r all)"
    ));
    t.unreadable = true;
    false
}
