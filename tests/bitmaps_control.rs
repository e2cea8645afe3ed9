//! Bitmap control operations on a live handle (add, remove, clear, enable, disable, merge,
//! status) and their errors, checked against `qemu-img info` / `qemu-img bitmap` both ways.

mod common;

use common::bitmaps::*;
use common::*;
use oxcow::{BitmapAddOptions, ErrorKind, Image, OpenOptions};
use std::path::Path;

const SIZE: u64 = 16 * MIB;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn add_opts(granularity: u64, disabled: bool) -> BitmapAddOptions {
    BitmapAddOptions {
        granularity,
        disabled,
    }
}

fn sorted(mut v: Vec<(String, u64, Vec<String>)>) -> Vec<(String, u64, Vec<String>)> {
    for b in &mut v {
        b.2.sort();
    }
    v
}

fn assert_same_view(p: &Path, what: &str) {
    let img = Image::open(p, &OpenOptions::default()).expect("open read-only");
    assert_eq!(
        sorted(oxcow_bitmaps(&img)),
        sorted(qemu_bitmaps(p)),
        "{what}: oxcow and qemu-img info disagree"
    );
}

#[test]
fn bitmaps_made_by_oxcow_are_reported_identically_by_qemu() {
    let dir = TempDir::new("bm-ctl");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=65536");
    let img = Image::open(&p, &rw()).expect("open");
    img.bitmap_add("a", add_opts(0, false)).expect("add a");
    img.bitmap_add("b", add_opts(512, true)).expect("add b");
    img.bitmap_add("c", add_opts(1 << 20, false))
        .expect("add c");
    img.write_at(&[1; 4096], 70_000).expect("write");
    img.bitmap_enable("b").expect("enable b");
    img.write_at(&[1; 10], 2 * MIB).expect("write");
    img.bitmap_disable("c").expect("disable c");
    img.write_at(&[1; 10], 5 * MIB).expect("write");
    img.bitmap_merge("b", "a").expect("merge a into b");
    img.bitmap_add("gone", add_opts(0, false))
        .expect("add gone");
    img.bitmap_remove("gone").expect("remove gone");
    img.close().expect("close");
    assert_eq!(
        qemu_bitmaps(&p),
        vec![
            ("a".to_string(), 65536, vec!["auto".to_string()]),
            ("b".to_string(), 512, vec!["auto".to_string()]),
            ("c".to_string(), MIB, vec![]),
        ]
    );
    assert_check_clean(&p);
    assert_eq!(
        qemu_dirty_ranges(&p, "a"),
        vec![(65536, 65536), (2 * MIB, 65536), (5 * MIB, 65536)]
    );
    // b: its own writes (2 MiB, 5 MiB at 512 B) plus a's granules.
    assert_eq!(
        qemu_dirty_ranges(&p, "b"),
        vec![(65536, 65536), (2 * MIB, 65536), (5 * MIB, 65536)]
    );
    assert_eq!(qemu_dirty_ranges(&p, "c"), vec![(0, MIB), (2 * MIB, MIB)]);
    assert_same_view(&p, "after oxcow's changes");

    // Clear and remove on a second handle: durable for QEMU too.
    let img = Image::open(&p, &rw()).expect("reopen");
    img.bitmap_clear("a").expect("clear");
    img.bitmap_remove("c").expect("remove");
    drop(img);
    assert_check_clean(&p);
    assert_eq!(qemu_dirty_ranges(&p, "a"), vec![]);
    assert_eq!(qemu_bitmaps(&p).len(), 2);
    // Removing the last bitmaps drops the extension and autoclear bit 0, as QEMU does.
    let img = Image::open(&p, &rw()).expect("reopen");
    img.bitmap_remove("a").expect("remove a");
    img.bitmap_remove("b").expect("remove b");
    img.close().expect("close");
    assert_eq!(be64(&p, 88) & 1, 0, "autoclear bit 0 left set");
    assert!(qemu_bitmaps(&p).is_empty());
    assert_check_clean(&p);
}

#[test]
fn bitmaps_changed_by_qemu_img_bitmap_are_seen_by_oxcow() {
    let dir = TempDir::new("bm-qctl");
    let p = dir.join("img.qcow2");
    let src = dir.join("src.qcow2");
    qemu_create(&p, SIZE, "cluster_size=4096");
    qemu_create(&src, SIZE, "cluster_size=4096");
    qemu_img(&["bitmap", "--add", path_str(&p), "x"]);
    qemu_img(&["bitmap", "--add", "-g", "65536", path_str(&p), "y"]);
    qemu_img(&["bitmap", "--add", path_str(&src), "s"]);
    qemu_io(&src, &["write 1M 4k".to_string()]);
    qemu_io(&p, &["write 3M 4k".to_string()]);
    qemu_img(&["bitmap", "--disable", path_str(&p), "y"]);
    qemu_img(&[
        "bitmap",
        "--merge",
        "s",
        "-b",
        path_str(&src),
        "-F",
        "qcow2",
        path_str(&p),
        "x",
    ]);
    assert_same_view(&p, "after qemu-img bitmap");
    let img = Image::open(&p, &OpenOptions::default()).expect("open");
    assert_eq!(oxcow_dirty_ranges(&img, "x"), qemu_dirty_ranges(&p, "x"));
    assert_eq!(
        oxcow_dirty_ranges(&img, "x"),
        vec![(MIB, 4096), (3 * MIB, 4096)]
    );
    drop(img);
    // merge_from another image, oxcow side.
    let img = Image::open(&p, &rw()).expect("open rw");
    let s = Image::open(&src, &OpenOptions::default()).expect("open src");
    img.bitmap_clear("y").expect("clear");
    img.bitmap_merge_from("y", &s, "s").expect("merge_from");
    drop(s);
    img.close().expect("close");
    assert_eq!(qemu_dirty_ranges(&p, "y"), vec![(MIB, 65536)]);
    assert_check_clean(&p);
}

#[test]
fn control_errors_follow_qemu() {
    let dir = TempDir::new("bm-err");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "");
    let img = Image::open(&p, &rw()).expect("open");
    img.bitmap_add("a", add_opts(0, false)).expect("add");
    let kind = |r: oxcow::Result<()>| r.expect_err("accepted").kind();
    assert_eq!(
        kind(img.bitmap_add("a", add_opts(0, false))),
        ErrorKind::Exists
    );
    assert_eq!(
        kind(img.bitmap_add("", add_opts(0, false))),
        ErrorKind::InvalidArgument
    );
    let long = "n".repeat(1024);
    assert_eq!(
        kind(img.bitmap_add(&long, add_opts(0, false))),
        ErrorKind::InvalidArgument
    );
    img.bitmap_add(&"n".repeat(1023), add_opts(0, false))
        .expect("1023-byte name");
    for g in [256, 3000, 1 << 32] {
        assert_eq!(
            kind(img.bitmap_add("g", add_opts(g, false))),
            ErrorKind::InvalidArgument
        );
    }
    assert_eq!(kind(img.bitmap_remove("nope")), ErrorKind::NotFound);
    assert_eq!(kind(img.bitmap_clear("nope")), ErrorKind::NotFound);
    assert_eq!(kind(img.bitmap_merge("a", "nope")), ErrorKind::NotFound);
    assert_eq!(
        img.bitmap_status("nope", 0, 1).expect_err("status").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        img.bitmap_status("a", SIZE, 1)
            .expect_err("past the end")
            .kind(),
        ErrorKind::InvalidArgument
    );
    let info = img.bitmaps().expect("list");
    assert_eq!(
        info[0].granularity, 65536,
        "default granularity as qemu-img"
    );
    drop(img);
    let img = Image::open(&p, &OpenOptions::default()).expect("open ro");
    assert_eq!(
        kind(img.bitmap_add("b", add_opts(0, false))),
        ErrorKind::ReadOnly
    );
    assert_eq!(kind(img.bitmap_remove("a")), ErrorKind::ReadOnly);
    drop(img);
    let v2 = dir.join("v2.qcow2");
    qemu_create(&v2, SIZE, "compat=0.10");
    let img = Image::open(&v2, &rw()).expect("open v2");
    assert_eq!(
        kind(img.bitmap_add("b", add_opts(0, false))),
        ErrorKind::Unsupported
    );
}

#[test]
fn control_operations_run_while_other_threads_write() {
    let dir = TempDir::new("bm-live");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=4096");
    let img = std::sync::Arc::new(Image::open(&p, &rw()).expect("open"));
    img.bitmap_add("base", add_opts(4096, false)).expect("add");
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let img = std::sync::Arc::clone(&img);
            let stop = std::sync::Arc::clone(&stop);
            let written = std::sync::Arc::clone(&written);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = ((n * 2 + t) * 4096) % SIZE;
                    img.write_at(&[t as u8; 4096], off).expect("write");
                    written.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut i = 0;
    // Control operations interleaved with the writers: at least 20, and until the writers
    // have made progress in between (bounded in time).
    while i < 20 || (written.load(Ordering::Relaxed) < 500 && t0.elapsed().as_secs() < 20) {
        let name = format!("b{i}");
        img.bitmap_add(&name, add_opts(0, i % 2 == 0)).expect("add");
        img.bitmap_merge(&name, "base").expect("merge");
        img.bitmap_clear("base").expect("clear");
        img.bitmap_status(&name, 0, SIZE).expect("status");
        if i % 3 == 0 || i >= 20 {
            img.bitmap_remove(&name).expect("remove");
        }
        i += 1;
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    assert!(written.load(Ordering::Relaxed) > 0, "the writers never ran");
    std::sync::Arc::try_unwrap(img)
        .ok()
        .expect("sole handle")
        .close()
        .expect("close");
    assert_check_clean(&p);
    assert_same_view(&p, "after the live run");
}

#[test]
fn a_directory_naming_one_bitmap_twice_fails_the_open_like_qemu() {
    let dir = TempDir::new("bm-dup");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "");
    qemu_img(&["bitmap", "--add", path_str(&p), "aa"]);
    qemu_img(&["bitmap", "--add", path_str(&p), "ab"]);
    let (ext, _) = common::malformed::find_ext(&p, 0x2385_2875).expect("bitmaps extension");
    let dir_off = be64(&p, ext + 8 + 16);
    // The second entry starts 32 bytes in (24-byte header + "aa", padded); its name 24 later.
    poke(&p, dir_off + 32 + 24 + 1, b"a");
    let q = qemu_info_status(&p, false);
    assert!(
        q.code != 0 && q.all().contains("Bitmap already exists: aa"),
        "{}",
        q.all()
    );
    for writable in [false, true] {
        let e = Image::open(
            &p,
            &OpenOptions {
                writable,
                ..Default::default()
            },
        )
        .err()
        .expect("opened an image QEMU refuses");
        assert!(e.to_string().contains("Bitmap already exists: aa"), "{e}");
    }
}

#[test]
fn a_check_with_repair_on_a_live_handle_keeps_the_bitmaps() {
    let dir = TempDir::new("bm-check");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=4096");
    qemu_img(&["bitmap", "--add", path_str(&p), "b"]);
    let img = Image::open(&p, &rw()).expect("open");
    img.write_at(&[1; 4096], 0).expect("write");
    img.bitmap_add("n", add_opts(0, false)).expect("add");
    for fix in [oxcow::CheckFix::Leaks, oxcow::CheckFix::All] {
        let r = img.check(fix, None).expect("check");
        assert_eq!(r.exit_code(), 0, "{r:#?}");
        img.write_at(&[2; 4096], 5 * MIB)
            .expect("write after the check");
    }
    img.close().expect("close");
    assert_check_clean(&p);
    for name in ["b", "n"] {
        assert_eq!(
            qemu_dirty_ranges(&p, name),
            if name == "b" {
                vec![(0, 4096), (5 * MIB, 4096)]
            } else {
                vec![(5 * MIB, 4096)]
            },
            "{name}"
        );
    }
}
