//! Resize against QEMU: every scenario runs `qemu-img resize` on one copy of an image and
//! `Image::resize` on another, then both copies must pass `qemu-img check`, compare equal,
//! report the same virtual size and hold the same guest bytes.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const EINVAL: i32 = 22;
const ENOTSUP: i32 = 95;
const GIB: u64 = 1024 * MIB;

/// Two copies of one image: `q` for qemu-img, `o` for oxcow (same directory, so a relative
/// backing name resolves for both).
struct Twin {
    dir: TempDir,
    q: PathBuf,
    o: PathBuf,
}

fn twin(tag: &str, setup: impl FnOnce(&TempDir, &Path)) -> Twin {
    let dir = TempDir::new(tag);
    let q = dir.join("q.qcow2");
    setup(&dir, &q);
    let o = dir.join("o.qcow2");
    std::fs::copy(&q, &o).expect("copy image");
    Twin { dir, q, o }
}

fn qemu_resize(p: &Path, size: u64, shrink: bool) -> CmdOut {
    let size = size.to_string();
    let mut args = vec!["resize", "-f", "qcow2"];
    if shrink {
        args.push("--shrink");
    }
    args.extend([path_str(p), &size]);
    run("qemu-img", &args)
}

fn oxcow_resize(p: &Path, size: u64, shrink: bool) -> Result<(), oxcow::Error> {
    let img = open_rw(p);
    let r = img.resize(size, shrink);
    img.close().expect("close");
    r
}

impl Twin {
    /// Resizes both copies; both must succeed.
    fn resize(&self, size: u64, shrink: bool) {
        let q = qemu_resize(&self.q, size, shrink);
        assert_eq!(q.code, 0, "qemu-img resize: {}", q.all());
        oxcow_resize(&self.o, size, shrink)
            .unwrap_or_else(|e| panic!("oxcow resize to {size}: {e}"));
    }

    /// Both copies: check clean, same guest contents and virtual size.
    fn assert_equivalent(&self) {
        assert_check_clean(&self.q);
        assert_check_clean(&self.o);
        let (qi, oi) = (qemu_info(&self.q), qemu_info(&self.o));
        assert_eq!(
            qi.get("virtual-size").as_u64(),
            oi.get("virtual-size").as_u64(),
            "virtual sizes differ"
        );
        assert_same_guest(&self.q, &self.o);
        let want = qemu_to_raw(&self.q, "qcow2", &self.dir);
        let got = oxcow_read_all(&open_ro(&self.o));
        assert_same_bytes(&got, &want, "guest bytes after resize");
    }
}

fn io(p: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    let o = qemu_io(p, &cmds);
    assert_eq!(o.code, 0, "qemu-io: {}", o.all());
}

/// Data at the start, in the middle and at the end of a `size`-byte image.
fn spread_data(p: &Path, size: u64) {
    io(
        p,
        &[
            "write -P 0x11 0 200k",
            &format!("write -P 0x22 {} 300k", size / 2),
            &format!("write -P 0x33 {} 64k", size - 64 * KIB),
        ],
    );
}

#[test]
fn growing_within_the_l1_table_matches_qemu() {
    let t = twin("grow-in-l1", |_, p| {
        qemu_create(p, 100 * MIB, "");
        spread_data(p, 100 * MIB);
    });
    t.resize(300 * MIB, false);
    t.assert_equivalent();
    // New area is writable through oxcow at the new size.
    let img = open_rw(&t.o);
    img.write_at(&[0x44; 4096], 300 * MIB - 4096)
        .expect("write");
    img.close().expect("close");
    assert_check_clean(&t.o);
}

#[test]
fn growing_past_the_l1_table_relocates_it_like_qemu() {
    // 512-byte clusters: 64 L1 entries per cluster, each covering 32 KiB, so the L1 table
    // of a 100 MiB image spans 50 clusters.
    let t = twin("grow-past-l1", |_, p| {
        qemu_create(p, MIB, "cluster_size=512");
        spread_data(p, MIB);
    });
    let before = be64(&t.o, 40);
    t.resize(100 * MIB, false);
    t.assert_equivalent();
    assert_ne!(be64(&t.o, 40), before, "the L1 table moved");
    assert_eq!(be32(&t.o, 36), be32(&t.q, 36), "l1_size like QEMU's");
    let img = open_rw(&t.o);
    img.write_at(&[0x55; 8192], 99 * MIB)
        .expect("write past the old L1 coverage");
    img.close().expect("close");
    assert_check_clean(&t.o);
    // QEMU writes through the relocated table too.
    io(&t.o, &["write -P 0x56 50M 64k", "read -P 0x55 99M 8k"]);
    assert_check_clean(&t.o);
}

#[test]
fn growing_by_gigabytes_with_64k_clusters_matches_qemu() {
    let t = twin("grow-big", |_, p| {
        qemu_create(p, 10 * MIB, "");
        spread_data(p, 10 * MIB);
    });
    t.resize(5 * GIB, false);
    t.assert_equivalent();
    t.resize(5 * GIB + 512, false);
    t.assert_equivalent();
}

fn backing_4m(dir: &TempDir) {
    let base = dir.join("base.qcow2");
    qemu_create(&base, 4 * MIB, "");
    io(&base, &["write -P 0x77 0 4M"]);
}

#[test]
fn growing_over_a_longer_backing_file_reads_zeros_like_qemu() {
    for (opts, old) in [
        ("", MIB),
        ("", 1000 * KIB),
        ("extended_l2=on", 1000 * KIB),
        ("cluster_size=4096", 999 * KIB + 512),
    ] {
        let t = twin("grow-backing", |dir, p| {
            backing_4m(dir);
            qemu_create_overlay(p, Some(old), opts, "base.qcow2", "qcow2");
            io(p, &["write -P 0x12 64k 64k"]);
        });
        t.resize(3 * MIB, false);
        t.assert_equivalent();
        {
            let img = open_ro(&t.o);
            let mut buf = vec![0xffu8; (3 * MIB - old) as usize];
            img.read_at(&mut buf, old).expect("read new area");
            assert!(
                buf.iter().all(|&b| b == 0),
                "{opts} {old}: new area not zero"
            );
        }
        // Small growth inside the straddling cluster.
        t.resize(3 * MIB + 1024, false);
        t.assert_equivalent();
    }
}

#[test]
fn growing_a_v2_overlay_over_a_longer_backing_is_refused_like_qemu() {
    let t = twin("grow-backing-v2", |dir, p| {
        backing_4m(dir);
        qemu_create_overlay(p, Some(MIB), "compat=0.10", "base.qcow2", "qcow2");
    });
    let q = qemu_resize(&t.q, 3 * MIB, false);
    assert_ne!(q.code, 0, "qemu-img refuses");
    let e = oxcow_resize(&t.o, 3 * MIB, false).expect_err("oxcow refuses");
    assert_eq!(e.errno(), ENOTSUP, "{e}");
    assert!(
        e.to_string().contains("Failed to zero out new clusters"),
        "{e}"
    );
    t.assert_equivalent();
    // Growing within the backing's end is refused, past it... both as QEMU.
    let base = t.dir.join("base.qcow2");
    assert_eq!(qemu_info(&base).get("virtual-size").as_u64(), 4 * MIB);
}

#[test]
fn shrinking_without_data_past_the_cut_matches_qemu() {
    let t = twin("shrink-clean", |_, p| {
        qemu_create(p, 2 * GIB, "");
        io(p, &["write -P 0x21 0 1M"]);
    });
    t.resize(512 * MIB, true);
    t.assert_equivalent();
    t.resize(10 * MIB, true);
    t.assert_equivalent();
}

#[test]
fn shrinking_with_data_past_the_cut_frees_it_like_qemu() {
    let t = twin("shrink-data", |_, p| {
        qemu_create(p, 2 * GIB, "");
        io(
            p,
            &[
                "write -P 0xaa 0 2M",
                "write -P 0xbb 1G 1M",
                "write -c -P 0xcc 1800M 64k",
                "write -z 1900M 128k",
                "write -P 0xdd 2047M 1M",
            ],
        );
    });
    t.resize(1000 * KIB, true);
    t.assert_equivalent();
    let (q, o) = (qemu_check_json(&t.q), qemu_check_json(&t.o));
    assert_eq!(
        o.get("allocated-clusters").as_u64(),
        q.get("allocated-clusters").as_u64()
    );
    // Like QEMU, the file is cut after its last used cluster.
    let len = std::fs::metadata(&t.o).expect("stat").len();
    assert_eq!(len, o.get("image-end-offset").as_u64(), "file not trimmed");
    // Growing again shows what QEMU shows (the straddling cluster keeps its tail).
    t.resize(2 * GIB, false);
    t.assert_equivalent();
}

#[test]
fn shrinking_below_one_l2_table_and_regrowing_matches_qemu() {
    let t = twin("shrink-l2", |_, p| {
        qemu_create(p, 64 * MIB, "cluster_size=4096");
        spread_data(p, 64 * MIB);
    });
    t.resize(3 * MIB + 4096 * 3, true);
    t.assert_equivalent();
    t.resize(64 * MIB, false);
    t.assert_equivalent();
}

#[test]
fn resizing_version_2_images_matches_qemu() {
    let t = twin("v2", |_, p| {
        qemu_create(p, 100 * MIB, "compat=0.10,cluster_size=4096");
        spread_data(p, 100 * MIB);
    });
    t.resize(3 * GIB, false);
    t.assert_equivalent();
    t.resize(50 * MIB, true);
    t.assert_equivalent();
    assert_eq!(
        qemu_info(&t.o)
            .get("format-specific")
            .get("data")
            .get("compat")
            .as_str(),
        "0.10"
    );
}

#[test]
fn resizing_extended_l2_images_matches_qemu() {
    let t = twin("ext-l2", |_, p| {
        qemu_create(p, 100 * MIB, "extended_l2=on");
        spread_data(p, 100 * MIB);
        io(p, &["write -z 60M 6k", "write -P 0x66 70M 2k"]);
    });
    t.resize(2 * GIB, false);
    t.assert_equivalent();
    t.resize(65 * MIB, true);
    t.assert_equivalent();
}

#[test]
fn resizing_images_with_snapshots_matches_qemu_and_keeps_the_snapshots() {
    let t = twin("snapshots", |_, p| {
        qemu_create(p, 64 * MIB, "");
        spread_data(p, 64 * MIB);
        qemu_snapshot_create(p, "s1");
        io(p, &["write -P 0x99 63M 1M", "write -P 0x98 0 64k"]);
        qemu_snapshot_create(p, "s2");
    });
    let before = snapshot_raw(&t.q, "s1", &t.dir);
    t.resize(8 * MIB, true);
    t.assert_equivalent();
    // qemu-img shows a snapshot at the current virtual size.
    let after = snapshot_raw(&t.o, "s1", &t.dir);
    assert_same_bytes(
        &after,
        &before[..8 * MIB as usize],
        "snapshot s1 after the shrink",
    );
    t.resize(3 * GIB, false);
    t.assert_equivalent();
    for name in ["s1", "s2"] {
        let (q, o) = (
            snapshot_raw(&t.q, name, &t.dir),
            snapshot_raw(&t.o, name, &t.dir),
        );
        assert_same_bytes(&o, &q, name);
    }
    // QEMU can still apply and delete them.
    qemu_snapshot_apply(&t.o, "s1");
    qemu_snapshot_delete(&t.o, "s2");
    assert_check_clean(&t.o);
}

/// A snapshot's disk as raw bytes, through qemu-img convert -l.
fn snapshot_raw(p: &Path, name: &str, dir: &TempDir) -> Vec<u8> {
    let out = dir.join(&format!("snap-{}.raw", unique_id()));
    let opt = format!("snapshot.name={name}");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        "-l",
        &opt,
        path_str(p),
        path_str(&out),
    ]);
    let v = std::fs::read(&out).expect("snapshot raw");
    let _ = std::fs::remove_file(&out);
    v
}

fn qemu_check_json(p: &Path) -> Json {
    let o = run("qemu-img", &["check", "--output=json", path_str(p)]);
    Json::parse(&o.stdout)
}

#[test]
fn shrinking_without_the_flag_or_to_an_unaligned_size_is_refused_like_qemu() {
    let t = twin("refusals", |_, p| qemu_create(p, 4 * MIB, ""));
    let e = oxcow_resize(&t.o, 2 * MIB, false).expect_err("needs the shrink flag");
    assert_eq!(e.errno(), EINVAL);
    assert!(e.to_string().contains("shrink"), "{e}");
    let e = oxcow_resize(&t.o, 4 * MIB + 1000, false).expect_err("unaligned");
    assert_eq!(e.errno(), EINVAL);
    assert!(
        e.to_string()
            .contains("The new size must be a multiple of 512"),
        "{e}"
    );
    assert_eq!(qemu_resize(&t.q, 4 * MIB + 1000, false).code, 1);
    let e = oxcow_resize(&t.o, 7 << 60, false).expect_err("L1 too large");
    assert!(e.to_string().contains("Failed to grow the L1 table"), "{e}");
    t.assert_equivalent();
    assert_eq!(qemu_info(&t.o).get("virtual-size").as_u64(), 4 * MIB);
}

#[test]
fn resizing_a_read_only_handle_fails_with_erofs() {
    let dir = TempDir::new("resize-ro");
    let p = dir.join("a.qcow2");
    qemu_create(&p, 4 * MIB, "");
    let e = open_ro(&p).resize(8 * MIB, false).expect_err("read-only");
    assert_eq!(e.errno(), 30);
}

#[test]
fn requests_past_the_new_end_fail_and_inside_succeed_on_the_same_handle() {
    let dir = TempDir::new("resize-handle");
    let p = dir.join("a.qcow2");
    qemu_create(&p, 4 * MIB, "");
    let img = open_rw(&p);
    img.write_at(&[1; 4096], 3 * MIB).expect("write");
    img.resize(2 * MIB, true).expect("shrink");
    assert_eq!(img.virtual_size(), 2 * MIB);
    let mut buf = [0u8; 4096];
    assert_eq!(img.read_at(&mut buf, 3 * MIB).unwrap_err().errno(), EINVAL);
    assert_eq!(img.write_at(&buf, 2 * MIB).unwrap_err().errno(), EINVAL);
    img.resize(4 * MIB, false).expect("grow");
    img.read_at(&mut buf, 3 * MIB).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0),
        "dropped data does not come back"
    );
    img.write_at(&[2; 4096], 4 * MIB - 4096)
        .expect("write at the new end");
    assert_eq!(img.info().expect("info").virtual_size, 4 * MIB);
    img.close().expect("close");
    assert_check_clean(&p);
    assert_eq!(qemu_info(&p).get("virtual-size").as_u64(), 4 * MIB);
}

#[test]
fn the_old_l1_table_is_reused_and_the_new_one_guarded_on_the_live_handle() {
    let dir = TempDir::new("resize-guard");
    let p = dir.join("a.qcow2");
    qemu_create(&p, MIB, "cluster_size=512");
    let img = open_rw(&p);
    img.write_at(&[3; 4096], 0).expect("write");
    let old_l1 = be64(&p, 40);
    img.resize(64 * MIB, false).expect("grow past the L1 table");
    img.flush().expect("flush");
    let new_l1 = be64(&p, 40);
    assert_ne!(new_l1, old_l1);
    // Enough allocations to reuse the old table's cluster once its grace period is over.
    for i in 0..64u64 {
        img.write_at(&[i as u8 + 1; 2048], MIB + i * 64 * KIB)
            .expect("write reusing freed clusters");
        img.flush().expect("flush");
    }
    img.close().expect("close");
    assert_check_clean(&p);
    // The old table's cluster was handed out again (a guarded cluster would have refused
    // the write and fenced the handle).
    let reused = qemu_map(&p).iter().any(|e| {
        e.offset
            .is_some_and(|o| o <= old_l1 && old_l1 < o + e.length)
    });
    assert!(reused, "the old L1 cluster {old_l1:#x} was not reused");
}

#[test]
fn resizing_image_variants_matches_qemu() {
    for (opts, cs) in [
        ("lazy_refcounts=on", "64k"),
        ("refcount_bits=1,cluster_size=4096", "4k"),
        ("refcount_bits=64", "64k"),
        ("cluster_size=2M", "2M"),
        ("cluster_size=16k,extended_l2=on", "16k"),
    ] {
        let t = twin("variants", |_, p| {
            qemu_create(p, 64 * MIB, opts);
            spread_data(p, 64 * MIB);
            io(
                p,
                &[&format!("write -c -P 0x44 40M {cs}"), "write -z 41M 64k"],
            );
        });
        t.resize(700 * MIB, false);
        t.assert_equivalent();
        t.resize(33 * MIB, true);
        t.assert_equivalent();
        t.resize(100 * MIB, false);
        t.assert_equivalent();
    }
}

#[test]
fn shrinking_an_overlay_and_growing_it_over_its_backing_again_matches_qemu() {
    let t = twin("overlay-shrink-grow", |dir, p| {
        backing_4m(dir);
        qemu_create_overlay(p, None, "", "base.qcow2", "qcow2");
        io(p, &["write -P 0x31 512k 64k", "write -P 0x32 3M 64k"]);
    });
    t.resize(MIB + 512, true);
    t.assert_equivalent();
    t.resize(4 * MIB, false);
    t.assert_equivalent();
}
