//! Internal snapshots against QEMU: the same create/apply/delete sequences (with guest writes
//! in between) run through qemu-img on one copy of an image and through oxcow on another;
//! both must check clean, read the same, and hold the same snapshot tables (apart from
//! dates) and snapshot contents. Images cover plain, compressed, zero, extended-L2,
//! small-cluster, version-2 and overlay layouts.

mod common;
mod snapshots_support;

use common::*;
use snapshots_support::Step::{Apply, Create, Delete, Write};
use snapshots_support::*;
use std::path::PathBuf;

const SIZE: u64 = 4 * MIB;

/// Two identical images: `setup` (qemu-io commands) runs on a fresh image created with
/// `opts`, which is then copied.
fn pair(dir: &TempDir, opts: &str, setup: &[String]) -> (PathBuf, PathBuf) {
    let q = dir.join("qemu.qcow2");
    qemu_create(&q, SIZE, opts);
    if !setup.is_empty() {
        qemu_io(&q, setup);
    }
    let o = dir.join("oxcow.qcow2");
    std::fs::copy(&q, &o).expect("copy");
    (q, o)
}

fn sequence() -> Vec<snapshots_support::Step> {
    vec![
        Create("s1"),
        Write(0, 96 * KIB, 0xa1),
        Write(2 * MIB + 512, 4096, 0xa2),
        Create("s2"),
        Write(64 * KIB, 200 * KIB, 0xa3),
        Apply("s1"),
        Write(MIB, 8192, 0xa4),
        Delete("s2"),
        Create("s3"),
        Create("s3"),
        Write(0, 4096, 0xa5),
        Apply("1"),
        Delete("s1"),
        Write(3 * MIB, 64 * KIB, 0xa6),
    ]
}

fn data_setup() -> Vec<String> {
    vec![
        "write -P 0x11 0 256k".into(),
        "write -P 0x12 1m 64k".into(),
        "write -P 0x13 3m 100k".into(),
    ]
}

#[test]
fn create_apply_delete_sequences_match_qemu_on_a_plain_image() {
    let dir = TempDir::new("snap-plain");
    let (q, o) = pair(&dir, "", &data_setup());
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_with_small_clusters_and_wide_refcounts() {
    let dir = TempDir::new("snap-small");
    let (q, o) = pair(&dir, "cluster_size=4096,refcount_bits=64", &data_setup());
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_with_lazy_refcounts() {
    let dir = TempDir::new("snap-lazy");
    let (q, o) = pair(&dir, "lazy_refcounts=on,cluster_size=4096", &data_setup());
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_on_a_version_2_image() {
    let dir = TempDir::new("snap-v2");
    let (q, o) = pair(&dir, "compat=0.10", &data_setup());
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_with_zero_clusters_plain_and_preallocated() {
    let dir = TempDir::new("snap-zero");
    let mut setup = data_setup();
    // A preallocated zero cluster (allocation kept) and plain zero clusters.
    setup.push("write -z 64k 64k".into());
    setup.push("write -z -u 1m 64k".into());
    setup.push("write -z 2m 128k".into());
    let (q, o) = pair(&dir, "", &setup);
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_with_extended_l2_subclusters() {
    let dir = TempDir::new("snap-extl2");
    let setup = vec![
        "write -P 0x21 0 4k".into(),
        "write -P 0x22 100k 8k".into(),
        "write -z 8k 4k".into(),
        "write -P 0x23 1m 64k".into(),
    ];
    let (q, o) = pair(&dir, "extended_l2=on,cluster_size=64k", &setup);
    let mut steps = sequence();
    steps.insert(1, Write(4096 + 512, 1024, 0xb1));
    run_both(&dir, &q, &o, &steps);
}

#[test]
fn sequences_match_qemu_over_compressed_clusters() {
    let dir = TempDir::new("snap-compressed");
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    for (i, b) in data.iter_mut().enumerate().take(2 * MIB as usize) {
        *b = (i / 777) as u8;
    }
    std::fs::write(&raw, &data).expect("raw");
    let q = dir.join("qemu.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&q),
    ]);
    let o = dir.join("oxcow.qcow2");
    std::fs::copy(&q, &o).expect("copy");
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn sequences_match_qemu_on_an_overlay() {
    let dir = TempDir::new("snap-overlay");
    let base = dir.join("base.qcow2");
    qemu_create_with_data(&base, SIZE, "", 0x5a, 2 * MIB);
    let q = dir.join("qemu.qcow2");
    let o = dir.join("oxcow.qcow2");
    for p in [&q, &o] {
        qemu_create_overlay(p, None, "", "base.qcow2", "qcow2");
        qemu_io(p, &["write -P 0x31 64k 64k".into()]);
    }
    run_both(&dir, &q, &o, &sequence());
}

#[test]
fn snapshots_made_by_oxcow_are_applied_and_deleted_by_qemu() {
    let dir = TempDir::new("snap-cross-o2q");
    let (p, _) = pair(&dir, "", &data_setup());
    let img = open_rw(&p);
    img.snapshot_create("mine").expect("create");
    img.write_at(&[0x77; 8192], 4096).expect("write");
    img.snapshot_create("two").expect("create");
    img.close().expect("close");
    assert_check_clean(&p);
    let before = oxcow_contents(&p);
    qemu_img(&["snapshot", "-a", "mine", path_str(&p)]);
    assert_check_clean(&p);
    qemu_img(&["snapshot", "-d", "mine", path_str(&p)]);
    qemu_img(&["snapshot", "-a", "two", path_str(&p)]);
    qemu_img(&["snapshot", "-d", "two", path_str(&p)]);
    assert_check_clean(&p);
    assert!(
        oxcow_contents(&p) == before,
        "contents after qemu's apply of 'two'"
    );
}

#[test]
fn snapshots_made_by_qemu_are_applied_and_deleted_by_oxcow() {
    let dir = TempDir::new("snap-cross-q2o");
    let (p, _) = pair(&dir, "", &data_setup());
    qemu_img(&["snapshot", "-c", "theirs", path_str(&p)]);
    let original = oxcow_contents(&p);
    qemu_io(&p, &["write -P 0x44 0 128k".into()]);
    qemu_img(&["snapshot", "-c", "later", path_str(&p)]);
    qemu_io(&p, &["write -P 0x45 64k 128k".into()]);
    let img = open_rw(&p);
    img.snapshot_apply("theirs").expect("apply");
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).expect("read");
    assert!(got == original, "live handle reads the applied snapshot");
    img.snapshot_delete("later").expect("delete");
    img.snapshot_delete("theirs").expect("delete");
    img.close().expect("close");
    assert_check_clean(&p);
    assert!(oxcow_contents(&p) == original);
    assert!(table_entries(&p).is_empty());
    assert_eq!(
        (be32(&p, 60), be64(&p, 64)),
        (0, 0),
        "an empty table is recorded as QEMU does"
    );
}
