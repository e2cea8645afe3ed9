//! `check` against `qemu-img check` as the oracle: clean images of many variants, damaged
//! images (counters and exit codes equal qemu-img's on a copy), repairs (qemu-img check clean
//! afterwards, data unchanged), read-only behaviour, the live handle, and the CLI.

mod common;

use common::*;
use oxcow::{CheckFix, CheckReport, Image, OpenOptions};
use std::fs;
use std::path::Path;

const CS: u64 = 65536;

/// `qemu-img check [-r MODE] --output=json` → (exit code, parsed JSON when printed).
fn qemu_check_json(path: &Path, mode: Option<&str>) -> (i32, Option<Json>) {
    let mut args = vec!["check", "-f", "qcow2", "--output=json"];
    if let Some(m) = mode {
        args.push("-r");
        args.push(m);
    }
    args.push(path_str(path));
    let o = run("qemu-img", &args);
    let j = if o.stdout.trim().is_empty() {
        None
    } else {
        Some(Json::parse(o.stdout.trim()))
    };
    (o.code, j)
}

fn fix_name(fix: CheckFix) -> Option<&'static str> {
    match fix {
        CheckFix::None => None,
        CheckFix::Leaks => Some("leaks"),
        CheckFix::All => Some("all"),
    }
}

/// Runs oxcow and qemu-img with the same repair mode on two copies of `img` and asserts
/// the same exit code and counters. Returns oxcow's report.
fn compare_with_qemu(what: &str, img: &Path, fix: CheckFix, dir: &TempDir) -> CheckReport {
    let n = fix_name(fix).unwrap_or("none");
    let a = dir.join(&format!("{n}-qemu.qcow2"));
    let b = dir.join(&format!("{n}-oxcow.qcow2"));
    fs::copy(img, &a).unwrap();
    fs::copy(img, &b).unwrap();
    let (qrc, qj) = qemu_check_json(&a, fix_name(fix));
    let r = Image::check_path(&b, fix, false, None)
        .unwrap_or_else(|e| panic!("{what} ({n}): oxcow check failed: {e}"));
    let what = format!("{what} ({n})");
    assert_eq!(
        r.exit_code() as i32,
        qrc,
        "{what}: exit code differs (oxcow {r:#?}, qemu {qj:?})"
    );
    if let Some(j) = qj {
        // After a rebuild the new structures may land elsewhere than QEMU puts them.
        let rebuilt = r
            .repair_messages
            .iter()
            .any(|m| m.contains("Rebuilding refcount structure"));
        assert_check_counters(&what, &r, &j, !rebuilt);
    }
    r
}

/// A 64 MiB default image with data in the first L2 table (clusters 5..=9 hold data:
/// header 0, reftable 1, refblock 2, L1 3, L2 4). The file is extended to 32 clusters so
/// that unused clusters inside the file can be leaked.
fn base_image(dir: &TempDir, opts: &str) -> std::path::PathBuf {
    let p = dir.join("base.qcow2");
    qemu_create(&p, 64 << 20, opts);
    qemu_io(
        &p,
        &["write -P 7 0 256k".to_string(), "write -P 9 1M 64k".into()],
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(32 * CS)
        .unwrap();
    p
}

#[test]
fn clean_variants_match_qemu() {
    struct V {
        name: &'static str,
        opts: &'static str,
        cmds: &'static [&'static str],
        snapshots: u32,
        bitmaps: &'static [&'static str],
        after: &'static [&'static str],
    }
    let variants = [
        V {
            name: "default",
            opts: "",
            cmds: &["write -P 1 0 1M", "write -P 2 8M 300k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "empty",
            opts: "",
            cmds: &[],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "c4k",
            opts: "cluster_size=4k",
            cmds: &["write -P 1 0 1M", "write -P 2 8M 300k", "write 40M 4k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "c512-rc64",
            opts: "cluster_size=512,refcount_bits=64",
            cmds: &["write 0 100k", "write 1M 10k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "rc1",
            opts: "refcount_bits=1",
            cmds: &["write 0 1M", "write 9M 64k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "c2m-rc8",
            opts: "cluster_size=2M,refcount_bits=8",
            cmds: &["write 0 3M", "write 30M 64k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "v2-snapshots",
            opts: "compat=0.10",
            cmds: &["write -P 1 0 1M"],
            snapshots: 2,
            bitmaps: &[],
            after: &["write -P 2 512k 1M"],
        },
        V {
            name: "v3-snapshots-rc2",
            opts: "refcount_bits=2",
            cmds: &["write 0 256k"],
            snapshots: 2,
            bitmaps: &[],
            after: &["write 64k 64k"],
        },
        V {
            name: "extended-l2",
            opts: "extended_l2=on",
            cmds: &[
                "write 0 5k",
                "write 1M 64k",
                "write -z 2M 64k",
                "write 3M 2k",
            ],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "compressed",
            opts: "",
            cmds: &["write -c 0 64k", "write -c 128k 64k", "write 1M 64k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "zero-clusters",
            opts: "",
            cmds: &["write 0 1M", "write -z 128k 128k", "write -z -u 512k 64k"],
            snapshots: 0,
            bitmaps: &[],
            after: &[],
        },
        V {
            name: "bitmaps",
            opts: "",
            cmds: &["write 0 1M"],
            snapshots: 0,
            bitmaps: &["b0", "b1"],
            after: &["write 5M 1M", "write 40M 64k"],
        },
    ];
    let dir = TempDir::new("check-clean");
    for v in &variants {
        let p = dir.join(&format!("{}.qcow2", v.name));
        qemu_create(&p, 64 << 20, v.opts);
        let cmds: Vec<String> = v.cmds.iter().map(|s| s.to_string()).collect();
        if !cmds.is_empty() {
            qemu_io(&p, &cmds);
        }
        for i in 0..v.snapshots {
            qemu_img(&["snapshot", "-c", &format!("s{i}"), path_str(&p)]);
        }
        for b in v.bitmaps {
            qemu_img(&["bitmap", "--add", path_str(&p), b]);
        }
        let after: Vec<String> = v.after.iter().map(|s| s.to_string()).collect();
        if !after.is_empty() {
            qemu_io(&p, &after);
        }
        let (qrc, qj) = qemu_check_json(&p, None);
        let qj = qj.expect("qemu-img printed JSON");
        let r = Image::check_path(&p, CheckFix::None, false, None).unwrap();
        assert_eq!(r.exit_code() as i32, qrc, "{}: {r:#?}", v.name);
        assert_check_counters(v.name, &r, &qj, true);
        // The same through an open read-only handle.
        let img = open_ro(&p);
        let r2 = img.check(CheckFix::None, None).unwrap();
        assert_check_counters(&format!("{} (handle)", v.name), &r2, &qj, true);
    }
}

#[test]
fn backing_chain_overlay_matches_qemu() {
    let dir = TempDir::new("check-backing");
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&base, 16 << 20, "");
    qemu_io(&base, &["write -P 1 0 1M".into()]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(&top, &["write -P 2 512k 64k".into(), "write 3M 4k".into()]);
    let (qrc, qj) = qemu_check_json(&top, None);
    let img = open_ro(&top);
    let r = img.check(CheckFix::None, None).unwrap();
    assert_eq!(r.exit_code() as i32, qrc);
    assert_check_counters("overlay", &r, &qj.unwrap(), true);
}

/// One damage: where to write what, and what a full repair should achieve.
struct Damage {
    name: &'static str,
    opts: &'static str,
    at: u64,
    bytes: Vec<u8>,
    /// Extra qemu-io commands run on the base image before the damage.
    extra: &'static [&'static str],
    /// Guest data is untouched by the damage: after a repair the image must read like the
    /// pre-damage copy.
    data_intact: bool,
    /// Exit code of `qemu-img check` after oxcow's repair (0 unless unrepairable).
    after_repair: i32,
}

fn be(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn damages() -> Vec<Damage> {
    let rb = 2 * CS; // refblock 0 (16-bit entries)
    let rt = CS; // refcount table
    let l1 = 3 * CS;
    let l2 = 4 * CS;
    let copied = 1u64 << 63;
    let d = |name, at, bytes, data_intact, after_repair| Damage {
        name,
        opts: "",
        at,
        bytes,
        extra: &[],
        data_intact,
        after_repair,
    };
    let ext = |name, at, bytes, data_intact, after_repair| Damage {
        opts: "extended_l2=on",
        ..d(name, at, bytes, data_intact, after_repair)
    };
    vec![
        d("refcount-down", rb + 2 * 5, vec![0, 0], true, 0),
        d("refcount-up", rb + 2 * 5, vec![0, 2], true, 0),
        d("leak", rb + 2 * 20, vec![0, 1], true, 0),
        d("l2-refcount-zero", rb + 2 * 4, vec![0, 0], true, 0),
        d("l2-entry-to-reftable", l2 + 16, be(copied | CS), false, 0),
        d(
            "l2-entry-past-eof",
            l2 + 16,
            be(copied | (1 << 28)),
            false,
            2,
        ),
        d(
            "l2-entry-unaligned",
            l2 + 16,
            be(copied | 0x70200),
            false,
            2,
        ),
        d("prealloc-zero-unaligned", l2 + 8 * 40, be(0x90201), true, 0),
        d("l2-reserved-bits", l2 + 8, be(copied | 0x60002), true, 2),
        d("l1-reserved-bits", l1, be(copied | 0x40001), true, 2),
        d("l1-unaligned", l1, be(copied | 0x40200), false, 2),
        d("l1-copied-cleared", l1, be(0x40000), true, 0),
        d("l2-copied-cleared", l2, be(0x50000), true, 0),
        d("reftable-zeroed", rt, be(0), true, 0),
        d("reftable-reserved-bits", rt, be(0x20001), true, 0),
        d("reftable-unaligned", rt, be(0x20200), true, 0),
        d("reftable-entry-outside", rt + 8, be(1 << 28), true, 0),
        d("refcount-table-lost", 48, be(0), true, 0),
        Damage {
            name: "rc1-refcount-down",
            opts: "refcount_bits=1",
            // 1-bit entries, LSB first: clusters 0..7 in byte 0; drop cluster 5.
            at: rb,
            bytes: vec![0b1101_1111],
            extra: &[],
            data_intact: true,
            after_repair: 0,
        },
        Damage {
            name: "rc64-refcount-up",
            opts: "refcount_bits=64",
            at: rb + 8 * 6,
            bytes: be(3),
            extra: &[],
            data_intact: true,
            after_repair: 0,
        },
        // Extended L2: 16-byte entries (descriptor, subcluster bitmap).
        ext(
            "ext-unallocated-alloc-bits",
            l2 + 16 * 30 + 8,
            be(1),
            false,
            2,
        ),
        ext(
            "ext-alloc-and-zero",
            l2 + 16 + 8,
            be(0x1_ffff_ffff),
            false,
            2,
        ),
        Damage {
            bytes: [be(copied | 0x60200), be(0)].concat(),
            ..ext("ext-unaligned-no-data", l2 + 16 * 30, vec![], true, 0)
        },
        // COPIED on a compressed cluster (guest cluster 32); the bytes are computed from the
        // entry on disk.
        Damage {
            extra: &["write -c -P 8 2M 64k"],
            ..d("compressed-copied", l2 + 8 * 32, vec![], true, 2)
        },
    ]
}

#[test]
fn damaged_images_match_qemu_and_repair() {
    for dmg in damages() {
        let dir = TempDir::new(&format!("check-dmg-{}", dmg.name));
        let base = base_image(&dir, dmg.opts);
        if !dmg.extra.is_empty() {
            let cmds: Vec<String> = dmg.extra.iter().map(|c| c.to_string()).collect();
            qemu_io(&base, &cmds);
        }
        let orig = dir.join("orig.qcow2");
        fs::copy(&base, &orig).unwrap();
        if dmg.name == "refcount-table-lost" {
            // Point the header at an all-zero cluster: every refcount reads 0.
            poke(&base, 48, &be(20 * CS));
        } else if dmg.name == "compressed-copied" {
            let old = be64(&base, dmg.at);
            assert!(old & (1 << 62) != 0, "not a compressed entry: {old:#x}");
            poke(&base, dmg.at, &be(old | (1 << 63)));
        } else {
            poke(&base, dmg.at, &dmg.bytes);
        }
        let none = compare_with_qemu(dmg.name, &base, CheckFix::None, &dir);
        assert!(
            none.exit_code() != 0,
            "{}: the damage went unnoticed",
            dmg.name
        );
        compare_with_qemu(dmg.name, &base, CheckFix::Leaks, &dir);
        // qemu-img's own -r all trips over some damages (its overlap check refuses the
        // rebuild); compare only where it completes.
        let qa = dir.join("all-probe.qcow2");
        fs::copy(&base, &qa).unwrap();
        if qemu_check_json(&qa, Some("all")).1.is_some() {
            compare_with_qemu(dmg.name, &base, CheckFix::All, &dir);
        }
        // oxcow's full repair: qemu-img agrees it is clean (or as good as it gets).
        let fixed = dir.join("fixed.qcow2");
        fs::copy(&base, &fixed).unwrap();
        let r = Image::check_path(&fixed, CheckFix::All, false, None).unwrap();
        let (code, out) = qemu_img_check(&fixed);
        assert_eq!(
            code, dmg.after_repair,
            "{}: qemu-img check after oxcow's repair ({r:#?}):\n{out}",
            dmg.name
        );
        assert_eq!(
            r.exit_code() as i32,
            dmg.after_repair,
            "{}: {r:#?}",
            dmg.name
        );
        if dmg.data_intact {
            let o = run(
                "qemu-img",
                &["compare", "-q", path_str(&orig), path_str(&fixed)],
            );
            assert_eq!(
                o.code,
                0,
                "{}: data changed by the repair: {}",
                dmg.name,
                o.all()
            );
        }
        // A second repair finds nothing more to do.
        let again = Image::check_path(&fixed, CheckFix::All, false, None).unwrap();
        assert_eq!(
            again.corruptions_fixed + again.leaks_fixed,
            0,
            "{}",
            dmg.name
        );
    }
}

fn incompat(p: &Path) -> u64 {
    be64(p, 72)
}

#[test]
fn killed_lazy_writer_is_repaired() {
    let dir = TempDir::new("check-lazy");
    let p = dir.join("lazy.qcow2");
    qemu_create(&p, 256 << 20, "lazy_refcounts=on");
    qemu_io(
        &p,
        &["write -P 7 0 256k".into(), "write -P 9 1M 64k".into()],
    );
    // A writer killed before its refcounts reach the disk.
    let o = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 2M 128k",
            "-c",
            "write -P 4 200M 64k",
            "-c",
            "abort",
            path_str(&p),
        ],
    );
    assert_ne!(o.code, 0, "qemu-io abort should kill the process");
    assert_eq!(incompat(&p) & 1, 1, "dirty bit set by the lazy writer");
    let none = compare_with_qemu("lazy", &p, CheckFix::None, &dir);
    assert_eq!(none.exit_code(), 2);
    // -r leaks cannot raise refcounts: a check error, and (unlike QEMU) the dirty bit stays.
    let leaks_copy = dir.join("leaks.qcow2");
    fs::copy(&p, &leaks_copy).unwrap();
    let r = Image::check_path(&leaks_copy, CheckFix::Leaks, false, None).unwrap();
    assert_eq!(r.exit_code(), 1);
    assert!(r
        .messages
        .iter()
        .any(|m| m == "ERROR need to rebuild refcount structures"));
    assert_eq!(incompat(&leaks_copy) & 1, 1, "dirty bit must stay set");
    compare_with_qemu("lazy", &p, CheckFix::All, &dir);
    let fixed = dir.join("fixed.qcow2");
    fs::copy(&p, &fixed).unwrap();
    let r = Image::check_path(&fixed, CheckFix::All, false, None).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:#?}");
    assert!(r.rechecked);
    assert_eq!(incompat(&fixed) & 3, 0, "dirty and corrupt bits cleared");
    assert_check_clean(&fixed);
    let o = run(
        "qemu-img",
        &["compare", "-q", path_str(&p), path_str(&fixed)],
    );
    assert_eq!(o.code, 0, "{}", o.all());
    // The engine opens the repaired image read-write again.
    let img = open_rw(&fixed);
    img.write_at(&[5u8; 4096], 8 << 20).unwrap();
    img.close().unwrap();
    assert_check_clean(&fixed);
}

#[test]
fn corrupt_bit_is_cleared_by_full_repair_only() {
    let dir = TempDir::new("check-corrupt-bit");
    let p = base_image(&dir, "");
    poke(&p, 72, &be(2));
    poke(&p, 2 * CS + 2 * 20, &[0, 1]); // plus a leak
    let r = Image::check_path(&p, CheckFix::None, false, None).unwrap();
    assert_eq!(r.exit_code(), 3);
    let r = Image::check_path(&p, CheckFix::All, false, None).unwrap();
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.leaks_fixed, 1);
    assert_eq!(incompat(&p) & 2, 0);
    assert_check_clean(&p);
}

fn file_state(p: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (read_file(p), fs::metadata(p).unwrap().modified().unwrap())
}

#[test]
fn read_only_check_writes_nothing_and_refuses_repairs() {
    let dir = TempDir::new("check-ro");
    let p = base_image(&dir, "lazy_refcounts=on");
    poke(&p, 2 * CS + 2 * 5, &[0, 0]);
    poke(&p, 2 * CS + 2 * 20, &[0, 1]);
    poke(&p, 72, &be(1)); // dirty
    let before = file_state(&p);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let r = Image::check_path(&p, CheckFix::None, false, None).unwrap();
    assert_eq!(r.exit_code(), 2);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let r2 = img.check(CheckFix::None, None).unwrap();
    assert_eq!(r, r2);
    for fix in [CheckFix::Leaks, CheckFix::All] {
        let e = img.check(fix, None).unwrap_err();
        assert_eq!(e.kind(), oxcow::ErrorKind::ReadOnly, "{e}");
        assert_eq!(e.errno(), 30); // EROFS
    }
    drop(img);
    // -U check as well.
    let r3 = Image::check_path(&p, CheckFix::None, true, None).unwrap();
    assert_eq!(r3.corruptions, r.corruptions);
    assert!(Image::check_path(&p, CheckFix::All, true, None).is_err());
    assert!(
        before == file_state(&p),
        "a read-only check changed the file"
    );
}

#[test]
fn live_handle_check_sees_unflushed_writes_and_repairs_leaks() {
    let dir = TempDir::new("check-live");
    let p = dir.join("live.qcow2");
    qemu_create(&p, 64 << 20, "");
    let img = open_rw(&p);
    let data = vec![0x5au8; 300_000];
    img.write_at(&data, 0).unwrap();
    // Not flushed: the check writes the metadata back first, so nothing looks leaked.
    let mut calls = 0u64;
    let mut last = (0, 0);
    let mut cb = |d: u64, t: u64| {
        calls += 1;
        assert!(d <= t);
        last = (d, t);
    };
    let r = img.check(CheckFix::None, Some(&mut cb)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:#?}");
    assert_eq!(r.allocated_clusters, 5);
    assert_eq!(r.total_clusters, 1024);
    assert!(calls > 0 && last.0 == last.1);
    img.flush().unwrap();
    // Leak a cluster behind the engine's back (its caches are clean after the flush).
    // Over-count a data cluster: a leak plus a COPIED mismatch.
    poke(&p, 2 * CS + 2 * 6, &[0, 2]);
    let r = img.check(CheckFix::None, None).unwrap();
    assert_eq!((r.leaks, r.corruptions, r.exit_code()), (1, 1, 2), "{r:#?}");
    let r = img.check(CheckFix::Leaks, None).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed, r.exit_code()), (0, 1, 0), "{r:#?}");
    // The handle keeps working on the reloaded metadata.
    img.write_at(&[1u8; 70000], 10 << 20).unwrap();
    let mut back = vec![0u8; 300_000];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == data);
    img.close().unwrap();
    assert_check_clean(&p);
}

#[test]
fn check_runs_while_other_threads_write() {
    let dir = TempDir::new("check-concurrent");
    let p = dir.join("c.qcow2");
    qemu_create(&p, 256 << 20, "");
    let img = std::sync::Arc::new(open_rw(&p));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..3u64 {
        let img = img.clone();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = ((i * 7 + t * 1000) % 2000) * 65536 + t * 4096;
                img.write_at(&[t as u8 + 1; 8192], off).unwrap();
                i += 1;
            }
        }));
    }
    for _ in 0..10 {
        let r = img.check(CheckFix::None, None).unwrap();
        assert_eq!(r.exit_code(), 0, "{r:#?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let img = std::sync::Arc::try_unwrap(img).ok().unwrap();
    img.close().unwrap();
    assert_check_clean(&p);
}

fn oxcow_cli(args: &[&str]) -> CmdOut {
    run(env!("CARGO_BIN_EXE_oxcow"), args)
}

#[test]
fn cli_json_human_and_exit_codes() {
    let dir = TempDir::new("check-cli");
    let p = base_image(&dir, "");
    // Clean.
    let o = oxcow_cli(&["check", "--output=json", path_str(&p)]);
    assert_eq!(o.code, 0, "{}", o.all());
    let j = Json::parse(o.stdout.trim());
    let (_, q) = qemu_check_json(&p, None);
    let q = q.unwrap();
    for k in [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "format",
    ] {
        assert_eq!(j.get(k), q.get(k), "{k}");
    }
    assert_eq!(j.get("filename").as_str(), path_str(&p));
    for k in ["corruptions", "leaks", "leaks-fixed", "corruptions-fixed"] {
        assert!(j.opt(k).is_none(), "{k} must be absent when zero");
    }
    let o = oxcow_cli(&["check", path_str(&p)]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("No errors were found on the image."));
    assert!(o.stdout.contains("Image end offset: "));
    assert!(o.stdout.contains("/1024 = "), "{}", o.stdout);

    // Leak: exit 3; -r leaks repairs it with qemu-img's double check.
    poke(&p, 2 * CS + 2 * 20, &[0, 1]);
    let o = oxcow_cli(&["check", "--output", "json", path_str(&p)]);
    assert_eq!(o.code, 3, "{}", o.all());
    assert_eq!(Json::parse(o.stdout.trim()).get("leaks").as_u64(), 1);
    assert!(o
        .stderr
        .contains("Leaked cluster 20 refcount=1 reference=0"));
    let o = oxcow_cli(&["check", "-r", "leaks", path_str(&p)]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("Double checking the fixed image now..."));
    assert!(o.stdout.contains("    1 leaked clusters"));
    assert!(o
        .stderr
        .contains("Repairing cluster 20 refcount=1 reference=0"));

    // Corruption: exit 2; JSON after -r all has corruptions-fixed.
    poke(&p, 2 * CS + 2 * 5, &[0, 2]);
    let o = oxcow_cli(&["check", "--output=json", path_str(&p)]);
    assert_eq!(o.code, 2, "{}", o.all());
    let j = Json::parse(o.stdout.trim());
    assert_eq!(
        (check_field(&j, "corruptions"), check_field(&j, "leaks")),
        (1, 1)
    );
    let o = oxcow_cli(&["check", "-r", "all", "--output=json", path_str(&p)]);
    assert_eq!(o.code, 0, "{}", o.all());
    let j = Json::parse(o.stdout.trim());
    // The leak is fixed; with the refcount back at 1 the COPIED flag is right again.
    assert_eq!(check_field(&j, "leaks-fixed"), 1);
    assert!(j.opt("corruptions-fixed").is_none());
    assert!(j.opt("corruptions").is_none());

    // Rebuild needed under -r leaks: check error, exit 1.
    poke(&p, 2 * CS + 2 * 5, &[0, 0]);
    let o = oxcow_cli(&["check", "-r", "leaks", path_str(&p)]);
    assert_eq!(o.code, 1, "{}", o.all());
    assert!(o
        .stderr
        .contains("ERROR need to rebuild refcount structures"));

    // -U, progress, and failures to open.
    let o = oxcow_cli(&["check", "-U", "-p", path_str(&p)]);
    assert_eq!(o.code, 2, "{}", o.all());
    let o = oxcow_cli(&["check", path_str(&dir.join("missing.qcow2"))]);
    assert_eq!(o.code, 1, "{}", o.all());
    let raw = dir.join("raw.img");
    fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert_eq!(oxcow_cli(&["check", path_str(&raw)]).code, 1);
    assert_eq!(oxcow_cli(&["check", "-r", "bogus", path_str(&p)]).code, 1);
}

#[test]
fn lost_refcount_table_is_rebuilt_for_every_geometry() {
    let geometries = [
        "cluster_size=512",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=1k,refcount_bits=64",
        "cluster_size=4k,refcount_bits=8",
        "cluster_size=2M",
        "compat=0.10,cluster_size=4k",
        "extended_l2=on,refcount_bits=32",
    ];
    for g in geometries {
        let dir = TempDir::new("check-rebuild");
        let p = dir.join("img.qcow2");
        qemu_create(&p, 64 << 20, g);
        qemu_io(
            &p,
            &[
                "write -P 3 0 3M".into(),
                "write -c -P 4 8M 2M".into(),
                "write -P 5 20M 1M".into(),
            ],
        );
        // Narrow refcounts cannot take the snapshot's extra references (compressed clusters
        // share host clusters).
        let snap = !(g.ends_with("refcount_bits=1") || g.ends_with("refcount_bits=8"));
        if snap {
            qemu_img(&["snapshot", "-c", "s1", path_str(&p)]);
            qemu_io(&p, &["write -P 6 1M 64k".into()]);
        }
        let orig = dir.join("orig.qcow2");
        fs::copy(&p, &orig).unwrap();
        // Zero the whole refcount table.
        let rt = be64(&p, 48);
        let rt_clusters = be32(&p, 56) as u64;
        let cs = 1u64 << be32(&p, 20);
        poke(&p, rt, &vec![0u8; (rt_clusters * cs) as usize]);
        let r = compare_with_qemu(g, &p, CheckFix::None, &dir);
        assert_eq!(r.exit_code(), 2);
        let r = compare_with_qemu(g, &p, CheckFix::All, &dir);
        assert_eq!(r.exit_code(), 0);
        let fixed = dir.join("all-oxcow.qcow2");
        assert_check_clean(&fixed);
        let o = run(
            "qemu-img",
            &["compare", "-q", path_str(&orig), path_str(&fixed)],
        );
        assert_eq!(o.code, 0, "{g}: {}", o.all());
        let snaps = run("qemu-img", &["snapshot", "-l", path_str(&fixed)]);
        assert_eq!(snaps.stdout.contains("s1"), snap, "{g}: {}", snaps.all());
    }
}

/// Random garbage in the metadata never makes the check panic or hang, a repair never makes
/// qemu-img's verdict worse, and a repaired image re-checks the same way.
#[test]
fn random_metadata_damage_never_panics_or_worsens() {
    let dir = TempDir::new("check-fuzz");
    let base = base_image(&dir, "");
    qemu_img(&["snapshot", "-c", "s1", path_str(&base)]);
    qemu_io(&base, &["write -c -P 4 2M 64k".into()]);
    let len = fs::metadata(&base).unwrap().len();
    let mut rng = Rng::new(0x5eed_c4ec);
    let p = dir.join("fuzz.qcow2");
    for round in 0..150 {
        fs::copy(&base, &p).unwrap();
        for _ in 0..rng.range(1, 4) {
            // Anywhere after the fixed header fields: tables, entries, refcounts.
            let at = rng.range(CS, len - 8) & !7;
            let v = match rng.below(4) {
                0 => rng.next_u64(),
                1 => rng.next_u64() & 0x00ff_ffff_ffff_fe00,
                2 => (rng.below(64) * CS) | (rng.below(2) << 63),
                _ => 0,
            };
            poke(&p, at, &be(v));
        }
        let (before, _) = qemu_img_check(&p);
        let plain = Image::check_path(&p, CheckFix::None, false, None);
        let Ok(plain) = plain else { continue };
        if before != 1 {
            assert_eq!(
                plain.exit_code() as i32,
                before,
                "round {round}: {plain:#?}"
            );
        }
        match Image::check_path(&p, CheckFix::All, false, None) {
            Ok(r) => {
                let (after, out) = qemu_img_check(&p);
                // 0 clean < 3 leaks < 2 corruptions < 1 check failed.
                let severity = |c: i32| [0, 3, 2, 1].iter().position(|&x| x == c).unwrap_or(4);
                assert!(
                    severity(after) <= severity(before),
                    "round {round}: qemu-img check {before} -> {after} after repair:\n{out}"
                );
                let again = Image::check_path(&p, CheckFix::None, false, None).unwrap();
                assert_eq!(again.exit_code(), r.exit_code(), "round {round}");
            }
            Err(e) => eprintln!("round {round}: repair refused: {e}"),
        }
    }
}
