//! Persistent dirty bitmaps: the bitmap directory (pointed to by the bitmaps header extension)
//! and bitmap table entries, with QEMU's constraints.
//!
//! QEMU refuses to open an image (read-only too) whose directory breaks these constraints, so
//! oxcow does the same: an image QEMU cannot open is not one oxcow should serve or modify.

use super::be::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use super::Geometry;
use crate::error::{corrupt, unsupported, Result};

/// Fixed part of a directory entry, in bytes.
pub const ENTRY_HEADER_LEN: usize = 24;
/// Largest bitmap table QEMU accepts, in entries.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// Largest bitmap QEMU accepts, in bytes of bitmap data.
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Largest bitmap name QEMU accepts, in bytes.
pub const MAX_NAME_LEN: usize = 1023;
/// Smallest and largest granularity, as a power of two of bytes.
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Flag: the bitmap was not saved consistently (its writer is running or crashed).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap is enabled and must track every write.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU treats as reserved (it rejects bit 2, `extra_data_compatible`, too).
pub const FLAGS_RESERVED: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// Bitmap type: dirty tracking, the only one defined.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Reserved bits of a bitmap table entry.
pub const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Data-cluster offset bits of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// Each bit of the bitmap covers `1 << granularity_bits` guest bytes.
    pub granularity_bits: u8,
    /// Bitmap name (UTF-8 not required by the format; kept as bytes).
    pub name: Vec<u8>,
}

impl BitmapEntry {
    /// The name for messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Parses a bitmap directory of `count` entries that must fill `dir` exactly, checking every
/// entry against QEMU's constraints for a disk of `virtual_size` bytes.
pub fn parse_directory(
    dir: &[u8],
    count: u32,
    geo: &Geometry,
    virtual_size: u64,
) -> Result<Vec<BitmapEntry>> {
    let mut out = Vec::with_capacity((count as usize).min(dir.len() / ENTRY_HEADER_LEN));
    let mut pos = 0usize;
    for _ in 0..count {
        if dir.len() - pos < ENTRY_HEADER_LEN {
            return corrupt!("Broken bitmap directory: entry {} is truncated", out.len());
        }
        let e = &dir[pos..];
        let name_size = u16_at(e, 18) as usize;
        let extra = u32_at(e, 20) as usize;
        let len = ENTRY_HEADER_LEN
            .checked_add(extra)
            .and_then(|l| l.checked_add(name_size))
            .filter(|&l| l <= dir.len() - pos)
            .ok_or_else(|| {
                crate::Error::corrupt(format!(
                    "Broken bitmap directory: entry {} overruns the directory",
                    out.len()
                ))
            })?;
        let name_at = ENTRY_HEADER_LEN + extra;
        let entry = BitmapEntry {
            table_offset: u64_at(e, 0),
            table_size: u32_at(e, 8),
            flags: u32_at(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name: e[name_at..name_at + name_size].to_vec(),
        };
        if extra != 0 {
            return unsupported!(
                "Bitmap '{}' has extra data, which is not supported",
                entry.display_name()
            );
        }
        check_constraints(&entry, name_size, geo, virtual_size)?;
        let padded = len.next_multiple_of(8);
        if dir.len() - pos < padded || e[len..padded].iter().any(|&b| b != 0) {
            return corrupt!(
                "Broken bitmap directory: bad padding after bitmap '{}'",
                entry.display_name()
            );
        }
        pos += padded;
        out.push(entry);
    }
    if pos != dir.len() {
        return corrupt!(
            "Broken bitmap directory: {count} entries take {pos} bytes, the extension says {}",
            dir.len()
        );
    }
    Ok(out)
}

fn check_constraints(
    e: &BitmapEntry,
    name_size: usize,
    geo: &Geometry,
    virtual_size: u64,
) -> Result<()> {
    let phys_bytes = e.table_size as u64 * geo.cluster_size();
    let ok = e.table_size != 0
        && e.table_size <= MAX_TABLE_ENTRIES
        && e.table_offset != 0
        && geo.is_aligned(e.table_offset)
        && GRANULARITY_BITS.contains(&e.granularity_bits)
        && e.flags & FLAGS_RESERVED == 0
        && name_size != 0
        && name_size <= MAX_NAME_LEN
        && e.kind == TYPE_DIRTY_TRACKING
        && phys_bytes <= MAX_PHYS_BYTES
        // A consistent bitmap must cover the whole disk.
        && (e.flags & FLAG_IN_USE != 0
            || (phys_bytes * 8)
                .checked_shl(e.granularity_bits as u32)
                .is_none_or(|covered| covered >= virtual_size));
    if !ok {
        return corrupt!(
            "Bitmap '{}' doesn't satisfy the constraints",
            e.display_name()
        );
    }
    Ok(())
}

/// Most bitmaps an image may hold (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory QEMU accepts, in bytes.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Most bits QEMU lets a new bitmap have (it refuses the granularity otherwise).
pub const MAX_NEW_BITMAP_BITS: u64 = MAX_PHYS_BYTES;

/// One decoded bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Every bit of the cluster's range is 0 (entry 0).
    Zero,
    /// Every bit of the cluster's range is 1 (entry 1, offset 0).
    Ones,
    /// The bits are stored in the data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes and validates a raw entry as QEMU does (reserved bits clear, data offsets
    /// cluster-aligned, bit 0 only without an offset).
    pub fn decode(raw: u64, geo: &Geometry) -> Result<TableEntry> {
        let off = raw & TABLE_ENTRY_OFFSET;
        if raw & TABLE_ENTRY_RESERVED != 0 || (off != 0 && (raw & 1 != 0 || !geo.is_aligned(off))) {
            return corrupt!("Invalid bitmap table entry {raw:#x}");
        }
        Ok(match (off, raw & 1) {
            (0, 0) => TableEntry::Zero,
            (0, _) => TableEntry::Ones,
            (o, _) => TableEntry::Data(o),
        })
    }

    /// The raw entry.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zero => 0,
            TableEntry::Ones => 1,
            TableEntry::Data(o) => o & TABLE_ENTRY_OFFSET,
        }
    }
}

/// Bytes a directory entry with a name of `name_len` bytes takes, padding included.
pub fn entry_len(name_len: usize) -> usize {
    (ENTRY_HEADER_LEN + name_len).next_multiple_of(8)
}

/// Bitmap table entries a bitmap of `1 << granularity_bits` bytes per bit needs for a disk of
/// `virtual_size` bytes (one entry per cluster of bitmap data).
pub fn table_entries(virtual_size: u64, granularity_bits: u8, geo: &Geometry) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(geo.cluster_size() * 8)
}

/// Serializes a directory (entries in order, each padded to 8 bytes), as QEMU writes it.
/// Names longer than [`MAX_NAME_LEN`] are refused.
pub fn serialize_directory(entries: &[BitmapEntry]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| entry_len(e.name.len())).sum());
    for e in entries {
        if e.name.is_empty() || e.name.len() > MAX_NAME_LEN {
            return Err(crate::Error::invalid(format!(
                "bitmap name of {} bytes is not allowed",
                e.name.len()
            )));
        }
        let at = out.len();
        out.resize(at + entry_len(e.name.len()), 0);
        let b = &mut out[at..];
        put_u64(b, 0, e.table_offset);
        put_u32(b, 8, e.table_size);
        put_u32(b, 12, e.flags);
        b[16] = e.kind;
        b[17] = e.granularity_bits;
        put_u16(b, 18, e.name.len() as u16);
        b[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + e.name.len()].copy_from_slice(&e.name);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
            external_data: false,
        }
    }

    fn entry(name: &str, table_size: u32, flags: u32, gran: u8) -> Vec<u8> {
        let mut v = vec![0u8; ENTRY_HEADER_LEN];
        v[0..8].copy_from_slice(&0x30000u64.to_be_bytes());
        v[8..12].copy_from_slice(&table_size.to_be_bytes());
        v[12..16].copy_from_slice(&flags.to_be_bytes());
        v[16] = 1;
        v[17] = gran;
        v[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }

    #[test]
    fn a_directory_like_qemu_writes_parses() {
        let mut d = entry("b0", 1, FLAG_AUTO, 16);
        d.extend(entry("backup-2", 1, 0, 16));
        let v = parse_directory(&d, 2, &geo(), 1 << 30).expect("valid");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, b"backup-2");
    }

    #[test]
    fn each_constraint_violation_is_refused_with_the_bitmap_name() {
        let g = geo();
        let cases = [
            entry("zero-table", 0, 0, 16),
            entry("reserved-flag", 1, 1 << 2, 16),
            entry("granularity", 1, 0, 8),
            entry("too-small", 1, 0, 9),
        ];
        for d in cases {
            let e = parse_directory(&d, 1, &g, 1 << 40).expect_err("violation accepted");
            assert!(
                e.to_string().contains("doesn't satisfy the constraints"),
                "{e}"
            );
        }
        let mut bad_type = entry("t", 1, 0, 16);
        bad_type[16] = 2;
        assert!(parse_directory(&bad_type, 1, &g, 1 << 20).is_err());
    }

    #[test]
    fn in_use_bitmaps_need_not_cover_the_disk() {
        let d = entry("in-use", 1, FLAG_IN_USE, 9);
        assert!(parse_directory(&d, 1, &geo(), 1 << 40).is_ok());
    }

    #[test]
    fn truncated_or_overlong_directories_are_refused() {
        let d = entry("b0", 1, 0, 16);
        assert!(parse_directory(&d[..20], 1, &geo(), 1 << 20).is_err());
        assert!(parse_directory(&d, 2, &geo(), 1 << 20).is_err());
        let mut long = d.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(parse_directory(&long, 1, &geo(), 1 << 20).is_err());
        let mut huge_name = d.clone();
        huge_name[18..20].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse_directory(&huge_name, 1, &geo(), 1 << 20).is_err());
    }

    #[test]
    fn a_serialized_directory_parses_back() {
        let e = BitmapEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: b"backup-1".to_vec(),
        };
        let d = serialize_directory(&[e.clone(), e.clone()]).expect("serialize");
        assert_eq!(d.len(), 2 * entry_len(8));
        assert_eq!(
            parse_directory(&d, 2, &geo(), 1 << 30).expect("parse"),
            vec![e.clone(), e]
        );
    }

    #[test]
    fn table_entries_decode_as_qemu_reads_them() {
        let g = geo();
        assert_eq!(TableEntry::decode(0, &g).ok(), Some(TableEntry::Zero));
        assert_eq!(TableEntry::decode(1, &g).ok(), Some(TableEntry::Ones));
        assert_eq!(
            TableEntry::decode(0x30000, &g).ok(),
            Some(TableEntry::Data(0x30000))
        );
        assert!(TableEntry::decode(0x30001, &g).is_err());
        assert!(TableEntry::decode(0x30200, &g).is_err());
        assert!(TableEntry::decode(1 << 63, &g).is_err());
        assert_eq!(table_entries(1 << 30, 16, &g), 1);
        assert_eq!(table_entries((1 << 30) * 64, 9, &g), 256);
    }
}
