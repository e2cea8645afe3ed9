//! Header field offsets for the tests' byte pokes, taken from the library's one declaration of
//! the layout (`oxcow::format::header::layout`), and qemu-img check's counters.

use super::{be64, peek, poke, Json};
use oxcow::format::header::layout as l;
use oxcow::CheckReport;
use std::path::Path;

pub const H_MAGIC: u64 = l::MAGIC.offset as u64;
pub const H_VERSION: u64 = l::VERSION.offset as u64;
pub const H_BACKING_OFF: u64 = l::BACKING_FILE_OFFSET.offset as u64;
pub const H_BACKING_SIZE: u64 = l::BACKING_FILE_SIZE.offset as u64;
pub const H_CLUSTER_BITS: u64 = l::CLUSTER_BITS.offset as u64;
pub const H_SIZE: u64 = l::SIZE.offset as u64;
pub const H_CRYPT: u64 = l::CRYPT_METHOD.offset as u64;
pub const H_L1_SIZE: u64 = l::L1_SIZE.offset as u64;
pub const H_L1_OFF: u64 = l::L1_TABLE_OFFSET.offset as u64;
pub const H_RT_OFF: u64 = l::REFCOUNT_TABLE_OFFSET.offset as u64;
pub const H_RT_CLUSTERS: u64 = l::REFCOUNT_TABLE_CLUSTERS.offset as u64;
pub const H_NB_SNAP: u64 = l::NB_SNAPSHOTS.offset as u64;
pub const H_SNAP_OFF: u64 = l::SNAPSHOTS_OFFSET.offset as u64;
pub const H_INCOMPAT: u64 = l::INCOMPATIBLE_FEATURES.offset as u64;
pub const H_AUTOCLEAR: u64 = l::AUTOCLEAR_FEATURES.offset as u64;
pub const H_REFCOUNT_ORDER: u64 = l::REFCOUNT_ORDER.offset as u64;
pub const H_HEADER_LEN: u64 = l::HEADER_LENGTH.offset as u64;
pub const H_COMPRESSION: u64 = l::COMPRESSION_TYPE.offset as u64;

/// Host offset of the snapshot table named by the image's header.
pub fn snapshot_table_offset(p: &Path) -> u64 {
    be64(p, H_SNAP_OFF)
}

/// Rewrites the first snapshot table entry as a version-3 entry without extra data (id "1",
/// name "s1"): what QEMU calls an incomplete entry.
pub fn strip_first_snapshot_extra_data(p: &Path) {
    let s = snapshot_table_offset(p);
    let mut e = peek(p, s, 40);
    e[36..40].copy_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(b"1s1");
    e.resize(48, 0);
    poke(p, s, &e);
}

/// A counter of `qemu-img check --output=json` (absent = 0).
pub fn check_field(j: &Json, k: &str) -> u64 {
    j.opt(k).map(|v| v.as_u64()).unwrap_or(0)
}

/// Every counter of oxcow's report equals qemu-img's JSON (`image-end-offset` only when
/// `with_end`: a rebuilt refcount structure may land elsewhere).
pub fn assert_check_counters(what: &str, r: &CheckReport, j: &Json, with_end: bool) {
    let pairs = [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("check-errors", r.check_errors),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("image-end-offset", r.image_end_offset),
    ];
    for (k, v) in pairs {
        if k != "image-end-offset" || with_end {
            assert_eq!(
                v,
                check_field(j, k),
                "{what}: {k} differs from qemu-img (oxcow {r:#?}, qemu {j:?})"
            );
        }
    }
}
