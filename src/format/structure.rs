//! The on-disk structures of a qcow2 image, as named in errors, events and the overlap guard.

/// Which metadata structure a cluster belongs to (names as in QEMU's messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MetaKind {
    /// Cluster 0.
    Header = 0,
    /// The active L1 table.
    ActiveL1 = 1,
    /// An L2 table of the active L1.
    ActiveL2 = 2,
    /// The refcount table.
    RefcountTable = 3,
    /// A refcount block.
    RefcountBlock = 4,
    /// The snapshot table.
    SnapshotTable = 5,
    /// A snapshot's L1 table.
    InactiveL1 = 6,
    /// An L2 table of a snapshot's L1.
    InactiveL2 = 7,
    /// The persistent-bitmap directory.
    BitmapDirectory = 8,
    /// A persistent bitmap's table.
    BitmapTable = 9,
    /// A data cluster of a persistent bitmap.
    BitmapData = 10,
}

impl MetaKind {
    /// Every structure, in the order the guard reports the first one a cluster belongs to.
    pub const ALL: [MetaKind; 11] = [
        MetaKind::Header,
        MetaKind::ActiveL1,
        MetaKind::ActiveL2,
        MetaKind::RefcountTable,
        MetaKind::RefcountBlock,
        MetaKind::SnapshotTable,
        MetaKind::InactiveL1,
        MetaKind::InactiveL2,
        MetaKind::BitmapDirectory,
        MetaKind::BitmapTable,
        MetaKind::BitmapData,
    ];

    /// The structure's name as QEMU prints it.
    pub fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2_header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::InactiveL1 => "inactive L1 table",
            MetaKind::InactiveL2 => "inactive L2 table",
            MetaKind::BitmapDirectory => "bitmap directory",
            MetaKind::BitmapTable => "bitmap table",
            MetaKind::BitmapData => "bitmap data",
        }
    }
}
