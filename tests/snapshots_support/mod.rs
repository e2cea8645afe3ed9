//! Shared by the tests/snapshots_*.rs files: running the same snapshot commands through
//! qemu-img and through oxcow on two copies of an image, and comparing the results the way
//! the issue asks (check clean, active states and every snapshot's view equal, snapshot
//! lists and table entries equal apart from dates).
#![allow(dead_code)]

use crate::common::*;
use oxcow::{Image, OpenOptions};
use std::path::Path;

/// One step of a scenario, run on both copies.
#[derive(Debug, Clone)]
pub enum Step {
    /// `qemu-img snapshot -c` / `Image::snapshot_create`.
    Create(&'static str),
    /// `qemu-img snapshot -a` / `Image::snapshot_apply`.
    Apply(&'static str),
    /// `qemu-img snapshot -d` / `Image::snapshot_delete`.
    Delete(&'static str),
    /// A guest write: `qemu-io write -P pattern off len` / `Image::write_at`, so writes after
    /// a snapshot exercise each engine's copy-on-write.
    Write(u64, u64, u8),
    /// `qemu-io write -z` / `Image::write_zeroes` (without unmap).
    Zero(u64, u64),
    /// `qemu-io discard` / `Image::discard`.
    Discard(u64, u64),
}

/// Runs `step` through qemu-img / qemu-io.
pub fn qemu_step(p: &Path, step: &Step) {
    match step {
        Step::Create(n) => drop(qemu_img(&["snapshot", "-c", n, path_str(p)])),
        Step::Apply(n) => drop(qemu_img(&["snapshot", "-a", n, path_str(p)])),
        Step::Delete(n) => drop(qemu_img(&["snapshot", "-d", n, path_str(p)])),
        Step::Write(off, len, pat) => {
            qemu_io(p, &[format!("write -P {pat:#x} {off} {len}")]);
        }
        Step::Zero(off, len) => drop(qemu_io(p, &[format!("write -z {off} {len}")])),
        Step::Discard(off, len) => drop(qemu_io(p, &[format!("discard {off} {len}")])),
    }
}

/// Runs `step` through oxcow on an open read-write handle.
pub fn oxcow_step(img: &Image, step: &Step) {
    let r = match step {
        Step::Create(n) => img.snapshot_create(n).map(drop),
        Step::Apply(n) => img.snapshot_apply(n),
        Step::Delete(n) => img.snapshot_delete(n),
        Step::Write(off, len, pat) => img.write_at(&vec![*pat; *len as usize], *off),
        Step::Zero(off, len) => img.write_zeroes(*off, *len, oxcow::ZeroFlags::default()),
        Step::Discard(off, len) => img.discard(*off, *len),
    };
    r.unwrap_or_else(|e| panic!("oxcow {step:?}: {e}"));
}

/// Runs `steps` on `q` with QEMU's tools and on `o` with oxcow (one handle, closed at the
/// end), then compares the two images.
pub fn run_both(dir: &TempDir, q: &Path, o: &Path, steps: &[Step]) {
    for s in steps {
        qemu_step(q, s);
    }
    let img = open_rw(o);
    for s in steps {
        oxcow_step(&img, s);
    }
    img.close().expect("close");
    assert_equivalent(dir, q, o);
}

/// One snapshot table entry without its dates: (l1_size, id, name, vm clock, vm state
/// size, extra data bytes).
pub type Entry = (u32, String, String, u64, u32, Vec<u8>);

/// The snapshot table entries as stored in the file.
pub fn table_entries(p: &Path) -> Vec<Entry> {
    let nb = be32(p, 60);
    let mut off = be64(p, 64);
    let mut out = Vec::new();
    for _ in 0..nb {
        let fixed = peek(p, off, 40);
        let be16 = |i: usize| u16::from_be_bytes([fixed[i], fixed[i + 1]]) as u64;
        let be32 = |i: usize| u32::from_be_bytes(fixed[i..i + 4].try_into().unwrap());
        let (id_len, name_len, extra) = (be16(12), be16(14), be32(36) as u64);
        let var = peek(p, off + 40, (extra + id_len + name_len) as usize);
        let text =
            |a: u64, b: u64| String::from_utf8_lossy(&var[a as usize..b as usize]).into_owned();
        out.push((
            be32(8),
            text(extra, extra + id_len),
            text(extra + id_len, extra + id_len + name_len),
            u64::from_be_bytes(fixed[24..32].try_into().unwrap()),
            be32(32),
            var[..extra as usize].to_vec(),
        ));
        off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
    out
}

/// `qemu-img snapshot -l` without the DATE column.
pub fn listing(p: &Path) -> Vec<String> {
    undated(&qemu_img(&["snapshot", "-l", path_str(p)]).stdout)
}

/// A snapshot table (`snapshot -l` output) without the DATE column (dates differ between
/// two runs).
pub fn undated(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 7 && f[0] != "ID" {
                // ID TAG size unit date time clock [icount]
                let mut g = f.clone();
                g.drain(4..6);
                g.join(" ")
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// The "snapshots" array of `qemu-img info --output=json` without the dates.
pub fn info_snapshots(p: &Path) -> Json {
    let o = qemu_img(&["info", "--output=json", path_str(p)]);
    let mut list = match Json::parse(&o.stdout).opt("snapshots") {
        Some(Json::Arr(a)) => a.clone(),
        _ => Vec::new(),
    };
    for s in &mut list {
        if let Json::Obj(m) = s {
            m.remove("date-sec");
            m.remove("date-nsec");
        }
    }
    Json::Arr(list)
}

/// The guest contents of snapshot `id` of `p` as raw bytes (`qemu-img convert -l`).
pub fn snapshot_view(dir: &TempDir, p: &Path, id: &str) -> Vec<u8> {
    let out = dir.join(&format!("view-{}-{id}.raw", unique_id()));
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-l",
        &format!("snapshot.id={id}"),
        "-O",
        "raw",
        path_str(p),
        path_str(&out),
    ]);
    let v = read_file(&out);
    std::fs::remove_file(&out).ok();
    v
}

/// Both images check clean, have the same guest contents, the same snapshot tables apart
/// from dates (and L1 positions), and every snapshot reads the same in both.
pub fn assert_equivalent(dir: &TempDir, q: &Path, o: &Path) {
    assert_check_clean(q);
    assert_check_clean(o);
    assert_same_guest(q, o);
    let (tq, to) = (table_entries(q), table_entries(o));
    assert_eq!(tq, to, "snapshot table entries (without dates) differ");
    assert_eq!(listing(q), listing(o), "qemu-img snapshot -l differs");
    let info = info_snapshots(q);
    assert!(
        matches!(&info, Json::Arr(a) if a.len() == tq.len()),
        "{info:?}"
    );
    assert_eq!(info, info_snapshots(o), "qemu-img info snapshots differ");
    for (_, id, ..) in &tq {
        let (a, b) = (snapshot_view(dir, q, id), snapshot_view(dir, o, id));
        assert!(a == b, "snapshot {id} reads differently");
    }
}

/// Opens `p` read-only through oxcow and reads the whole disk.
pub fn oxcow_contents(p: &Path) -> Vec<u8> {
    let img = Image::open(p, &OpenOptions::default()).expect("open ro");
    oxcow_read_all(&img)
}
