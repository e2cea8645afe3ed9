//! Internal snapshot table entries.
//!
//! Validation is split like QEMU's: what QEMU refuses when it reads the table at open (too
//! much extra data, a table over 64 MiB) is refused by [`parse`]; the rest (the snapshot's L1
//! table, incomplete v3 extra data) is only reported by `check` and refused by the operations
//! that need the snapshot ([`Snapshot::l1_problem`]).

use super::be::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::error::{corrupt, Result};

/// Bytes of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;
/// Largest extra data QEMU accepts per entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Largest snapshot table QEMU accepts, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Extra data bytes every version-3 entry must have (through `disk_size`).
pub const V3_MIN_EXTRA_DATA: u32 = 16;
/// Extra data bytes oxcow (and QEMU) know: vm_state_size_large, disk_size, icount.
pub const KNOWN_EXTRA_DATA: u32 = 24;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Disk size at creation (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// The VM's instruction counter at creation (extra data), if recorded.
    pub icount: Option<u64>,
    /// `extra_data_size` as found on disk (before any truncation by a repair).
    pub extra_data_size: u32,
    /// Extra data past the fields oxcow knows, kept verbatim for a rewrite of the table
    /// (at most [`MAX_EXTRA_DATA`] minus the known part).
    pub unknown_extra: Vec<u8>,
    /// The raw id and name bytes, kept verbatim for a rewrite of the table.
    raw_id_name: (Vec<u8>, Vec<u8>),
}

impl Snapshot {
    /// Why the snapshot's L1 table cannot be used, in `qemu-img check`'s words (QEMU opens
    /// such an image and refuses only the snapshot operations that need the table).
    pub fn l1_problem(&self, cluster_size: u64) -> Option<String> {
        if self.l1_table_offset % cluster_size != 0 {
            return Some(format!(
                "snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned",
                self.id, self.name, self.l1_table_offset
            ));
        }
        if self.l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Some(format!(
                "snapshot {} ({}) l1_size={:#x}: L1 table is too large",
                self.id, self.name, self.l1_size
            ));
        }
        None
    }

    /// A new entry as `qemu-img snapshot -c` writes it: no VM state, a VM clock of 0, an
    /// icount of 0, the full known extra data (with `disk_size`), id and name verbatim.
    pub fn new(id: &str, name: &str, l1: (u64, u32), date: (u32, u32), disk_size: u64) -> Snapshot {
        Snapshot {
            l1_table_offset: l1.0,
            l1_size: l1.1,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(disk_size),
            icount: Some(0),
            extra_data_size: KNOWN_EXTRA_DATA,
            unknown_extra: Vec::new(),
            raw_id_name: (id.as_bytes().to_vec(), name.as_bytes().to_vec()),
        }
    }

    /// Whether a version-`version` image requires more extra data than this entry has.
    pub fn is_incomplete(&self, version: u32) -> bool {
        version >= 3 && self.extra_data_size < V3_MIN_EXTRA_DATA
    }
}

/// Sizes of the variable part of an entry, from its fixed part: (extra, id, name).
pub fn variable_sizes(fixed: &[u8]) -> (u32, u16, u16) {
    (u32_at(fixed, 36), u16_at(fixed, 12), u16_at(fixed, 14))
}

/// Total entry length (8-byte aligned) from the fixed part.
pub fn entry_len(fixed: &[u8]) -> u64 {
    let (extra, id, name) = variable_sizes(fixed);
    (FIXED_LEN as u64 + extra as u64 + id as u64 + name as u64).div_ceil(8) * 8
}

/// Parses one entry; `buf` holds at least [`entry_len`] bytes and `index` is used in
/// messages. More extra data than QEMU accepts fails, as it fails QEMU's open, unless
/// `truncate_extra` (a repair): then the excess is dropped, as `qemu-img check -r all` does.
pub fn parse(buf: &[u8], index: usize, truncate_extra: bool) -> Result<Snapshot> {
    let (extra, id_len, name_len) = variable_sizes(buf);
    if extra > MAX_EXTRA_DATA && !truncate_extra {
        return corrupt!(
            "Too much extra metadata in snapshot table entry {index} (you can force-remove this extra metadata with qemu-img check -r all)"
        );
    }
    let e = &buf[FIXED_LEN..FIXED_LEN + extra as usize];
    let mut s = Snapshot {
        l1_table_offset: u64_at(buf, 0),
        l1_size: u32_at(buf, 8),
        id: String::new(),
        name: String::new(),
        date_sec: u32_at(buf, 16),
        date_nsec: u32_at(buf, 20),
        vm_clock_nsec: u64_at(buf, 24),
        vm_state_size: u32_at(buf, 32) as u64,
        disk_size: None,
        icount: None,
        extra_data_size: extra,
        unknown_extra: Vec::new(),
        raw_id_name: (Vec::new(), Vec::new()),
    };
    if extra >= 8 {
        s.vm_state_size = u64_at(e, 0);
    }
    if extra >= 16 {
        s.disk_size = Some(u64_at(e, 8));
    }
    // -1 means "not recorded" (qemu-img then omits it).
    if extra >= 24 {
        s.icount = Some(u64_at(e, 16)).filter(|&v| v != u64::MAX);
    }
    if extra > KNOWN_EXTRA_DATA {
        let keep = extra.min(MAX_EXTRA_DATA) as usize;
        s.unknown_extra = e[KNOWN_EXTRA_DATA as usize..keep].to_vec();
    }
    let id_start = FIXED_LEN + extra as usize;
    let name_start = id_start + id_len as usize;
    let id = &buf[id_start..name_start];
    let name = &buf[name_start..name_start + name_len as usize];
    s.id = String::from_utf8_lossy(id).into_owned();
    s.name = String::from_utf8_lossy(name).into_owned();
    s.raw_id_name = (id.to_vec(), name.to_vec());
    Ok(s)
}

/// Serializes a snapshot table the way QEMU writes one: every entry gets the known extra
/// data (a missing disk size is recorded as `virtual_size`, a missing icount as -1) plus the
/// unknown extra data it had, then its id and name, padded to 8 bytes.
pub fn serialize_table(snapshots: &[Snapshot], virtual_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snapshots {
        let extra = KNOWN_EXTRA_DATA as usize + s.unknown_extra.len();
        let (id, name) = &s.raw_id_name;
        let len = (FIXED_LEN + extra + id.len() + name.len()).div_ceil(8) * 8;
        let mut e = vec![0u8; len];
        put_u64(&mut e, 0, s.l1_table_offset);
        put_u32(&mut e, 8, s.l1_size);
        // Lengths came from u16 fields on disk.
        put_u16(&mut e, 12, id.len() as u16);
        put_u16(&mut e, 14, name.len() as u16);
        put_u32(&mut e, 16, s.date_sec);
        put_u32(&mut e, 20, s.date_nsec);
        put_u64(&mut e, 24, s.vm_clock_nsec);
        put_u32(&mut e, 32, u32::try_from(s.vm_state_size).unwrap_or(0));
        put_u32(&mut e, 36, extra as u32);
        put_u64(&mut e, 40, s.vm_state_size);
        put_u64(&mut e, 48, s.disk_size.unwrap_or(virtual_size));
        put_u64(&mut e, 56, s.icount.unwrap_or(u64::MAX));
        let mut at = FIXED_LEN + KNOWN_EXTRA_DATA as usize;
        for part in [&s.unknown_extra[..], id, name] {
            e[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out.extend_from_slice(&e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(extra: &[u8], id: &[u8], name: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; FIXED_LEN];
        put_u64(&mut e, 0, 0x50000);
        put_u32(&mut e, 8, 1);
        put_u16(&mut e, 12, id.len() as u16);
        put_u16(&mut e, 14, name.len() as u16);
        put_u32(&mut e, 36, extra.len() as u32);
        e.extend_from_slice(extra);
        e.extend_from_slice(id);
        e.extend_from_slice(name);
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    #[test]
    fn incomplete_entry_parses_and_is_rewritten_complete() {
        let raw = entry(&[], b"1", b"s1");
        let s = parse(&raw, 0, false).unwrap();
        assert!(s.is_incomplete(3) && !s.is_incomplete(2));
        let table = serialize_table(std::slice::from_ref(&s), 1 << 20);
        let t = parse(&table, 0, false).unwrap();
        assert!(!t.is_incomplete(3));
        assert_eq!((t.id.as_str(), t.name.as_str()), ("1", "s1"));
        assert_eq!((t.disk_size, t.icount), (Some(1 << 20), None));
    }

    #[test]
    fn excess_extra_data_fails_unless_truncated() {
        let raw = entry(&vec![0u8; 2000], b"7", b"big");
        assert!(parse(&raw, 3, false).is_err());
        let s = parse(&raw, 3, true).unwrap();
        assert_eq!(
            s.unknown_extra.len(),
            (MAX_EXTRA_DATA - KNOWN_EXTRA_DATA) as usize
        );
        let table = serialize_table(&[s], 0);
        assert_eq!(variable_sizes(&table).0, MAX_EXTRA_DATA);
        assert_eq!(parse(&table, 0, false).unwrap().name, "big");
    }

    #[test]
    fn l1_problems_are_named() {
        let mut s = parse(&entry(&[0; 24], b"1", b"a"), 0, false).unwrap();
        assert_eq!(s.l1_problem(65536), None);
        s.l1_table_offset = 0x50200;
        assert!(s.l1_problem(65536).unwrap().contains("not cluster aligned"));
        s.l1_table_offset = 0x50000;
        s.l1_size = 0x100_0000;
        assert!(s.l1_problem(65536).unwrap().contains("too large"));
    }
}
