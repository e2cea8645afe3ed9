//! Replays every fuzzing reproducer committed under `fuzz/regressions/TARGET/` through exactly
//! the operations of the fuzz target that found it (`fuzz/src/ops.rs`, included below), each
//! under a watchdog: a panic or a hang fails the test. Reproducers of findings that are known
//! and not fixed yet live in `fuzz/regressions/pending/TARGET/` and replay only with
//! `OXCOW_FUZZ_PENDING=1` (move them up once the fix lands).
//!
//! Also compares repairs against QEMU: every check_repair reproducer and corpus image is
//! repaired by oxcow, and `qemu-img check` must not find it worse afterwards than before,
//! unless QEMU's own repair (`qemu-img check -r all`) leaves it just as bad (QEMU is the
//! oracle: e.g. both grow the file to reach refcount blocks outside the image and then fail
//! on an entry they cannot read).

mod common;

#[allow(dead_code)]
#[path = "../fuzz/src/ops.rs"]
mod ops;

use common::{run, with_timeout, TempDir};
use oxcow::{CheckFix, Image};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(60);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Replays the reproducers of `target` (and the pending ones when asked), each on a watchdog
/// thread; returns the failures.
fn replay(target: &str) {
    let mut inputs = files(&fuzz_dir().join("regressions").join(target));
    let pending = files(&fuzz_dir().join("regressions/pending").join(target));
    if std::env::var_os("OXCOW_FUZZ_PENDING").is_some() {
        inputs.extend(pending);
    } else if !pending.is_empty() {
        eprintln!(
            "{target}: {} pending reproducer(s) of known, unfixed findings skipped (OXCOW_FUZZ_PENDING=1 replays them)",
            pending.len()
        );
    }
    let wd = Arc::new(ops::Workdir::new(&format!("regress-{target}")));
    let mut failures = Vec::new();
    for input in &inputs {
        let data = std::fs::read(input).expect("read reproducer");
        let name = input.display().to_string();
        let wd = Arc::clone(&wd);
        let t = target.to_string();
        let r = with_timeout(WATCHDOG, &name, move || match t.as_str() {
            "header" => ops::header(&data),
            "image_io" => ops::image_io(&data, &wd),
            "check_repair" => ops::check_repair(&data, &wd),
            "manage" => ops::manage(&data, &wd),
            other => panic!("unknown fuzz target {other}"),
        });
        if let Err(e) = r {
            failures.push(e);
            if failures.last().is_some_and(|f| f.contains("HANG")) {
                break; // the hung thread still owns the work directory's image
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} reproducers fail:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn header_reproducers() {
    replay("header");
}

#[test]
fn image_io_reproducers() {
    replay("image_io");
}

#[test]
fn check_repair_reproducers() {
    replay("check_repair");
}

#[test]
fn manage_reproducers() {
    replay("manage");
}

/// `qemu-img check --output=json` of `path`: (corruptions, check errors), or `None` when
/// qemu-img could not check the image at all.
fn qemu_counts(path: &Path) -> Option<(u64, u64)> {
    let out = run(
        "qemu-img",
        &[
            "check",
            "-f",
            "qcow2",
            "--output=json",
            common::path_str(path),
        ],
    );
    let json = out.stdout.trim();
    if !json.starts_with('{') {
        return None;
    }
    let j = common::Json::parse(json);
    let n = |k: &str| j.opt(k).map_or(0, |v| v.as_u64());
    Some((n("corruptions"), n("check-errors")))
}

/// `qemu-img check -r all` of `path` (its verdict is read afterwards with [`qemu_counts`]).
fn qemu_repair(path: &Path) {
    run(
        "qemu-img",
        &["check", "-f", "qcow2", "-r", "all", common::path_str(path)],
    );
}

/// Whether `a` has more corruptions or more check errors than `b`.
fn is_worse(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 > b.0 || a.1 > b.1
}

/// Inputs under `fuzz/regressions/qemu-parity/check_repair/` break the check_repair target's
/// own property (the repair leaves a corruption the check before it did not count), and
/// QEMU's repair does exactly the same: QEMU is the oracle, so oxcow's repaired image must
/// check (by `qemu-img check`) exactly like QEMU's.
#[test]
fn check_repair_qemu_parity_reproducers() {
    let inputs = files(&fuzz_dir().join("regressions/qemu-parity/check_repair"));
    let dir = TempDir::new("fuzz-qemu-parity");
    let (by_oxcow, by_qemu) = (dir.join("by-oxcow.qcow2"), dir.join("by-qemu.qcow2"));
    for input in &inputs {
        std::fs::copy(input, &by_oxcow).expect("copy the image");
        std::fs::copy(input, &by_qemu).expect("copy the image");
        let p = by_oxcow.clone();
        let name = input.display().to_string();
        with_timeout(WATCHDOG, &name, move || {
            let _ = Image::check_path(&p, CheckFix::All, false, None);
        })
        .unwrap_or_else(|e| panic!("{e}"));
        qemu_repair(&by_qemu);
        let (ours, qemus) = (qemu_counts(&by_oxcow), qemu_counts(&by_qemu));
        assert!(
            ours.is_some(),
            "{name}: qemu-img cannot check oxcow's repair"
        );
        assert_eq!(
            ours, qemus,
            "{name}: qemu-img check (corruptions, check errors) after oxcow's repair and after qemu-img's"
        );
    }
}

/// Repairs with oxcow never make `qemu-img check` worse than before, or than QEMU's own
/// repair does: replays the check_repair reproducers and corpus (too slow to do per fuzzing
/// execution; about half a minute here).
#[test]
fn repair_never_worse_for_qemu() {
    let mut inputs = files(&fuzz_dir().join("regressions/check_repair"));
    inputs.extend(files(&fuzz_dir().join("corpus/check_repair")));
    let dir = TempDir::new("fuzz-qemu-repair");
    let img = dir.join("image.qcow2");
    let by_qemu = dir.join("by-qemu.qcow2");
    let mut worse = Vec::new();
    let mut compared = 0;
    for input in &inputs {
        std::fs::copy(input, &img).expect("copy the image");
        let Some(before) = qemu_counts(&img) else {
            continue; // qemu-img cannot check it: nothing to be worse than
        };
        let p = img.clone();
        let name = input.display().to_string();
        let repaired = with_timeout(WATCHDOG, &name, move || {
            Image::check_path(&p, CheckFix::All, false, None).map(|r| r.exit_code())
        });
        if let Err(e) = repaired {
            worse.push(e);
            break; // a hung repair still owns the image
        }
        compared += 1;
        let after = qemu_counts(&img);
        if after.is_some_and(|a| !is_worse(a, before)) {
            continue;
        }
        std::fs::copy(input, &by_qemu).expect("copy the image");
        qemu_repair(&by_qemu);
        let qemu_after = qemu_counts(&by_qemu);
        match (after, qemu_after) {
            (Some(a), Some(q)) if !is_worse(a, q) => {}
            (None, None) => {}
            _ => worse.push(format!(
                "{name}: qemu-img check (corruptions, check errors) {before:?} before, \
                 {after:?} after oxcow's repair, {qemu_after:?} after qemu-img's repair"
            )),
        }
    }
    eprintln!(
        "compared {compared} of {} images with qemu-img",
        inputs.len()
    );
    assert!(
        worse.is_empty(),
        "oxcow repair made qemu-img check worse:\n{}",
        worse.join("\n")
    );
}
