//! Resize of an image with persistent bitmaps, with `qemu-img resize` (QEMU 10) as the oracle:
//! the bitmaps follow the new size (bits past a shrunk end are dropped, the grown area is
//! clean), keep their names, granularities and flags, and go on recording writes in the new
//! area; the image checks clean.

mod common;

use common::bitmaps::{qemu_bitmaps, qemu_dirty_ranges};
use common::*;
use oxcow::{Image, OpenOptions};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A 64 MiB image with an enabled bitmap "b0" and a disabled "b1" (64 KiB granules) after
/// writes QEMU recorded in "b0", one of them past 40 MiB.
fn image_with_bitmaps(p: &Path) {
    qemu_create(p, 64 * MIB, "");
    qemu_img(&["bitmap", "--add", path_str(p), "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", path_str(p), "b1"]);
    qemu_io(
        p,
        &[
            "write -P 1 1M 64k".to_string(),
            "write -P 2 60M 4k".to_string(),
            "write -P 3 39M 1M".to_string(),
        ],
    );
    qemu_img(&["bitmap", "--enable", path_str(p), "b1"]);
    qemu_io(p, &["write -P 4 2M 4k".to_string()]);
    qemu_img(&["bitmap", "--disable", path_str(p), "b1"]);
}

/// Resizes a copy with qemu-img and another with oxcow to `size`, then writes `after` (offset,
/// length) on both; returns the two paths.
fn resize_both(
    dir: &TempDir,
    size: u64,
    after: (u64, u64),
) -> (std::path::PathBuf, std::path::PathBuf) {
    let orig = dir.join("orig.qcow2");
    image_with_bitmaps(&orig);
    let (q, o) = (dir.join("q.qcow2"), dir.join("o.qcow2"));
    std::fs::copy(&orig, &q).unwrap();
    std::fs::copy(&orig, &o).unwrap();
    let size_arg = size.to_string();
    let r = run("qemu-img", &["resize", "--shrink", path_str(&q), &size_arg]);
    assert_eq!(r.code, 0, "{}", r.all());
    qemu_io(&q, &[format!("write -P 5 {} {}", after.0, after.1)]);

    let img = Image::open(&o, &rw()).expect("open");
    img.resize(size, true).expect("resize");
    img.write_at(&vec![5; after.1 as usize], after.0)
        .expect("write after the resize");
    img.close().expect("close");
    (q, o)
}

fn assert_same_bitmaps(q: &Path, o: &Path) {
    assert_eq!(qemu_bitmaps(o), qemu_bitmaps(q), "bitmap lists");
    for name in ["b0", "b1"] {
        assert_eq!(
            qemu_dirty_ranges(o, name),
            qemu_dirty_ranges(q, name),
            "dirty set of {name}"
        );
    }
    assert_check_clean(o);
    assert_same_guest(q, o);
}

#[test]
fn growing_keeps_bitmaps_and_records_writes_in_the_new_area_like_qemu() {
    let dir = TempDir::new("resize-bm-grow");
    let (q, o) = resize_both(&dir, 128 * MIB, (100 * MIB, 8192));
    assert_eq!(qemu_info(&o).get("virtual-size").as_u64(), 128 * MIB);
    assert_same_bitmaps(&q, &o);
}

#[test]
fn shrinking_drops_the_bits_past_the_new_end_like_qemu() {
    let dir = TempDir::new("resize-bm-shrink");
    // 39.5 MiB: the cut falls inside a granule written before.
    let (q, o) = resize_both(&dir, 79 * MIB / 2, (3 * MIB, 512));
    assert_eq!(qemu_info(&o).get("virtual-size").as_u64(), 79 * MIB / 2);
    assert_same_bitmaps(&q, &o);
}

/// After a shrink, growing back (on the same handle) must not bring back the bits that were
/// past the cut: QEMU drops them at the shrink; a bitmap that was not resized would show them.
#[test]
fn growing_back_after_a_shrink_shows_no_dropped_bits_like_qemu() {
    let dir = TempDir::new("resize-bm-shrink-grow");
    let orig = dir.join("orig.qcow2");
    image_with_bitmaps(&orig);
    let (q, o) = (dir.join("q.qcow2"), dir.join("o.qcow2"));
    std::fs::copy(&orig, &q).unwrap();
    std::fs::copy(&orig, &o).unwrap();
    for size in [20 * MIB, 64 * MIB] {
        let r = run(
            "qemu-img",
            &["resize", "--shrink", path_str(&q), &size.to_string()],
        );
        assert_eq!(r.code, 0, "{}", r.all());
    }
    let img = Image::open(&o, &rw()).expect("open");
    img.resize(20 * MIB, true).expect("shrink");
    img.resize(64 * MIB, false).expect("grow back");
    img.close().expect("close");
    assert_same_bitmaps(&q, &o);
}
