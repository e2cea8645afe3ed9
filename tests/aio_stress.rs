//! The asynchronous queue from one thread with thousands of requests in flight, on both
//! backends (io_uring where the kernel allows it, and the worker pool), against a byte
//! model; the result is checked by qemu-img (compare with the model, check). Plus the
//! queue's error contract and a crash test that kills a process with requests in flight.
//!
//! Environment: `OXCOW_STRESS_SEED` overrides the seed.

mod common;

use common::aio::Buf;
use common::stress::seed_override;
use common::*;
use oxcow::{
    AioBackend, AioBuf, AioOp, AioOptions, AioQueue, ErrorKind, Image, OpenOptions, ZeroFlags,
};
use std::path::Path;
use std::sync::Arc;

type Queue = AioQueue<Arc<Image>, Buf, (u64, u64)>;
/// What `Queue::submit` returns.
type Submitted = Result<u64, (oxcow::Error, AioOp<Buf>, (u64, u64))>;

fn queue(img: &Arc<Image>, depth: u32, force_threads: bool) -> Queue {
    let opts = AioOptions {
        depth,
        workers: 2,
        force_threads,
    };
    AioQueue::new(Arc::clone(img), &opts).expect("queue")
}

fn open(path: &Path, writable: bool) -> Arc<Image> {
    open_with(path, writable, false).expect("open")
}

fn open_with(path: &Path, writable: bool, direct: bool) -> oxcow::Result<Arc<Image>> {
    let opts = OpenOptions {
        writable,
        direct,
        ..OpenOptions::default()
    };
    Image::open(path, &opts).map(Arc::new)
}

/// Disjoint random ranges covering parts of `[0, size)`: 1 to 3 slots of `slot` bytes
/// each, shrunk at random by up to 511 bytes at each end, in shuffled order.
fn disjoint_ranges(rng: &mut Rng, size: u64, slot: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut pos = 0;
    while pos < size {
        let n = rng.range(1, 3).min((size - pos) / slot).max(1);
        let (mut a, mut b) = (pos, pos + n * slot);
        if rng.chance(50) {
            a += rng.below(512);
            b -= rng.below(512);
        }
        if rng.chance(85) {
            v.push((a, b - a));
        }
        pos += n * slot;
    }
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// Submits every op of one round (all in flight at once), then polls them all; checks each
/// completion and each read against `model` as it was before the round.
fn run_round(q: &Queue, rng: &mut Rng, model: &mut [u8], round: u64) {
    let ranges = disjoint_ranges(rng, model.len() as u64, 4096);
    let before = model.to_vec();
    let mut kinds = std::collections::HashMap::new();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let kind = rng.below(10);
        let op = match kind {
            0..=4 => {
                let data = tagged_data((round * 7 + i as u64) as u8 | 1, off, len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                AioOp::Write {
                    bufs: vec![Buf::from(&data)],
                    offset: off,
                }
            }
            5..=7 => AioOp::Read {
                bufs: vec![Buf::new(len as usize, 0xAA)],
                offset: off,
            },
            8 => {
                // Vectored read in two pieces.
                let cut = len / 3;
                AioOp::Read {
                    bufs: vec![
                        Buf::new(cut as usize, 0xAA),
                        Buf::new((len - cut) as usize, 0x55),
                    ],
                    offset: off,
                }
            }
            _ => {
                model[off as usize..(off + len) as usize].fill(0);
                AioOp::WriteZeroes {
                    offset: off,
                    count: len,
                    flags: ZeroFlags {
                        may_unmap: rng.chance(50),
                    },
                }
            }
        };
        let cookie = q
            .submit(op, (off, len))
            .map_err(|(e, _, _)| e)
            .expect("submit");
        kinds.insert(cookie, kind);
    }
    assert!(q.in_flight() > 0);
    let mut left = ranges.len();
    while left > 0 {
        for c in q.poll(usize::MAX, None) {
            left -= 1;
            c.result
                .unwrap_or_else(|e| panic!("request {}: {e}", c.cookie));
            let (off, len) = c.user;
            if let AioOp::Read { bufs, .. } = c.op {
                let got: Vec<u8> = bufs.iter().flat_map(|b| b.bytes().to_vec()).collect();
                assert_same_bytes(&got, &before[off as usize..(off + len) as usize], "read");
            }
            assert!(kinds.remove(&c.cookie).is_some(), "cookie completed twice");
        }
    }
    assert_eq!(q.in_flight(), 0);
}

fn stress(force_threads: bool, cluster: &str, direct: bool) {
    let seed = seed_override().unwrap_or(0xA10_5EED);
    let dir = TempDir::new("aio-stress");
    let path = dir.join("s.qcow2");
    let size = 16 * MIB;
    qemu_create(&path, size, &format!("cluster_size={cluster}"));
    let img = match open_with(&path, true, direct) {
        Ok(img) => img,
        Err(e) if direct && e.kind() == ErrorKind::Unsupported => {
            eprintln!("no O_DIRECT under {}: skipped ({e})", dir.path().display());
            return;
        }
        Err(e) => panic!("open: {e}"),
    };
    let q = queue(&img, 8192, force_threads);
    if force_threads {
        assert_eq!(q.backend(), AioBackend::Threads);
    }
    eprintln!("backend {:?}, seed {seed:#x}", q.backend());
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; size as usize];
    for round in 0..4 {
        run_round(&q, &mut rng, &mut model, round);
        if round == 1 {
            q.submit(AioOp::Flush, (0, 0))
                .map_err(|(e, _, _)| e)
                .unwrap();
            let c = q.poll(1, None);
            assert!(c[0].result.is_ok());
        }
    }
    drop(q);
    let img = Arc::try_unwrap(img).ok().expect("sole owner");
    img.close().unwrap();
    let raw = dir.join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_compare_identical(&path, &raw);
    assert_check_clean(&path);
}

#[test]
fn thousands_in_flight_match_the_model_default_backend() {
    stress(false, "64k", false);
}

#[test]
fn thousands_in_flight_match_the_model_direct_io() {
    stress(false, "64k", true);
}

#[test]
fn thousands_in_flight_match_the_model_worker_pool() {
    stress(true, "4k", false);
}

#[test]
fn submit_refuses_bad_ranges_read_only_writes_and_a_full_queue() {
    let dir = TempDir::new("aio-errors");
    let path = dir.join("e.qcow2");
    qemu_create(&path, MIB, "");
    let img = open(&path, true);
    let q = queue(&img, 2, false);
    let kind = |r: Submitted| r.map_err(|(e, _, _)| e.kind()).unwrap_err();
    let read = |off| AioOp::Read {
        bufs: vec![Buf::new(4096, 0)],
        offset: off,
    };
    assert_eq!(
        kind(q.submit(read(MIB - 512), (0, 0))),
        ErrorKind::InvalidArgument
    );
    let big = AioOp::Discard {
        offset: u64::MAX,
        count: 2,
    };
    assert_eq!(kind(q.submit(big, (0, 0))), ErrorKind::InvalidArgument);
    q.submit(read(0), (0, 0)).map_err(|(e, _, _)| e).unwrap();
    q.submit(read(4096), (0, 0)).map_err(|(e, _, _)| e).unwrap();
    assert_eq!(kind(q.submit(read(0), (0, 0))), ErrorKind::Busy);
    assert_eq!(q.poll(10, None).len() + q.poll(10, None).len(), 2);
    assert!(
        q.poll(10, None).is_empty(),
        "nothing in flight returns at once"
    );
    drop(q);
    drop(img);
    let img = open(&path, false);
    let q = queue(&img, 0, false);
    let w = AioOp::Write {
        bufs: vec![Buf::new(512, 1)],
        offset: 0,
    };
    assert_eq!(kind(q.submit(w, (0, 0))), ErrorKind::ReadOnly);
    // A queue dropped with requests in flight waits for them.
    for i in 0..64 {
        q.submit(read(i * 4096), (0, 0))
            .map_err(|(e, _, _)| e)
            .unwrap();
    }
    drop(q);
    assert_eq!(Arc::strong_count(&img), 1);
}

const CHILD_ENV: &str = "OXCOW_AIO_CRASH_CHILD";
/// `direct` when the child opens the image with O_DIRECT.
const CHILD_DIRECT_ENV: &str = "OXCOW_AIO_CRASH_DIRECT";
const SLOTS: u64 = 2048;
/// The byte every slot holds before the child overwrites it (overwrite rounds).
const OLD: u8 = 0xEE;

/// What slot `k` holds once the child's write of it completed.
fn slot_data(k: u64) -> Vec<u8> {
    tagged_data((k % 251) as u8 | 1, k * 8192, 4096)
}

/// The child: writes slot k with tagged data, 128 in flight; every 256 completed writes it
/// drains, flushes and prints how many writes the flush covers. Runs until killed. On a
/// pre-written image these are overwrites in place (on the ring with the io_uring backend);
/// on an empty one, allocating writes.
#[test]
fn aio_crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let direct = std::env::var_os(CHILD_DIRECT_ENV).is_some_and(|v| v == "direct");
    let img = open_with(Path::new(&path), true, direct).expect("open");
    let q = queue(&img, 256, false);
    println!("backend {:?}", q.backend());
    let (mut next, mut done) = (0u64, 0u64);
    while done < SLOTS {
        // Up to the next multiple of 256, 128 in flight; then drain and flush.
        let batch_end = (done / 256 + 1) * 256;
        while next < batch_end && q.in_flight() < 128 {
            let op = AioOp::Write {
                bufs: vec![Buf::from(&slot_data(next))],
                offset: next * 8192,
            };
            q.submit(op, (next, 0)).map_err(|(e, _, _)| e).unwrap();
            next += 1;
        }
        for c in q.poll(usize::MAX, None) {
            c.result.unwrap();
            done += 1;
        }
        if done == batch_end {
            q.submit(AioOp::Flush, (u64::MAX, 0))
                .map_err(|(e, _, _)| e)
                .unwrap();
            q.poll(1, None)[0].result.as_ref().unwrap();
            println!("flushed {done}");
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(600));
}

/// One child killed with writes in flight: allocating writes into an empty image, or
/// overwrites of a written one; `direct` opens it with O_DIRECT, `backend` is passed as
/// OXCOW_AIO_BACKEND (`threads` forces the pool). Then `qemu-img check` finds at worst
/// leaks, every write a flush covered reads back, and with overwrites every other slot
/// holds either its old or its new data.
fn kill_with_writes_in_flight(
    dir: &TempDir,
    rng: &mut Rng,
    round: u32,
    overwrite: bool,
    direct: bool,
    backend: &str,
) {
    use std::io::{BufRead, BufReader};
    let path = dir.join(&format!("c{round}.qcow2"));
    if overwrite {
        qemu_create_with_data(&path, SLOTS * 8192, "cluster_size=4k", OLD, SLOTS * 8192);
    } else {
        qemu_create(&path, SLOTS * 8192, "cluster_size=4k");
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "aio_crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .env(CHILD_DIRECT_ENV, if direct { "direct" } else { "buffered" })
        .env("OXCOW_AIO_BACKEND", backend)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let wait_flushes = rng.range(1, 5);
    let mut flushed = 0u64;
    let mut seen = 0;
    let mut lines = BufReader::new(stdout).lines();
    for line in &mut lines {
        let Ok(line) = line else { break };
        if line.contains("backend ") {
            eprintln!("round {round}: {line}, overwrite {overwrite}, direct {direct}");
        }
        if let Some(n) = line.strip_prefix("flushed ") {
            flushed = n.trim().parse().unwrap();
            seen += 1;
            if seen == wait_flushes {
                break;
            }
        }
    }
    // Kill with requests in flight (the child went on submitting after the flush).
    std::thread::sleep(std::time::Duration::from_micros(rng.below(3000)));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(flushed > 0, "round {round}: the child never flushed");
    let (code, out) = check_once_unlocked(&path);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{out}");
    let img = open(&path, false);
    let mut buf = vec![0u8; 4096];
    for k in 0..SLOTS {
        img.read_at(&mut buf, k * 8192).unwrap();
        let new = slot_data(k);
        if k < flushed {
            assert!(
                buf == new,
                "round {round}: write {k} of {flushed} flushed ones lost"
            );
        } else if overwrite {
            assert!(
                buf == new || buf.iter().all(|&b| b == OLD),
                "round {round}: slot {k} (not flushed) holds neither its old nor its new data"
            );
        }
    }
}

#[test]
fn killed_with_requests_in_flight_keeps_flushed_writes_and_at_worst_leaks() {
    let dir = TempDir::new("aio-crash");
    let seed = seed_override().unwrap_or(5);
    let mut rng = Rng::new(seed);
    for round in 0..3 {
        kill_with_writes_in_flight(&dir, &mut rng, round, false, false, "io_uring");
    }
    // O_DIRECT handles grow the file ahead of allocation: the killed child leaves it longer
    // than its clusters, with a reserved tail nothing references.
    if !direct_io_supported(&dir) {
        eprintln!(
            "no O_DIRECT under {}: direct rounds skipped",
            dir.path().display()
        );
        return;
    }
    for (round, backend) in [(3, "io_uring"), (4, "threads"), (5, "io_uring")] {
        kill_with_writes_in_flight(&dir, &mut rng, round, false, true, backend);
        let path = dir.join(&format!("c{round}.qcow2"));
        writes_after_a_crash_land_beside_the_old_ones(&path);
    }
}

/// Reopens a killed child's image with O_DIRECT (its file may be longer than its clusters),
/// rewrites every slot, closes it and expects a clean check (leaks repaired first) and every
/// slot's data.
fn writes_after_a_crash_land_beside_the_old_ones(path: &Path) {
    qemu_img(&["check", "-q", "-r", "leaks", path_str(path)]);
    let img = open_with(path, true, true).expect("reopen with O_DIRECT");
    for k in 0..SLOTS {
        img.write_at(&slot_data(k), k * 8192).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    assert_check_clean(path);
    let img = open(path, false);
    let mut buf = vec![0u8; 4096];
    for k in 0..SLOTS {
        img.read_at(&mut buf, k * 8192).unwrap();
        assert!(buf == slot_data(k), "slot {k} after the crash and rewrite");
    }
}

#[test]
fn killed_with_overwrites_in_flight_keeps_flushed_writes_on_both_backends() {
    let dir = TempDir::new("aio-crash-ow");
    let seed = seed_override().unwrap_or(7);
    let mut rng = Rng::new(seed);
    let mut round = 0;
    for backend in ["io_uring", "threads"] {
        for direct in [false, true] {
            if direct && !direct_io_supported(&dir) {
                eprintln!(
                    "no O_DIRECT under {}: direct rounds skipped",
                    dir.path().display()
                );
                continue;
            }
            for _ in 0..2 {
                kill_with_writes_in_flight(&dir, &mut rng, round, true, direct, backend);
                round += 1;
            }
        }
    }
}

/// Whether files under `dir` can be opened with O_DIRECT (tmpfs cannot).
fn direct_io_supported(dir: &TempDir) -> bool {
    let path = dir.join("probe.qcow2");
    qemu_create(&path, MIB, "");
    let ok = open_with(&path, false, true).is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

/// `qemu-img check`, retried while the killed child's lock lingers: the kernel tears down a
/// dead process's io_uring (and drops the file references of its requests in flight, and
/// with the last one the file's locks) asynchronously, shortly after the process is reaped.
fn check_once_unlocked(path: &Path) -> (i32, String) {
    for _ in 0..100 {
        let (code, out) = qemu_img_check(path);
        if !out.contains("Failed to get shared \"write\" lock") {
            return (code, out);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    qemu_img_check(path)
}
