//! L1, L2 and refcount table entries: decoding into typed descriptors and encoding back.

use super::be::u64_at;
use super::geometry::{Geometry, SUBCLUSTERS};
use super::offset::HostOffset;
use super::refcount::{REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK};

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

/// The host offset of the L2 table an L1 entry points at (zero = no L2 table); the same as
/// [`L1Entry::l2_offset`], for callers holding the raw word.
pub fn l1_l2_offset(e: u64) -> HostOffset {
    L1Entry(e).l2_offset()
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
    /// A compressed cluster in an image whose data lives in an external data file.
    CompressedWithDataFile,
}

/// An L1 table entry as stored (big-endian on disk, native here).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at the L2 table at `l2` (aligned), with the COPIED flag `copied`.
    pub fn new(l2: HostOffset, copied: bool) -> L1Entry {
        L1Entry(l2.get()).with_copied(copied)
    }

    /// The host offset of the L2 table (zero: no L2 table).
    pub fn l2_offset(self) -> HostOffset {
        HostOffset::new(self.0 & OFFSET_MASK)
    }

    /// The COPIED flag: the L2 table's refcount is exactly one.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// The same entry with the COPIED flag set to `copied`.
    pub fn with_copied(self, copied: bool) -> L1Entry {
        if copied {
            L1Entry(self.0 | COPIED)
        } else {
            L1Entry(self.0 & !COPIED)
        }
    }

    /// The reserved bits that are set (zero in a valid entry).
    pub fn reserved(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// A refcount table entry as stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// An entry pointing at the refcount block at `block` (aligned).
    pub fn new(block: HostOffset) -> RefcountTableEntry {
        RefcountTableEntry(block.get())
    }

    /// The host offset of the refcount block (zero: no block).
    pub fn block_offset(self) -> HostOffset {
        HostOffset::new(self.0 & REFTABLE_OFFSET_MASK)
    }

    /// The reserved bits that are set (zero in a valid entry).
    pub fn reserved(self) -> u64 {
        self.0 & REFTABLE_RESERVED_MASK
    }
}

/// The cluster types of an L2 entry, as QEMU names them (`QCow2ClusterType`). The ZERO flag
/// is ignored with extended L2 entries, where the bitmap says which subclusters are zero.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum L2Kind {
    /// No host cluster and no ZERO flag.
    Unallocated,
    /// ZERO flag without a host cluster.
    ZeroPlain,
    /// ZERO flag with a preallocated host cluster.
    ZeroAlloc,
    /// A host cluster holding data.
    Normal,
    /// A compressed-cluster descriptor.
    Compressed,
}

/// An L2 table entry as stored: the descriptor word and, with extended L2 entries, the
/// subcluster bitmap (zero otherwise). Decodes without judging; [`L2Entry::mapping`] is the
/// validating decode the I/O path uses, the check reads the fields directly.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct L2Entry {
    /// The descriptor word (offset and flags, or a compressed descriptor).
    pub word0: u64,
    /// The subcluster bitmap: allocation bits low, zero bits high (extended L2 only).
    pub bitmap: u64,
}

impl L2Entry {
    /// An entry from its two words (`bitmap` is zero without extended L2).
    pub fn new(word0: u64, bitmap: u64) -> L2Entry {
        L2Entry { word0, bitmap }
    }

    /// The entry stored in `bytes` (one entry of an L2 table: 8 or 16 bytes).
    pub fn from_bytes(extended_l2: bool, bytes: &[u8]) -> L2Entry {
        let bitmap = if extended_l2 { u64_at(bytes, 8) } else { 0 };
        L2Entry::new(u64_at(bytes, 0), bitmap)
    }

    /// The on-disk bytes of this entry (8 or 16).
    pub fn to_bytes(self, extended_l2: bool) -> Vec<u8> {
        let mut bytes = self.word0.to_be_bytes().to_vec();
        if extended_l2 {
            bytes.extend_from_slice(&self.bitmap.to_be_bytes());
        }
        bytes
    }

    /// The cluster type.
    pub fn kind(self, geo: &Geometry) -> L2Kind {
        if self.word0 & COMPRESSED != 0 {
            L2Kind::Compressed
        } else if self.word0 & ZERO != 0 && !geo.extended_l2 {
            if self.host() != HostOffset::ZERO {
                L2Kind::ZeroAlloc
            } else {
                L2Kind::ZeroPlain
            }
        } else if self.host() == HostOffset::ZERO && !(geo.external_data && self.copied()) {
            // With an external data file, offset 0 is guest cluster 0's place; every data
            // cluster there has the COPIED flag, which tells it from "unallocated".
            L2Kind::Unallocated
        } else {
            L2Kind::Normal
        }
    }

    /// The host cluster offset of a standard (not compressed) entry, as stored (it may be
    /// unaligned in a damaged image).
    pub fn host(self) -> HostOffset {
        HostOffset::new(self.word0 & OFFSET_MASK)
    }

    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.word0 & COPIED != 0
    }

    /// The same entry with the COPIED flag set to `copied`.
    pub fn with_copied(self, copied: bool) -> L2Entry {
        let word0 = if copied {
            self.word0 | COPIED
        } else {
            self.word0 & !COPIED
        };
        L2Entry { word0, ..self }
    }

    /// The reserved bits that are set in a standard entry (zero in a valid one; always zero
    /// for a compressed descriptor, whose bits are all fields).
    pub fn reserved(self) -> u64 {
        if self.word0 & COMPRESSED != 0 {
            0
        } else {
            self.word0 & L2_RESERVED_MASK
        }
    }

    /// Extended L2: the subclusters holding data.
    pub fn alloc_bits(self) -> u32 {
        // The low half of the bitmap, by definition.
        (self.bitmap & 0xffff_ffff) as u32
    }

    /// Extended L2: the subclusters reading as zeros.
    pub fn zero_bits(self) -> u32 {
        (self.bitmap >> 32) as u32
    }

    /// The compressed data a compressed descriptor points at.
    pub fn compressed(self, geo: &Geometry) -> CompressedExtent {
        CompressedExtent::decode(geo, self.word0)
    }

    /// The mapping of a valid entry, or what makes it invalid. `version` is the image's
    /// (the ZERO flag needs v3).
    pub fn mapping(self, geo: &Geometry, version: u32) -> Result<Mapping, EntryError> {
        let (host, copied) = (self.host(), self.copied());
        let (alloc, zero) = (self.alloc_bits(), self.zero_bits());
        match self.kind(geo) {
            L2Kind::Compressed if geo.external_data => Err(EntryError::CompressedWithDataFile),
            L2Kind::Compressed => {
                let c = self.compressed(geo);
                Ok(Mapping::Compressed {
                    host: c.host,
                    csize: c.csize(),
                })
            }
            L2Kind::ZeroPlain | L2Kind::ZeroAlloc => {
                if version < 3 {
                    return Err(EntryError::ZeroInV2);
                }
                if host != HostOffset::ZERO && !host.is_cluster_aligned(geo) {
                    return Err(EntryError::Unaligned(host));
                }
                Ok(Mapping::Zero { host, copied })
            }
            L2Kind::Unallocated if geo.extended_l2 => {
                if alloc != 0 {
                    return Err(EntryError::InvalidBitmap);
                }
                Ok(Mapping::Unallocated { zero })
            }
            L2Kind::Unallocated => Ok(Mapping::Unallocated { zero: 0 }),
            L2Kind::Normal => {
                if alloc & zero != 0 {
                    return Err(EntryError::InvalidBitmap);
                }
                if !host.is_cluster_aligned(geo) {
                    return Err(EntryError::Unaligned(host));
                }
                let alloc = if geo.extended_l2 { alloc } else { u32::MAX };
                Ok(Mapping::Data {
                    host,
                    copied,
                    alloc,
                    zero,
                })
            }
        }
    }
}

/// The entries of an L2 table held in `table` (one cluster of bytes), in order.
pub fn l2_table_entries<'a>(geo: &Geometry, table: &'a [u8]) -> impl Iterator<Item = L2Entry> + 'a {
    let ext = geo.extended_l2;
    table
        .chunks_exact(l2_entry_bytes(geo))
        .map(move |b| L2Entry::from_bytes(ext, b))
}

/// Bytes per L2 entry, as a length ([`Geometry::l2_entry_size`] as a `usize`).
pub fn l2_entry_bytes(geo: &Geometry) -> usize {
    if geo.extended_l2 {
        16
    } else {
        8
    }
}

/// The compressed data of a compressed-cluster descriptor: the bytes from host byte offset
/// `host` to the end of the `sectors`-th 512-byte sector counted from the one holding `host`.
/// This is the one place that knows the descriptor's bit layout.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CompressedExtent {
    /// Host byte offset of the first compressed byte (not aligned).
    pub host: HostOffset,
    /// Number of 512-byte sectors the data touches (at least one).
    pub sectors: u64,
}

impl CompressedExtent {
    /// The descriptor's layout: the host offset takes the bits below the returned shift, the
    /// sector count minus one the `cluster_bits - 8` bits above it (up to the flag bits).
    fn layout(geo: &Geometry) -> (u32, u64) {
        let count_bits = geo.cluster_bits - 8;
        (62 - count_bits, (1u64 << count_bits) - 1)
    }

    /// The extent described by a compressed descriptor `word0`.
    pub fn decode(geo: &Geometry, word0: u64) -> CompressedExtent {
        let (shift, count_mask) = Self::layout(geo);
        CompressedExtent {
            host: HostOffset::new(word0 & ((1u64 << shift) - 1)),
            sectors: ((word0 >> shift) & count_mask) + 1,
        }
    }

    /// The extent holding `csize` bytes at `host`.
    pub fn for_bytes(host: HostOffset, csize: u64) -> CompressedExtent {
        let end = host.get() + csize;
        CompressedExtent {
            host,
            sectors: end.div_ceil(512) - host.get() / 512,
        }
    }

    /// The descriptor word (with the COMPRESSED flag).
    pub fn encode(self, geo: &Geometry) -> u64 {
        let (shift, _) = Self::layout(geo);
        COMPRESSED | ((self.sectors - 1) << shift) | self.host.get()
    }

    /// Bytes to read from `host` (to the end of the last sector; may reach into the next
    /// cluster).
    pub fn csize(self) -> u64 {
        self.sectors * 512 - self.host.get() % 512
    }
}

/// Decodes an L2 entry. `word1` is the subcluster bitmap (ignored without extended L2).
pub fn decode_l2(
    geo: &Geometry,
    version: u32,
    word0: u64,
    word1: u64,
) -> Result<Mapping, EntryError> {
    let bitmap = if geo.extended_l2 { word1 } else { 0 };
    L2Entry::new(word0, bitmap).mapping(geo, version)
}

/// Encodes a mapping back into (word0, word1). Compressed mappings are encoded with
/// [`encode_compressed`] instead and are not accepted here.
pub fn encode_l2(geo: &Geometry, m: Mapping) -> (u64, u64) {
    let copied = |c: bool| if c { COPIED } else { 0 };
    let bitmap = |alloc: u32, zero: u32| {
        if geo.extended_l2 {
            u64::from(alloc) | (u64::from(zero) << 32)
        } else {
            0
        }
    };
    match m {
        Mapping::Unallocated { zero } => (0, bitmap(0, zero)),
        Mapping::Zero { host, copied: c } => {
            debug_assert!(!geo.extended_l2);
            (host.get() | ZERO | copied(c), 0)
        }
        Mapping::Data {
            host,
            copied: c,
            alloc,
            zero,
        } => (host.get() | copied(c), bitmap(alloc, zero)),
        Mapping::Compressed { host, csize } => (encode_compressed(geo, host, csize), 0),
    }
}

/// Encodes a compressed-cluster descriptor for `csize` bytes at host byte offset `host`.
pub fn encode_compressed(geo: &Geometry, host: HostOffset, csize: u64) -> u64 {
    CompressedExtent::for_bytes(host, csize).encode(geo)
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
            external_data: false,
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

    #[test]
    fn l1_and_refcount_table_entries_decode_their_fields() {
        let e = L1Entry(0x3_0000 | COPIED | (1 << 60) | 1);
        assert_eq!(e.l2_offset(), HostOffset::new(0x3_0000));
        assert!(e.copied());
        assert_eq!(e.reserved(), (1 << 60) | 1);
        assert!(!e.with_copied(false).copied());
        assert_eq!(
            L1Entry::new(HostOffset::new(0x3_0000), true).0,
            0x3_0000 | COPIED
        );
        let r = RefcountTableEntry(0x5_0000 | 0x100);
        assert_eq!(r.block_offset(), HostOffset::new(0x5_0000));
        assert_eq!(r.reserved(), 0x100);
        assert_eq!(
            RefcountTableEntry::new(HostOffset::new(0x5_0000)).reserved(),
            0
        );
    }

    #[test]
    fn l2_entries_classify_like_qemu() {
        let g = geo(16, false);
        let kind = |w: u64| L2Entry::new(w, 0).kind(&g);
        assert_eq!(kind(0), L2Kind::Unallocated);
        assert_eq!(kind(ZERO), L2Kind::ZeroPlain);
        assert_eq!(kind(0x1_0000 | ZERO), L2Kind::ZeroAlloc);
        assert_eq!(kind(0x1_0000), L2Kind::Normal);
        assert_eq!(kind(COMPRESSED | 0x1_0000), L2Kind::Compressed);
        // The ZERO flag means nothing with extended L2.
        assert_eq!(
            L2Entry::new(ZERO, 0).kind(&geo(16, true)),
            L2Kind::Unallocated
        );
        assert_eq!(L2Entry::new(0x1_0000 | 2, 0).reserved(), 2);
        assert_eq!(L2Entry::new(COMPRESSED | 2, 0).reserved(), 0);
        let e = L2Entry::new(0x1_0000, 0xf | (0xf0 << 32));
        assert_eq!((e.alloc_bits(), e.zero_bits()), (0xf, 0xf0));
        assert_eq!(L2Entry::from_bytes(true, &e.to_bytes(true)), e);
        let table: Vec<u8> = [e.to_bytes(true), L2Entry::default().to_bytes(true)].concat();
        let entries: Vec<_> = l2_table_entries(&geo(16, true), &table).collect();
        assert_eq!(entries, vec![e, L2Entry::default()]);
    }

    #[test]
    fn compressed_extents_count_touched_sectors() {
        let g = geo(16, false);
        let c = CompressedExtent::for_bytes(HostOffset::new(0x5_01ff), 2);
        assert_eq!(c.sectors, 2);
        assert_eq!(c.csize(), 1024 - 511);
        assert_eq!(CompressedExtent::decode(&g, c.encode(&g)), c);
        assert_eq!(L2Entry::new(c.encode(&g) | COPIED, 0).compressed(&g), c);
    }

    /// The decoder before the typed entries, kept to pin the behaviour of the new one.
    fn reference_decode(
        g: &Geometry,
        version: u32,
        w0: u64,
        w1: u64,
    ) -> Result<Mapping, EntryError> {
        if w0 & COMPRESSED != 0 {
            let x = 62 - (g.cluster_bits - 8);
            let host = w0 & ((1u64 << x) - 1);
            let nb = ((w0 >> x) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
            let host = HostOffset::new(host);
            let csize = nb * 512 - (host.get() & 511);
            return Ok(Mapping::Compressed { host, csize });
        }
        let host = HostOffset::new(w0 & OFFSET_MASK);
        let copied = w0 & COPIED != 0;
        if g.extended_l2 {
            let (alloc, zero) = ((w1 & 0xffff_ffff) as u32, (w1 >> 32) as u32);
            if alloc & zero != 0 || (host == HostOffset::ZERO && alloc != 0) {
                return Err(EntryError::InvalidBitmap);
            }
            if host == HostOffset::ZERO {
                return Ok(Mapping::Unallocated { zero });
            }
            if !host.is_cluster_aligned(g) {
                return Err(EntryError::Unaligned(host));
            }
            return Ok(Mapping::Data {
                host,
                copied,
                alloc,
                zero,
            });
        }
        if w0 & ZERO != 0 {
            if version < 3 {
                return Err(EntryError::ZeroInV2);
            }
            if host != HostOffset::ZERO && !host.is_cluster_aligned(g) {
                return Err(EntryError::Unaligned(host));
            }
            return Ok(Mapping::Zero { host, copied });
        }
        if host == HostOffset::ZERO {
            return Ok(Mapping::Unallocated { zero: 0 });
        }
        if !host.is_cluster_aligned(g) {
            return Err(EntryError::Unaligned(host));
        }
        Ok(Mapping::Data {
            host,
            copied,
            alloc: u32::MAX,
            zero: 0,
        })
    }

    #[test]
    fn decode_matches_the_previous_decoder() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let flags = [
            0,
            COPIED,
            COMPRESSED,
            ZERO,
            COPIED | ZERO,
            COMPRESSED | COPIED,
        ];
        for (bits, ext) in [(9, false), (16, false), (16, true), (21, false), (21, true)] {
            let g = geo(bits, ext);
            for n in 0..20_000u64 {
                let r = next();
                let off = match n % 3 {
                    0 => 0,
                    1 => (r & OFFSET_MASK) & !(g.cluster_size() - 1),
                    _ => r & OFFSET_MASK,
                };
                let w0 = off | flags[(n % 6) as usize] | (r & L2_RESERVED_MASK & 0x6);
                let w1 = match n % 4 {
                    0 => 0,
                    1 => next() & 0xffff_ffff,
                    2 => next() & !0xffff_ffff,
                    _ => next(),
                };
                for version in [2, 3] {
                    assert_eq!(
                        decode_l2(&g, version, w0, w1),
                        reference_decode(&g, version, w0, w1),
                        "{w0:#x} {w1:#x} v{version} {g:?}"
                    );
                }
            }
        }
    }
}
