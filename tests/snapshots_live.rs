//! Internal snapshots on a live handle: writers running while a snapshot is created, reads
//! after apply never seeing the old mapping, copy-on-write after create, the read-only
//! snapshot view (open option), and the errors of the snapshot operations.

mod common;
mod snapshots_support;

use common::*;
use oxcow::{ErrorKind, Image, OpenOptions};
use snapshots_support::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SIZE: u64 = 8 * MIB;
const CHUNK: u64 = 64 * KIB;

fn image(dir: &TempDir, opts: &str) -> std::path::PathBuf {
    let p = dir.join("live.qcow2");
    qemu_create(&p, SIZE, opts);
    p
}

fn view(p: &std::path::Path, key: &str) -> Vec<u8> {
    let img = Image::open(
        p,
        &OpenOptions {
            snapshot: Some(key.to_string()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open snapshot {key}: {e}"));
    oxcow_read_all(&img)
}

/// Closes the last handle `img` (every thread joined) and checks `p` clean with qemu-img.
fn close_and_check(img: Arc<Image>, p: &std::path::Path) {
    Arc::try_unwrap(img)
        .ok()
        .expect("sole owner")
        .close()
        .expect("close");
    assert_check_clean(p);
}

/// Each writer thread owns a stripe of chunks and writes generation-tagged data; a
/// snapshot taken meanwhile must hold, for every chunk, some generation the writer wrote
/// before the snapshot returned and no later than the one after.
#[test]
fn writers_keep_running_while_snapshots_are_created_and_every_snapshot_is_consistent() {
    let dir = TempDir::new("snap-live");
    let p = image(&dir, "cluster_size=4096");
    let img = Arc::new(open_rw(&p));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = 4u64;
    let chunks = SIZE / CHUNK;
    let gens: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..chunks).map(|_| Default::default()).collect());
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let (img, stop, gens) = (img.clone(), stop.clone(), gens.clone());
            std::thread::spawn(move || {
                let mut g = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for c in (t..chunks).step_by(threads as usize) {
                        img.write_at(&vec![(g % 251) as u8 + 1; CHUNK as usize], c * CHUNK)
                            .expect("write");
                        gens[c as usize].store(g, Ordering::Release);
                    }
                    g += 1;
                }
            })
        })
        .collect();
    let mut taken = Vec::new();
    for i in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let before: Vec<u64> = gens.iter().map(|g| g.load(Ordering::Acquire)).collect();
        let name = format!("live{i}");
        img.snapshot_create(&name).expect("create while writing");
        let after: Vec<u64> = gens.iter().map(|g| g.load(Ordering::Acquire)).collect();
        taken.push((name, before, after));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let final_data = oxcow_read_all(&img);
    close_and_check(img, &p);
    for (name, before, after) in taken {
        let v = view(&p, &name);
        for c in 0..chunks as usize {
            let b = v[c * CHUNK as usize];
            assert!(
                v[c * CHUNK as usize..(c + 1) * CHUNK as usize]
                    .iter()
                    .all(|&x| x == b),
                "{name}: chunk {c} is torn"
            );
            let ok =
                (before[c]..=after[c] + 1).any(|g| g % 251 + 1 == b as u64 || (g == 0 && b == 0));
            assert!(
                ok,
                "{name}: chunk {c} holds {b}, written between gens {} and {}",
                before[c], after[c]
            );
        }
    }
    assert!(oxcow_contents(&p) == final_data);
}

#[test]
fn reads_after_apply_see_the_snapshot_and_writes_after_create_copy_shared_clusters() {
    let dir = TempDir::new("snap-apply-live");
    let p = image(&dir, "");
    let img = open_rw(&p);
    img.write_at(&[1u8; 128 * 1024], 0).expect("write");
    // Warm the lock-free caches with the current mapping.
    let mut buf = vec![0u8; 128 * 1024];
    img.read_at(&mut buf, 0).expect("read");
    let s = img.snapshot_create("a").expect("create");
    assert_eq!(
        (s.id.as_str(), s.name.as_str(), s.disk_size),
        ("1", "a", Some(SIZE))
    );
    img.write_at(&[2u8; 4096], 4096).expect("cow write");
    img.write_at(&[3u8; 4096], 8192)
        .expect("second write to the copied cluster");
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf[4096..8192].iter().all(|&b| b == 2) && buf[8192] == 3);
    img.snapshot_apply("a").expect("apply");
    img.read_at(&mut buf, 0).expect("read");
    assert!(
        buf.iter().all(|&b| b == 1),
        "a read after apply saw the old mapping"
    );
    img.flush().expect("flush");
    assert_check_clean_while_open(&p);
    assert_live_check_clean(&img);
    img.snapshot_delete("a").expect("delete");
    assert!(img.snapshots().is_empty());
    assert_live_check_clean(&img);
    img.close().expect("close");
    assert_check_clean(&p);
}

/// The kind of the error `r` must be.
fn err_kind<T: std::fmt::Debug>(r: oxcow::Result<T>) -> ErrorKind {
    r.expect_err("the operation must fail").kind()
}

/// The engine's own check on the live handle (it reads the header the operations updated).
fn assert_live_check_clean(img: &Image) {
    let r = img.check(oxcow::CheckFix::None, None).expect("check");
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{:?}",
        r.messages
    );
}

/// qemu-img check -U on an image another handle holds open read-write.
fn assert_check_clean_while_open(p: &std::path::Path) {
    let o = run("qemu-img", &["check", "-U", path_str(p)]);
    assert_eq!(o.code, 0, "{}", o.all());
}

#[test]
fn the_snapshot_open_option_reads_the_snapshot_like_qemu_img_convert_l() {
    let dir = TempDir::new("snap-view");
    let p = image(&dir, "");
    qemu_io(&p, &["write -P 0x61 0 1m".into()]);
    qemu_img(&["snapshot", "-c", "old", path_str(&p)]);
    qemu_io(&p, &["write -P 0x62 512k 1m".into()]);
    let want = snapshot_view(&dir, &p, "1");
    assert!(view(&p, "old") == want, "by name");
    assert!(view(&p, "1") == want, "by id");
    let writable = Image::open(
        &p,
        &OpenOptions {
            writable: true,
            snapshot: Some("old".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        writable.err().map(|e| e.kind()),
        Some(ErrorKind::InvalidArgument)
    );
    let missing = Image::open(
        &p,
        &OpenOptions {
            snapshot: Some("nope".into()),
            ..Default::default()
        },
    );
    assert_eq!(missing.err().map(|e| e.kind()), Some(ErrorKind::NotFound));
}

#[test]
fn snapshot_operations_refuse_read_only_handles_missing_names_and_damaged_entries() {
    let dir = TempDir::new("snap-errors");
    let p = image(&dir, "");
    qemu_io(&p, &["write -P 0x61 0 64k".into()]);
    qemu_img(&["snapshot", "-c", "good", path_str(&p)]);
    qemu_img(&["snapshot", "-c", "bad", path_str(&p)]);
    let ro = open_ro(&p);
    assert_eq!(err_kind(ro.snapshot_create("x")), ErrorKind::ReadOnly);
    assert_eq!(err_kind(ro.snapshot_apply("good")), ErrorKind::ReadOnly);
    assert_eq!(err_kind(ro.snapshot_delete("good")), ErrorKind::ReadOnly);
    drop(ro);
    // Unalign the second entry's L1 table offset.
    let table = snapshot_table_offset(&p);
    let first_len = (40 + 24 + 1 + 4u64).div_ceil(8) * 8;
    let l1 = be64(&p, table + first_len);
    poke(&p, table + first_len, &(l1 + 512).to_be_bytes());
    let img = open_rw(&p);
    assert_eq!(err_kind(img.snapshot_apply("nope")), ErrorKind::NotFound);
    assert_eq!(err_kind(img.snapshot_delete("nope")), ErrorKind::NotFound);
    assert_eq!(err_kind(img.snapshot_apply("bad")), ErrorKind::Corrupt);
    assert_eq!(err_kind(img.snapshot_delete("2")), ErrorKind::Corrupt);
    assert_eq!(
        err_kind(img.snapshot_create("")),
        ErrorKind::InvalidArgument
    );
    // The handle is still usable and the intact snapshot still works.
    img.write_at(&[9u8; 512], 0).expect("write after refusals");
    img.snapshot_apply("good")
        .expect("apply the intact snapshot");
    img.close().expect("close");
}

/// Oracle: `qemu-img snapshot -a` of a snapshot taken at another disk size resizes the
/// image to the snapshot's size first (shrinking or growing), then reverts: same size, same
/// guest data, both check clean.
#[test]
fn applying_a_snapshot_of_another_disk_size_resizes_like_qemu() {
    for (tag, later) in [("shrinks", "+8M"), ("grows", "4M")] {
        let dir = TempDir::new("snap-size");
        let p = image(&dir, "");
        qemu_io(
            &p,
            &["write -P 0x31 0 64k".into(), "write -P 0x32 3M 64k".into()],
        );
        qemu_img(&["snapshot", "-c", "then", path_str(&p)]);
        let r = run("qemu-img", &["resize", "--shrink", path_str(&p), later]);
        assert_eq!(r.code, 0, "{}", r.all());
        let q = dir.join("q.qcow2");
        std::fs::copy(&p, &q).unwrap();
        qemu_img(&["snapshot", "-a", "then", path_str(&q)]);

        let img = open_rw(&p);
        img.write_at(&[0x33; 4096], 1 << 20)
            .expect("write before apply");
        img.snapshot_apply("then").expect(tag);
        assert_eq!(img.virtual_size(), SIZE, "{tag}");
        img.close().expect("close");
        assert_eq!(
            qemu_info(&p).get("virtual-size").as_u64(),
            qemu_info(&q).get("virtual-size").as_u64(),
            "{tag}"
        );
        assert_check_clean(&p);
        assert_same_guest(&q, &p);
    }
}

#[test]
fn snapshots_need_refcounts_of_more_than_one_bit() {
    let dir = TempDir::new("snap-rc1");
    let p = image(&dir, "refcount_bits=1");
    qemu_io(&p, &["write -P 0x61 0 64k".into()]);
    let img = open_rw(&p);
    let e = img.snapshot_create("x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    img.write_at(&[1u8; 512], 0)
        .expect("the handle still works");
    img.close().expect("close");
    assert_check_clean(&p);
}

#[test]
fn a_create_that_would_overflow_a_refcount_fails_cleanly_and_keeps_the_others() {
    let dir = TempDir::new("snap-rc2");
    let p = image(&dir, "refcount_bits=2");
    qemu_io(&p, &["write -P 0x61 0 64k".into()]);
    let img = open_rw(&p);
    img.snapshot_create("a").expect("first");
    img.snapshot_create("b").expect("second");
    // QEMU fails the third too (EINVAL), leaking two clusters; oxcow gives them back.
    let e = img.snapshot_create("c").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(img.snapshots().len(), 2);
    img.write_at(&[2u8; 4096], 0).expect("cow write");
    img.snapshot_apply("a").expect("apply");
    img.snapshot_delete("b").expect("delete");
    img.close().expect("close");
    assert_check_clean(&p);
}

/// Readers hammer the lock-free path while the main thread reverts to a snapshot: every
/// read that starts after apply returned sees the snapshot's data, never the old mapping.
#[test]
fn no_read_started_after_apply_sees_the_old_mapping() {
    let dir = TempDir::new("snap-apply-readers");
    let p = image(&dir, "cluster_size=4096");
    let img = Arc::new(open_rw(&p));
    img.write_at(&vec![0x11; 2 * MIB as usize], 0)
        .expect("write");
    img.snapshot_create("old").expect("create");
    img.write_at(&vec![0x22; 2 * MIB as usize], 0)
        .expect("write");
    for round in 0..4 {
        let done = Arc::new(AtomicBool::new(false));
        let want = if round % 2 == 0 { 0x11 } else { 0x22 };
        let readers: Vec<_> = (0..3)
            .map(|t| {
                let (img, done) = (img.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    let mut after = 0;
                    while after < 200 {
                        let started_after = done.load(Ordering::Acquire);
                        let off = ((t * 7919 + after * 4096) as u64) % (2 * MIB);
                        img.read_at(&mut buf, off & !4095).expect("read");
                        if started_after {
                            assert!(buf.iter().all(|&b| b == want), "stale read at {off:#x}");
                            after += 1;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        if round % 2 == 0 {
            img.snapshot_apply("old").expect("apply");
        } else {
            img.write_at(&vec![0x22; 2 * MIB as usize], 0)
                .expect("write");
        }
        done.store(true, Ordering::Release);
        for r in readers {
            r.join().expect("reader saw a stale mapping");
        }
    }
    close_and_check(img, &p);
}

/// Writers keep going while snapshots are deleted; the active data is exactly what the
/// writers wrote last.
#[test]
fn writers_keep_running_while_snapshots_are_deleted() {
    let dir = TempDir::new("snap-delete-live");
    let p = image(&dir, "cluster_size=4096");
    let img = Arc::new(open_rw(&p));
    img.write_at(&vec![0x33; SIZE as usize], 0).expect("fill");
    for i in 0..5 {
        img.snapshot_create(&format!("s{i}")).expect("create");
        img.write_at(&vec![i as u8; 256 * 1024], i * MIB)
            .expect("write");
    }
    let threads = 4u64;
    let chunks = SIZE / CHUNK;
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for g in 1..=20u64 {
                    for c in (t..chunks).step_by(threads as usize) {
                        let v = (g * 10 + t) as u8;
                        img.write_at(&vec![v; CHUNK as usize], c * CHUNK)
                            .expect("write");
                    }
                }
            })
        })
        .collect();
    for i in 0..5 {
        img.snapshot_delete(&format!("s{i}"))
            .expect("delete while writing");
    }
    for w in writers {
        w.join().expect("writer");
    }
    let data = oxcow_read_all(&img);
    for c in 0..chunks {
        let want = (200 + c % threads) as u8;
        let got = &data[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        assert!(got.iter().all(|&b| b == want), "chunk {c}");
    }
    close_and_check(img, &p);
}

/// QEMU refuses to apply a snapshot to an image with persistent bitmaps ("Device has active
/// dirty bitmaps", EBUSY) but creates and deletes snapshots; so does oxcow.
#[test]
fn apply_is_refused_on_an_image_with_bitmaps_like_qemu() {
    let dir = TempDir::new("snap-bitmaps");
    let p = image(&dir, "");
    qemu_img(&["bitmap", "--add", "--disable", path_str(&p), "b0"]);
    qemu_io(&p, &["write -P 1 0 64k".into()]);
    let q = dir.join("q.qcow2");
    std::fs::copy(&p, &q).expect("copy");
    qemu_img(&["snapshot", "-c", "s", path_str(&q)]);
    let qa = run("qemu-img", &["snapshot", "-a", "s", path_str(&q)]);
    assert!(
        qa.code == 1 && qa.stderr.contains("Device has active dirty bitmaps"),
        "{}",
        qa.all()
    );
    let img = open_rw(&p);
    img.snapshot_create("s").expect("create with bitmaps");
    let e = img.snapshot_apply("s").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(
        e.to_string().contains("Device has active dirty bitmaps"),
        "{e}"
    );
    img.snapshot_delete("s").expect("delete with bitmaps");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_eq!(
        run("qemu-img", &["snapshot", "-d", "s", path_str(&q)]).code,
        0
    );
    assert_same_guest(&p, &q);
}
