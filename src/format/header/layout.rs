//! The fixed header fields of cluster 0, declared once: name, byte offset, width and the first
//! qcow2 version that has them. Parsing, serialization, in-place updates and the layout tests
//! all go through this table, so an offset is written down in exactly one place and a field a
//! version does not define can never be written to an image of that version.

use crate::error::{unsupported, Result};
use std::marker::PhantomData;

/// A value stored big-endian in a fixed header field.
pub trait FieldValue: Copy {
    /// Width on disk in bytes.
    const WIDTH: usize;
    /// Decodes the value from exactly `WIDTH` bytes.
    fn decode(bytes: &[u8]) -> Self;
    /// Encodes the value into exactly `WIDTH` bytes.
    fn encode(self, out: &mut [u8]);
    /// The value widened to u64 (for messages and generic updates).
    fn widen(self) -> u64;
}

macro_rules! field_value {
    ($t:ty) => {
        impl FieldValue for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            fn decode(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&bytes[..Self::WIDTH]);
                <$t>::from_be_bytes(a)
            }
            fn encode(self, out: &mut [u8]) {
                out[..Self::WIDTH].copy_from_slice(&self.to_be_bytes());
            }
            fn widen(self) -> u64 {
                u64::from(self)
            }
        }
    };
}
field_value!(u8);
field_value!(u32);
field_value!(u64);

/// One fixed header field holding a `T`.
#[derive(Debug)]
pub struct Field<T> {
    /// The spec's name of the field.
    pub name: &'static str,
    /// Byte offset in cluster 0.
    pub offset: usize,
    /// First qcow2 version whose header has the field (2 or 3).
    pub since_version: u32,
    value: PhantomData<T>,
}

// Manual impls: a derive would require `T: Clone`.
impl<T> Clone for Field<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Field<T> {}

/// A field's place in the layout without its value type, for tables and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// The spec's name of the field.
    pub name: &'static str,
    /// Byte offset in cluster 0.
    pub offset: usize,
    /// Width in bytes.
    pub width: usize,
    /// First qcow2 version whose header has the field.
    pub since_version: u32,
}

impl<T: FieldValue> Field<T> {
    const fn new(name: &'static str, offset: usize, since_version: u32) -> Self {
        Field {
            name,
            offset,
            since_version,
            value: PhantomData,
        }
    }

    /// The field's place in the layout.
    pub const fn info(self) -> FieldInfo {
        FieldInfo {
            name: self.name,
            offset: self.offset,
            width: T::WIDTH,
            since_version: self.since_version,
        }
    }

    /// Reads the field from a buffer holding at least the whole fixed header.
    pub fn get(self, cluster0: &[u8]) -> T {
        T::decode(&cluster0[self.offset..self.offset + T::WIDTH])
    }

    /// Writes the field into a buffer holding at least the whole fixed header.
    pub fn put(self, cluster0: &mut [u8], value: T) {
        value.encode(&mut cluster0[self.offset..self.offset + T::WIDTH]);
    }

    /// Whether an image of `version` has this field.
    pub fn exists_in(self, version: u32) -> bool {
        version >= self.since_version
    }

    /// The bytes that change the field in place on an image of `version`. Fails with
    /// `Unsupported` when that version's header has no such field: on version 2 the bytes at
    /// offset 72 and up belong to header extensions or the backing file name.
    pub fn update(self, version: u32, value: T) -> Result<FieldUpdate> {
        let mut u = FieldUpdate {
            offset: self.offset,
            len: 0,
            bytes: [0; FieldUpdate::MAX],
        };
        u.append(self, version, value)?;
        Ok(u)
    }
}

/// An in-place update of one or more adjacent header fields: written with a single host
/// write so that related fields (refcount table offset and size) change together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldUpdate {
    offset: usize,
    len: usize,
    bytes: [u8; FieldUpdate::MAX],
}

impl FieldUpdate {
    const MAX: usize = 16;

    /// Extends the update with the field that directly follows it.
    pub fn followed_by<T: FieldValue>(
        mut self,
        f: Field<T>,
        version: u32,
        value: T,
    ) -> Result<Self> {
        self.append(f, version, value)?;
        Ok(self)
    }

    fn append<T: FieldValue>(&mut self, f: Field<T>, version: u32, value: T) -> Result<()> {
        if !f.exists_in(version) {
            return unsupported!(
                "a version {version} image has no header field {} (offset {})",
                f.name,
                f.offset
            );
        }
        // Adjacency and size are properties of the code, not of the image.
        debug_assert_eq!(f.offset, self.offset + self.len, "fields must be adjacent");
        debug_assert!(self.len + T::WIDTH <= Self::MAX);
        value.encode(&mut self.bytes[self.len..self.len + T::WIDTH]);
        self.len += T::WIDTH;
        Ok(())
    }

    /// Host offset of the first byte to write (cluster 0 starts the file).
    pub fn offset(&self) -> crate::format::HostOffset {
        crate::format::HostOffset::new(self.offset as u64)
    }

    /// The bytes to write.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Points the header at a new refcount table: offset and cluster count in one write, so no
/// crash can pair the new offset with the old size. Both fields exist in every version.
pub fn reftable_update(offset: crate::format::HostOffset, clusters: u64) -> Result<FieldUpdate> {
    let Ok(clusters) = u32::try_from(clusters) else {
        return crate::error::invalid!("refcount table of {clusters} clusters");
    };
    REFCOUNT_TABLE_OFFSET
        .update(2, offset.get())?
        .followed_by(REFCOUNT_TABLE_CLUSTERS, 2, clusters)
}

macro_rules! layout {
    ($($(#[$doc:meta])* $name:ident: $t:ty = $spec:literal @ $off:literal since $v:literal;)*) => {
        $($(#[$doc])* pub const $name: Field<$t> = Field::new($spec, $off, $v);)*
        /// Every fixed field, in on-disk order.
        pub const ALL: &[FieldInfo] = &[$($name.info()),*];
    };
}

layout! {
    /// "QFI\xfb".
    MAGIC: u32 = "magic" @ 0 since 2;
    /// 2 or 3.
    VERSION: u32 = "version" @ 4 since 2;
    /// Offset of the backing file name in cluster 0 (0 = none).
    BACKING_FILE_OFFSET: u64 = "backing_file_offset" @ 8 since 2;
    /// Length of the backing file name, not NUL-terminated.
    BACKING_FILE_SIZE: u32 = "backing_file_size" @ 16 since 2;
    /// log2 of the cluster size.
    CLUSTER_BITS: u32 = "cluster_bits" @ 20 since 2;
    /// Virtual disk size in bytes.
    SIZE: u64 = "size" @ 24 since 2;
    /// 0 none, 1 AES, 2 LUKS.
    CRYPT_METHOD: u32 = "crypt_method" @ 32 since 2;
    /// Entries in the active L1 table.
    L1_SIZE: u32 = "l1_size" @ 36 since 2;
    /// Host offset of the active L1 table.
    L1_TABLE_OFFSET: u64 = "l1_table_offset" @ 40 since 2;
    /// Host offset of the refcount table.
    REFCOUNT_TABLE_OFFSET: u64 = "refcount_table_offset" @ 48 since 2;
    /// Clusters occupied by the refcount table.
    REFCOUNT_TABLE_CLUSTERS: u32 = "refcount_table_clusters" @ 56 since 2;
    /// Number of internal snapshots.
    NB_SNAPSHOTS: u32 = "nb_snapshots" @ 60 since 2;
    /// Host offset of the snapshot table.
    SNAPSHOTS_OFFSET: u64 = "snapshots_offset" @ 64 since 2;
    /// Feature bits an implementation must understand to open the image.
    INCOMPATIBLE_FEATURES: u64 = "incompatible_features" @ 72 since 3;
    /// Feature bits an implementation may ignore.
    COMPATIBLE_FEATURES: u64 = "compatible_features" @ 80 since 3;
    /// Feature bits an implementation that does not maintain them must clear.
    AUTOCLEAR_FEATURES: u64 = "autoclear_features" @ 88 since 3;
    /// log2 of the refcount entry width in bits (v2: always 4).
    REFCOUNT_ORDER: u32 = "refcount_order" @ 96 since 3;
    /// Length of the fixed header; extensions follow it (v2: always 72).
    HEADER_LENGTH: u32 = "header_length" @ 100 since 3;
    /// 0 deflate, 1 zstd; present only when header_length is over 104.
    COMPRESSION_TYPE: u8 = "compression_type" @ 104 since 3;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_contiguous_and_versioned_like_the_spec() {
        let mut next = 0;
        for f in ALL {
            assert_eq!(f.offset, next, "{} does not follow its predecessor", f.name);
            next = f.offset + f.width;
            let expected = if f.offset < 72 { 2 } else { 3 };
            assert_eq!(f.since_version, expected, "{}", f.name);
        }
        assert_eq!(next, 105, "the v3 fields end with compression_type at 104");
    }

    #[test]
    fn version_3_fields_cannot_be_updated_on_version_2() {
        let e = INCOMPATIBLE_FEATURES.update(2, 2).unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP);
        assert!(e.to_string().contains("incompatible_features"), "{e}");
        let u = INCOMPATIBLE_FEATURES.update(3, 2).unwrap();
        assert_eq!(u.offset().get(), 72);
        assert_eq!(u.bytes(), &[0, 0, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn adjacent_fields_update_in_one_write() {
        let u = REFCOUNT_TABLE_OFFSET
            .update(2, 0x30000)
            .unwrap()
            .followed_by(REFCOUNT_TABLE_CLUSTERS, 2, 3)
            .unwrap();
        assert_eq!(u.offset().get(), 48);
        assert_eq!(u.bytes(), &[0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3]);
    }
}
