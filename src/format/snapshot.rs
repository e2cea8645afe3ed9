//! Internal snapshot table entries.

use super::be::{u16_at, u32_at, u64_at};
use crate::error::{corrupt, Result};

/// Bytes of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;
/// Largest extra data QEMU accepts per entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Largest snapshot table QEMU accepts, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

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

/// Parses and validates one entry; `buf` holds at least [`entry_len`] bytes.
/// `index` is used in messages; `version` decides whether v3 extra data is mandatory.
pub fn parse(buf: &[u8], index: usize, version: u32, cluster_size: u64) -> Result<Snapshot> {
    let (extra, id_len, name_len) = variable_sizes(buf);
    if extra > MAX_EXTRA_DATA {
        return corrupt!("Too much extra metadata in snapshot table entry {index}");
    }
    if version >= 3 && extra < 16 {
        return corrupt!("Snapshot table entry {index} is incomplete (extra data {extra} bytes)");
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
    let id_start = FIXED_LEN + extra as usize;
    let name_start = id_start + id_len as usize;
    s.id = String::from_utf8_lossy(&buf[id_start..name_start]).into_owned();
    s.name = String::from_utf8_lossy(&buf[name_start..name_start + name_len as usize]).into_owned();
    if s.l1_table_offset % cluster_size != 0 {
        return corrupt!(
            "Snapshot L1 table offset invalid ({:#x}) in snapshot {index}",
            s.l1_table_offset
        );
    }
    if s.l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
        return corrupt!("Snapshot L1 table too large in snapshot {index}");
    }
    Ok(s)
}
