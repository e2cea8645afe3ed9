//! Issue 6, "many writers at once": N threads hammer ONE image handle with reads, writes
//! (aligned and unaligned, allocating and overwriting, vectored), write_zeroes (with and
//! without may_unmap), discards, flushes and block_status, and every byte is checked against a
//! reference model.
//!
//! The model. The guest disk is cut into regions:
//! - *owned stripes*: a random partition of the first part of the disk into stripes of random
//!   size (many smaller than a cluster, so several threads own bytes of the same cluster);
//!   stripe i belongs to thread i % N, which is the only one writing it, so its content is
//!   known exactly and every read of it (concurrent with other threads' writes to the same
//!   clusters) must return exactly the model.
//! - *storm clusters*: at the start of each round all threads meet at a barrier and then at
//!   once write their own slice (random cut points, often unaligned) of the same brand-new
//!   cluster; every slice written must survive and the slices nobody wrote must still read as
//!   the backing data (or zeros).
//! - *overlap clusters*: in the same storm, threads write overlapping random ranges of one
//!   brand-new cluster with per-thread data; every byte must hold the data of one thread whose
//!   range covers it (or the initial content if no range covers it).
//! - *contested region*: random writes, write_zeroes and cluster-aligned discards from all
//!   threads at any time. Each byte must finally hold the last value some thread left there
//!   (that thread's data or zeros); concurrent reads must see the initial content, zeros or
//!   some thread's data.
//!
//! Afterwards: the whole model is read back through the live handle, the image is closed,
//! `qemu-img check` must exit 0, `qemu-img compare` against a raw file built from the model
//! must find them identical, and a fresh read-only open reads the model again.
//!
//! Plus a crash test: a child process (this test binary re-executed) runs writer threads and a
//! flusher that prints which writes had completed before each flush; it is killed with
//! SIGKILL, and every write listed by the last printed flush must read back, with `qemu-img
//! check` exiting 0 or 3.
//!
//! Environment:
//! - `OXCOW_STRESS_SEED=<n>` replays one seed (decimal or 0x-hex) in every test.
//! - `OXCOW_STRESS_ROUNDS=<n>` multiplies the number of rounds (default 1).
//! - `OXCOW_STRESS_SECONDS=<s>`: how long the ignored `soak` test runs random configurations
//!   and seeds (default 60; `cargo test --release --test stress soak -- --ignored`).
//!
//! A failure message names the configuration and the seed; interleavings are not
//! reproducible, the operations each thread issues are.

mod common;

use common::*;
use oxcow::{BackingFormat, CreateOptions, Image, OpenOptions, ZeroFlags};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// Configuration and seeds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Cfg {
    threads: usize,
    cluster: u64,
    extended_l2: bool,
    lazy_refcounts: bool,
    /// Overlay on a qcow2 backing file written by qemu-io (0 = no backing file).
    backing_cluster: u64,
    rounds: usize,
    ops_per_round: usize,
    seed: u64,
}

impl Cfg {
    fn new(threads: usize, cluster: u64, seed: u64) -> Cfg {
        Cfg {
            threads,
            cluster,
            extended_l2: false,
            lazy_refcounts: false,
            backing_cluster: 0,
            rounds: 12 * rounds_factor(),
            ops_per_round: 80,
            seed: seed_override().unwrap_or(seed),
        }
    }
    fn backing(mut self, cluster: u64) -> Cfg {
        self.backing_cluster = cluster;
        self
    }
    fn extended_l2(mut self) -> Cfg {
        self.extended_l2 = true;
        self
    }
    fn lazy(mut self) -> Cfg {
        self.lazy_refcounts = true;
        self
    }
    fn has_backing(&self) -> bool {
        self.backing_cluster != 0
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn seed_override() -> Option<u64> {
    std::env::var("OXCOW_STRESS_SEED")
        .ok()
        .and_then(|s| parse_u64(&s))
}

fn rounds_factor() -> usize {
    std::env::var("OXCOW_STRESS_ROUNDS")
        .ok()
        .and_then(|s| parse_u64(&s))
        .map(|n| n.max(1) as usize)
        .unwrap_or(1)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn thread_seed(seed: u64, t: usize) -> u64 {
    mix(seed ^ mix(0x7468_7265_6164 + t as u64))
}

// ---------------------------------------------------------------------------------------------
// Data patterns: byte at guest position `pos` of a write tagged `tag`. Different tags give
// different data almost everywhere, and data moved to a wrong offset does not match.
// ---------------------------------------------------------------------------------------------

fn pat_word(tag: u64, word: u64) -> u64 {
    mix(tag ^ word.wrapping_mul(0xff51_afd7_ed55_8ccd))
}

fn pat_byte(tag: u64, pos: u64) -> u8 {
    (pat_word(tag, pos >> 3) >> ((pos & 7) * 8)) as u8
}

fn fill_pat(tag: u64, off: u64, buf: &mut [u8]) {
    let mut cur = u64::MAX;
    let mut w = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = off + i as u64;
        if pos >> 3 != cur {
            cur = pos >> 3;
            w = pat_word(tag, cur);
        }
        *b = (w >> ((pos & 7) * 8)) as u8;
    }
}

fn pat(tag: u64, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    fill_pat(tag, off, &mut v);
    v
}

/// Data of thread `t` in the contested and overlap regions (the same for all its writes, so
/// the model only needs to know which threads may have written a byte).
fn ctag(t: usize) -> u64 {
    0xc0c0_0000_0000 + t as u64
}

/// Data of thread `t`'s slice of the storm cluster of `round`.
fn stag(t: usize, round: usize) -> u64 {
    0x5707_0000_0000 + ((t as u64) << 20) + round as u64
}

/// Data of thread `t`'s `seq`-th write to its own stripes.
fn otag(t: usize, seq: u64) -> u64 {
    ((t as u64 + 1) << 40) + seq
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Layout {
    cs: u64,
    n: usize,
    vsize: u64,
    /// Owned stripes `(offset, length)`; stripe i belongs to thread i % n.
    stripes: Vec<(u64, u64)>,
    owned_end: u64,
    /// First storm cluster (one per round).
    storm: u64,
    /// First overlap cluster (one per round).
    overlap: u64,
    contested: u64,
    contested_len: u64,
    /// Backing file size (0 = no backing file) and its data: sorted, disjoint
    /// `(offset, length, byte)` ranges written by qemu-io; everything else reads as zeros.
    backing_len: u64,
    backing_ranges: Vec<(u64, u64, u8)>,
}

impl Layout {
    fn new(cfg: &Cfg) -> Layout {
        let cs = cfg.cluster;
        let n = cfg.threads;
        let mut r = Rng::new(cfg.seed ^ 0x6c61_796f_7574);
        let entry = if cfg.extended_l2 { 16 } else { 8 };
        // Guest bytes covered by one L2 table: the storm and contested regions straddle L2
        // boundaries, so threads allocate L2 tables concurrently too.
        let l2_cover = cs / entry * cs;
        let target = (64.max(8 * n as u64) * cs).min(l2_cover / 2);
        let mut stripes = Vec::new();
        let mut pos = 0u64;
        while pos < target {
            let len = match r.below(100) {
                0..=39 => r.range(cs / 16, cs / 3),
                40..=64 => r.range(cs / 2, 2 * cs),
                _ => r.range(3 * cs, 6 * cs) + if r.chance(50) { 0 } else { r.below(cs) },
            };
            let len = if r.chance(30) {
                (len / 512).max(1) * 512
            } else {
                len
            };
            stripes.push((pos, len));
            pos += len;
        }
        let owned_end = pos;
        let rounds = cfg.rounds as u64;
        let storm = (l2_cover - rounds.div_ceil(2) * cs).max(owned_end.next_multiple_of(cs) + cs);
        let overlap = storm + (rounds + 2) * cs;
        let contested = (2 * l2_cover - 3 * cs).max(overlap + (rounds + 2) * cs);
        let contested_len = 6 * cs;
        let vsize = contested + contested_len + 2 * cs;
        let mut backing_len = 0;
        let mut backing_ranges = Vec::new();
        if cfg.has_backing() {
            // The backing file ends in the middle of the contested region, not on a cluster
            // boundary of the overlay.
            backing_len = contested + 2 * cs + 3 * 512;
            let regions = [
                (0, owned_end),
                (storm, overlap + rounds * cs),
                (contested, backing_len),
            ];
            for (a, b) in regions {
                let mut p = a / 512 * 512;
                while p < b {
                    let len = (r.range(1, 3 * cs / 512) * 512).min(backing_len - p);
                    if r.chance(65) {
                        let v = if r.chance(10) {
                            0
                        } else {
                            r.range(1, 255) as u8
                        };
                        backing_ranges.push((p, len, v));
                    }
                    p += len + r.below(cs / 512 + 1) * 512;
                }
            }
        }
        Layout {
            cs,
            n,
            vsize,
            stripes,
            owned_end,
            storm,
            overlap,
            contested,
            contested_len,
            backing_len,
            backing_ranges,
        }
    }

    fn initial_byte(&self, pos: u64) -> u8 {
        if pos >= self.backing_len {
            return 0;
        }
        let i = self.backing_ranges.partition_point(|&(o, _, _)| o <= pos);
        if i == 0 {
            return 0;
        }
        let (o, l, v) = self.backing_ranges[i - 1];
        if pos < o + l {
            v
        } else {
            0
        }
    }

    fn initial(&self, off: u64, len: u64) -> Vec<u8> {
        (off..off + len).map(|p| self.initial_byte(p)).collect()
    }

    fn in_contested(&self, pos: u64) -> bool {
        pos >= self.contested && pos < self.contested + self.contested_len
    }
}

/// What every thread does in the storm of one round (shared, derived from the seed).
struct StormPlan {
    /// Thread t's slice of the storm cluster is `[cuts[t], cuts[t+1])`.
    cuts: Vec<u64>,
    writes: Vec<bool>,
    /// Thread t's range `(start, len)` in the overlap cluster, relative to its start.
    overlap: Vec<Option<(u64, u64)>>,
}

fn storm_plan(cfg: &Cfg, round: usize) -> StormPlan {
    let cs = cfg.cluster;
    let n = cfg.threads;
    let mut r = Rng::new(cfg.seed ^ mix(0x5707_0000 + round as u64));
    let mut cuts: Vec<u64> = (1..n)
        .map(|_| {
            let v = r.below(cs + 1);
            if r.chance(50) {
                v / 512 * 512
            } else {
                v
            }
        })
        .collect();
    cuts.sort_unstable();
    cuts.insert(0, 0);
    cuts.push(cs);
    let writes = (0..n).map(|_| r.chance(80)).collect();
    let overlap = (0..n)
        .map(|_| {
            if !r.chance(70) {
                return None;
            }
            if r.chance(25) {
                return Some((0, cs));
            }
            let s = r.below(cs);
            Some((s, r.range(1, cs - s)))
        })
        .collect();
    StormPlan {
        cuts,
        writes,
        overlap,
    }
}

// ---------------------------------------------------------------------------------------------
// Barrier that gives up when another thread failed (a plain Barrier would hang the test)
// ---------------------------------------------------------------------------------------------

struct Barrier {
    n: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// False when `failed` was set while waiting.
    fn wait(&self, failed: &AtomicBool) -> bool {
        let mut g = self.state.lock().unwrap();
        let gen = g.1;
        g.0 += 1;
        if g.0 == self.n {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
            return true;
        }
        while g.1 == gen {
            if failed.load(Ordering::Acquire) {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap()
                .0;
        }
        true
    }
}

/// Aborts the whole test binary if a test hangs (a deadlock in the engine), naming the seed.
struct Watchdog {
    done: std::sync::Arc<AtomicBool>,
}

impl Watchdog {
    fn new(what: String, limit: Duration) -> Watchdog {
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < limit {
                if d.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("HANG: {what} did not finish within {limit:?}; aborting");
            std::process::abort();
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn diff(got: &[u8], want: &[u8], off: u64, what: &str) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap();
    let a = first.saturating_sub(4);
    let b = (first + 12).min(got.len());
    Err(format!(
        "{what}: {count} bytes differ in guest [{off:#x}, {:#x}), first at {:#x}, last at {:#x}\n  got  {:02x?}\n  want {:02x?}",
        off + got.len() as u64,
        off + first as u64,
        off + last as u64,
        &got[a..b],
        &want[a..b]
    ))
}

/// Checks a read of the contested region taken while other threads may write there.
fn check_contested_read(l: &Layout, off: u64, got: &[u8]) -> Result<(), String> {
    for (i, &b) in got.iter().enumerate() {
        let pos = off + i as u64;
        if b == 0 || b == l.initial_byte(pos) || (0..l.n).any(|t| pat_byte(ctag(t), pos) == b) {
            continue;
        }
        return Err(format!(
            "contested read [{off:#x}, +{:#x}): byte at {pos:#x} is {b:#04x}, which is neither the initial content {:#04x}, zero, nor any thread's data",
            got.len(),
            l.initial_byte(pos)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One worker thread
// ---------------------------------------------------------------------------------------------

struct ThreadOut {
    /// Final model of each owned stripe.
    own: Vec<(u64, Vec<u8>)>,
    /// Per contested byte: 0 untouched, 1 this thread's data, 2 zeros (last op of this thread).
    contested: Vec<u8>,
}

struct Shared<'a> {
    cfg: Cfg,
    layout: &'a Layout,
    img: &'a Image,
    barrier: Barrier,
    failed: AtomicBool,
}

struct Worker<'a> {
    t: usize,
    sh: &'a Shared<'a>,
    rng: Rng,
    own: Vec<(u64, Vec<u8>)>,
    contested: Vec<u8>,
    seq: u64,
    log: VecDeque<String>,
}

fn sub_range(r: &mut Rng, off: u64, len: u64) -> (u64, u64) {
    match r.below(5) {
        0 => (off, len),
        1 | 2 => {
            let a = off.next_multiple_of(4096);
            let e = (off + len) / 4096 * 4096;
            if e > a {
                let blocks = (e - a) / 4096;
                let s = r.below(blocks);
                let n = r.range(1, blocks - s);
                return (a + s * 4096, n * 4096);
            }
            let s = r.below(len);
            (off + s, r.range(1, len - s))
        }
        _ => {
            let s = r.below(len);
            (off + s, r.range(1, len - s))
        }
    }
}

/// Whole clusters inside `[off, off+len)`, if any: a random run of them.
fn cluster_sub_range(r: &mut Rng, off: u64, len: u64, cs: u64) -> Option<(u64, u64)> {
    let a = off.next_multiple_of(cs);
    let e = (off + len) / cs * cs;
    if e <= a {
        return None;
    }
    let n = (e - a) / cs;
    let s = r.below(n);
    let k = r.range(1, n - s);
    Some((a + s * cs, k * cs))
}

impl<'a> Worker<'a> {
    fn note(&mut self, s: String) {
        if self.log.len() == 12 {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    fn fail(&self, msg: String) -> String {
        let log: Vec<&str> = self.log.iter().map(|s| s.as_str()).collect();
        format!(
            "thread {} (seed {:#x}): {msg}\n  its last operations, oldest first:\n    {}",
            self.t,
            thread_seed(self.sh.cfg.seed, self.t),
            log.join("\n    ")
        )
    }

    fn io<T>(&self, what: &str, r: oxcow::Result<T>) -> Result<T, String> {
        r.map_err(|e| self.fail(format!("{what}: {e} (errno {})", e.errno())))
    }

    fn write(&mut self, buf: &[u8], off: u64) -> Result<(), String> {
        let img = self.sh.img;
        if buf.len() > 2 && self.rng.chance(20) {
            let x = self.rng.range(1, buf.len() as u64 - 1) as usize;
            let y = self.rng.range(x as u64, buf.len() as u64 - 1) as usize;
            self.note(format!(
                "write_vectored [{off:#x}, +{:#x}) split {x}/{y}",
                buf.len()
            ));
            let r = if x == y {
                img.write_vectored_at(&[&buf[..x], &buf[x..]], off)
            } else {
                img.write_vectored_at(&[&buf[..x], &buf[x..y], &buf[y..]], off)
            };
            self.io("write_vectored_at", r)
        } else {
            self.note(format!("write [{off:#x}, +{:#x})", buf.len()));
            self.io("write_at", img.write_at(buf, off))
        }
    }

    fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let img = self.sh.img;
        let mut buf = vec![0xeeu8; len as usize];
        if len > 2 && self.rng.chance(20) {
            let x = self.rng.range(1, len - 1) as usize;
            self.note(format!("read_vectored [{off:#x}, +{len:#x}) split {x}"));
            let (a, b) = buf.split_at_mut(x);
            let r = img.read_vectored_at(&mut [a, b], off);
            self.io("read_vectored_at", r)?;
        } else {
            self.note(format!("read [{off:#x}, +{len:#x})"));
            self.io("read_at", img.read_at(&mut buf, off))?;
        }
        Ok(buf)
    }

    fn run(&mut self) -> Result<(), String> {
        for round in 0..self.sh.cfg.rounds {
            if !self.sh.barrier.wait(&self.sh.failed) {
                return Err(format!("thread {}: stopped, another thread failed", self.t));
            }
            self.storm(round)?;
            for _ in 0..self.sh.cfg.ops_per_round {
                if self.sh.failed.load(Ordering::Relaxed) {
                    return Err(format!("thread {}: stopped, another thread failed", self.t));
                }
                self.one_op()?;
            }
        }
        Ok(())
    }

    /// All threads arrive here together: write own slices of one new cluster and
    /// overlapping ranges of another, at once; then read them back.
    fn storm(&mut self, round: usize) -> Result<(), String> {
        let l = self.sh.layout;
        let cs = l.cs;
        let plan = storm_plan(&self.sh.cfg, round);
        let t = self.t;
        let sbase = l.storm + round as u64 * cs;
        let obase = l.overlap + round as u64 * cs;
        let (a, b) = (plan.cuts[t], plan.cuts[t + 1]);
        let slice = plan.writes[t] && b > a;
        let mut steps = [0, 1];
        if self.rng.chance(50) {
            steps.swap(0, 1);
        }
        for s in steps {
            if s == 0 && slice {
                let data = pat(stag(t, round), sbase + a, b - a);
                self.write(&data, sbase + a)?;
            } else if let (1, Some((o, n))) = (s, plan.overlap[t]) {
                let data = pat(ctag(t), obase + o, n);
                self.write(&data, obase + o)?;
            }
        }
        if slice {
            let got = self.read(sbase + a, b - a)?;
            let want = pat(stag(t, round), sbase + a, b - a);
            diff(&got, &want, sbase + a, "own slice of the storm cluster")
                .map_err(|e| self.fail(e))?;
        }
        // The overlap cluster: bytes of this thread's range hold some covering thread's data
        // (ours is complete); other bytes may still be the initial content.
        let got = self.read(obase, cs)?;
        for (i, &v) in got.iter().enumerate() {
            let rel = i as u64;
            let pos = obase + rel;
            let mine = matches!(plan.overlap[t], Some((o, n)) if rel >= o && rel < o + n);
            let ok = (!mine && v == l.initial_byte(pos))
                || (0..l.n).any(|u| {
                    matches!(plan.overlap[u], Some((o, n)) if rel >= o && rel < o + n)
                        && pat_byte(ctag(u), pos) == v
                });
            if !ok {
                return Err(self.fail(format!(
                    "overlap cluster of round {round}: byte at {pos:#x} is {v:#04x}, not the data of a thread that wrote it{}",
                    if mine { " (this thread's write had completed)" } else { " nor the initial content" }
                )));
            }
        }
        Ok(())
    }

    fn one_op(&mut self) -> Result<(), String> {
        let l = self.sh.layout;
        let cs = l.cs;
        let img = self.sh.img;
        let r = self.rng.below(100);
        let si = self.rng.below(self.own.len() as u64) as usize;
        let (soff, slen) = (self.own[si].0, self.own[si].1.len() as u64);
        match r {
            0..=29 | 85..=94 => {
                let (o, n) = sub_range(&mut self.rng, soff, slen);
                self.seq += 1;
                let data = pat(otag(self.t, self.seq), o, n);
                self.write(&data, o)?;
                let rel = (o - soff) as usize;
                self.own[si].1[rel..rel + n as usize].copy_from_slice(&data);
            }
            30..=44 => {
                let (o, n) = sub_range(&mut self.rng, soff, slen);
                let got = self.read(o, n)?;
                let rel = (o - soff) as usize;
                let want = &self.own[si].1[rel..rel + n as usize];
                diff(&got, want, o, "read of an owned stripe").map_err(|e| self.fail(e))?;
            }
            45..=54 => {
                let (o, n) = self.contested_range();
                let data = pat(ctag(self.t), o, n);
                self.write(&data, o)?;
                self.set_contested(o, n, 1);
            }
            55..=59 => {
                let (o, n) = self.contested_range();
                let got = self.read(o, n)?;
                check_contested_read(l, o, &got).map_err(|e| self.fail(e))?;
            }
            60..=67 => {
                let (o, n) = sub_range(&mut self.rng, soff, slen);
                let may_unmap = self.rng.chance(50);
                self.note(format!(
                    "write_zeroes [{o:#x}, +{n:#x}) may_unmap={may_unmap}"
                ));
                self.io(
                    "write_zeroes",
                    img.write_zeroes(o, n, ZeroFlags { may_unmap }),
                )?;
                let rel = (o - soff) as usize;
                self.own[si].1[rel..rel + n as usize].fill(0);
            }
            68..=69 => {
                let (o, n) = self.contested_range();
                let may_unmap = self.rng.chance(50);
                self.note(format!(
                    "write_zeroes contested [{o:#x}, +{n:#x}) may_unmap={may_unmap}"
                ));
                self.io(
                    "write_zeroes",
                    img.write_zeroes(o, n, ZeroFlags { may_unmap }),
                )?;
                self.set_contested(o, n, 2);
            }
            70..=75 => {
                // Discard whole clusters of an owned stripe (read as zeros in v3).
                if let Some((o, n)) = cluster_sub_range(&mut self.rng, soff, slen, cs) {
                    self.note(format!("discard [{o:#x}, +{n:#x})"));
                    self.io("discard", img.discard(o, n))?;
                    let rel = (o - soff) as usize;
                    self.own[si].1[rel..rel + n as usize].fill(0);
                }
            }
            76..=77 => {
                let k = l.contested_len / cs;
                let s = self.rng.below(k);
                let n = self.rng.range(1, (k - s).min(2));
                let (o, n) = (l.contested + s * cs, n * cs);
                self.note(format!("discard contested [{o:#x}, +{n:#x})"));
                self.io("discard", img.discard(o, n))?;
                self.set_contested(o, n, 2);
            }
            78..=81 => {
                self.note("flush".into());
                self.io("flush", img.flush())?;
            }
            82..=84 => {
                let o = self.rng.below(l.vsize);
                let n = self.rng.range(1, (l.vsize - o).min(8 * cs));
                self.note(format!("block_status [{o:#x}, +{n:#x})"));
                let e = self.io("block_status", img.block_status(o, n))?;
                if e.offset != o || e.length == 0 || e.length > n {
                    return Err(self.fail(format!("block_status({o:#x}, {n:#x}) = {e:?}")));
                }
            }
            _ => {
                // A read spanning the end of an owned stripe into whatever follows: check
                // only our own bytes.
                let o = soff + self.rng.below(slen);
                let n = self.rng.range(1, 2 * cs).min(l.vsize - o);
                let got = self.read(o, n)?;
                let k = (soff + slen - o).min(n) as usize;
                let rel = (o - soff) as usize;
                let want = &self.own[si].1[rel..rel + k];
                diff(&got[..k], want, o, "read starting in an owned stripe")
                    .map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    fn contested_range(&mut self) -> (u64, u64) {
        let l = self.sh.layout;
        let cs = l.cs;
        if self.rng.chance(30) {
            let k = l.contested_len / cs;
            let s = self.rng.below(k);
            return (l.contested + s * cs, cs * self.rng.range(1, (k - s).min(2)));
        }
        let s = self.rng.below(l.contested_len);
        let n = self.rng.range(1, (l.contested_len - s).min(2 * cs));
        (l.contested + s, n)
    }

    fn set_contested(&mut self, o: u64, n: u64, v: u8) {
        let rel = (o - self.sh.layout.contested) as usize;
        self.contested[rel..rel + n as usize].fill(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

fn make_backing(dir: &TempDir, cfg: &Cfg, l: &Layout) -> std::path::PathBuf {
    let p = dir.join("backing.qcow2");
    qemu_create(
        &p,
        l.backing_len,
        &format!("cluster_size={}", cfg.backing_cluster),
    );
    let cmds: Vec<String> = l
        .backing_ranges
        .iter()
        .map(|&(o, n, v)| {
            if v == 0 {
                format!("write -z {o} {n}")
            } else {
                format!("write -P {v} {o} {n}")
            }
        })
        .collect();
    if !cmds.is_empty() {
        qemu_io(&p, &cmds);
    }
    p
}

/// The final content of every region, as read through `img`, checked against the model.
/// Returns `(offset, bytes)` regions; everything outside them must be the initial content.
fn verify_final(
    img: &Image,
    cfg: &Cfg,
    l: &Layout,
    outs: &[ThreadOut],
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let cs = l.cs;
    let read = |off: u64, len: u64| -> Result<Vec<u8>, String> {
        let mut b = vec![0xeeu8; len as usize];
        img.read_at(&mut b, off)
            .map_err(|e| format!("final read [{off:#x}, +{len:#x}): {e}"))?;
        Ok(b)
    };
    let mut regions = Vec::new();

    // Owned stripes: exact.
    let mut want = vec![0u8; l.owned_end as usize];
    for out in outs {
        for (o, d) in &out.own {
            want[*o as usize..*o as usize + d.len()].copy_from_slice(d);
        }
    }
    let got = read(0, l.owned_end)?;
    diff(&got, &want, 0, "owned stripes after the run")?;
    regions.push((0, got));

    // Storm clusters: exact.
    let rounds = cfg.rounds as u64;
    let mut want = l.initial(l.storm, rounds * cs);
    for round in 0..cfg.rounds {
        let plan = storm_plan(cfg, round);
        let base = l.storm + round as u64 * cs;
        for t in 0..l.n {
            let (a, b) = (plan.cuts[t], plan.cuts[t + 1]);
            if plan.writes[t] && b > a {
                let rel = (base - l.storm + a) as usize;
                fill_pat(
                    stag(t, round),
                    base + a,
                    &mut want[rel..rel + (b - a) as usize],
                );
            }
        }
    }
    let got = read(l.storm, rounds * cs)?;
    diff(&got, &want, l.storm, "storm clusters after the run")?;
    regions.push((l.storm, got));

    // Overlap clusters: per byte, the data of a covering writer, else initial.
    let got = read(l.overlap, rounds * cs)?;
    for round in 0..cfg.rounds {
        let plan = storm_plan(cfg, round);
        let base = l.overlap + round as u64 * cs;
        for rel in 0..cs {
            let pos = base + rel;
            let v = got[(pos - l.overlap) as usize];
            let covering: Vec<usize> = (0..l.n)
                .filter(|&u| matches!(plan.overlap[u], Some((o, n)) if rel >= o && rel < o + n))
                .collect();
            let ok = if covering.is_empty() {
                v == l.initial_byte(pos)
            } else {
                covering.iter().any(|&u| pat_byte(ctag(u), pos) == v)
            };
            if !ok {
                return Err(format!(
                    "overlap cluster of round {round} after the run: byte at {pos:#x} is {v:#04x}; written by threads {covering:?} (initial {:#04x})",
                    l.initial_byte(pos)
                ));
            }
        }
    }
    regions.push((l.overlap, got));

    // Contested: the last value some thread left there.
    let got = read(l.contested, l.contested_len)?;
    for (i, &v) in got.iter().enumerate() {
        let pos = l.contested + i as u64;
        let mut any = false;
        let mut ok = false;
        for (t, out) in outs.iter().enumerate() {
            match out.contested[i] {
                1 => {
                    any = true;
                    ok |= pat_byte(ctag(t), pos) == v;
                }
                2 => {
                    any = true;
                    ok |= v == 0;
                }
                _ => {}
            }
        }
        if !any {
            ok = v == l.initial_byte(pos);
        }
        if !ok {
            let states: Vec<u8> = outs.iter().map(|o| o.contested[i]).collect();
            return Err(format!(
                "contested byte at {pos:#x} is {v:#04x}; last op of each thread there (0 none, 1 data, 2 zeros): {states:?}; initial {:#04x}",
                l.initial_byte(pos)
            ));
        }
    }
    regions.push((l.contested, got));
    debug_assert!(regions
        .iter()
        .all(|(o, _)| !l.in_contested(*o) || *o == l.contested));
    Ok(regions)
}

fn write_raw_reference(path: &Path, l: &Layout, regions: &[(u64, Vec<u8>)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create raw reference");
    f.set_len(l.vsize).unwrap();
    for &(o, n, v) in &l.backing_ranges {
        if v != 0 {
            f.write_all_at(&vec![v; n as usize], o).unwrap();
        }
    }
    for (o, d) in regions {
        f.write_all_at(d, *o).unwrap();
    }
}

fn run_stress(cfg: Cfg) {
    let what = format!("stress {cfg:?} (replay: OXCOW_STRESS_SEED={:#x})", cfg.seed);
    eprintln!("{what}");
    let _dog = Watchdog::new(what.clone(), Duration::from_secs(300));
    let t0 = Instant::now();
    let l = Layout::new(&cfg);
    let dir = TempDir::new(&format!(
        "stress-{}t-{}k{}",
        cfg.threads,
        cfg.cluster / KIB,
        if cfg.has_backing() { "-b" } else { "" }
    ));
    let path = dir.join("top.qcow2");
    if cfg.has_backing() {
        make_backing(&dir, &cfg, &l);
    }
    oxcow::create(
        &path,
        l.vsize,
        &CreateOptions {
            cluster_size: cfg.cluster as u32,
            extended_l2: cfg.extended_l2,
            lazy_refcounts: cfg.lazy_refcounts,
            backing_file: cfg.has_backing().then(|| "backing.qcow2".to_string()),
            backing_format: cfg.has_backing().then_some(BackingFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: create: {e}"));
    let img = open_rw(&path);

    let sh = Shared {
        cfg,
        layout: &l,
        img: &img,
        barrier: Barrier::new(cfg.threads),
        failed: AtomicBool::new(false),
    };
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let outs: Vec<Option<ThreadOut>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cfg.threads)
            .map(|t| {
                let sh = &sh;
                let first_error = &first_error;
                let l = &l;
                s.spawn(move || {
                    let mut w = Worker {
                        t,
                        sh,
                        rng: Rng::new(thread_seed(cfg.seed, t)),
                        own: l
                            .stripes
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| i % cfg.threads == t)
                            .map(|(_, &(o, n))| (o, l.initial(o, n)))
                            .collect(),
                        contested: vec![0; l.contested_len as usize],
                        seq: 0,
                        log: VecDeque::new(),
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()))
                        .unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            Err(w.fail(format!("PANIC: {msg}")))
                        });
                    match r {
                        Ok(()) => Some(ThreadOut {
                            own: w.own,
                            contested: w.contested,
                        }),
                        Err(e) => {
                            let mut g = first_error.lock().unwrap();
                            if g.is_none() {
                                *g = Some(e);
                            }
                            sh.failed.store(true, Ordering::Release);
                            None
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        panic!("{what}:\n{e}");
    }
    let outs: Vec<ThreadOut> = outs.into_iter().map(Option::unwrap).collect();
    let t_run = t0.elapsed();

    let regions = verify_final(&img, &cfg, &l, &outs)
        .unwrap_or_else(|e| panic!("{what}: through the live handle: {e}"));
    img.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));

    let (code, out) = qemu_img_check(&path);
    assert_eq!(code, 0, "{what}: qemu-img check exited {code}:\n{out}");
    let raw = dir.join("model.raw");
    write_raw_reference(&raw, &l, &regions);
    let (code, out) = qemu_compare(&path, &raw);
    assert_eq!(
        code, 0,
        "{what}: qemu-img compare against the model: exit {code}\n{out}"
    );
    let img = open_ro(&path);
    for (o, d) in &regions {
        let mut got = vec![0xeeu8; d.len()];
        img.read_at(&mut got, *o)
            .unwrap_or_else(|e| panic!("{what}: read after reopen: {e}"));
        if let Err(e) = diff(&got, d, *o, "after reopen") {
            panic!("{what}: {e}");
        }
    }
    drop(img);
    eprintln!(
        "{what}: ok, run {:.2}s, total {:.2}s",
        t_run.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

#[test]
fn threads_2_clusters_64k() {
    run_stress(Cfg::new(2, 64 * KIB, 0x0002_0064));
}

#[test]
fn threads_4_clusters_64k() {
    run_stress(Cfg::new(4, 64 * KIB, 0x0004_0064));
}

#[test]
fn threads_8_clusters_64k() {
    run_stress(Cfg::new(8, 64 * KIB, 0x0008_0064));
}

#[test]
fn threads_16_clusters_64k() {
    run_stress(Cfg::new(16, 64 * KIB, 0x0016_0064));
}

#[test]
fn threads_8_clusters_4k() {
    run_stress(Cfg::new(8, 4 * KIB, 0x0008_0004));
}

#[test]
fn threads_16_clusters_4k_backing_64k() {
    run_stress(Cfg::new(16, 4 * KIB, 0x0016_0004_b064).backing(64 * KIB));
}

#[test]
fn threads_4_clusters_64k_backing_4k() {
    run_stress(Cfg::new(4, 64 * KIB, 0x0004_0064_b004).backing(4 * KIB));
}

#[test]
fn threads_8_clusters_64k_backing_64k() {
    run_stress(Cfg::new(8, 64 * KIB, 0x0008_0064_b064).backing(64 * KIB));
}

#[test]
fn threads_8_extended_l2_clusters_64k_backing() {
    run_stress(
        Cfg::new(8, 64 * KIB, 0x0008_e264_b064)
            .extended_l2()
            .backing(64 * KIB),
    );
}

#[test]
fn threads_4_extended_l2_clusters_32k() {
    run_stress(Cfg::new(4, 32 * KIB, 0x0004_e232).extended_l2());
}

#[test]
fn threads_8_lazy_refcounts_clusters_4k() {
    run_stress(Cfg::new(8, 4 * KIB, 0x0008_1a2e_0004).lazy());
}

/// Random configurations and seeds for `OXCOW_STRESS_SECONDS` seconds (default 60), for local
/// soak runs: `cargo test --release --test stress soak -- --ignored`.
#[test]
#[ignore = "soak mode: run with --ignored (OXCOW_STRESS_SECONDS sets the duration)"]
fn soak() {
    let secs = std::env::var("OXCOW_STRESS_SECONDS")
        .ok()
        .and_then(|s| parse_u64(&s))
        .unwrap_or(60);
    let t0 = Instant::now();
    let mut r = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut runs = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let threads = [2, 4, 8, 16, 32][r.below(5) as usize];
        let cluster = [4, 16, 32, 64, 128][r.below(5) as usize] * KIB;
        let mut cfg = Cfg::new(threads, cluster, r.next_u64());
        if cluster >= 16 * KIB && r.chance(30) {
            cfg = cfg.extended_l2();
        }
        if r.chance(25) {
            cfg = cfg.lazy();
        }
        if r.chance(50) {
            cfg = cfg.backing([4, 64][r.below(2) as usize] * KIB);
        }
        run_stress(cfg);
        runs += 1;
    }
    eprintln!("soak: {runs} runs in {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Flush racing writes, checked by killing a writer process
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Focused leak checks: one kind of concurrency each, then a clean close must leave
// `qemu-img check` at 0 (no leaked cluster)
// ---------------------------------------------------------------------------------------------

fn leak_check(
    tag: &str,
    threads: usize,
    cluster: u64,
    body: impl Fn(&Image, usize, &mut Rng) + Sync,
) {
    let seed = seed_override().unwrap_or(0x1ea_0000 + threads as u64);
    let what = format!("{tag}, {threads} threads (replay: OXCOW_STRESS_SEED={seed:#x})");
    let _dog = Watchdog::new(what.clone(), Duration::from_secs(120));
    let dir = TempDir::new(&format!("stress-leak-{tag}"));
    let p = dir.join("leak.qcow2");
    oxcow::create(
        &p,
        64 * cluster * 64,
        &CreateOptions {
            cluster_size: cluster as u32,
            ..Default::default()
        },
    )
    .expect("create");
    let img = open_rw(&p);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (img, body) = (&img, &body);
            s.spawn(move || body(img, t, &mut Rng::new(thread_seed(seed, t))));
        }
    });
    img.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
    let (code, out) = qemu_img_check(&p);
    assert_eq!(code, 0, "{what}: qemu-img check exited {code}:\n{out}");
}

/// All threads allocate slices of the same new clusters at once (no discards).
#[test]
fn leak_free_concurrent_allocation_of_shared_new_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("alloc", 16, 65536, |img, t, _| {
            for c in 0..64u64 {
                let off = c * 65536 + t as u64 * 4096;
                img.write_at(&pat(otag(t, c), off, 4096), off)
                    .expect("write");
            }
        });
    }
}

/// Threads write and discard their own clusters (allocate, free, reallocate), flushing now
/// and then.
#[test]
fn leak_free_discard_and_reallocate_own_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("discard-own", 16, 65536, |img, t, r| {
            for i in 0..60u64 {
                let c = t as u64 * 4 + r.below(4);
                let off = c * 65536;
                match r.below(4) {
                    0 => img.discard(off, 65536).expect("discard"),
                    1 => img
                        .write_zeroes(off, 65536, ZeroFlags { may_unmap: true })
                        .expect("zero"),
                    _ => img
                        .write_at(&pat(otag(t, i), off, 65536), off)
                        .expect("write"),
                }
                if i % 16 == 15 {
                    img.flush().expect("flush");
                }
            }
        });
    }
}

/// All threads write, zero and discard the same few clusters.
#[test]
fn leak_free_discard_racing_writes_on_shared_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("discard-shared", 16, 65536, |img, t, r| {
            for i in 0..60u64 {
                let c = r.below(4);
                let off = c * 65536 + r.below(16) * 4096;
                match r.below(5) {
                    0 => img.discard(c * 65536, 65536).expect("discard"),
                    1 => img
                        .write_zeroes(c * 65536, 65536, ZeroFlags { may_unmap: true })
                        .expect("zero"),
                    2 => img.flush().expect("flush"),
                    _ => img
                        .write_at(&pat(otag(t, i), off, 4096), off)
                        .expect("write"),
                }
            }
        });
    }
}
