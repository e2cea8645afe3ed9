//! An index of the host clusters that hold metadata, so that no allocation and no guest data
//! write can land on them (the first increment of the metadata-overlap guard).
//!
//! Lookups are O(1). The index is built at open from the in-memory tables (header, active L1
//! and its L2 tables, refcount table and blocks, snapshot table and snapshot L1 tables) and
//! kept up to date as tables are allocated and moved.

use std::collections::HashMap;

/// Which metadata structure a cluster belongs to (names as in QEMU's messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// Cluster 0.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table of the active L1.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
}

impl MetaKind {
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
        }
    }
}

/// Host cluster index -> metadata kind.
#[derive(Debug, Default)]
pub struct MetadataIndex {
    clusters: HashMap<u64, MetaKind>,
}

impl MetadataIndex {
    /// Records clusters `[first, first+count)` as holding `kind`.
    pub fn insert(&mut self, first: u64, count: u64, kind: MetaKind) {
        for c in first..first + count {
            self.clusters.insert(c, kind);
        }
    }

    /// Forgets clusters `[first, first+count)`.
    pub fn remove(&mut self, first: u64, count: u64) {
        for c in first..first + count {
            self.clusters.remove(&c);
        }
    }

    /// The metadata kind held by a host cluster, if any.
    pub fn get(&self, cluster: u64) -> Option<MetaKind> {
        self.clusters.get(&cluster).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_ranges_are_found_and_removed() {
        let mut ix = MetadataIndex::default();
        ix.insert(3, 2, MetaKind::ActiveL1);
        assert_eq!(ix.get(3), Some(MetaKind::ActiveL1));
        assert_eq!(ix.get(4), Some(MetaKind::ActiveL1));
        assert_eq!(ix.get(5), None);
        ix.remove(3, 1);
        assert_eq!(ix.get(3), None);
        assert_eq!(MetaKind::RefcountBlock.name(), "refcount block");
    }
}
