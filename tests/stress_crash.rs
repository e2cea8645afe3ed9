//! Flush racing writes, checked by killing a writer process: a child process (this test binary
//! re-executed with `--exact flush_crash_child`, which therefore lives in this file) runs writer
//! threads and a flusher that prints which writes had completed before each flush; it is killed
//! with SIGKILL at a random moment.
//!
//! The oracle: every write listed by the last printed flush must read back (bytes that differ
//! may only hold a later write of the same writer), and `qemu-img check` must exit 0 or 3
//! (leaks only); a dirty lazy-refcounts image must be clean after a repairing writable open.
//!
//! Environment: `OXCOW_STRESS_SEED` and `OXCOW_STRESS_ROUNDS` (number of kills) as in
//! `stress_threads`.

mod common;

use common::stress::*;
use common::*;
use oxcow::{CreateOptions, Image, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "OXCOW_STRESS_CRASH_CHILD";
/// A writer may run at most this many writes ahead of the last flush it was told about.
const WINDOW: u64 = 48;
const CRASH_WRITERS: usize = 4;
const CRASH_REGION: u64 = 1 << 20;

/// Write `k` of writer `t`: `(offset, length, tag)` inside the writer's own region.
fn crash_write(seed: u64, t: usize, k: u64) -> (u64, u64, u64) {
    let mut r = Rng::new(thread_seed(seed, t) ^ mix(k));
    let len = match r.below(4) {
        0 => r.range(1, 512),
        1 => 4096,
        2 => r.range(4096, 20_000),
        _ => r.range(1, 70_000),
    };
    let mut off = r.below(CRASH_REGION - len + 1);
    if r.chance(30) {
        off = off / 4096 * 4096;
    }
    (t as u64 * CRASH_REGION + off, len, otag(t, k))
}

/// Child process body: CRASH_WRITERS writer threads and one flusher on one image. Before each
/// flush, the flusher snapshots how many writes each writer has completed; after the flush
/// returns it prints `FLUSHED c0 c1 ...`, and only then lets the writers run further ahead.
#[test]
#[ignore = "entry point of the child process of the flush_* crash tests"]
fn flush_crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seed = parse_u64(&std::env::var("OXCOW_STRESS_CRASH_SEED").unwrap()).unwrap();
    let img = open_rw(Path::new(&path));
    let completed: Vec<AtomicU64> = (0..CRASH_WRITERS).map(|_| AtomicU64::new(0)).collect();
    let released: Vec<AtomicU64> = (0..CRASH_WRITERS).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..CRASH_WRITERS {
            let (img, completed, released) = (&img, &completed, &released);
            s.spawn(move || {
                for k in 0u64.. {
                    while k >= released[t].load(Ordering::Acquire) + WINDOW {
                        std::thread::yield_now();
                    }
                    let (off, len, tag) = crash_write(seed, t, k);
                    img.write_at(&pat(tag, off, len), off).expect("child write");
                    completed[t].store(k + 1, Ordering::Release);
                }
            });
        }
        let mut r = Rng::new(seed ^ 0xf1);
        loop {
            std::thread::sleep(Duration::from_micros(r.below(1500)));
            let snap: Vec<u64> = completed
                .iter()
                .map(|c| c.load(Ordering::Acquire))
                .collect();
            img.flush().expect("child flush");
            let line: Vec<String> = snap.iter().map(|c| c.to_string()).collect();
            let mut out = std::io::stdout().lock();
            writeln!(out, "FLUSHED {}", line.join(" ")).unwrap();
            out.flush().unwrap();
            drop(out);
            for (rel, c) in released.iter().zip(&snap) {
                rel.store(*c, Ordering::Release);
            }
        }
    });
}

/// Runs the child until it has printed `min_flushes` flushes, kills it with SIGKILL after a
/// random short delay, and returns the last printed snapshot.
fn run_and_kill(p: &Path, seed: u64, min_flushes: usize) -> Vec<u64> {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--ignored", "--exact", "flush_crash_child", "--nocapture"])
        .env(CHILD_ENV, p)
        .env("OXCOW_STRESS_CRASH_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let parse = |l: &str| -> Option<Vec<u64>> {
        l.strip_prefix("FLUSHED ")
            .map(|r| r.split_whitespace().map(|x| x.parse().unwrap()).collect())
    };
    let mut last = vec![0; CRASH_WRITERS];
    let mut seen = 0;
    let t0 = Instant::now();
    while seen < min_flushes {
        assert!(t0.elapsed() < Duration::from_secs(60), "child too slow");
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(v) = parse(&l) {
                    last = v;
                    seen += 1;
                }
            }
            _ => {
                let _ = child.kill();
                panic!(
                    "crash child (seed {seed:#x}) exited early: {:?}",
                    child.wait()
                );
            }
        }
    }
    std::thread::sleep(Duration::from_micros(Rng::new(seed).below(3000)));
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    for l in lines.map_while(|l| l.ok()) {
        if let Some(v) = parse(&l) {
            last = v;
        }
    }
    last
}

/// Every write in the snapshot of the last flush reads back; bytes that differ must come from
/// a later write of the same writer (which may or may not have reached the disk).
fn verify_crash(p: &Path, seed: u64, flushed: &[u64]) -> Result<(), String> {
    let img = Image::open(p, &OpenOptions::default()).map_err(|e| format!("open: {e}"))?;
    for (t, &c) in flushed.iter().enumerate() {
        let base = t as u64 * CRASH_REGION;
        let mut want = vec![0u8; CRASH_REGION as usize];
        for k in 0..c {
            let (o, n, tag) = crash_write(seed, t, k);
            let rel = (o - base) as usize;
            fill_pat(tag, o, &mut want[rel..rel + n as usize]);
        }
        let later: Vec<(u64, u64, u64)> =
            (c..c + WINDOW).map(|k| crash_write(seed, t, k)).collect();
        let mut got = vec![0u8; CRASH_REGION as usize];
        img.read_at(&mut got, base)
            .map_err(|e| format!("read: {e}"))?;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if g == w {
                continue;
            }
            let pos = base + i as u64;
            if !later
                .iter()
                .any(|&(o, n, tag)| pos >= o && pos < o + n && pat_byte(tag, pos) == g)
            {
                return Err(format!(
                    "writer {t} ({c} writes flushed): byte at {pos:#x} is {g:#04x}, expected {w:#04x} (durable) or a later write's data"
                ));
            }
        }
    }
    Ok(())
}

fn flush_crash(tag: &str, opts: CreateOptions, base_seed: u64) {
    let kills = 3 * rounds_factor();
    for i in 0..kills {
        let seed = seed_override().unwrap_or(base_seed + i as u64);
        let what = format!("{tag} kill {i} (replay: OXCOW_STRESS_SEED={seed:#x})");
        let dir = TempDir::new(&format!("stress-crash-{tag}"));
        let p = dir.join("crash.qcow2");
        oxcow::create(&p, CRASH_WRITERS as u64 * CRASH_REGION, &opts).expect("create");
        let flushed = run_and_kill(&p, seed, 20 + i * 7);
        let (code, report) = qemu_img_check(&p);
        if opts.lazy_refcounts {
            // A dirty lazy-refcount image: a read-write open repairs it, then it is clean.
            assert!(
                code == 0 || code == 2 || code == 3,
                "{what}: check of the dirty image: exit {code}\n{report}"
            );
            open_rw(&p).close().expect("close after repair");
            let (code, report) = qemu_img_check(&p);
            assert_eq!(code, 0, "{what}: after the repairing open:\n{report}");
        } else {
            assert!(
                code == 0 || code == 3,
                "{what}: qemu-img check after SIGKILL exited {code}\n{report}"
            );
        }
        if let Err(e) = verify_crash(&p, seed, &flushed) {
            panic!("{what}: flushed {flushed:?}: {e}");
        }
        eprintln!("{what}: ok, writes per writer covered by the last flush: {flushed:?}");
    }
}

#[test]
fn flush_covers_completed_writes_across_sigkill_4k() {
    flush_crash(
        "4k",
        CreateOptions {
            cluster_size: 4096,
            ..Default::default()
        },
        0xc4a5_0004,
    );
}

#[test]
fn flush_covers_completed_writes_across_sigkill_64k_extended_l2() {
    flush_crash(
        "64k-extl2",
        CreateOptions {
            extended_l2: true,
            ..Default::default()
        },
        0xc4a5_e264,
    );
}

#[test]
fn flush_covers_completed_writes_across_sigkill_lazy_refcounts() {
    flush_crash(
        "lazy",
        CreateOptions {
            cluster_size: 16384,
            lazy_refcounts: true,
            ..Default::default()
        },
        0xc4a5_1a2e,
    );
}
