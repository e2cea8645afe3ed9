//! The address spaces of a qcow2 image as types: a guest offset (the disk the guest sees) and a
//! host offset (a byte of the image file) are different types, and so are their cluster
//! indices. The shift and mask arithmetic lives on [`Geometry`] and on these types; a guest
//! offset becomes a host offset only through a mapping (an L2 entry), never by a cast.

use super::Geometry;
use std::fmt;
use std::ops::{Add, AddAssign};

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// The zero offset.
            pub const ZERO: $name = $name(0);

            /// Wraps a byte offset.
            pub const fn new(v: u64) -> $name {
                $name(v)
            }

            /// The byte offset as a number (for I/O calls, messages and on-disk encoding).
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` on overflow.
            pub fn checked_add(self, n: u64) -> Option<$name> {
                self.0.checked_add(n).map($name)
            }

            /// Bytes from `earlier` to `self` (`self >= earlier`).
            pub fn since(self, earlier: $name) -> u64 {
                debug_assert!(self >= earlier);
                self.0 - earlier.0
            }

            /// Rounded down to a multiple of `n`.
            pub fn align_down(self, n: u64) -> $name {
                $name(self.0 / n * n)
            }

            /// Rounded up to a multiple of `n` (offsets are bounded by the 2^56 image limit,
            /// far from overflowing).
            pub fn align_up(self, n: u64) -> $name {
                $name(self.0.div_ceil(n) * n)
            }

            /// The start of the cluster holding this byte.
            pub fn cluster_start(self, geo: &Geometry) -> $name {
                $name(geo.cluster_start(self.0))
            }

            /// The offset of this byte within its cluster.
            pub fn in_cluster(self, geo: &Geometry) -> u64 {
                geo.offset_in_cluster(self.0)
            }

            /// Whether this is the first byte of a cluster.
            pub fn is_cluster_aligned(self, geo: &Geometry) -> bool {
                geo.is_aligned(self.0)
            }
        }

        impl Add<u64> for $name {
            type Output = $name;
            fn add(self, n: u64) -> $name {
                $name(self.0 + n)
            }
        }

        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, n: u64) {
                self.0 += n;
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

offset_type!(
    /// A byte offset in the guest's view of the disk (0 .. virtual size).
    GuestOffset
);
offset_type!(
    /// A byte offset in the image file.
    HostOffset
);

/// Index of a guest cluster: guest offset >> cluster_bits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct GuestCluster(pub u64);

/// Index of a host cluster: host offset >> cluster_bits (what refcounts count).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct HostCluster(pub u64);

impl GuestOffset {
    /// The guest cluster holding this byte.
    pub fn cluster(self, geo: &Geometry) -> GuestCluster {
        GuestCluster(self.0 >> geo.cluster_bits)
    }

    /// Index of the L1 entry whose L2 table maps this byte.
    pub fn l1_index(self, geo: &Geometry) -> usize {
        // The L1 table holds at most 4 Mi entries (32 MiB), so the index fits.
        (self.0 >> geo.l2_coverage_bits()) as usize
    }

    /// Index of the L2 entry that maps this byte, within its table.
    pub fn l2_index(self, geo: &Geometry) -> usize {
        // Below the number of entries of one table (at most 256 Ki).
        ((self.0 >> geo.cluster_bits) & (geo.l2_entries() - 1)) as usize
    }

    /// The first guest byte past the range of the L2 table that maps this byte.
    pub fn l2_range_end(self, geo: &Geometry) -> GuestOffset {
        let bits = geo.l2_coverage_bits();
        GuestOffset(((self.0 >> bits) + 1) << bits)
    }

    /// Subcluster index (0..32) of this byte in its cluster.
    pub fn subcluster(self, geo: &Geometry) -> u32 {
        geo.subcluster_index(self.0)
    }
}

impl GuestCluster {
    /// The first byte of the cluster.
    pub fn offset(self, geo: &Geometry) -> GuestOffset {
        GuestOffset(self.0 << geo.cluster_bits)
    }
}

impl HostOffset {
    /// The host cluster holding this byte.
    pub fn cluster(self, geo: &Geometry) -> HostCluster {
        HostCluster(self.0 >> geo.cluster_bits)
    }
}

impl HostCluster {
    /// The first byte of the cluster.
    pub fn offset(self, geo: &Geometry) -> HostOffset {
        HostOffset(self.0 << geo.cluster_bits)
    }

    /// Index of the refcount block that counts this cluster, in the refcount table.
    pub fn refblock_index(self, geo: &Geometry) -> u64 {
        self.0 >> (geo.cluster_bits + 3 - geo.refcount_order)
    }

    /// Index of this cluster's entry within its refcount block.
    pub fn refblock_entry(self, geo: &Geometry) -> u64 {
        self.0 % geo.refblock_entries()
    }
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

    #[test]
    fn guest_arithmetic_finds_tables_and_entries() {
        let g = geo();
        let off = GuestOffset::new((512 << 20) + 3 * 65536 + 100);
        assert_eq!(off.l1_index(&g), 1);
        assert_eq!(off.l2_index(&g), 3);
        assert_eq!(off.in_cluster(&g), 100);
        assert_eq!(off.cluster(&g), GuestCluster(8192 + 3));
        assert_eq!(off.cluster(&g).offset(&g), off.cluster_start(&g));
        assert_eq!(off.l2_range_end(&g), GuestOffset::new(1024 << 20));
    }

    #[test]
    fn host_clusters_find_their_refcount_entries() {
        let g = geo();
        let c = HostOffset::new(32768 * 65536 + 5 * 65536).cluster(&g);
        assert_eq!(c, HostCluster(32768 + 5));
        assert_eq!(c.refblock_index(&g), 1);
        assert_eq!(c.refblock_entry(&g), 5);
        assert_eq!(c.offset(&g), HostOffset::new((32768 + 5) * 65536));
    }
}
