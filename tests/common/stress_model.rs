//! The model of the many-writers stress test (`stress_threads`, `stress_backing`): N threads
//! hammer ONE image handle, and every byte is checked against this model.
//!
//! The guest disk is cut into regions:
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
//! Here: the configuration, the layout of those regions, the storm plan, the checks of
//! concurrent and final reads, the backing file and the raw reference file.

use std::path::{Path, PathBuf};

use oxcow::Image;

use super::stress::*;
use super::*;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub struct Cfg {
    pub threads: usize,
    pub cluster: u64,
    pub extended_l2: bool,
    pub lazy_refcounts: bool,
    /// Overlay on a qcow2 backing file written by qemu-io (0 = no backing file).
    pub backing_cluster: u64,
    /// Open with discard_unmap: freed clusters are punched while the others run.
    pub discard_unmap: bool,
    pub rounds: usize,
    pub ops_per_round: usize,
    pub seed: u64,
}

impl Cfg {
    pub fn new(threads: usize, cluster: u64, seed: u64) -> Cfg {
        Cfg {
            threads,
            cluster,
            extended_l2: false,
            lazy_refcounts: false,
            backing_cluster: 0,
            discard_unmap: false,
            rounds: 12 * rounds_factor(),
            ops_per_round: 80,
            seed: seed_override().unwrap_or(seed),
        }
    }
    pub fn backing(mut self, cluster: u64) -> Cfg {
        self.backing_cluster = cluster;
        self
    }
    pub fn extended_l2(mut self) -> Cfg {
        self.extended_l2 = true;
        self
    }
    pub fn discard_unmap(mut self) -> Cfg {
        self.discard_unmap = true;
        self
    }
    pub fn lazy(mut self) -> Cfg {
        self.lazy_refcounts = true;
        self
    }
    pub fn has_backing(&self) -> bool {
        self.backing_cluster != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Layout {
    pub cs: u64,
    pub n: usize,
    pub vsize: u64,
    /// Owned stripes `(offset, length)`; stripe i belongs to thread i % n.
    pub stripes: Vec<(u64, u64)>,
    pub owned_end: u64,
    /// First storm cluster (one per round).
    pub storm: u64,
    /// First overlap cluster (one per round).
    pub overlap: u64,
    pub contested: u64,
    pub contested_len: u64,
    /// Backing file size (0 = no backing file) and its data: sorted, disjoint
    /// `(offset, length, byte)` ranges written by qemu-io; everything else reads as zeros.
    pub backing_len: u64,
    pub backing_ranges: Vec<(u64, u64, u8)>,
}

impl Layout {
    pub fn new(cfg: &Cfg) -> Layout {
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

    pub fn initial_byte(&self, pos: u64) -> u8 {
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

    pub fn initial(&self, off: u64, len: u64) -> Vec<u8> {
        (off..off + len).map(|p| self.initial_byte(p)).collect()
    }

    pub fn in_contested(&self, pos: u64) -> bool {
        pos >= self.contested && pos < self.contested + self.contested_len
    }
}

/// What every thread does in the storm of one round (shared, derived from the seed).
pub struct StormPlan {
    /// Thread t's slice of the storm cluster is `[cuts[t], cuts[t+1])`.
    pub cuts: Vec<u64>,
    pub writes: Vec<bool>,
    /// Thread t's range `(start, len)` in the overlap cluster, relative to its start.
    pub overlap: Vec<Option<(u64, u64)>>,
}

pub fn storm_plan(cfg: &Cfg, round: usize) -> StormPlan {
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
// Checks
// ---------------------------------------------------------------------------------------------

pub fn diff(got: &[u8], want: &[u8], off: u64, what: &str) -> Result<(), String> {
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
pub fn check_contested_read(l: &Layout, off: u64, got: &[u8]) -> Result<(), String> {
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

pub struct ThreadOut {
    /// Final model of each owned stripe.
    pub own: Vec<(u64, Vec<u8>)>,
    /// Per contested byte: 0 untouched, 1 this thread's data, 2 zeros (last op of this thread).
    pub contested: Vec<u8>,
}

pub fn make_backing(dir: &TempDir, cfg: &Cfg, l: &Layout) -> PathBuf {
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
pub fn verify_final(
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

pub fn write_raw_reference(path: &Path, l: &Layout, regions: &[(u64, Vec<u8>)]) {
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
