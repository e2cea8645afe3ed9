//! L1 and L2 table entries: decoding into typed descriptors and encoding back.

use super::geometry::{Geometry, SUBCLUSTERS};
use super::offset::HostOffset;

/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard (uncompressed) L2 entry, excluding the zero flag.
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// COPIED flag: refcount is exactly one, the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// COMPRESSED flag of L2 entries.
pub const COMPRESSED: u64 = 1 << 62;
/// ZERO flag of standard L2 entries (v3, no extended L2).
pub const ZERO: u64 = 1;

/// The host offset of the L2 table an L1 entry points at (zero = no L2 table).
pub fn l1_l2_offset(e: u64) -> HostOffset {
    HostOffset::new(e & OFFSET_MASK)
}

/// A decoded L2 entry (standard or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// No data in this image; reads go to the backing file (or zeros). With extended L2,
    /// `zero` marks the subclusters that read as zeros.
    Unallocated {
        /// Extended L2: subclusters that read as zeros.
        zero: u32,
    },
    /// Standard L2 entry with the zero flag: reads as zeros. `host` is a preallocated cluster
    /// (0 if none), `copied` its COPIED flag.
    Zero {
        /// Preallocated host cluster or zero.
        host: HostOffset,
        /// COPIED flag.
        copied: bool,
    },
    /// Data in a host cluster. With extended L2, `alloc` and `zero` are the subcluster bitmaps
    /// (a subcluster with neither bit reads from the backing file); without, `alloc` is all ones.
    Data {
        /// Host offset of the cluster.
        host: HostOffset,
        /// COPIED flag (refcount == 1).
        copied: bool,
        /// Subclusters holding data.
        alloc: u32,
        /// Subclusters reading as zeros.
        zero: u32,
    },
    /// Compressed data: `csize` bytes at host byte offset `host`.
    Compressed {
        /// Host byte offset (not aligned).
        host: HostOffset,
        /// Bytes to read (may reach into the next cluster).
        csize: u64,
    },
}

/// What one subcluster of a mapping reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Read from the backing file or zeros.
    Unallocated,
    /// Reads zeros.
    Zero,
    /// Data at this host offset.
    Data(HostOffset),
    /// Part of a compressed cluster.
    Compressed,
}

/// A structural problem found while decoding an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    /// Data or preallocated cluster offset not cluster aligned.
    Unaligned(HostOffset),
    /// Zero flag in a v2 image.
    ZeroInV2,
    /// Extended L2 bitmap with both bits set for a subcluster, or allocation bits on an
    /// unallocated cluster.
    InvalidBitmap,
}

/// Decodes an L2 entry. `word1` is the subcluster bitmap (ignored without extended L2).
pub fn decode_l2(
    geo: &Geometry,
    version: u32,
    word0: u64,
    word1: u64,
) -> Result<Mapping, EntryError> {
    if word0 & COMPRESSED != 0 {
        let x = 62 - (geo.cluster_bits - 8);
        let host = word0 & ((1u64 << x) - 1);
        let sectors_mask = (1u64 << (geo.cluster_bits - 8)) - 1;
        let nb_sectors = ((word0 >> x) & sectors_mask) + 1;
        let csize = nb_sectors * 512 - (host & 511);
        return Ok(Mapping::Compressed {
            host: HostOffset::new(host),
            csize,
        });
    }
    let host = HostOffset::new(word0 & OFFSET_MASK);
    let copied = word0 & COPIED != 0;
    if geo.extended_l2 {
        let alloc = word1 as u32;
        let zero = (word1 >> 32) as u32;
        if alloc & zero != 0 {
            return Err(EntryError::InvalidBitmap);
        }
        if host == HostOffset::ZERO {
            if alloc != 0 {
                return Err(EntryError::InvalidBitmap);
            }
            return Ok(Mapping::Unallocated { zero });
        }
        if !host.is_cluster_aligned(geo) {
            return Err(EntryError::Unaligned(host));
        }
        return Ok(Mapping::Data {
            host,
            copied,
            alloc,
            zero,
        });
    }
    if word0 & ZERO != 0 {
        if version < 3 {
            return Err(EntryError::ZeroInV2);
        }
        if host != HostOffset::ZERO && !host.is_cluster_aligned(geo) {
            return Err(EntryError::Unaligned(host));
        }
        return Ok(Mapping::Zero { host, copied });
    }
    if host == HostOffset::ZERO {
        return Ok(Mapping::Unallocated { zero: 0 });
    }
    if !host.is_cluster_aligned(geo) {
        return Err(EntryError::Unaligned(host));
    }
    Ok(Mapping::Data {
        host,
        copied,
        alloc: u32::MAX,
        zero: 0,
    })
}

/// Encodes a mapping back into (word0, word1). Compressed mappings are encoded with
/// [`encode_compressed`] instead and are not accepted here.
pub fn encode_l2(geo: &Geometry, m: Mapping) -> (u64, u64) {
    let copied = |c: bool| if c { COPIED } else { 0 };
    match m {
        Mapping::Unallocated { zero } => (
            0,
            if geo.extended_l2 {
                (zero as u64) << 32
            } else {
                0
            },
        ),
        Mapping::Zero { host, copied: c } => {
            debug_assert!(!geo.extended_l2);
            (host.get() | ZERO | copied(c), 0)
        }
        Mapping::Data {
            host,
            copied: c,
            alloc,
            zero,
        } => {
            let w1 = if geo.extended_l2 {
                alloc as u64 | ((zero as u64) << 32)
            } else {
                0
            };
            (host.get() | copied(c), w1)
        }
        Mapping::Compressed { host, csize } => (encode_compressed(geo, host, csize), 0),
    }
}

/// Encodes a compressed-cluster descriptor for `csize` bytes at host byte offset `host`.
pub fn encode_compressed(geo: &Geometry, host: HostOffset, csize: u64) -> u64 {
    let x = 62 - (geo.cluster_bits - 8);
    let host = host.get();
    let end = host + csize;
    let nb_sectors = end.div_ceil(512) - host / 512;
    COMPRESSED | ((nb_sectors - 1) << x) | host
}

impl Mapping {
    /// State of subcluster `sc` (0..32; always 0 without extended L2, where the whole
    /// cluster is one subcluster).
    pub fn subcluster(&self, geo: &Geometry, sc: u32) -> SubclusterState {
        let bit = 1u32 << sc;
        match *self {
            Mapping::Unallocated { zero } => {
                if zero & bit != 0 {
                    SubclusterState::Zero
                } else {
                    SubclusterState::Unallocated
                }
            }
            Mapping::Zero { .. } => SubclusterState::Zero,
            Mapping::Data {
                host, alloc, zero, ..
            } => {
                if alloc & bit != 0 {
                    SubclusterState::Data(host + u64::from(sc) * geo.subcluster_size())
                } else if zero & bit != 0 {
                    SubclusterState::Zero
                } else {
                    SubclusterState::Unallocated
                }
            }
            Mapping::Compressed { .. } => SubclusterState::Compressed,
        }
    }

    /// Number of consecutive subclusters from `sc` (inclusive) that share its state kind
    /// and, for data, are contiguous on the host.
    pub fn run_from(&self, geo: &Geometry, sc: u32) -> u32 {
        let per = if geo.extended_l2 { SUBCLUSTERS } else { 1 };
        let first = self.subcluster(geo, sc);
        let mut n = 1;
        while sc + n < per {
            let next = self.subcluster(geo, sc + n);
            let same = match (first, next) {
                (SubclusterState::Data(_), SubclusterState::Data(_)) => true,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            n += 1;
        }
        n
    }

    /// The host cluster this entry holds a reference to (data or preallocated zero), if any.
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { host, .. } if host != HostOffset::ZERO => Some(host),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(bits: u32, ext: bool) -> Geometry {
        Geometry {
            cluster_bits: bits,
            extended_l2: ext,
            refcount_order: 4,
        }
    }

    #[test]
    fn compressed_descriptor_round_trips() {
        let g = geo(16, false);
        let w = encode_compressed(&g, HostOffset::new(0x5_0123), 3000);
        match decode_l2(&g, 3, w, 0).unwrap() {
            Mapping::Compressed { host, csize } => {
                assert_eq!(host, HostOffset::new(0x5_0123));
                assert!((3000..3000 + 512).contains(&csize));
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn zero_flag_in_v2_is_an_error() {
        let g = geo(16, false);
        assert_eq!(decode_l2(&g, 2, ZERO, 0), Err(EntryError::ZeroInV2));
        assert_eq!(
            decode_l2(&g, 3, ZERO, 0),
            Ok(Mapping::Zero {
                host: HostOffset::ZERO,
                copied: false
            })
        );
    }

    #[test]
    fn unaligned_data_offset_is_an_error() {
        let g = geo(16, false);
        assert_eq!(
            decode_l2(&g, 3, 0x10200 | COPIED, 0),
            Err(EntryError::Unaligned(HostOffset::new(0x10200)))
        );
    }

    #[test]
    fn extended_bitmap_conflicts_are_errors() {
        let g = geo(16, true);
        assert_eq!(
            decode_l2(&g, 3, 0x10000, 1 | (1 << 32)),
            Err(EntryError::InvalidBitmap)
        );
        assert_eq!(decode_l2(&g, 3, 0, 1), Err(EntryError::InvalidBitmap));
    }

    #[test]
    fn extended_subcluster_states_and_runs() {
        let g = geo(16, true);
        let m = decode_l2(&g, 3, 0x20000 | COPIED, 0b0110 | (0b1000u64 << 32)).unwrap();
        assert_eq!(m.subcluster(&g, 0), SubclusterState::Unallocated);
        assert_eq!(
            m.subcluster(&g, 1),
            SubclusterState::Data(HostOffset::new(0x20000 + 2048))
        );
        assert_eq!(m.subcluster(&g, 3), SubclusterState::Zero);
        assert_eq!(m.run_from(&g, 1), 2);
        assert_eq!(m.run_from(&g, 4), 28);
        let (w0, w1) = encode_l2(&g, m);
        assert_eq!(decode_l2(&g, 3, w0, w1).unwrap(), m);
    }
}
