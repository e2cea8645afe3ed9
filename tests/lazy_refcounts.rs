//! Lazy refcounts and the dirty bit: set durably before the first lazily counted change,
//! kept by a plain flush (like QEMU), cleared by a clean close and by reopen read-only; a
//! process killed with SIGKILL in the middle of a write workload leaves an image that a
//! read-write open repairs (and without lazy refcounts, at worst leaks).

mod common;

use common::*;
use oxcow::{CreateOptions, Image, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const CHILD_ENV: &str = "OXCOW_KILL_CHILD_IMAGE";
/// Writes the child may have issued after its last reported flush: up to 8 until the next
/// flush, whose report the kill may have cut off, and up to 8 more after that one.
const LATER: u64 = 16;

/// The incompatible-features word on disk: bit 0 is the dirty bit.
fn dirty_on_disk(p: &Path) -> bool {
    be64(p, 72) & 1 != 0
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn lazy_image(dir: &TempDir, lazy: bool) -> std::path::PathBuf {
    let p = dir.join("lazy.qcow2");
    oxcow::create(
        &p,
        64 * MIB,
        &CreateOptions {
            cluster_size: 4096,
            lazy_refcounts: lazy,
            ..Default::default()
        },
    )
    .expect("create");
    p
}

#[test]
fn dirty_bit_is_set_before_the_first_allocation_and_cleared_by_a_clean_close() {
    let dir = TempDir::new("lazy-bit");
    let p = lazy_image(&dir, true);
    let img = Image::open(&p, &rw()).expect("open");
    assert!(!dirty_on_disk(&p), "opening alone must not dirty the image");
    img.write_at(&[1u8; 10_000], 5000).expect("write");
    assert!(
        dirty_on_disk(&p),
        "an allocation happened with a clean header on disk"
    );
    assert!(img.info().expect("info").dirty);
    img.flush().expect("flush");
    assert!(
        dirty_on_disk(&p),
        "a plain flush clears the bit in QEMU neither"
    );
    img.close().expect("close");
    assert!(!dirty_on_disk(&p), "a clean close must clear the dirty bit");
    assert_check_clean(&p);

    // Reopen read-only also marks it clean, and back to read-write dirties it again on write.
    let img = Image::open(&p, &rw()).expect("open");
    img.write_at(&[2u8; 100], 8 * MIB).expect("write");
    assert!(dirty_on_disk(&p));
    img.reopen(&OpenOptions::default()).expect("reopen ro");
    assert!(
        !dirty_on_disk(&p),
        "reopen read-only must clear the dirty bit"
    );
    assert_check_clean(&p);
    img.reopen(&rw()).expect("reopen rw");
    assert!(!dirty_on_disk(&p));
    img.write_at(&[3u8; 100], 9 * MIB).expect("write");
    assert!(dirty_on_disk(&p));
    drop(img);
    assert!(!dirty_on_disk(&p), "dropping the image closes it cleanly");
    assert_check_clean(&p);
}

#[test]
fn images_without_lazy_refcounts_never_get_the_dirty_bit() {
    let dir = TempDir::new("lazy-off");
    let p = lazy_image(&dir, false);
    let img = Image::open(&p, &rw()).expect("open");
    img.write_at(&[1u8; 100_000], 0).expect("write");
    assert!(!dirty_on_disk(&p));
    img.close().expect("close");
    assert_check_clean(&p);
}

/// Child process body: writes 64 KiB chunks in a loop over the disk, flushing every 8 writes
/// and printing `FLUSHED <n>` (all chunks below n are durable) after each flush.
#[test]
#[ignore = "entry point of the child process of killed_writer_* tests"]
fn kill_child_workload() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = Image::open(&path, &rw()).expect("child open");
    let chunks = img.virtual_size() / (64 * 1024);
    let mut n = 0u64;
    loop {
        let c = (n * 7919) % chunks; // scattered, allocating, revisiting over time
        let off = c * 64 * 1024;
        img.write_at(&tagged_data((n % 250) as u8 + 1, off, 64 * 1024), off)
            .expect("child write");
        n += 1;
        if n % 8 == 0 {
            img.flush().expect("child flush");
            println!("FLUSHED {n}");
        }
    }
}

/// Runs the child on `p` until it has flushed at least `min_flushes` times, kills it with
/// SIGKILL in the middle of its workload and returns the last flushed count it reported.
fn run_and_kill(p: &Path, min_flushes: u64) -> u64 {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--ignored", "--exact", "kill_child_workload", "--nocapture"])
        .env(CHILD_ENV, p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut flushed = 0;
    let t0 = Instant::now();
    while flushed < min_flushes {
        assert!(t0.elapsed() < Duration::from_secs(60), "child too slow");
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(n) = l.strip_prefix("FLUSHED ") {
                    flushed = n.trim().parse().expect("count");
                }
            }
            _ => panic!("child exited early"),
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    // Lines printed before the kill may still be buffered in the pipe: take the last.
    for l in lines.map_while(|l| l.ok()) {
        if let Some(n) = l.strip_prefix("FLUSHED ") {
            flushed = n.trim().parse().expect("count");
        }
    }
    flushed
}

/// Expected contents of every chunk after the first `n` writes of the child's sequence.
fn expected_chunks(chunks: u64, n: u64) -> Vec<Option<u64>> {
    let mut last = vec![None; chunks as usize];
    for i in 0..n {
        last[((i * 7919) % chunks) as usize] = Some(i);
    }
    last
}

fn verify_flushed(p: &Path, flushed: u64, later_max: u64) {
    let img = Image::open(p, &OpenOptions::default()).expect("open ro");
    let chunks = img.virtual_size() / (64 * 1024);
    let durable = expected_chunks(chunks, flushed);
    // Chunks written after the last flush may hold either version: skip them.
    let touched_later: std::collections::HashSet<u64> =
        (flushed..later_max).map(|i| (i * 7919) % chunks).collect();
    let mut buf = vec![0u8; 64 * 1024];
    let mut verified = 0;
    for (c, w) in durable.iter().enumerate() {
        if touched_later.contains(&(c as u64)) {
            continue;
        }
        let off = c as u64 * 64 * 1024;
        img.read_at(&mut buf, off).expect("read");
        match w {
            Some(i) => assert_same_bytes(
                &buf,
                &tagged_data((i % 250) as u8 + 1, off, 64 * 1024),
                &format!("chunk {c} (write {i}, flushed before the kill)"),
            ),
            None => assert!(buf.iter().all(|&b| b == 0), "chunk {c} was never written"),
        }
        verified += 1;
    }
    assert!(
        verified > chunks / 2,
        "only {verified} chunks could be verified"
    );
}

#[test]
fn killed_writer_with_lazy_refcounts_is_repaired_by_the_next_read_write_open() {
    let dir = TempDir::new("lazy-kill");
    let p = lazy_image(&dir, true);
    let flushed = run_and_kill(&p, 40);
    assert!(dirty_on_disk(&p), "the killed writer left a clean header");
    let (code, _) = qemu_img_check(&p);
    assert!(
        code == 0 || code == 2 || code == 3,
        "check of the dirty image: exit {code}"
    );
    // A read-write open repairs it; then QEMU finds it clean.
    let img = Image::open(&p, &rw()).expect("read-write open of the dirty image");
    assert!(!dirty_on_disk(&p), "the repair left the dirty bit set");
    img.close().expect("close");
    let (code, report) = qemu_img_check(&p);
    assert_eq!(code, 0, "after the repair:\n{report}");
    verify_flushed(&p, flushed, flushed + LATER);
}

#[test]
fn killed_writer_without_lazy_refcounts_leaves_at_most_leaks() {
    let dir = TempDir::new("plain-kill");
    let p = lazy_image(&dir, false);
    let flushed = run_and_kill(&p, 40);
    let (code, report) = qemu_img_check(&p);
    assert!(
        code == 0 || code == 3,
        "exit {code} after SIGKILL:\n{report}"
    );
    verify_flushed(&p, flushed, flushed + LATER);
}
