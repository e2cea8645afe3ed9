//! Engine-level checks of the snapshot operations that the integration tests cannot see:
//! the overlap guard's index follows the snapshot tables, and the in-memory header follows
//! the on-disk one.

use super::super::Image;
use crate::engine::crash_tests::scratch_image;
use crate::format::HostOffset;
use crate::storage::MetaKind;

fn kind(img: &Image, off: u64) -> Option<MetaKind> {
    img.file.guard().kind_of(off >> img.geo.cluster_bits)
}

#[test]
fn the_guard_protects_new_snapshot_tables_and_forgets_freed_ones() {
    let (dir, img) = scratch_image("snapguard-guard");
    img.write_at(&[7u8; 65536], 0).expect("write");
    let s = img.snapshot_create("a").expect("create");
    let table = img.lock_meta().header.snapshots_offset;
    assert_eq!(kind(&img, s.l1_table_offset), Some(MetaKind::InactiveL1));
    assert_eq!(kind(&img, table), Some(MetaKind::SnapshotTable));
    let l2 = crate::format::entry::L1Entry(img.view.l1_entry(0).expect("l1")).l2_offset();
    img.write_at(&[8u8; 512], 0).expect("cow write");
    // The shared table stayed the snapshot's; the active one is a copy.
    assert_eq!(kind(&img, l2.get()), Some(MetaKind::InactiveL2));
    let s2 = img.snapshot_create("b").expect("create");
    let table2 = img.lock_meta().header.snapshots_offset;
    assert_ne!(table, table2);
    assert_eq!(
        kind(&img, table),
        None,
        "the old snapshot table is no longer guarded"
    );
    img.snapshot_delete("a").expect("delete");
    assert_eq!(kind(&img, s.l1_table_offset), None);
    assert_eq!(
        kind(&img, l2.get()),
        None,
        "a freed snapshot L2 table is not guarded"
    );
    assert_eq!(kind(&img, s2.l1_table_offset), Some(MetaKind::InactiveL1));
    img.snapshot_delete("b").expect("delete");
    let h = img.lock_meta().header.clone();
    assert_eq!((h.nb_snapshots, h.snapshots_offset), (0, 0));
    assert_eq!(kind(&img, table2), None);
    assert_eq!(kind(&img, s2.l1_table_offset), None);
    drop(img);
    drop(dir);
}

#[test]
fn apply_moves_the_active_l1_and_the_guard_with_it() {
    let (dir, img) = scratch_image("snapguard-apply");
    img.write_at(&[1u8; 4096], 0).expect("write");
    img.snapshot_create("a").expect("create");
    img.write_at(&[2u8; 4096], 0).expect("write");
    let old = HostOffset::new(img.lock_meta().header.l1_table_offset);
    img.snapshot_apply("a").expect("apply");
    let new = HostOffset::new(img.lock_meta().header.l1_table_offset);
    assert_ne!(old, new);
    assert_eq!(kind(&img, new.get()), Some(MetaKind::ActiveL1));
    assert_eq!(kind(&img, old.get()), None);
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|&x| x == 1));
    drop(img);
    drop(dir);
}
