//! Crash and I/O-error consistency, with the host file simulated in memory
//! ([`crate::storage::sim::SimFile`]): for every crash point of a workload's write-back (every
//! prefix of the writes since the last durable state, and reorderings of the writes between two
//! syncs) and for an I/O error injected at every write, the file afterwards must pass
//! `qemu-img check` with at worst leaks (exit 0 or 3, never 2) and every byte acknowledged by a
//! completed flush must read back. A lazy-refcounts image must come back clean after the
//! read-write open that repairs it.

use super::Image;
use crate::storage::sim::{apply, Event, SimFile};
use crate::storage::HostFile;
use crate::{CreateOptions, OpenOptions, ZeroFlags};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

// The simulated-file scaffolding below is shared with the crash tests of the bitmap and
// snapshot operations (engine::bitmap::crash_tests, engine::snapshot::crash_tests).

/// A scratch directory, removed on drop; `tag` names it and must be unique in the process.
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("oxcow-crash-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift: deterministic workloads without a dependency.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(super) const SIZE: u64 = 4 << 20;

/// Read-write open options.
pub(super) fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// A fresh 4 MiB image on a real file, opened read-write, in the scratch directory `tag`
/// names (unique in the process; removed when the returned [`Scratch`] is dropped).
pub(super) fn scratch_image(tag: &str) -> (Scratch, Image) {
    let dir = Scratch::new(tag);
    let path = dir.0.join("image.qcow2");
    crate::create(&path, SIZE, &CreateOptions::default()).expect("create");
    let img = Image::open(&path, &rw()).expect("open");
    (dir, img)
}

/// Opens `bytes` read-write as an image on a simulated host file named `path`.
pub(super) fn open_sim(bytes: Vec<u8>, path: &Path) -> (Arc<SimFile>, Image) {
    open_sim_with(bytes, path, &rw())
}

/// Opens `bytes` as an image on a simulated host file named `path` with `opts`.
pub(super) fn open_sim_with(
    bytes: Vec<u8>,
    path: &Path,
    opts: &OpenOptions,
) -> (Arc<SimFile>, Image) {
    let sim = Arc::new(SimFile::new(bytes));
    let file = HostFile::new(sim.clone(), path.display().to_string());
    let img = Image::open_file(file, path, opts, 0).expect("open simulated image");
    (sim, img)
}

/// Read-write options with the smallest caches: two 512-byte slices of L2 and of refcounts,
/// so nearly every lookup and refcount update misses, evicts and writes back mid-request.
fn rw_two_slices() -> OpenOptions {
    OpenOptions {
        l2_cache_size: 1,
        refcount_cache_size: 1,
        l2_slice_size: 512,
        ..rw()
    }
}

/// The first `len` guest bytes of `img`.
pub(super) fn read_guest(img: &Image, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    img.read_at(&mut v, 0).expect("read guest");
    v
}

/// Guest contents plus which bytes the second phase touched.
pub(super) struct Model {
    pub(super) data: Vec<u8>,
    pub(super) touched: Vec<bool>,
}

impl Model {
    pub(super) fn write(&mut self, off: u64, buf: &[u8], phase2: bool) {
        let r = off as usize..off as usize + buf.len();
        self.data[r.clone()].copy_from_slice(buf);
        if phase2 {
            self.touched[r].fill(true);
        }
    }
    pub(super) fn zero(&mut self, off: u64, len: u64, phase2: bool) {
        let r = off as usize..(off + len) as usize;
        self.data[r.clone()].fill(0);
        if phase2 {
            self.touched[r].fill(true);
        }
    }
}

/// Random writes, compressed writes, write_zeroes and discards. Errors are returned (fault injection expects
/// them); the model records only operations that succeeded.
fn workload(img: &Image, m: &mut Model, rng: &mut Rng, n: usize, phase2: bool, cs: u64) {
    for _ in 0..n {
        let off = rng.below(SIZE - 1);
        let len = (1 + rng.below(3 * cs)).min(SIZE - off);
        // Mark the range touched first: a failed operation may have changed it partly.
        if phase2 {
            m.touched[off as usize..(off + len) as usize].fill(true);
        }
        match rng.below(10) {
            0 => {
                if img
                    .write_zeroes(off, len, ZeroFlags { may_unmap: true })
                    .is_ok()
                {
                    m.zero(off, len, phase2);
                }
            }
            1 => {
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if img.discard(off, len).is_ok() && a < b {
                    m.zero(a, b - a, phase2);
                }
            }
            2 => {
                // A compressed cluster: a random prefix of random length, then zeros, so the
                // compressed sizes vary and packed clusters often span two host clusters.
                let at = off / cs * cs;
                let mut buf = vec![0u8; cs as usize];
                let noisy = rng.below(cs * 3 / 4) as usize;
                for b in &mut buf[..noisy] {
                    *b = rng.next() as u8;
                }
                if phase2 {
                    m.touched[at as usize..(at + cs) as usize].fill(true);
                }
                if img.write_compressed(&buf, at).is_ok() {
                    m.write(at, &buf, phase2);
                }
            }
            _ => {
                let tag = rng.next() as u8 | 1;
                let buf: Vec<u8> = (0..len).map(|i| tag ^ (i as u8)).collect();
                if img.write_at(&buf, off).is_ok() {
                    m.write(off, &buf, phase2);
                }
            }
        }
    }
}

/// Runs `qemu-img check` on the qcow2 image at `p`: its exit code must be in `allowed`
/// (0: clean, 3: leaked clusters only).
pub(crate) fn assert_qemu_check(p: &Path, allowed: &[i32], what: &str) {
    let out = Command::new("qemu-img")
        .args([
            "check",
            "-q",
            "-f",
            "qcow2",
            p.to_str().expect("utf-8 path"),
        ])
        .output()
        .expect("qemu-img");
    let code = out.status.code().unwrap_or(-1);
    assert!(
        allowed.contains(&code),
        "{what}: qemu-img check {} exit {code}: {}{}",
        p.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks one crash state: qemu-img finds at worst leaks (after the repairing open for lazy
/// refcounts), and every byte flushed in phase one and untouched since reads back.
pub(super) fn check_state(dir: &Path, bytes: &[u8], flushed: &Model, lazy: bool, what: &str) {
    let p = dir.join("state.qcow2");
    std::fs::write(&p, bytes).expect("write state");
    if lazy {
        let img = Image::open(&p, &rw()).unwrap_or_else(|e| panic!("{what}: repairing open: {e}"));
        img.close().expect("close");
    }
    assert_qemu_check(&p, if lazy { &[0] } else { &[0, 3] }, what);
    let img = Image::open(&p, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open after crash: {e}"));
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{what}: read after crash: {e}"));
    for (i, (&g, &w)) in got.iter().zip(&flushed.data).enumerate() {
        if !flushed.touched[i] && g != w {
            panic!("{what}: flushed byte {i:#x} is {g:#x}, expected {w:#x}");
        }
    }
}

/// The file after the writes `journal[..k]` on top of `base`; `drop` removes some of the
/// writes made after the last sync before `k` (a disk may reorder them).
pub(super) fn state_at(
    base: &[u8],
    journal: &[Event],
    k: usize,
    drop: &dyn Fn(usize) -> bool,
) -> Vec<u8> {
    let last_sync = journal[..k]
        .iter()
        .rposition(|e| matches!(e, Event::Sync))
        .map_or(0, |i| i + 1);
    let mut f = base.to_vec();
    for (i, e) in journal[..k].iter().enumerate() {
        if let Event::Write(off, data) = e {
            if i < last_sync || !drop(i) {
                apply(&mut f, *off, data);
            }
        }
    }
    f
}

/// Runs `check` on the crash states of `journal` on top of `base`: about `points` prefixes
/// spread over it and the whole journal, each as written and then reordered (the writes after
/// its last sync dropped where bit `i % 64` of `mask(k)` is set). `check` gets the file and a
/// description; returns the number of states checked.
pub(super) fn each_crash_state(
    base: &[u8],
    journal: &[Event],
    points: usize,
    mut mask: impl FnMut(usize) -> u64,
    mut check: impl FnMut(&[u8], &str),
) -> usize {
    let n = journal.len();
    let step = (n / points).max(1);
    let ks = (0..=n).step_by(step).chain((n % step != 0).then_some(n));
    let mut states = 0;
    for k in ks {
        let what = format!("crash after {k}/{n} journal entries");
        check(&state_at(base, journal, k, &|_| false), &what);
        let m = mask(k);
        let reordered = state_at(base, journal, k, &|i| m >> (i % 64) & 1 == 1);
        check(&reordered, &format!("{what}, reordered"));
        states += 2;
    }
    states
}

/// What a crash right after the whole `journal` leaves: only the writes up to the last sync.
pub(super) fn durable_state(base: &[u8], journal: &[Event]) -> Vec<u8> {
    state_at(base, journal, journal.len(), &|_| true)
}

fn crash_points(tag: &str, opts: CreateOptions, seed: u64) {
    crash_points_with(tag, opts, seed, &rw());
}

fn crash_points_with(tag: &str, opts: CreateOptions, seed: u64, open: &OpenOptions) {
    let dir = Scratch::new(tag);
    let path = dir.0.join("img.qcow2");
    let cs = opts.cluster_size as u64;
    let lazy = opts.lazy_refcounts;
    crate::create(&path, SIZE, &opts).expect("create");
    let (sim, img) = open_sim_with(std::fs::read(&path).expect("read"), &path, open);
    let mut rng = Rng(seed);
    let mut m = Model {
        data: vec![0; SIZE as usize],
        touched: vec![false; SIZE as usize],
    };
    workload(&img, &mut m, &mut rng, 40, false, cs);
    img.flush().expect("flush 1");
    let base = sim.contents();
    let start = sim.journal().len();
    let flushed = Model {
        data: m.data.clone(),
        touched: vec![false; SIZE as usize],
    };
    workload(&img, &mut m, &mut rng, 40, true, cs);
    img.flush().expect("flush 2");
    if opts.version < 3 {
        assert_no_version3_header_writes(tag, &sim.journal(), cs);
    }
    let journal = sim.journal()[start..].to_vec();
    std::mem::forget(img); // the process "dies" here
    let flushed = Model {
        data: flushed.data,
        touched: m.touched.clone(),
    };
    // Every prefix, at most ~120 of them spread over the journal, plus reorderings.
    let states = each_crash_state(
        &base,
        &journal,
        120,
        |_| rng.next(),
        |bytes, what| check_state(&dir.0, bytes, &flushed, lazy, &format!("{tag}: {what}")),
    );
    // The completed second flush makes everything durable.
    let all = state_at(&base, &journal, journal.len(), &|_| false);
    let done = Model {
        data: m.data.clone(),
        touched: vec![false; SIZE as usize],
    };
    check_state(&dir.0, &all, &done, lazy, &format!("{tag}: after flush 2"));
    assert!(states > 20, "{tag}: too few crash states ({states})");
}

/// On a version-2 image, bytes 72 and up of cluster 0 hold header extensions and the backing
/// file name: no write may touch them as if they were version-3 feature fields.
fn assert_no_version3_header_writes(tag: &str, journal: &[Event], cluster_size: u64) {
    for e in journal {
        if let Event::Write(off, data) = e {
            let end = off + data.len() as u64;
            assert!(
                *off >= cluster_size || end <= 72,
                "{tag}: a write at {off:#x}..{end:#x} touches the v2 header past its fields"
            );
        }
    }
}

#[test]
fn every_crash_point_of_a_write_back_leaves_at_most_leaks_and_keeps_flushed_data() {
    crash_points(
        "c512-rc64",
        CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
        11,
    );
    crash_points(
        "c4k-extl2",
        CreateOptions {
            cluster_size: 16384,
            extended_l2: true,
            ..Default::default()
        },
        12,
    );
}

#[test]
fn every_crash_point_of_a_version_2_image_leaves_at_most_leaks_and_writes_no_v3_field() {
    crash_points(
        "v2-c4k",
        CreateOptions {
            cluster_size: 4096,
            version: 2,
            ..Default::default()
        },
        14,
    );
}

#[test]
fn every_crash_point_of_a_lazy_refcounts_image_is_repaired_by_the_next_open() {
    crash_points(
        "c4k-lazy",
        CreateOptions {
            cluster_size: 4096,
            lazy_refcounts: true,
            ..Default::default()
        },
        13,
    );
}

#[test]
fn an_io_error_at_any_write_leaves_at_most_leaks_and_keeps_flushed_data() {
    let dir = Scratch::new("eio");
    let path = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 4096,
        refcount_bits: 16,
        ..Default::default()
    };
    let cs = opts.cluster_size as u64;
    crate::create(&path, SIZE, &opts).expect("create");
    let (sim, img) = open_sim(std::fs::read(&path).expect("read"), &path);
    let mut rng = Rng(21);
    let mut m = Model {
        data: vec![0; SIZE as usize],
        touched: vec![false; SIZE as usize],
    };
    workload(&img, &mut m, &mut rng, 30, false, cs);
    img.flush().expect("flush");
    drop(img);
    let base = sim.contents();
    // How many writes the second phase makes without faults.
    let total = {
        let (sim, img) = open_sim(base.clone(), &path);
        let before = sim.journal().len();
        let mut m2 = Model {
            data: m.data.clone(),
            touched: vec![false; SIZE as usize],
        };
        workload(&img, &mut m2, &mut Rng(22), 30, true, cs);
        let _ = img.flush();
        let n = sim.journal()[before..]
            .iter()
            .filter(|e| matches!(e, Event::Write(..)))
            .count();
        std::mem::forget(img);
        n
    };
    assert!(total > 20, "too few writes to inject into ({total})");
    let step = (total / 60).max(1);
    for n in (0..total).step_by(step) {
        let (sim, img) = open_sim(base.clone(), &path);
        sim.fail_write_after(n as u64);
        let mut m2 = Model {
            data: m.data.clone(),
            touched: vec![false; SIZE as usize],
        };
        workload(&img, &mut m2, &mut Rng(22), 30, true, cs);
        let _ = img.flush();
        drop(img); // close after the error: whatever the engine writes then counts too
        let flushed = Model {
            data: m.data.clone(),
            touched: m2.touched,
        };
        let what = format!("EIO at write {n}/{total}");
        check_state(&dir.0, &sim.contents(), &flushed, false, &what);
        // And a crash right after: only what was synced.
        let durable = durable_state(&base, &sim.journal());
        check_state(
            &dir.0,
            &durable,
            &flushed,
            false,
            &format!("{what}, then a crash"),
        );
    }
}

/// Sliced caches (issue 18) under constant eviction: dirty slices are written back, in the
/// same crash-safe order, in the middle of requests; new tables and refcount blocks are
/// written whole at allocation. With lazy refcounts this found that guest data and new tables
/// must still be durable before the L2 and L1 entries that point at them.
#[test]
fn every_crash_point_with_two_slice_caches_leaves_at_most_leaks_and_keeps_flushed_data() {
    let c4k = |lazy_refcounts| CreateOptions {
        cluster_size: 4096,
        lazy_refcounts,
        ..Default::default()
    };
    crash_points_with("s512-c4k", c4k(false), 23, &rw_two_slices());
    crash_points_with("s512-c4k-lazy", c4k(true), 0x1a2e, &rw_two_slices());
    crash_points_with(
        "s512-c32k-extl2",
        CreateOptions {
            cluster_size: 32768,
            extended_l2: true,
            ..Default::default()
        },
        31,
        &rw_two_slices(),
    );
}
