//! The qcow2 header (cluster 0): parsing with QEMU-equivalent validation, and serialization.
//!
//! Parsing never trusts a field: every size is bounded before it is used, and each rejection
//! names the field. Unknown header extensions and the bytes past the fields oxcow knows are kept
//! so that a rewrite preserves them.

mod extensions;
pub mod layout;

pub use extensions::ext;

use super::geometry::Geometry;
use crate::error::ErrorKind;
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

/// Why a header is parsed: what it must describe differs a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// To open the image: what QEMU's open accepts. A refcount table offset of 0 is accepted
    /// (QEMU opens such an image and refuses its first allocation).
    Open,
    /// To check (and maybe rebuild) it: a refcount table of 0 clusters is accepted too.
    Check,
}

/// A parsed, validated qcow2 header with its extensions. `Default` is all zeros and no
/// extensions: a base for building a header field by field, not a valid header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
            external_data: self.has_data_file(),
        }
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is declared a valid raw image of the guest disk
    /// (autoclear bit 1; meaningful only with [`Self::has_data_file`]).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
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
        if first.len() < 24 || layout::MAGIC.get(first) != MAGIC {
            return None;
        }
        let bits = layout::CLUSTER_BITS.get(first);
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            Some(1u64 << bits)
        } else {
            None
        }
    }

    /// Parses and validates cluster 0. `buf` holds the first `min(cluster_size, file length)`
    /// bytes of the file; bytes missing at the end of a short file read as zeros.
    ///
    /// Validates what QEMU validates when it opens an image; per-entry checks (tables'
    /// contents) are the engine's, made when a request needs the entry.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        Header::parse_for(buf, Purpose::Open)
    }

    /// [`Header::parse`] for a purpose: a check accepts a missing refcount table (0
    /// clusters), which `qemu-img check -r all` rebuilds from nothing.
    pub fn parse_for(buf: &[u8], purpose: Purpose) -> Result<Header> {
        let c0 = read_cluster0(buf)?;
        let mut h = Header::fixed_fields(&c0);
        h.read_version3_fields(&c0)?;
        // Extensions exist in both versions (only their start differs) and are parsed before
        // the feature checks so that unknown incompatible bits can be reported by name.
        let cluster_size = h.cluster_size();
        let ext_end = match h.backing_file_offset {
            0 => cluster_size,
            o => o.min(cluster_size),
        };
        h.parse_extensions(&c0, u64::from(h.header_length), ext_end)?;
        h.check_features()?;
        h.read_backing_name(&c0)?;
        h.check_tables(purpose)?;
        h.check_compression()?;
        Ok(h)
    }

    /// The version-2 fields, with the values version 2 implies for the rest.
    fn fixed_fields(c0: &[u8]) -> Header {
        Header {
            version: layout::VERSION.get(c0),
            backing_file_offset: layout::BACKING_FILE_OFFSET.get(c0),
            backing_file_size: layout::BACKING_FILE_SIZE.get(c0),
            cluster_bits: layout::CLUSTER_BITS.get(c0),
            size: layout::SIZE.get(c0),
            crypt_method: layout::CRYPT_METHOD.get(c0),
            l1_size: layout::L1_SIZE.get(c0),
            l1_table_offset: layout::L1_TABLE_OFFSET.get(c0),
            refcount_table_offset: layout::REFCOUNT_TABLE_OFFSET.get(c0),
            refcount_table_clusters: layout::REFCOUNT_TABLE_CLUSTERS.get(c0),
            nb_snapshots: layout::NB_SNAPSHOTS.get(c0),
            snapshots_offset: layout::SNAPSHOTS_OFFSET.get(c0),
            // What version 2 implies for the version-3 fields.
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            ..Header::default()
        }
    }

    fn read_version3_fields(&mut self, c0: &[u8]) -> Result<()> {
        if self.version < 3 {
            return Ok(());
        }
        self.incompatible_features = layout::INCOMPATIBLE_FEATURES.get(c0);
        self.compatible_features = layout::COMPATIBLE_FEATURES.get(c0);
        self.autoclear_features = layout::AUTOCLEAR_FEATURES.get(c0);
        self.refcount_order = layout::REFCOUNT_ORDER.get(c0);
        self.header_length = layout::HEADER_LENGTH.get(c0);
        if self.header_length < 104 {
            return corrupt!(
                "qcow2 header too short (header_length {})",
                self.header_length
            );
        }
        // The spec requires a multiple of 8 so that extensions stay aligned; QEMU does not
        // check it, but no QEMU ever wrote anything else.
        if self.header_length % 8 != 0 {
            return corrupt!(
                "qcow2 header_length {} is not a multiple of 8",
                self.header_length
            );
        }
        if u64::from(self.header_length) > self.cluster_size() {
            return corrupt!(
                "qcow2 header exceeds cluster size (header_length {})",
                self.header_length
            );
        }
        if self.header_length as usize > layout::COMPRESSION_TYPE.offset {
            self.compression_type = layout::COMPRESSION_TYPE.get(c0);
        }
        if self.header_length > V3_HEADER_LENGTH {
            self.extra_header_bytes =
                c0[V3_HEADER_LENGTH as usize..self.header_length as usize].to_vec();
        }
        Ok(())
    }

    fn check_features(&self) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    self.feature_name(0, b)
                        .unwrap_or_else(|| format!("bit {b}"))
                })
                .collect();
            return unsupported!(
                "Unsupported qcow2 feature(s): {} (unknown incompatible feature mask {:#x})",
                names.join(", "),
                unknown
            );
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !self.has_data_file() {
            return corrupt!("data-file-raw requires a data file");
        }
        if self.crypt_method != 0 {
            return unsupported!(
                "Encrypted images are not supported (crypt_method {})",
                self.crypt_method
            );
        }
        if self.crypto.is_some() {
            return corrupt!("Crypto header extension present in an unencrypted image");
        }
        if self.refcount_order > 6 {
            return corrupt!(
                "Reference count entry width too large; may not exceed 64 bits (refcount_order {})",
                self.refcount_order
            );
        }
        let geo = self.geometry();
        if geo.extended_l2 && geo.subcluster_size() < 512 {
            return unsupported!("Unsupported subcluster size: {}", geo.subcluster_size());
        }
        Ok(())
    }

    fn read_backing_name(&mut self, c0: &[u8]) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.backing_file_offset > cluster_size {
            return corrupt!(
                "Invalid backing file offset {:#x} (beyond cluster 0)",
                self.backing_file_offset
            );
        }
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = u64::from(self.backing_file_size);
        if len > u64::from(MAX_BACKING_NAME) || len > cluster_size - self.backing_file_offset {
            return corrupt!("Backing file name too long ({len} bytes)");
        }
        let start = self.backing_file_offset as usize;
        let name = c0[start..start + len as usize].to_vec();
        if !name.is_empty() {
            self.backing_file = Some(name);
        }
        Ok(())
    }

    fn check_tables(&self, purpose: Purpose) -> Result<()> {
        let cluster_size = self.cluster_size();
        let l1_needed = self.geometry().l1_entries_for(self.size);
        if l1_needed > i32::MAX as u64 / 8 {
            return corrupt!("Image is too big (virtual size {})", self.size);
        }
        if u64::from(self.l1_size) < l1_needed {
            return corrupt!(
                "L1 table is too small (l1_size {} < {} needed for size {})",
                self.l1_size,
                l1_needed,
                self.size
            );
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        validate_table(
            "Active L1 table",
            self.l1_table_offset,
            l1_bytes,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return corrupt!("Active L1 table offset invalid (0: overlaps the header)");
        }
        if self.refcount_table_clusters == 0 && purpose == Purpose::Open {
            return corrupt!("Image does not contain a reference count table");
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        validate_table(
            "Reference count table",
            self.refcount_table_offset,
            rt_bytes,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        // A check reads the first MAX_SNAPSHOTS entries and may discard the rest, as QEMU's.
        if self.nb_snapshots > MAX_SNAPSHOTS && purpose == Purpose::Open {
            return corrupt!("Snapshot table too large ({} snapshots)", self.nb_snapshots);
        }
        if self.snapshots_offset % cluster_size != 0 {
            return corrupt!(
                "Snapshot table offset invalid ({:#x})",
                self.snapshots_offset
            );
        }
        Ok(())
    }

    fn check_compression(&self) -> Result<()> {
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, bit) {
            (0, true) => {
                corrupt!("qcow2: Compression type incompatible feature bit must not be set")
            }
            (1, false) => corrupt!("qcow2: Compression type incompatible feature bit must be set"),
            (0 | 1, _) => Ok(()),
            (t, _) => unsupported!("qcow2: unknown compression type: {t}"),
        }
    }

    /// The bitmaps extension when autoclear bit 0 vouches for it (validated at parse); a
    /// stale extension is kept for nothing but the record, as QEMU ignores it.
    pub fn bitmaps_in_use(&self) -> Option<BitmapsExtension> {
        self.bitmaps
            .filter(|_| self.autoclear_features & AUTOCLEAR_BITMAPS != 0)
    }

    fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.clone())
    }

    /// Serializes the whole of cluster 0: fixed header, extensions in QEMU's order, end marker
    /// and backing file name. Sets `header_length`, `backing_file_offset` and
    /// `backing_file_size` to where things landed. Fails if they do not fit in one cluster.
    /// Only the fields the image's version defines are written.
    pub fn to_cluster0(&mut self) -> Result<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let mut out = vec![0u8; cluster_size];
        let fixed_end = if self.version >= 3 {
            let len = V3_HEADER_LENGTH as usize + self.extra_header_bytes.len();
            out[V3_HEADER_LENGTH as usize..len].copy_from_slice(&self.extra_header_bytes);
            len
        } else {
            V2_HEADER_LENGTH as usize
        };
        self.header_length = fixed_end as u32;
        let off = extensions::write_records(&mut out, fixed_end, &self.extension_records()?)?;
        self.place_backing_name(&mut out, off)?;
        self.write_fixed_fields(&mut out);
        Ok(out)
    }

    fn place_backing_name(&mut self, out: &mut [u8], off: usize) -> Result<()> {
        let Some(name) = &self.backing_file else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
            return Ok(());
        };
        if name.len() > MAX_BACKING_NAME as usize || off + name.len() > out.len() {
            return Err(Error::invalid(format!(
                "backing file name too long ({} bytes)",
                name.len()
            )));
        }
        out[off..off + name.len()].copy_from_slice(name);
        self.backing_file_offset = off as u64;
        self.backing_file_size = name.len() as u32;
        Ok(())
    }

    fn write_fixed_fields(&self, out: &mut [u8]) {
        layout::MAGIC.put(out, MAGIC);
        layout::VERSION.put(out, self.version);
        layout::BACKING_FILE_OFFSET.put(out, self.backing_file_offset);
        layout::BACKING_FILE_SIZE.put(out, self.backing_file_size);
        layout::CLUSTER_BITS.put(out, self.cluster_bits);
        layout::SIZE.put(out, self.size);
        layout::CRYPT_METHOD.put(out, self.crypt_method);
        layout::L1_SIZE.put(out, self.l1_size);
        layout::L1_TABLE_OFFSET.put(out, self.l1_table_offset);
        layout::REFCOUNT_TABLE_OFFSET.put(out, self.refcount_table_offset);
        layout::REFCOUNT_TABLE_CLUSTERS.put(out, self.refcount_table_clusters);
        layout::NB_SNAPSHOTS.put(out, self.nb_snapshots);
        layout::SNAPSHOTS_OFFSET.put(out, self.snapshots_offset);
        if self.version >= 3 {
            layout::INCOMPATIBLE_FEATURES.put(out, self.incompatible_features);
            layout::COMPATIBLE_FEATURES.put(out, self.compatible_features);
            layout::AUTOCLEAR_FEATURES.put(out, self.autoclear_features);
            layout::REFCOUNT_ORDER.put(out, self.refcount_order);
            layout::HEADER_LENGTH.put(out, self.header_length);
            layout::COMPRESSION_TYPE.put(out, self.compression_type);
        }
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

/// Checks the magic, version and cluster size, then returns cluster 0 zero-padded to its
/// full size so that a short file cannot make a later read index past the end.
fn read_cluster0(buf: &[u8]) -> Result<Vec<u8>> {
    if buf.len() < V2_HEADER_LENGTH as usize || layout::MAGIC.get(buf) != MAGIC {
        return Err(Error::new(
            ErrorKind::NotQcow2,
            "Image is not in qcow2 format",
        ));
    }
    let version = layout::VERSION.get(buf);
    if version != 2 && version != 3 {
        return unsupported!("Unsupported qcow2 version {version}");
    }
    let cluster_bits = layout::CLUSTER_BITS.get(buf);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return unsupported!("Unsupported cluster size: 2^{cluster_bits}");
    }
    let mut c0 = vec![0u8; 1usize << cluster_bits];
    let have = buf.len().min(c0.len());
    c0[..have].copy_from_slice(&buf[..have]);
    Ok(c0)
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
    use crate::format::be::put_u32;

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
    fn data_file_header_parses_back_with_its_name_and_raw_bit() {
        let mut h = base();
        h.backing_file = None;
        h.backing_format = None;
        h.incompatible_features = INCOMPAT_DATA_FILE;
        h.autoclear_features = AUTOCLEAR_DATA_FILE_RAW;
        h.data_file = Some(b"disk.raw".to_vec());
        let back = Header::parse(&h.to_cluster0().unwrap()).unwrap();
        assert_eq!(back, h);
        assert!(back.geometry().external_data && back.data_file_raw());
    }

    #[test]
    fn bad_magic_is_not_qcow2() {
        let mut b = base().to_cluster0().unwrap();
        b[0] = 0;
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotQcow2);
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
                |h| h.autoclear_features = AUTOCLEAR_DATA_FILE_RAW,
                "data-file-raw requires a data file",
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
