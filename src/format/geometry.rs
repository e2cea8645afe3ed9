//! Cluster geometry: every shift and mask that turns guest or host offsets into table indices.
//!
//! All address arithmetic of the engine goes through [`Geometry`] so that the relation between
//! guest offsets, L1/L2 indices, subclusters, host clusters and refcount block indices is written
//! once.

/// Size in bytes of a standard L2 entry.
pub const L2_ENTRY_SIZE: u64 = 8;
/// Size in bytes of an extended L2 entry (descriptor + subcluster bitmap).
pub const EXTENDED_L2_ENTRY_SIZE: u64 = 16;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// The derived sizes of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Extended L2 entries (16 bytes, 32 subclusters).
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Guest data lives in an external data file (incompatible bit 2): a data cluster's host
    /// offset is its guest offset in that file, so offset 0 with the COPIED flag is guest
    /// cluster 0 rather than "unallocated", and data clusters have no refcounts.
    pub external_data: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            EXTENDED_L2_ENTRY_SIZE
        } else {
            L2_ENTRY_SIZE
        }
    }

    /// Number of entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits()
    }

    /// log2 of [`Self::l2_entries`]: shifts and masks rather than divisions on the per-request
    /// path (the divisor is not a constant, so `/` and `%` would compile to `div`).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits
            .saturating_sub(self.l2_entry_size().trailing_zeros())
    }

    /// log2 of [`Self::l2_coverage`].
    pub fn l2_coverage_bits(&self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        1u64 << self.l2_coverage_bits()
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }

    /// Number of L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> self.l2_coverage_bits()
    }

    /// L2 index of a guest offset within its table.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Offset of a guest byte within its cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Start of the cluster holding `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }

    /// Index of the cluster holding `off` (guest or host).
    pub fn cluster_index(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }

    /// Whether `off` is cluster aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// Rounds a byte count up to whole clusters.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Largest refcount an entry can hold.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Number of refcount entries in one refcount block.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// Number of u64 entries in one cluster of the refcount table or L1 table.
    pub fn u64_per_cluster(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Subcluster index (0..32) of a guest offset.
    pub fn subcluster_index(&self, guest: u64) -> u32 {
        (self.offset_in_cluster(guest) / self.subcluster_size()) as u32
    }

    /// Bits `[first, last]` set in a 32-bit subcluster mask.
    pub fn subcluster_mask(first: u32, last: u32) -> u32 {
        debug_assert!(first <= last && last < SUBCLUSTERS);
        let upper = if last == 31 {
            u32::MAX
        } else {
            (1u32 << (last + 1)) - 1
        };
        upper & !((1u32 << first) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32, ext: bool) -> Geometry {
        Geometry {
            cluster_bits: bits,
            extended_l2: ext,
            refcount_order: 4,
            external_data: false,
        }
    }

    #[test]
    fn default_geometry_covers_512_mib_per_l2() {
        let geo = g(16, false);
        assert_eq!(geo.l2_entries(), 8192);
        assert_eq!(geo.l2_coverage(), 512 << 20);
        assert_eq!(geo.refblock_entries(), 32768);
        assert_eq!(geo.l1_entries_for(64 << 20), 1);
        assert_eq!(geo.l1_entries_for((512 << 20) + 1), 2);
    }

    #[test]
    fn extended_l2_halves_entries_and_splits_subclusters() {
        let geo = g(16, true);
        assert_eq!(geo.l2_entries(), 4096);
        assert_eq!(geo.subcluster_size(), 2048);
        assert_eq!(geo.subcluster_index(65536 + 4096), 2);
    }

    #[test]
    fn subcluster_masks_cover_inclusive_ranges() {
        assert_eq!(Geometry::subcluster_mask(0, 0), 1);
        assert_eq!(Geometry::subcluster_mask(0, 31), u32::MAX);
        assert_eq!(Geometry::subcluster_mask(4, 7), 0xf0);
        assert_eq!(Geometry::subcluster_mask(31, 31), 0x8000_0000);
    }

    #[test]
    fn refcount_max_follows_width() {
        let mut geo = g(16, false);
        geo.refcount_order = 0;
        assert_eq!(geo.refcount_max(), 1);
        geo.refcount_order = 6;
        assert_eq!(geo.refcount_max(), u64::MAX);
        assert_eq!(geo.refblock_entries(), 8192);
    }
}
