//! Transactional reopen: read-write <-> read-only switches move QEMU-compatible locks, flush
//! first, re-validate, refuse a replaced file, and a failed reopen changes nothing.

mod common;

use common::*;
use oxcow::{CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const EAGAIN: i32 = 11;
const EINVAL: i32 = 22;
const EROFS: i32 = 30;
const ESTALE: i32 = 116;
const EUCLEAN: i32 = 117;

fn ro() -> OpenOptions {
    OpenOptions::default()
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn new_image(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    oxcow::create(&p, 8 * MIB, &CreateOptions::default()).expect("create");
    p
}

/// Whether QEMU can open the image read-only right now (no -U): fails while someone holds
/// it read-write.
fn qemu_can_read(p: &Path) -> bool {
    run("qemu-img", &["info", path_str(p)]).code == 0
}

/// Whether qemu-io can write to the image right now.
fn qemu_can_write(p: &Path) -> bool {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x77 7M 512", path_str(p)],
    )
    .code
        == 0
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn read_write_to_read_only_flushes_and_releases_the_write_locks() {
    let dir = TempDir::new("reopen-ro");
    let p = new_image(&dir, "a.qcow2");
    let img = Image::open(&p, &rw()).expect("open rw");
    img.write_at(&tagged_data(3, 0, 300_000), 12345)
        .expect("write");
    assert!(
        !qemu_can_read(&p),
        "QEMU opened an image oxcow holds read-write"
    );
    img.reopen(&ro()).expect("reopen read-only");
    assert!(img.is_read_only());
    // The data was flushed: QEMU (which may open it now) sees it and finds the image clean.
    assert!(
        qemu_can_read(&p),
        "write locks still held after reopen read-only"
    );
    assert_check_clean(&p);
    let q = dir.join("q.raw");
    run_ok(
        "qemu-img",
        &["convert", "-U", "-O", "raw", path_str(&p), path_str(&q)],
    );
    let raw = read_file(&q);
    assert_same_bytes(
        &raw[12345..312345],
        &tagged_data(3, 0, 300_000),
        "QEMU view",
    );
    // Writes are refused; reads still work; a read-only user still keeps writers out.
    let e = img
        .write_at(&[1], 0)
        .expect_err("write on a reopened read-only image");
    assert_eq!(e.errno(), EROFS);
    assert!(
        !qemu_can_write(&p),
        "qemu-io wrote while oxcow holds the image read-only"
    );
    let mut b = vec![0u8; 300_000];
    img.read_at(&mut b, 12345).expect("read");
    assert_same_bytes(&b, &tagged_data(3, 0, 300_000), "oxcow view");
}

#[test]
fn read_only_to_read_write_takes_the_write_locks_and_writes() {
    let dir = TempDir::new("reopen-rw");
    let p = new_image(&dir, "a.qcow2");
    let img = Image::open(&p, &ro()).expect("open ro");
    assert!(qemu_can_read(&p));
    img.reopen(&rw()).expect("reopen read-write");
    assert!(!img.is_read_only());
    assert!(
        !qemu_can_read(&p),
        "QEMU opened an image oxcow reopened read-write"
    );
    img.write_at(&[9u8; 70_000], 65_000)
        .expect("write after reopen");
    img.reopen(&ro()).expect("back to read-only");
    img.reopen(&rw()).expect("and read-write again");
    img.write_at(&[8u8; 1000], 0).expect("second write");
    img.close().expect("close");
    assert_check_clean(&p);
    let q = dir.join("q.raw");
    run_ok(
        "qemu-img",
        &["convert", "-O", "raw", path_str(&p), path_str(&q)],
    );
    let raw = read_file(&q);
    assert!(raw[..1000].iter().all(|&b| b == 8));
    assert!(raw[65_000..135_000].iter().all(|&b| b == 9));
}

#[test]
fn reopen_read_write_while_qemu_reads_fails_with_eagain_and_changes_nothing() {
    let dir = TempDir::new("reopen-eagain");
    let p = new_image(&dir, "a.qcow2");
    // A read-only qemu-io that stays open: QEMU's readers forbid writers.
    let _q = KillOnDrop(
        Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "sleep 20000", path_str(&p)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io"),
    );
    // Wait until QEMU holds its locks (a writable open fails then; nobody else has the image).
    let t0 = Instant::now();
    loop {
        match Image::open(&p, &rw()) {
            Err(e) if e.errno() == EAGAIN => break,
            Ok(i) => drop(i),
            Err(e) => panic!("probe open: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu-io never took its locks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = Image::open(&p, &ro()).expect("open ro beside a QEMU reader");
    let e = img.reopen(&rw()).expect_err("reopen rw while QEMU reads");
    assert_eq!(e.errno(), EAGAIN, "{e}");
    assert!(
        e.to_string().contains("Is another process using the image"),
        "{e}"
    );
    // Nothing changed: still read-only, still readable, and still a reader that keeps
    // writers out (our read-only locks are intact).
    assert!(img.is_read_only());
    let mut b = [1u8; 4096];
    img.read_at(&mut b, 0).expect("read after failed reopen");
    assert!(b.iter().all(|&x| x == 0));
    assert!(
        !qemu_can_write(&p),
        "a failed reopen dropped our read-only locks"
    );
    drop(_q);
    img.reopen(&rw()).expect("reopen rw once QEMU is gone");
    img.write_at(&[5; 512], 0).expect("write");
    img.close().expect("close");
    assert_check_clean(&p);
}

#[test]
fn reopen_refuses_a_path_that_now_names_another_file() {
    let dir = TempDir::new("reopen-estale");
    let p = new_image(&dir, "a.qcow2");
    let other = new_image(&dir, "b.qcow2");
    let img = Image::open(&p, &ro()).expect("open ro");
    let moved = dir.join("moved.qcow2");
    std::fs::rename(&p, &moved).expect("rename");
    std::fs::rename(&other, &p).expect("replace");
    let e = img
        .reopen(&rw())
        .expect_err("reopen switched files silently");
    assert_eq!(e.errno(), ESTALE, "{e}");
    assert!(img.is_read_only());
    let mut b = [0u8; 512];
    img.read_at(&mut b, 0).expect("still reads the original");
    // The replacement was not written to.
    assert_check_clean(&p);
}

#[test]
fn reopen_rules_keep_read_only_direct_and_force_share() {
    let dir = TempDir::new("reopen-rules");
    let p = new_image(&dir, "a.qcow2");
    let keep = Image::open(
        &p,
        &OpenOptions {
            keep_read_only: true,
            ..Default::default()
        },
    )
    .expect("open keep-read-only");
    assert_eq!(
        keep.reopen(&rw()).expect_err("keep-ro went rw").errno(),
        EROFS
    );
    drop(keep);
    let fs = Image::open(
        &p,
        &OpenOptions {
            force_share: true,
            ..Default::default()
        },
    )
    .expect("open force-share");
    assert_eq!(
        fs.reopen(&rw()).expect_err("force-share went rw").errno(),
        EROFS
    );
    fs.reopen(&ro()).expect("force-share -> plain read-only");
    fs.reopen(&rw()).expect("then read-write");
    let e = fs
        .reopen(&OpenOptions {
            writable: true,
            direct: true,
            ..Default::default()
        })
        .expect_err("O_DIRECT changed by reopen");
    assert_eq!(e.errno(), EINVAL);
    assert!(!fs.is_read_only(), "a refused reopen changed the mode");
}

#[test]
fn reopen_read_write_refuses_an_image_marked_corrupt_meanwhile() {
    let dir = TempDir::new("reopen-corrupt");
    let p = new_image(&dir, "a.qcow2");
    let img = Image::open(
        &p,
        &OpenOptions {
            force_share: false,
            ..Default::default()
        },
    )
    .expect("open ro");
    // Mark the image corrupt behind our back (as another tool could have before our open).
    let bits = be64(&p, 72);
    poke(&p, 72, &(bits | 2).to_be_bytes());
    let e = img.reopen(&rw()).expect_err("reopened a corrupt image rw");
    assert_eq!(e.errno(), EUCLEAN, "{e}");
    assert!(img.is_read_only());
    assert!(
        qemu_can_read(&p),
        "the failed reopen left write locks behind"
    );
}

#[test]
fn reopen_while_other_threads_write_loses_no_acknowledged_write() {
    let dir = TempDir::new("reopen-threads");
    let p = new_image(&dir, "a.qcow2");
    let img = Arc::new(Image::open(&p, &rw()).expect("open rw"));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let img = Arc::clone(&img);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 2000 {
                    let off = (t * 2000 + i) * 1024;
                    match img.write_at(&tagged_data(t as u8 + 1, off, 1024), off) {
                        Ok(()) => {
                            acked.push(off);
                            i += 1;
                        }
                        Err(e) => assert_eq!(e.errno(), EROFS, "unexpected write error: {e}"),
                    }
                }
                (t, acked)
            })
        })
        .collect();
    for _ in 0..20 {
        img.reopen(&ro()).expect("reopen ro under load");
        std::thread::sleep(Duration::from_millis(2));
        img.reopen(&rw()).expect("reopen rw under load");
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = writers
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    img.reopen(&ro()).expect("final reopen ro");
    assert_check_clean(&p);
    let mut b = vec![0u8; 1024];
    let mut n = 0;
    for (t, acked) in results {
        for off in acked {
            img.read_at(&mut b, off).expect("read");
            assert_same_bytes(
                &b,
                &tagged_data(t as u8 + 1, off, 1024),
                "acknowledged write",
            );
            n += 1;
        }
    }
    assert!(
        n > 20,
        "too few writes were acknowledged ({n}) to prove anything"
    );
}
