//! Crash points and injected I/O errors of a commit, with both files of the chain simulated
//! in memory. The two journals are ordered by one global sequence, so that a crash at any
//! point of the commit cuts both files at the same moment (and each file may further lose
//! the writes after its own last sync). In every crash state both files pass `qemu-img check`
//! with at worst leaks, the top reads exactly as before the commit, and every byte of the base
//! reads either as before or as the top reads it. An I/O error at any write leaves the same
//! guarantees on the live handle and on disk, and a retry succeeds.

use super::backing::Backing;
use super::commit::CommitOptions;
use super::crash_tests::{read_guest, state_at, Rng, Scratch};
use super::Image;
use crate::options::BackingFormat;
use crate::storage::sim::SimFile;
use crate::storage::{Backend, HostFile, LockMode};
use crate::{CreateOptions, OpenOptions, ZeroFlags};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 2 << 20;

/// The global order of the journal entries of every file, and the write to fail.
#[derive(Default)]
struct Clock {
    next: AtomicU64,
    writes: AtomicU64,
    /// The global write number (0-based) that fails with EIO; `u64::MAX`: none.
    fail_at: AtomicU64,
}

/// A simulated file that can be reopened (nothing to do in memory) and stamps each journal
/// entry with the global clock.
struct Stamped {
    sim: SimFile,
    clock: Arc<Clock>,
    stamps: Mutex<Vec<u64>>,
}

impl Stamped {
    fn new(bytes: Vec<u8>, clock: &Arc<Clock>) -> Arc<Stamped> {
        Arc::new(Stamped {
            sim: SimFile::new(bytes),
            clock: Arc::clone(clock),
            stamps: Mutex::new(Vec::new()),
        })
    }

    fn stamp(&self) {
        let t = self.clock.next.fetch_add(1, Ordering::SeqCst);
        self.stamps.lock().expect("stamps").push(t);
    }

    /// How many journal entries happened before global time `t`.
    fn entries_before(&self, t: u64) -> usize {
        self.stamps
            .lock()
            .expect("stamps")
            .iter()
            .filter(|&&s| s < t)
            .count()
    }
}

impl Backend for Stamped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.sim.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.clock.writes.fetch_add(1, Ordering::SeqCst);
        if n == self.clock.fail_at.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.sim.write_at(buf, offset)?;
        self.stamp();
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.sim.sync()?;
        self.stamp();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.sim.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.sim.set_len(len)
    }
    fn reopen(&self, _name: &str, _writable: bool, _mode: LockMode) -> crate::Result<()> {
        Ok(())
    }
}

/// The chain on disk before the commit: base.qcow2 and top.qcow2 over it.
struct Before {
    dir: Scratch,
    base: Vec<u8>,
    top: Vec<u8>,
    /// The guest contents of the top (through the chain) and of the base.
    top_guest: Vec<u8>,
    base_guest: Vec<u8>,
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// Base data, then top writes, zeros and discards over it (cluster size `cs`).
fn build(tag: &str, cs: u32, seed: u64) -> Before {
    let dir = Scratch::new(tag);
    let (bp, tp) = (dir.0.join("base.qcow2"), dir.0.join("top.qcow2"));
    let opts = CreateOptions {
        cluster_size: cs,
        ..Default::default()
    };
    crate::create(&bp, SIZE, &opts).expect("create base");
    let top_opts = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some(BackingFormat::Qcow2),
        ..opts
    };
    crate::create(&tp, SIZE, &top_opts).expect("create top");
    let mut rng = Rng(seed);
    let base = Image::open(&bp, &rw()).expect("open base");
    base.write_at(&vec![0x11; (SIZE / 2) as usize], 0)
        .expect("base data");
    base.close().expect("close base");
    let top = Image::open(&tp, &rw()).expect("open top");
    for i in 0..24u64 {
        let off = rng.next() % (SIZE - 3 * cs as u64);
        let len = 1 + rng.next() % (3 * cs as u64);
        match i % 6 {
            0 => top.write_zeroes(off, len, ZeroFlags { may_unmap: true }),
            1 => top.discard(off, len),
            _ => top.write_at(&vec![0x20 + i as u8; len as usize], off),
        }
        .expect("top workload");
    }
    let top_guest = read_guest(&top, SIZE);
    top.close().expect("close top");
    let base_guest = read_guest(
        &Image::open(&bp, &OpenOptions::default()).expect("base"),
        SIZE,
    );
    Before {
        base: std::fs::read(&bp).expect("read base"),
        top: std::fs::read(&tp).expect("read top"),
        dir,
        top_guest,
        base_guest,
    }
}

/// The chain on simulated files: the top read-write, the base its read-only backing file.
fn open_chain(b: &Before, clock: &Arc<Clock>) -> (Arc<Stamped>, Arc<Stamped>, Image) {
    let (bp, tp) = (b.dir.0.join("base.qcow2"), b.dir.0.join("top.qcow2"));
    let base = Stamped::new(b.base.clone(), clock);
    let top = Stamped::new(b.top.clone(), clock);
    let base_file = HostFile::new(base.clone(), bp.display().to_string());
    let base_img = Image::open_file(base_file, &bp, &OpenOptions::default(), 1).expect("base");
    let top_file = HostFile::new(top.clone(), tp.display().to_string());
    let top_opts = OpenOptions {
        no_backing: true,
        ..rw()
    };
    let img = Image::open_file(top_file, &tp, &top_opts, 0).expect("top");
    img.replace_backing(Some(Backing::Qcow2(Box::new(base_img))));
    (base, top, img)
}

/// Checks one pair of files: both pass `qemu-img check` (leaks allowed), the top reads as
/// `b.top_guest`, each base byte reads as before or as the top does.
fn check_pair(b: &Before, base: &[u8], top: &[u8], what: &str) {
    let dir = b.dir.0.join("state");
    std::fs::create_dir_all(&dir).expect("state dir");
    let (bp, tp) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    std::fs::write(&bp, base).expect("write base");
    std::fs::write(&tp, top).expect("write top");
    for p in [&bp, &tp] {
        qemu_check(p, what);
    }
    let img = Image::open(&tp, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open top: {e}"));
    assert!(
        read_guest(&img, SIZE) == b.top_guest,
        "{what}: the top does not read as before the commit"
    );
    drop(img);
    let base_img = Image::open(&bp, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open base: {e}"));
    let got = read_guest(&base_img, SIZE);
    for (i, &g) in got.iter().enumerate() {
        assert!(
            g == b.base_guest[i] || g == b.top_guest[i],
            "{what}: base byte {i:#x} is {g:#x}: neither old ({:#x}) nor committed ({:#x})",
            b.base_guest[i],
            b.top_guest[i]
        );
    }
}

fn qemu_check(p: &Path, what: &str) {
    crate::engine::crash_tests::assert_qemu_check(p, &[0, 3], what);
}

fn no_fault() -> Arc<Clock> {
    let c = Arc::new(Clock::default());
    c.fail_at.store(u64::MAX, Ordering::SeqCst);
    c
}

/// The file after the journal entries before global time `t`; `drop` as in `state_at`.
fn at(before: &[u8], f: &Stamped, t: u64, drop: &dyn Fn(usize) -> bool) -> Vec<u8> {
    state_at(before, &f.sim.journal(), f.entries_before(t), drop)
}

fn crash_points(tag: &str, cs: u32, keep_top: bool) {
    let b = build(tag, cs, 5);
    let clock = no_fault();
    let (base, top, img) = open_chain(&b, &clock);
    img.commit(&CommitOptions {
        keep_top,
        ..Default::default()
    })
    .expect("commit");
    assert!(read_guest(&img, SIZE) == b.top_guest, "{tag}: live read");
    std::mem::forget(img); // the process "dies" here
    let total = clock.next.load(Ordering::SeqCst);
    assert!(total > 10, "{tag}: too few journal entries ({total})");
    // About 60 cut points spread over the global order, plus the end, each as written and
    // with some writes after each file's last sync lost.
    let mut rng = Rng(77);
    let mut states = 0;
    let step = (total / 60).max(1);
    for t in (0..=total).step_by(step as usize).chain([total]) {
        for mask in [0, rng.next()] {
            let drop = |i: usize| mask >> (i % 64) & 1 == 1;
            let bs = at(&b.base, &base, t, &drop);
            let ts = at(&b.top, &top, t, &drop);
            let what = format!("{tag}: crash at {t}/{total}, mask {mask:#x}");
            check_pair(&b, &bs, &ts, &what);
            states += 1;
        }
    }
    assert!(states > 20, "{tag}: too few crash states ({states})");
    if !keep_top {
        // After the commit the top maps nothing: everything comes from the base.
        let all_base = at(&b.base, &base, total, &|_| false);
        check_pair(
            &b,
            &all_base,
            &b.top,
            &format!("{tag}: base after, top before"),
        );
    }
}

#[test]
fn every_crash_point_of_a_commit_leaves_both_files_consistent_and_the_top_unchanged() {
    crash_points("commit-c4k", 4096, false);
    crash_points("commit-c64k-keep", 65536, true);
}

#[test]
fn an_io_error_at_any_write_of_a_commit_leaves_both_files_consistent_and_a_retry_succeeds() {
    let b = build("commit-eio", 4096, 9);
    let clock = no_fault();
    let (_, _, img) = open_chain(&b, &clock);
    img.commit(&CommitOptions::default()).expect("commit");
    let total = clock.writes.load(Ordering::SeqCst);
    drop(img);
    assert!(total > 10, "too few writes ({total})");
    let step = (total / 40).max(1);
    let mut failed = 0;
    for n in (0..total).step_by(step as usize) {
        let clock = no_fault();
        clock.fail_at.store(n, Ordering::SeqCst);
        let (base, top, img) = open_chain(&b, &clock);
        let what = format!("EIO at write {n}/{total}");
        if img.commit(&CommitOptions::default()).is_err() {
            failed += 1;
        }
        assert!(read_guest(&img, SIZE) == b.top_guest, "{what}: live read");
        check_pair(&b, &base.sim.contents(), &top.sim.contents(), &what);
        // Retry with the fault gone.
        img.commit(&CommitOptions::default())
            .unwrap_or_else(|e| panic!("{what}: retry: {e}"));
        assert!(read_guest(&img, SIZE) == b.top_guest, "{what}: after retry");
        img.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
        check_pair(
            &b,
            &base.sim.contents(),
            &top.sim.contents(),
            &format!("{what}, retried"),
        );
    }
    assert!(failed > 0, "no injected error made a commit fail");
}
