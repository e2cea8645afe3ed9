//! Crash points of the bitmap metadata operations, on the simulated host file: the in-use
//! marking at a read-write open, the store at close, add and remove. For every prefix of the
//! writes (and reorderings between two syncs) the image must pass `qemu-img check` with at
//! worst leaks, and every bitmap must be either in use (inconsistent), absent, or consistent
//! and complete: its dirty set covers every byte that differs from the image before the
//! session, and everything it held before. Never a consistent bitmap that misses a write.

use crate::engine::crash_tests::{
    durable_state, each_crash_state, open_sim, read_guest, rw, Rng, Scratch,
};
use crate::engine::Image;
use crate::storage::sim::{Event, SimFile};
use crate::storage::HostFile;
use crate::{BitmapAddOptions, CreateOptions, OpenOptions, BITMAP_INCONSISTENT};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: u64 = 4 << 20;

/// Per-bitmap dirty granules as a bool per byte-granule of 4 KiB (the test granularity).
fn dirty_map(img: &Image, name: &str) -> Vec<bool> {
    let mut out = vec![false; (SIZE / 4096) as usize];
    let mut off = 0;
    while off < SIZE {
        let e = img.bitmap_status(name, off, SIZE - off).expect("status");
        if e.flags & crate::EXTENT_DIRTY != 0 {
            for g in off / 4096..(off + e.length).div_ceil(4096) {
                out[g as usize] = true;
            }
        }
        off += e.length;
    }
    out
}

fn guest(img: &Image) -> Vec<u8> {
    read_guest(img, SIZE)
}

/// The state of the disk before the session: guest data and each bitmap's dirty map.
struct Before {
    data: Vec<u8>,
    bitmaps: Vec<(String, Vec<bool>)>,
}

/// The disk as `bytes` hold it (written to `dir`/before.qcow2): guest data and the dirty
/// maps of the base image's bitmaps.
fn before(dir: &Path, bytes: &[u8]) -> Before {
    let p = dir.join("before.qcow2");
    std::fs::write(&p, bytes).expect("write");
    let img = Image::open(&p, &OpenOptions::default()).expect("open before");
    Before {
        data: guest(&img),
        bitmaps: ["b", "off"]
            .iter()
            .map(|n| (n.to_string(), dirty_map(&img, n)))
            .collect(),
    }
}

fn check_state(dir: &Path, bytes: &[u8], before: &Before, what: &str) {
    let p = dir.join("state.qcow2");
    std::fs::write(&p, bytes).expect("write state");
    crate::engine::crash_tests::assert_qemu_check(&p, &[0, 3], what);
    let img =
        Image::open(&p, &OpenOptions::default()).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let data = guest(&img);
    for b in img.bitmaps().expect("list") {
        if b.flags & BITMAP_INCONSISTENT != 0 {
            continue;
        }
        let dirty = dirty_map(&img, &b.name);
        let old = before.bitmaps.iter().find(|(n, _)| *n == b.name);
        if b.flags & crate::BITMAP_AUTO == 0 {
            // A disabled bitmap records nothing: it must hold exactly what it held.
            let was = old.map_or_else(|| vec![false; dirty.len()], |(_, m)| m.clone());
            assert_eq!(dirty, was, "{what}: disabled bitmap '{}' changed", b.name);
            continue;
        }
        for (g, &d) in dirty.iter().enumerate() {
            let r = g * 4096..(g + 1) * 4096;
            let changed = data[r.clone()] != before.data[r];
            let was = old.is_some_and(|(_, m)| m[g]);
            assert!(
                d || (!changed && !was),
                "{what}: consistent bitmap '{}' misses granule {g} (changed {changed}, was dirty {was})",
                b.name
            );
        }
    }
}

/// A base image with consistent bitmaps "b" (some history) and "off" (disabled).
fn base_image(dir: &Path, cluster_size: u32) -> (Vec<u8>, PathBuf) {
    let path = dir.join("img.qcow2");
    let co = CreateOptions {
        cluster_size,
        ..Default::default()
    };
    crate::create(&path, SIZE, &co).expect("create");
    let (sim, img) = open_sim(std::fs::read(&path).expect("read"), &path);
    let g = BitmapAddOptions {
        granularity: 4096,
        disabled: false,
    };
    img.bitmap_add("b", g).expect("add");
    img.bitmap_add(
        "off",
        BitmapAddOptions {
            disabled: true,
            ..g
        },
    )
    .expect("add");
    img.write_at(&[0x11; 10000], 100_000).expect("write");
    img.close().expect("close");
    (sim.contents(), path)
}

fn session(img: &Image, add_remove: bool) {
    if add_remove {
        img.bitmap_add(
            "n",
            BitmapAddOptions {
                granularity: 4096,
                disabled: false,
            },
        )
        .expect("add n");
        img.bitmap_remove("off").expect("remove off");
    }
    for i in 0..12u64 {
        let off = (i * 337_000) % (SIZE - 9000);
        img.write_at(&vec![i as u8 + 0x20; 5000 + i as usize * 300], off)
            .expect("write");
    }
    img.discard(2 << 20, 1 << 20).expect("discard");
}

fn crash_points(tag: &str, cluster_size: u32, add_remove: bool) {
    let dir = Scratch::new(&format!("bitmap-{tag}"));
    let (base, path) = base_image(&dir.0, cluster_size);
    let before = before(&dir.0, &base);
    let (sim, img) = open_sim(base.clone(), &path);
    session(&img, add_remove);
    img.close().expect("close");
    let journal = sim.journal();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15u64 ^ cluster_size as u64);
    each_crash_state(
        &base,
        &journal,
        100,
        |_| rng.next(),
        |bytes, what| check_state(&dir.0, bytes, &before, &format!("{tag}: {what}")),
    );
    // After the completed close every bitmap is consistent again.
    let p = dir.0.join("final.qcow2");
    std::fs::write(&p, sim.contents()).expect("write");
    let img = Image::open(&p, &OpenOptions::default()).expect("open final");
    assert!(img
        .bitmaps()
        .expect("list")
        .iter()
        .all(|b| b.flags & BITMAP_INCONSISTENT == 0));
}

#[test]
fn every_crash_point_of_marking_tracking_and_storing_leaves_no_stale_consistent_bitmap() {
    crash_points("store-c64k", 65536, false);
    crash_points("store-c512", 512, false);
}

#[test]
fn every_crash_point_of_add_and_remove_leaves_no_stale_consistent_bitmap() {
    crash_points("addrm-c4k", 4096, true);
}

/// An I/O error at any write of the open, the session or the close: the file afterwards (and
/// after a crash right then) holds no stale consistent bitmap and at worst leaks.
#[test]
fn an_io_error_at_any_bitmap_write_leaves_no_stale_consistent_bitmap() {
    let dir = Scratch::new("bitmap-eio");
    let (base, path) = base_image(&dir.0, 4096);
    let before = before(&dir.0, &base);
    let run = |fail: Option<u64>| -> Arc<SimFile> {
        let sim = Arc::new(SimFile::new(base.clone()));
        if let Some(n) = fail {
            sim.fail_write_after(n);
        }
        let file = HostFile::new(sim.clone(), path.display().to_string());
        if let Ok(img) = Image::open_file(file, &path, &rw(), 0) {
            let _ = img.bitmap_add("n", BitmapAddOptions::default());
            for i in 0..6u64 {
                let _ = img.write_at(&[i as u8 + 1; 7000], i * 500_000);
            }
            let _ = img.bitmap_remove("off");
            let _ = img.close();
        }
        sim
    };
    let total = run(None)
        .journal()
        .iter()
        .filter(|e| matches!(e, Event::Write(..)))
        .count() as u64;
    assert!(total > 10, "too few writes ({total})");
    for n in 0..total {
        let sim = run(Some(n));
        let what = format!("EIO at write {n}/{total}");
        check_state(&dir.0, &sim.contents(), &before, &what);
        let durable = durable_state(&base, &sim.journal());
        check_state(&dir.0, &durable, &before, &format!("{what}, then a crash"));
    }
}
