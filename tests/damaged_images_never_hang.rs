//! Watchdog tests: damaged images never hang, never panic, and fail only with clean errors.
//!
//! Each damaged image is built with qemu-img/qemu-io plus byte pokes, then every operation a
//! hypervisor or a repair tool would run on it (open RO and RW, reads across the disk,
//! allocating writes, flush, close, check, check -r all) runs in a **child process** (this test
//! binary re-executed with `OXCOW_DAMAGED_STEP` set) under a watchdog: a loop that never ends is
//! killed and reported as a failure instead of hanging the test run, and a spinning thread
//! cannot steal the machine from the cases that follow.
//!
//! The oracle is QEMU 10.0.2 on the same image: each case records what `qemu-io` and
//! `qemu-img check [-r all]` did (observed on this machine), and QEMU's own repair is re-run live
//! so that "oxcow's repair leaves an image `qemu-img check` accepts" is demanded exactly where
//! QEMU's repair manages it too.

mod common;

use common::*;
use oxcow::{CheckFix, Image, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Per-step watchdog: every step finishes in well under a second on a 64 MiB image.
const WATCHDOG: Duration = Duration::from_secs(8);
const STEP_ENV: &str = "OXCOW_DAMAGED_STEP";

const EIO: i32 = 5;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const ENOTSUP: i32 = 95;
const EUCLEAN: i32 = 117;
const ENOMEDIUM: i32 = 123;
/// The errors a damaged image may cause.
const CLEAN_ERRNOS: [i32; 5] = [EIO, EUCLEAN, EINVAL, ENOTSUP, ENOSPC];

const COPIED: u64 = 1 << 63;
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 2;

// ---------------------------------------------------------------------------------------------
// Child side: one step on one image, reported line by line on stdout.
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the entry point of the child processes (a no-op otherwise).
#[test]
fn child_step_entry() {
    let Ok(spec) = std::env::var(STEP_ENV) else {
        return;
    };
    let (step, path) = spec.split_once(':').expect("step:path");
    let path = PathBuf::from(path);
    // The harness prints "test child_step_entry ... " without a newline: start afresh.
    println!();
    match step {
        "ro" => step_ro(&path),
        "rw" => step_rw(&path),
        "write_once" => step_write_once(&path),
        "check" => report(
            "check",
            Image::check_path(&path, CheckFix::None, false, None),
        ),
        "repair" => report(
            "repair",
            Image::check_path(&path, CheckFix::All, false, None),
        ),
        other => panic!("unknown step {other}"),
    }
    println!("@@DONE");
}

fn say<T>(op: &str, r: &oxcow::Result<T>) {
    match r {
        Ok(_) => println!("@@OP {op} ok"),
        Err(e) => println!(
            "@@OP {op} err {} {}",
            e.errno(),
            e.to_string().replace('\n', " ")
        ),
    }
}

fn report(op: &str, r: oxcow::Result<oxcow::CheckReport>) {
    say(op, &r);
    if let Ok(rep) = r {
        println!("@@REPORT {}", rep.exit_code());
    }
}

/// Reads the whole disk in 1 MiB requests (every one is attempted: damage in one place must
/// not stop the rest from being served).
fn read_across(img: &Image) {
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < img.virtual_size() {
        let n = (img.virtual_size() - off).min(MIB) as usize;
        say(&format!("read@{off:#x}"), &img.read_at(&mut buf[..n], off));
        off += n as u64;
    }
}

fn step_ro(path: &Path) {
    let img = Image::open(path, &OpenOptions::default());
    say("open_ro", &img);
    let Ok(img) = img else { return };
    read_across(&img);
    say("check_handle", &img.check(CheckFix::None, None));
    say("close", &img.close());
}

fn step_rw(path: &Path) {
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = Image::open(path, &opts);
    say("open_rw", &img);
    let Ok(img) = img else { return };
    read_across(&img);
    // Allocating writes: a whole cluster at 0 (over the damage in most cases), one in an
    // untouched L2 range, and an unaligned one that needs copy-on-write.
    let data = vec![0x5au8; 65536];
    say("write@0", &img.write_at(&data, 0));
    say("write@48M", &img.write_at(&data, 48 * MIB));
    say(
        "write@17M+512",
        &img.write_at(&data[..4096], 17 * MIB + 512),
    );
    say("flush", &img.flush());
    read_across(&img);
    say("close", &img.close());
}

fn step_write_once(path: &Path) {
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = Image::open(path, &opts).expect("open rw");
    // 48M is unallocated: the write needs a new L2 table and a data cluster.
    say("write@48M", &img.write_at(&[0x5au8; 65536], 48 * MIB));
    say("close", &img.close());
}

// ---------------------------------------------------------------------------------------------
// Parent side: run a step under the watchdog and judge its output.
// ---------------------------------------------------------------------------------------------

/// One operation's outcome: Ok, or the errno and message it failed with.
type OpResult = Result<(), (i32, String)>;

/// What one step printed: (op, outcome) in order, plus the check exit code.
struct StepOut {
    ops: Vec<(String, OpResult)>,
    report: Option<u8>,
}

impl StepOut {
    fn errnos(&self, prefix: &str) -> Vec<i32> {
        self.ops
            .iter()
            .filter(|(op, _)| op.starts_with(prefix))
            .filter_map(|(_, r)| r.as_ref().err().map(|e| e.0))
            .collect()
    }
}

/// Runs `step` on `image` in a child process, killing it after [`WATCHDOG`]. Panics on a
/// hang, a panic (or any abnormal exit) and on an error outside [`CLEAN_ERRNOS`]
/// (-ENOMEDIUM is accepted only after an EIO fenced the handle).
fn run_step(case: &str, step: &str, image: &Path) -> StepOut {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "child_step_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STEP_ENV, format!("{step}:{}", image.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait child") {
            break s;
        }
        if started.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{case}/{step}: HANG: did not finish within {WATCHDOG:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(
        status.success() && out.contains("@@DONE"),
        "{case}/{step}: child failed ({status}), a panic?\nstdout:\n{out}\nstderr:\n{err}"
    );
    let mut res = StepOut {
        ops: Vec::new(),
        report: None,
    };
    let mut fenced = false;
    for line in out.lines() {
        let line = line.find("@@").map_or("", |i| &line[i + 2..]);
        if let Some(code) = line.strip_prefix("REPORT ") {
            res.report = Some(code.parse().expect("report code"));
        }
        let Some(rest) = line.strip_prefix("OP ") else {
            continue;
        };
        let mut it = rest.splitn(4, ' ');
        let op = it.next().unwrap_or_default().to_string();
        if it.next() == Some("ok") {
            res.ops.push((op, Ok(())));
            continue;
        }
        let errno: i32 = it.next().and_then(|e| e.parse().ok()).expect("errno");
        let msg = it.next().unwrap_or_default().to_string();
        let clean = CLEAN_ERRNOS.contains(&errno) || (errno == ENOMEDIUM && fenced);
        assert!(
            clean,
            "{case}/{step}: {op} failed with errno {errno}: {msg}"
        );
        fenced |= errno == EIO;
        res.ops.push((op, Err((errno, msg))));
    }
    res
}

/// `qemu-img check` exit code, or None when qemu-img cannot open the image at all.
fn qemu_check_code(path: &Path) -> Option<i32> {
    let o = run("qemu-img", &["check", "-f", "qcow2", path_str(path)]);
    let cannot_open = o.code == 1 && o.all().contains("Could not open");
    (!cannot_open).then_some(o.code)
}

fn copy(src: &Path, dst: &Path) -> PathBuf {
    std::fs::copy(src, dst).expect("copy image");
    dst.to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

/// A 64 MiB image with data in guest [0, 128k) and [32M, 32M+64k). With 64 KiB clusters the
/// layout is: header 0x0, refcount table 0x10000, refcount block 0x20000, L1 0x30000, L2
/// 0x40000, data 0x50000..0x80000.
fn base(dir: &TempDir, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(&format!("{name}.qcow2"));
    qemu_create(&p, 64 * MIB, opts);
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 128k".into(),
            "write -P 0x22 32M 64k".into(),
        ],
    );
    p
}

/// 512-byte clusters and 1 MiB of data: ten refcount blocks of 256 clusters each.
fn multiblock(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(&format!("{name}.qcow2"));
    qemu_create(&p, 64 * MIB, "cluster_size=512");
    qemu_io(
        &p,
        &["write -P 0x11 0 1M".into(), "write -P 0x22 32M 64k".into()],
    );
    p
}

fn cluster_size(p: &Path) -> u64 {
    1 << be32(p, 20)
}
fn l1_off(p: &Path) -> u64 {
    be64(p, 40)
}
fn rt_off(p: &Path) -> u64 {
    be64(p, 48)
}
fn rb0_off(p: &Path) -> u64 {
    be64(p, rt_off(p)) & !0x1ff
}
fn l2_off(p: &Path) -> u64 {
    be64(p, l1_off(p)) & 0x00ff_ffff_ffff_fe00
}
fn put64(p: &Path, off: u64, v: u64) {
    poke(p, off, &v.to_be_bytes());
}
fn zero_cluster(p: &Path, off: u64) {
    poke(p, off, &vec![0u8; cluster_size(p) as usize]);
}
fn set_dirty(p: &Path) {
    put64(p, H_INCOMPAT, be64(p, H_INCOMPAT) | INCOMPAT_DIRTY);
}

/// One damaged image and what QEMU does with it.
struct Case {
    name: &'static str,
    build: fn(&TempDir, &'static str) -> PathBuf,
    /// `qemu-io -c 'write -P 0x5a 0 64k' -c 'write -P 0x5b 48M 64k'` fails with EIO (and
    /// marks the image corrupt): oxcow's allocating writes must fail too, never succeed
    /// silently on top of the contradiction.
    qemu_write_fails: bool,
}

/// The corpus. Each entry's comment is QEMU 10.0.2's behaviour on the same image
/// (`qemu-io -r -c 'read 0 64M'`, the writes above, `qemu-img check`, `check -r all`).
fn corpus() -> Vec<Case> {
    vec![
        // Reads fine. check: exit 2 ("ERROR cluster 5 refcount=0 reference=1", OFLAG_COPIED).
        // Write: EIO, "Marking image as corrupt: Preventing invalid write on metadata
        // (overlaps with refcount table)". check -r all: "Rebuilding refcount structure",
        // exit 0.
        Case {
            name: "reftable_entry0_zero",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, rt_off(&p), 0);
                p
            },
            qemu_write_fails: true,
        },
        // 512-byte clusters, whole refcount table zeroed. Reads fine; check exit 2; write
        // EIO (overlaps with refcount table); check -r all rebuilds, exit 0.
        Case {
            name: "reftable_all_zero",
            build: |d, n| {
                let p = multiblock(d, n);
                poke(
                    &p,
                    rt_off(&p),
                    &vec![0u8; (cluster_size(&p) * be32(&p, 56) as u64) as usize],
                );
                p
            },
            qemu_write_fails: true,
        },
        // 512-byte clusters, entry 1 zeroed (its 256 clusters hold L2 tables and data).
        // Reads fine; check exit 2; write EIO (overlaps with active L2 table); -r all exit 0.
        Case {
            name: "reftable_entry1_zero_multiblock",
            build: |d, n| {
                let p = multiblock(d, n);
                put64(&p, rt_off(&p) + 8, 0);
                p
            },
            qemu_write_fails: true,
        },
        // Refcount block 0 "at the header": offset field 0 (an offset of 0 is what the spec
        // calls "no block"), with reserved bit 8 set so the entry is not plain empty.
        // QEMU ignores the reserved bit at runtime: same as entry 0 zeroed (write EIO,
        // overlaps with refcount table); -r all rebuilds, exit 0.
        Case {
            name: "refblock_at_header",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, rt_off(&p), 0x100);
                p
            },
            qemu_write_fails: true,
        },
        // Refcount block 0 is the L1 table. Reads fine; check exit 2; write EIO (overlaps
        // with refcount table); -r all rebuilds, exit 0.
        Case {
            name: "refblock_at_l1",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, rt_off(&p), l1_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // Refcount table entry 0 points at the table itself. Reads fine; check exit 2; write
        // EIO (overlaps with qcow2_header); -r all rebuilds, exit 0.
        Case {
            name: "reftable_points_at_itself",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, rt_off(&p), rt_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // L1 entry with offset 0 (the header) and COPIED. qemu-io reads zeros; the write
        // ABORTS qemu-io ("qcow2_cache_do_get: Assertion `offset != 0' failed"). check reads
        // the header as an L2 table, exit 2; check -r all fails with "ERROR: Overlap check
        // failed", exit 1 (and leaves the image marked corrupt).
        Case {
            name: "l1_at_header",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l1_off(&p), COPIED);
                p
            },
            qemu_write_fails: false,
        },
        // L1 entry points at the refcount table. Reads (the table as an L2) fine; check exit
        // 2; write EIO (overlaps with refcount table), then ENOMEDIUM; -r all exit 0.
        Case {
            name: "l1_at_reftable",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l1_off(&p), COPIED | rt_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // Unaligned L1 entry. Read: EIO "L2 table offset 0x40200 unaligned (L1 index: 0)"
        // (non-fatal, read-only); write EIO + marked corrupt; check exit 2; -r all cannot fix
        // the L1 entry: exit 2.
        Case {
            name: "l1_unaligned",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l1_off(&p), COPIED | (l2_off(&p) + 0x200));
                p
            },
            qemu_write_fails: true,
        },
        // L1 entry 4 GiB past the end of the file. Reads zeros; the writes succeed (QEMU
        // writes into the L2 "table" at 4 GiB and grows the file); check exit 2 ("region
        // exceeding the end of the file"); -r all exit 2.
        Case {
            name: "l1_past_eof",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l1_off(&p), COPIED | (1 << 32));
                p
            },
            qemu_write_fails: false,
        },
        // L2 entry with offset 0 and COPIED: QEMU treats it as unallocated. Reads zeros,
        // writes succeed, check exit 3 (the old data cluster leaks); -r all exit 0.
        Case {
            name: "l2_at_header",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l2_off(&p), COPIED);
                p
            },
            qemu_write_fails: false,
        },
        // L2 entry 0 points at its own table. Reads the table as data; write EIO (overlaps
        // with active L2 table), then ENOMEDIUM; check exit 2; -r all exit 0.
        Case {
            name: "l2_at_itself",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l2_off(&p), COPIED | l2_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // L2 entry 4 GiB past the end of the file. Reads zeros; writes succeed (in place at
        // 4 GiB, the file grows); check exit 2; -r all exit 2.
        Case {
            name: "l2_past_eof",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l2_off(&p), COPIED | (1 << 32));
                p
            },
            qemu_write_fails: false,
        },
        // Every refcount 0 (the block zeroed). Reads fine; check exit 2; write EIO (overlaps
        // with qcow2_header); -r all rebuilds, exit 0.
        Case {
            name: "all_refcounts_zero",
            build: |d, n| {
                let p = base(d, n, "");
                zero_cluster(&p, rb0_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // The refcount table moved to the end of the file and declared 2 clusters long: the
        // second lies past EOF (and the moved table's own cluster has refcount 0). Reads
        // fine; check exit 2 (region exceeding the end of the file); write EIO (overlaps with
        // refcount table); -r all exit 2.
        Case {
            name: "reftable_truncated_by_eof",
            build: |d, n| {
                let p = base(d, n, "");
                let end = std::fs::metadata(&p).expect("stat").len();
                let table = peek(&p, rt_off(&p), cluster_size(&p) as usize);
                poke(&p, end, &table);
                put64(&p, 48, end);
                poke(&p, 56, &2u32.to_be_bytes());
                p
            },
            qemu_write_fails: true,
        },
        // refcount_bits=1, block zeroed. check exit 2; write EIO (overlaps with
        // qcow2_header); -r all exit 0.
        Case {
            name: "order0_refblock_zero",
            build: |d, n| {
                let p = base(d, n, "refcount_bits=1");
                zero_cluster(&p, rb0_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // refcount_bits=1, table entry 0 zeroed. Write EIO (overlaps with refcount table);
        // -r all exit 0.
        Case {
            name: "order0_reftable_entry0_zero",
            build: |d, n| {
                let p = base(d, n, "refcount_bits=1");
                put64(&p, rt_off(&p), 0);
                p
            },
            qemu_write_fails: true,
        },
        // refcount_bits=64, block zeroed. Write EIO (overlaps with qcow2_header); -r all 0.
        Case {
            name: "order6_refblock_zero",
            build: |d, n| {
                let p = base(d, n, "refcount_bits=64");
                zero_cluster(&p, rb0_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // refcount_bits=64, block 0 is the L1 table. Write EIO (overlaps with refcount
        // table); -r all exit 0.
        Case {
            name: "order6_refblock_at_l1",
            build: |d, n| {
                let p = base(d, n, "refcount_bits=64");
                put64(&p, rt_off(&p), l1_off(&p));
                p
            },
            qemu_write_fails: true,
        },
        // Lazy refcounts, dirty bit set, block zeroed. A RW open repairs first ("Rebuilding
        // refcount structure"): the writes succeed and check is then clean (exit 0). Plain
        // check on the damaged image: exit 2; -r all exit 0.
        Case {
            name: "lazy_dirty_refblock_zero",
            build: |d, n| {
                let p = base(d, n, "lazy_refcounts=on");
                zero_cluster(&p, rb0_off(&p));
                set_dirty(&p);
                p
            },
            qemu_write_fails: false,
        },
        // Lazy refcounts, dirty, table entry 0 zeroed: same as above (repair on open).
        Case {
            name: "lazy_dirty_reftable_entry0_zero",
            build: |d, n| {
                let p = base(d, n, "lazy_refcounts=on");
                put64(&p, rt_off(&p), 0);
                set_dirty(&p);
                p
            },
            qemu_write_fails: false,
        },
        // A compressed L2 entry (guest 1M) whose data is the header. Read: EIO (the header
        // does not inflate); writes elsewhere succeed; check exit 2 ("ERROR cluster 0
        // refcount=1 reference=2"); -r all raises the refcount, exit 0.
        Case {
            name: "compressed_at_header",
            build: |d, n| {
                let p = base(d, n, "");
                put64(&p, l2_off(&p) + 16 * 8, (1 << 62) | (3 << 54) | 0x10);
                p
            },
            qemu_write_fails: false,
        },
    ]
}

/// A repair may switch the refcount table (bytes 48..60) and clear feature bits (72..96);
/// every other byte of the header cluster must survive it, whatever a damaged table claims
/// lives there (QEMU's overlap check stops such writes: "ERROR: Overlap check failed").
fn assert_header_kept(name: &str, before: &Path, after: &Path) {
    let cs = cluster_size(before) as usize;
    let (a, b) = (peek(before, 0, cs), peek(after, 0, cs));
    let changed: Vec<usize> = (0..cs)
        .filter(|&i| a[i] != b[i] && !(48..60).contains(&i) && !(72..96).contains(&i))
        .collect();
    assert!(
        changed.is_empty(),
        "{name}: oxcow's check -r all wrote into the header at bytes {changed:?}"
    );
}

/// Runs every step on one case and judges it against QEMU.
fn exercise(dir: &TempDir, case: &Case) -> String {
    let name = case.name;
    let image = (case.build)(dir, name);
    let ro = run_step(name, "ro", &copy(&image, &dir.join(&format!("{name}.ro"))));
    let rw_path = copy(&image, &dir.join(&format!("{name}.rw")));
    let rw = run_step(name, "rw", &rw_path);
    if case.qemu_write_fails {
        // The refusal may come at plan time, or at the flush that writes the metadata back.
        let write_errs = ["open_rw", "write@", "flush"]
            .iter()
            .map(|p| rw.errnos(p).len())
            .sum::<usize>();
        assert!(
            write_errs > 0,
            "{name}: QEMU refuses these writes with EIO, oxcow accepted all of them: {:?}",
            rw.ops
        );
    }
    // A handle that fenced itself marked the image corrupt on disk (a writable image).
    if rw.errnos("write@").first() == Some(&EIO) || rw.errnos("flush").first() == Some(&EIO) {
        let bits = be64(&rw_path, H_INCOMPAT);
        assert!(
            bits & INCOMPAT_CORRUPT != 0,
            "{name}: a write failed with EIO but the image is not marked corrupt"
        );
    }
    let check = run_step(
        name,
        "check",
        &copy(&image, &dir.join(&format!("{name}.chk"))),
    );
    // The oracle for repair: QEMU's own `check -r all` on the same damage.
    let theirs = copy(&image, &dir.join(&format!("{name}.qemu-r")));
    let _ = run(
        "qemu-img",
        &["check", "-r", "all", "-f", "qcow2", path_str(&theirs)],
    );
    let qemu_repairs = matches!(qemu_check_code(&theirs), Some(0 | 3));
    let ours = copy(&image, &dir.join(&format!("{name}.oxcow-r")));
    let repair = run_step(name, "repair", &ours);
    assert_header_kept(name, &image, &ours);
    let after = qemu_check_code(&ours);
    if matches!(repair.report, Some(0 | 3)) {
        assert!(
            matches!(after, None | Some(0 | 3)),
            "{name}: oxcow's check -r all reported success but qemu-img check exits {after:?}"
        );
    }
    if qemu_repairs {
        assert!(
            matches!(after, Some(0 | 3)),
            "{name}: qemu-img check -r all repairs this image, oxcow's repair leaves qemu-img check at {after:?} (report {:?})",
            repair.report
        );
    }
    let summary = |s: &StepOut| {
        let errs = s.ops.iter().filter(|o| o.1.is_err()).count();
        format!("{}/{} failed", errs, s.ops.len())
    };
    format!(
        "{name}: ro {} | rw {} | check {:?} | repair {:?} -> qemu-img check {after:?} (qemu's repair clean: {qemu_repairs})",
        summary(&ro),
        summary(&rw),
        check.report,
        repair.report
    )
}

#[test]
fn damaged_images_never_hang_panic_or_fail_uncleanly() {
    if std::env::var_os(STEP_ENV).is_some() {
        return;
    }
    let dir = TempDir::new("damaged");
    let mut failures = Vec::new();
    let cases = corpus();
    for case in &cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(&dir, case)));
        match r {
            Ok(line) => eprintln!("{line}"),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(msg);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} damaged images misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The original hang (issue 15): refcount table entry 0 zeroed, then an allocating write.
/// The new refcount block's home is cluster 0, the header; the write used to loop forever in
/// `Refcounts::alloc`. QEMU fails the same write with EIO and marks the image corrupt
/// ("Preventing invalid write on metadata (overlaps with refcount table)"); `qemu-img check
/// -r all` then rebuilds the refcount structure (exit 0).
#[test]
fn allocating_write_on_zeroed_reftable_entry_fails_fast_and_is_repairable() {
    if std::env::var_os(STEP_ENV).is_some() {
        return;
    }
    let dir = TempDir::new("hang15");
    let image = base(&dir, "orig", "");
    put64(&image, rt_off(&image), 0);
    let out = run_step("hang15", "write_once", &image);
    assert_eq!(out.errnos("write@48M"), vec![EIO], "{:?}", out.ops);
    assert!(
        be64(&image, H_INCOMPAT) & INCOMPAT_CORRUPT != 0,
        "the image must be marked corrupt"
    );
    // Both repair tools bring it back, and the repaired image takes writes again.
    let theirs = copy(&image, &dir.join("qemu.qcow2"));
    let o = run(
        "qemu-img",
        &["check", "-r", "all", "-f", "qcow2", path_str(&theirs)],
    );
    assert_eq!(o.code, 0, "qemu-img check -r all:\n{}", o.all());
    let rep = run_step("hang15", "repair", &image);
    assert_eq!(rep.report, Some(0), "{:?}", rep.ops);
    assert_eq!(qemu_check_code(&image), Some(0));
    assert_eq!(be64(&image, H_INCOMPAT) & INCOMPAT_CORRUPT, 0);
    let rw = run_step("hang15", "rw", &image);
    assert!(rw.ops.iter().all(|o| o.1.is_ok()), "{:?}", rw.ops);
    assert_eq!(qemu_check_code(&image), Some(0));
    let mut buf = vec![0u8; 65536];
    let img = open_ro(&image);
    img.read_at(&mut buf, 32 * MIB).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0x22),
        "data at 32M survived the repair"
    );
    img.read_at(&mut buf, 0).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "the write after the repair landed"
    );
}
