//! The driver of the many-writers stress test: the worker threads (their random operations,
//! the storm at the start of each round, the checks of what they read) and `run_stress`, which
//! runs one configuration and then checks the result through the live handle, with `qemu-img
//! check`, with `qemu-img compare` against the model and through a fresh read-only open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use oxcow::{BackingFormat, CreateOptions, Image, ZeroFlags};

use super::stress::*;
use super::stress_model::*;
use super::*;

// ---------------------------------------------------------------------------------------------
// Barrier that gives up when another thread failed (a plain Barrier would hang the test)
// ---------------------------------------------------------------------------------------------

pub struct Barrier {
    pub n: usize,
    pub state: Mutex<(usize, u64)>,
    pub cv: Condvar,
}

impl Barrier {
    pub fn new(n: usize) -> Barrier {
        Barrier {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// False when `failed` was set while waiting.
    pub fn wait(&self, failed: &AtomicBool) -> bool {
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

pub struct Shared<'a> {
    pub cfg: Cfg,
    pub layout: &'a Layout,
    pub img: &'a Image,
    pub barrier: Barrier,
    pub failed: AtomicBool,
}

pub struct Worker<'a> {
    pub t: usize,
    pub sh: &'a Shared<'a>,
    pub rng: Rng,
    pub own: Vec<(u64, Vec<u8>)>,
    pub contested: Vec<u8>,
    pub seq: u64,
    pub log: VecDeque<String>,
}

pub fn sub_range(r: &mut Rng, off: u64, len: u64) -> (u64, u64) {
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
pub fn cluster_sub_range(r: &mut Rng, off: u64, len: u64, cs: u64) -> Option<(u64, u64)> {
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
    pub fn note(&mut self, s: String) {
        if self.log.len() == 12 {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    pub fn fail(&self, msg: String) -> String {
        let log: Vec<&str> = self.log.iter().map(|s| s.as_str()).collect();
        format!(
            "thread {} (seed {:#x}): {msg}\n  its last operations, oldest first:\n    {}",
            self.t,
            thread_seed(self.sh.cfg.seed, self.t),
            log.join("\n    ")
        )
    }

    pub fn io<T>(&self, what: &str, r: oxcow::Result<T>) -> Result<T, String> {
        r.map_err(|e| self.fail(format!("{what}: {e} (errno {})", e.errno())))
    }

    pub fn write(&mut self, buf: &[u8], off: u64) -> Result<(), String> {
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

    pub fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, String> {
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

    pub fn run(&mut self) -> Result<(), String> {
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
    pub fn storm(&mut self, round: usize) -> Result<(), String> {
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

    pub fn one_op(&mut self) -> Result<(), String> {
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

    pub fn contested_range(&mut self) -> (u64, u64) {
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

    pub fn set_contested(&mut self, o: u64, n: u64, v: u8) {
        let rel = (o - self.sh.layout.contested) as usize;
        self.contested[rel..rel + n as usize].fill(v);
    }
}

pub fn run_stress(cfg: Cfg) {
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
    let img = oxcow::Image::open(
        &path,
        &oxcow::OpenOptions {
            writable: true,
            discard_unmap: cfg.discard_unmap,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));

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
