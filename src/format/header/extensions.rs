//! Header extensions: the typed records between the fixed header and the backing file name
//! (or the end of cluster 0). Versions 2 and 3 both have them; only where they start differs.

use super::{BitmapsExtension, FeatureName, Header, AUTOCLEAR_BITMAPS};
use crate::error::{corrupt, Error, Result};
use crate::format::be::{put_u32, put_u64, u32_at, u64_at};

/// Header extension magics.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full-disk-encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Longest backing format name QEMU accepts in the extension (exclusive).
const MAX_BACKING_FORMAT_LEN: u64 = 16;

impl Header {
    /// Parses the extension area `c0[start..end]`. Each record is bounded by `end`, so the
    /// walk takes at most `(end - start) / 8` steps.
    pub(super) fn parse_extensions(&mut self, c0: &[u8], start: u64, end: u64) -> Result<()> {
        let mut off = start;
        let mut seen = Vec::new();
        loop {
            if off + 8 > end {
                // QEMU tolerates an extension area that ends without a terminator when it is
                // exactly used up; anything shorter is an overrun.
                if off >= end {
                    return Ok(());
                }
                return corrupt!("Header extension too large (at offset {off:#x})");
            }
            let typ = u32_at(c0, off as usize);
            let len = u64::from(u32_at(c0, off as usize + 4));
            off += 8;
            if typ == ext::END {
                return Ok(());
            }
            if len > end - off {
                return corrupt!("Header extension too large (type {typ:#x}, length {len})");
            }
            if seen.contains(&typ) {
                return corrupt!("Duplicate header extension {typ:#x}");
            }
            seen.push(typ);
            self.parse_extension(typ, &c0[off as usize..(off + len) as usize])?;
            off += len.div_ceil(8) * 8;
        }
    }

    fn parse_extension(&mut self, typ: u32, data: &[u8]) -> Result<()> {
        let len = data.len();
        match typ {
            ext::BACKING_FORMAT => {
                if len as u64 >= MAX_BACKING_FORMAT_LEN {
                    return corrupt!("ERROR: ext_backing_format: len={len} too large");
                }
                self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            ext::FEATURE_TABLE => self.feature_names = parse_feature_table(data),
            ext::BITMAPS => self.bitmaps = Some(self.parse_bitmaps(data)?),
            ext::CRYPTO => {
                if len != 16 {
                    return corrupt!("Crypto header extension has length {len}, expected 16");
                }
                self.crypto = Some((u64_at(data, 0), u64_at(data, 8)));
            }
            ext::DATA_FILE => self.data_file = Some(data.to_vec()),
            _ => self.unknown_extensions.push((typ, data.to_vec())),
        }
        Ok(())
    }

    /// Like QEMU, the contents are validated only while autoclear bit 0 vouches for them: a
    /// stale extension (written by a program without bitmap support, or any version-2 image)
    /// is kept but never used, so it cannot keep the image from opening.
    fn parse_bitmaps(&self, data: &[u8]) -> Result<BitmapsExtension> {
        if data.len() != 24 {
            return corrupt!("bitmaps_ext: Invalid extension length {}", data.len());
        }
        let b = BitmapsExtension {
            nb_bitmaps: u32_at(data, 0),
            directory_size: u64_at(data, 8),
            directory_offset: u64_at(data, 16),
        };
        if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(b);
        }
        if u32_at(data, 4) != 0 {
            return corrupt!("bitmaps_ext: Reserved field is not zero");
        }
        if b.nb_bitmaps == 0 || b.nb_bitmaps > 65535 {
            return corrupt!("bitmaps_ext: invalid number of bitmaps {}", b.nb_bitmaps);
        }
        if b.directory_size > 1024 * 65535 {
            return corrupt!(
                "bitmaps_ext: bitmap directory size {} is too large",
                b.directory_size
            );
        }
        if b.directory_offset % self.cluster_size() != 0 {
            return corrupt!(
                "bitmaps_ext: invalid bitmap directory offset {:#x}",
                b.directory_offset
            );
        }
        Ok(b)
    }

    /// The extensions to write, in QEMU's order. The feature name table is a version-3
    /// record (QEMU writes it only there); the others exist in both versions.
    ///
    /// Fails when the backing format name is too long to be read back (a name parsed from
    /// bytes that are not UTF-8 grows when made a string): never write what the parser refuses.
    pub(super) fn extension_records(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            if f.len() as u64 >= MAX_BACKING_FORMAT_LEN {
                return Err(Error::invalid(format!(
                    "backing format name of {} bytes is too long",
                    f.len()
                )));
            }
            exts.push((ext::BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(d) = &self.data_file {
            exts.push((ext::DATA_FILE, d.clone()));
        }
        if let Some((o, l)) = self.crypto {
            let mut d = vec![0u8; 16];
            put_u64(&mut d, 0, o);
            put_u64(&mut d, 8, l);
            exts.push((ext::CRYPTO, d));
        }
        if self.version >= 3 && !self.feature_names.is_empty() {
            exts.push((ext::FEATURE_TABLE, feature_table_bytes(&self.feature_names)));
        }
        if let Some(b) = self.bitmaps {
            let mut d = vec![0u8; 24];
            put_u32(&mut d, 0, b.nb_bitmaps);
            put_u64(&mut d, 8, b.directory_size);
            put_u64(&mut d, 16, b.directory_offset);
            exts.push((ext::BITMAPS, d));
        }
        exts.extend(self.unknown_extensions.iter().cloned());
        Ok(exts)
    }
}

/// Writes `exts` and the end marker into `out` at `off`; returns where the area ends.
pub(super) fn write_records(
    out: &mut [u8],
    mut off: usize,
    exts: &[(u32, Vec<u8>)],
) -> Result<usize> {
    for (typ, data) in exts {
        let padded = data.len().div_ceil(8) * 8;
        if off + 8 + padded + 8 > out.len() {
            return Err(Error::invalid("header extensions do not fit in cluster 0"));
        }
        put_u32(out, off, *typ);
        put_u32(out, off + 4, data.len() as u32);
        out[off + 8..off + 8 + data.len()].copy_from_slice(data);
        off += 8 + padded;
    }
    // End-of-extensions marker (the buffer is already zero).
    Ok(off + 8)
}

fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(48)
        .map(|e| {
            let name_bytes = &e[2..48];
            let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
            FeatureName {
                kind: e[0],
                bit: e[1],
                name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
            }
        })
        .collect()
}

fn feature_table_bytes(names: &[FeatureName]) -> Vec<u8> {
    let mut d = Vec::with_capacity(names.len() * 48);
    for f in names {
        let mut e = [0u8; 48];
        e[0] = f.kind;
        e[1] = f.bit;
        let n = f.name.len().min(46);
        e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
        d.extend_from_slice(&e);
    }
    d
}
