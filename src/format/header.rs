//! The qcow2 header (cluster 0): parsing with QEMU-equivalent validation, and serialization.
//!
//! Parsing never trusts a field: every size is bounded before it is used, and each rejection
//! names the field. Unknown header extensions and the bytes past the fields oxcow knows are kept
//! so that a rewrite preserves them.

use super::be::{put_u32, put_u64, u32_at, u64_at};
use super::geometry::Geometry;
use crate::error::{corrupt, unsupported, Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Header length QEMU writes for v3 images.
pub const V3_HEADER_LENGTH: u32 = 112;
/// Fixed header length of v2 images.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest cluster_bits QEMU accepts.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Byte offsets of header fields that are updated in place.
pub mod field {
    /// u64 incompatible_features.
    pub const INCOMPATIBLE: u64 = 72;
    /// u64 compatible_features.
    pub const COMPATIBLE: u64 = 80;
    /// u64 autoclear_features.
    pub const AUTOCLEAR: u64 = 88;
    /// u64 refcount_table_offset followed by u32 refcount_table_clusters.
    pub const REFCOUNT_TABLE: u64 = 48;
}

/// Incompatible feature bit 0: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression_type field is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit oxcow understands.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is valid raw.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

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

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL padding removed).
    pub name: String,
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

/// A parsed, validated qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 = unencrypted.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Length of the fixed header (extensions start here).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Backing file name (raw bytes, not NUL-terminated on disk).
    pub backing_file: Option<Vec<u8>>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// Feature name table extension.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExtension>,
    /// Crypto header extension (offset, length).
    pub crypto: Option<(u64, u64)>,
    /// External data file name extension.
    pub data_file: Option<Vec<u8>>,
    /// Extensions oxcow does not know, kept verbatim (type, payload).
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// Header bytes between the known fields and `header_length`, kept verbatim.
    pub extra_header_bytes: Vec<u8>,
}

impl Header {
    /// The geometry this header describes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & INCOMPAT_EXTL2 != 0,
            refcount_order: self.refcount_order,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Minimum number of bytes of the file to read before [`Header::parse`] can tell the
    /// cluster size; parse needs `min(cluster_size, file length)` bytes.
    pub const PROBE_LEN: usize = 104;

    /// Reads the cluster size from the first bytes of a file, for sizing the parse buffer.
    /// Returns `None` when the bytes are not a qcow2 header (parse reports why).
    pub fn probe_cluster_size(first: &[u8]) -> Option<u64> {
        if first.len() < 24 || u32_at(first, 0) != MAGIC {
            return None;
        }
        let bits = u32_at(first, 20);
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            Some(1u64 << bits)
        } else {
            None
        }
    }

    /// Parses and validates cluster 0. `buf` holds the first `min(cluster_size, file length)`
    /// bytes of the file; bytes missing at the end of a short file read as zeros.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LENGTH as usize || u32_at(buf, 0) != MAGIC {
            return Err(Error::NotQcow2("Image is not in qcow2 format".into()));
        }
        let version = u32_at(buf, 4);
        if version != 2 && version != 3 {
            return unsupported!("Unsupported qcow2 version {version}");
        }
        let cluster_bits = u32_at(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return unsupported!("Unsupported cluster size: 2^{cluster_bits}");
        }
        let cluster_size = 1u64 << cluster_bits;
        // Work on a zero-padded copy of cluster 0 so that a short file cannot make us index
        // past the end.
        let mut c0 = vec![0u8; cluster_size as usize];
        let have = buf.len().min(c0.len());
        c0[..have].copy_from_slice(&buf[..have]);

        let mut h = Header {
            version,
            backing_file_offset: u64_at(&c0, 8),
            backing_file_size: u32_at(&c0, 16),
            cluster_bits,
            size: u64_at(&c0, 24),
            crypt_method: u32_at(&c0, 32),
            l1_size: u32_at(&c0, 36),
            l1_table_offset: u64_at(&c0, 40),
            refcount_table_offset: u64_at(&c0, 48),
            refcount_table_clusters: u32_at(&c0, 56),
            nb_snapshots: u32_at(&c0, 60),
            snapshots_offset: u64_at(&c0, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            data_file: None,
            unknown_extensions: Vec::new(),
            extra_header_bytes: Vec::new(),
        };
        if version == 3 {
            h.incompatible_features = u64_at(&c0, 72);
            h.compatible_features = u64_at(&c0, 80);
            h.autoclear_features = u64_at(&c0, 88);
            h.refcount_order = u32_at(&c0, 96);
            h.header_length = u32_at(&c0, 100);
            if h.header_length < 104 {
                return corrupt!("qcow2 header too short (header_length {})", h.header_length);
            }
            if h.header_length as u64 > cluster_size {
                return corrupt!(
                    "qcow2 header exceeds cluster size (header_length {})",
                    h.header_length
                );
            }
            if h.header_length > 104 {
                h.compression_type = c0[104];
            }
            if h.header_length > V3_HEADER_LENGTH {
                h.extra_header_bytes =
                    c0[V3_HEADER_LENGTH as usize..h.header_length as usize].to_vec();
            }
        }

        // Extensions are parsed before feature checks so that unknown incompatible bits can be
        // reported by name.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        if version == 3 {
            h.parse_extensions(&c0, h.header_length as u64, ext_end)?;
        }

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| h.feature_name(0, b).unwrap_or_else(|| format!("bit {b}")))
                .collect();
            return unsupported!(
                "Unsupported qcow2 feature(s): {} (unknown incompatible feature mask {:#x})",
                names.join(", "),
                unknown
            );
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return unsupported!(
                "Unsupported qcow2 feature(s): external data file (not supported by oxcow yet)"
            );
        }
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return corrupt!("data-file-raw requires a data file");
        }
        if h.crypt_method != 0 {
            return unsupported!(
                "Encrypted images are not supported (crypt_method {})",
                h.crypt_method
            );
        }
        if h.crypto.is_some() {
            return corrupt!("Crypto header extension present in an unencrypted image");
        }
        if h.refcount_order > 6 {
            return corrupt!(
                "Reference count entry width too large; may not exceed 64 bits (refcount_order {})",
                h.refcount_order
            );
        }
        if h.backing_file_offset > cluster_size {
            return corrupt!(
                "Invalid backing file offset {:#x} (beyond cluster 0)",
                h.backing_file_offset
            );
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME
                || h.backing_file_size as u64 > cluster_size - h.backing_file_offset
            {
                return corrupt!("Backing file name too long ({} bytes)", h.backing_file_size);
            }
            let start = h.backing_file_offset as usize;
            let name = c0[start..start + h.backing_file_size as usize].to_vec();
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }

        let geo = h.geometry();
        if geo.extended_l2 && geo.subcluster_size() < 512 {
            return unsupported!("Unsupported subcluster size: {}", geo.subcluster_size());
        }
        let l1_needed = geo.l1_entries_for(h.size);
        if l1_needed > i32::MAX as u64 / 8 {
            return corrupt!("Image is too big (virtual size {})", h.size);
        }
        if (h.l1_size as u64) < l1_needed {
            return corrupt!(
                "L1 table is too small (l1_size {} < {} needed for size {})",
                h.l1_size,
                l1_needed,
                h.size
            );
        }
        validate_table(
            "Active L1 table",
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return corrupt!("Active L1 table offset invalid (0: overlaps the header)");
        }
        if h.refcount_table_clusters == 0 {
            return corrupt!("Image does not contain a reference count table");
        }
        validate_table(
            "Reference count table",
            h.refcount_table_offset,
            (h.refcount_table_clusters as u64) << cluster_bits,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        if h.refcount_table_offset == 0 {
            return corrupt!("Reference count table offset invalid (0)");
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt!("Snapshot table too large ({} snapshots)", h.nb_snapshots);
        }
        if h.snapshots_offset % cluster_size != 0 {
            return corrupt!("Snapshot table offset invalid ({:#x})", h.snapshots_offset);
        }
        match h.compression_type {
            0 if h.incompatible_features & INCOMPAT_COMPRESSION != 0 => {
                return corrupt!(
                    "qcow2: Compression type incompatible feature bit must not be set"
                );
            }
            1 if h.incompatible_features & INCOMPAT_COMPRESSION == 0 => {
                return corrupt!("qcow2: Compression type incompatible feature bit must be set");
            }
            0 | 1 => {}
            t => return unsupported!("qcow2: unknown compression type: {t}"),
        }
        Ok(h)
    }

    fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.clone())
    }

    fn parse_extensions(&mut self, c0: &[u8], start: u64, end: u64) -> Result<()> {
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
            let len = u32_at(c0, off as usize + 4) as u64;
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
            let data = &c0[off as usize..(off + len) as usize];
            match typ {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return corrupt!("ERROR: ext_backing_format: len={len} too large");
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return corrupt!("bitmaps_ext: Invalid extension length {len}");
                    }
                    let b = BitmapsExtension {
                        nb_bitmaps: u32_at(data, 0),
                        directory_size: u64_at(data, 8),
                        directory_offset: u64_at(data, 16),
                    };
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
                    if b.directory_offset % (1u64 << self.cluster_bits) != 0 {
                        return corrupt!(
                            "bitmaps_ext: invalid bitmap directory offset {:#x}",
                            b.directory_offset
                        );
                    }
                    self.bitmaps = Some(b);
                }
                ext::CRYPTO => {
                    if len != 16 {
                        return corrupt!("Crypto header extension has length {len}, expected 16");
                    }
                    self.crypto = Some((u64_at(data, 0), u64_at(data, 8)));
                }
                ext::DATA_FILE => self.data_file = Some(data.to_vec()),
                _ => self.unknown_extensions.push((typ, data.to_vec())),
            }
            off += len.div_ceil(8) * 8;
        }
    }

    /// Serializes the whole of cluster 0: fixed header, extensions in QEMU's order, end marker
    /// and backing file name. Sets `header_length`, `backing_file_offset` and
    /// `backing_file_size` to where things landed. Fails if they do not fit in one cluster.
    pub fn to_cluster0(&mut self) -> Result<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let mut out = vec![0u8; cluster_size];
        let v3 = self.version == 3;
        let mut off = if v3 {
            let len = V3_HEADER_LENGTH as usize + self.extra_header_bytes.len();
            self.header_length = len as u32;
            out[V3_HEADER_LENGTH as usize..len].copy_from_slice(&self.extra_header_bytes);
            len
        } else {
            self.header_length = V2_HEADER_LENGTH;
            V2_HEADER_LENGTH as usize
        };
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
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
        if !self.feature_names.is_empty() {
            let mut d = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            exts.push((ext::FEATURE_TABLE, d));
        }
        if let Some(b) = self.bitmaps {
            let mut d = vec![0u8; 24];
            put_u32(&mut d, 0, b.nb_bitmaps);
            put_u64(&mut d, 8, b.directory_size);
            put_u64(&mut d, 16, b.directory_offset);
            exts.push((ext::BITMAPS, d));
        }
        exts.extend(self.unknown_extensions.iter().cloned());
        if v3 {
            for (typ, data) in &exts {
                let padded = data.len().div_ceil(8) * 8;
                if off + 8 + padded + 8 > cluster_size {
                    return Err(Error::InvalidArgument(
                        "header extensions do not fit in cluster 0".into(),
                    ));
                }
                put_u32(&mut out, off, *typ);
                put_u32(&mut out, off + 4, data.len() as u32);
                out[off + 8..off + 8 + data.len()].copy_from_slice(data);
                off += 8 + padded;
            }
            // End-of-extensions marker (already zero).
            off += 8;
        }
        match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME as usize || off + name.len() > cluster_size {
                    return Err(Error::InvalidArgument(format!(
                        "backing file name too long ({} bytes)",
                        name.len()
                    )));
                }
                out[off..off + name.len()].copy_from_slice(name);
                self.backing_file_offset = off as u64;
                self.backing_file_size = name.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        put_u32(&mut out, 0, MAGIC);
        put_u32(&mut out, 4, self.version);
        put_u64(&mut out, 8, self.backing_file_offset);
        put_u32(&mut out, 16, self.backing_file_size);
        put_u32(&mut out, 20, self.cluster_bits);
        put_u64(&mut out, 24, self.size);
        put_u32(&mut out, 32, self.crypt_method);
        put_u32(&mut out, 36, self.l1_size);
        put_u64(&mut out, 40, self.l1_table_offset);
        put_u64(&mut out, 48, self.refcount_table_offset);
        put_u32(&mut out, 56, self.refcount_table_clusters);
        put_u32(&mut out, 60, self.nb_snapshots);
        put_u64(&mut out, 64, self.snapshots_offset);
        if v3 {
            put_u64(&mut out, 72, self.incompatible_features);
            put_u64(&mut out, 80, self.compatible_features);
            put_u64(&mut out, 88, self.autoclear_features);
            put_u32(&mut out, 96, self.refcount_order);
            put_u32(&mut out, 100, self.header_length);
            out[104] = self.compression_type;
        }
        Ok(out)
    }

    /// The feature name table QEMU writes into v3 images with clusters larger than 4 KiB.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// Checks a table's offset and size the way QEMU's `qcow2_validate_table` does.
fn validate_table(what: &str, offset: u64, bytes: u64, max: u64, cluster_size: u64) -> Result<()> {
    if bytes > max {
        return corrupt!("{what} too large ({bytes} bytes)");
    }
    if offset % cluster_size != 0
        || offset
            .checked_add(bytes)
            .is_none_or(|e| e > i64::MAX as u64)
    {
        return corrupt!("{what} offset invalid ({offset:#x})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 64 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            backing_file: Some(b"base.qcow2".to_vec()),
            backing_format: Some("qcow2".into()),
            feature_names: Header::qemu_feature_table(),
            bitmaps: None,
            crypto: None,
            data_file: None,
            unknown_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
            extra_header_bytes: Vec::new(),
        }
    }

    #[test]
    fn serialized_header_parses_back_identically() {
        let mut h = base();
        let bytes = h.to_cluster0().unwrap();
        let back = Header::parse(&bytes).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn bad_magic_is_not_qcow2() {
        let mut b = base().to_cluster0().unwrap();
        b[0] = 0;
        assert!(matches!(Header::parse(&b), Err(Error::NotQcow2(_))));
    }

    #[test]
    fn unknown_incompatible_bit_is_named_from_the_feature_table() {
        let mut h = base();
        h.feature_names.push(FeatureName {
            kind: 0,
            bit: 9,
            name: "time travel".into(),
        });
        h.incompatible_features = 1 << 9;
        let b = h.to_cluster0().unwrap();
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP);
        assert!(e.to_string().contains("time travel"), "{e}");
    }

    #[test]
    fn each_out_of_range_field_is_rejected_with_its_name() {
        type Poke = fn(&mut Header);
        let cases: Vec<(Poke, &str)> = vec![
            (|h| h.l1_size = 0, "L1 table is too small"),
            (
                |h| h.l1_table_offset = 0x30001,
                "Active L1 table offset invalid",
            ),
            (|h| h.refcount_table_clusters = 0, "reference count table"),
            (
                |h| h.refcount_table_offset = 0x10200,
                "Reference count table offset",
            ),
            (
                |h| h.refcount_table_clusters = 1000,
                "Reference count table too large",
            ),
            (|h| h.nb_snapshots = 70000, "Snapshot table too large"),
            (
                |h| h.snapshots_offset = 0x10,
                "Snapshot table offset invalid",
            ),
            (|h| h.refcount_order = 7, "Reference count entry width"),
            (|h| h.crypt_method = 1, "Encrypted"),
            (
                |h| h.incompatible_features = INCOMPAT_DATA_FILE,
                "external data file",
            ),
            (|h| h.compression_type = 1, "feature bit must be set"),
            (
                |h| h.incompatible_features = INCOMPAT_COMPRESSION,
                "must not be set",
            ),
            (|h| h.size = u64::MAX / 2, "Image is too big"),
        ];
        for (poke, msg) in cases {
            let mut h = base();
            poke(&mut h);
            let b = h.to_cluster0().unwrap();
            let e = Header::parse(&b).unwrap_err();
            assert!(e.to_string().contains(msg), "expected {msg:?}, got {e}");
        }
    }

    #[test]
    fn overlong_extension_is_rejected() {
        let mut h = base();
        h.backing_file = None;
        let mut b = h.to_cluster0().unwrap();
        put_u32(&mut b, 112 + 4, 0x7fff_ffff);
        let e = Header::parse(&b).unwrap_err();
        assert!(e.to_string().contains("Header extension too large"), "{e}");
    }

    #[test]
    fn truncated_file_does_not_panic() {
        let b = base().to_cluster0().unwrap();
        for n in [0, 4, 50, 72, 100, 104, 200] {
            let _ = Header::parse(&b[..n]);
        }
    }
}
