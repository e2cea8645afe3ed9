//! `oxcow measure` against `qemu-img measure`: the same command line on the same input prints
//! the same text (human and JSON), and the same errors fail, for sizes from 1 MiB to 1 PiB,
//! odd sizes, cluster sizes 512 B to 2 MiB, every size-relevant option, and inputs that are
//! empty, partly written, hold zero clusters, are raw (sparse and dense), have a backing file,
//! carry bitmaps, or are measured at an internal snapshot.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// `(exit code, stdout)` of `prog measure ARGS` run in `dir`.
fn measure(prog: &str, dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(prog)
        .arg("measure")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run measure");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs both tools with `args` (and `--output json` added) and requires identical output.
fn assert_same(dir: &Path, args: &[&str]) {
    for json in [false, true] {
        let mut a: Vec<&str> = Vec::new();
        if json {
            a.extend(["--output", "json"]);
        }
        a.extend_from_slice(args);
        let q = measure("qemu-img", dir, &a);
        let o = measure(env!("CARGO_BIN_EXE_oxcow"), dir, &a);
        assert_eq!(q.0, 0, "qemu-img measure {} failed", a.join(" "));
        assert_eq!(o, q, "oxcow measure {} differs from qemu-img", a.join(" "));
    }
}

#[test]
fn size_only_matches_qemu_img_for_sizes_and_cluster_sizes() {
    let dir = TempDir::new("measure-sizes");
    let sizes = ["1M", "1G", "1T", "1000", "12345678", "3G", "513M", "0"];
    for cs in ["512", "4k", "64k", "2M"] {
        for size in sizes {
            let o = format!("cluster_size={cs}");
            // Large images at small clusters exceed QEMU's L1 limit: both must refuse.
            let q = measure(
                "qemu-img",
                dir.path(),
                &["-O", "qcow2", "-o", &o, "--size", size],
            );
            if q.0 != 0 {
                let ox = measure(
                    env!("CARGO_BIN_EXE_oxcow"),
                    dir.path(),
                    &["-O", "qcow2", "-o", &o, "--size", size],
                );
                assert_ne!(ox.0, 0, "oxcow accepted what qemu-img refused: {o} {size}");
                continue;
            }
            assert_same(dir.path(), &["-O", "qcow2", "-o", &o, "--size", size]);
        }
    }
    assert_same(dir.path(), &["--size", "1P", "-O", "qcow2"]);
    assert_same(dir.path(), &["--size", "1000"]);
}

#[test]
fn every_size_relevant_option_matches_qemu_img() {
    let dir = TempDir::new("measure-options");
    let lists = [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full,cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "refcount_bits=1",
        "refcount_bits=64,cluster_size=512",
        "compat=0.10",
        "compat=1.1,lazy_refcounts=on",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "compression_type=zstd",
    ];
    for o in lists {
        for size in ["1G", "100G", "7M"] {
            assert_same(dir.path(), &["-O", "qcow2", "-o", o, "--size", size]);
        }
    }
}

#[test]
fn bad_command_lines_fail_like_qemu_img() {
    let dir = TempDir::new("measure-bad");
    qemu_create(&dir.join("a.qcow2"), MIB, "");
    let cases: &[&[&str]] = &[
        &[],
        &["--size", "1G", "a.qcow2"],
        &["-O", "qcow2", "--size", "1E"],
        &["-O", "qcow2", "--size", "1G", "-o", "cluster_size=1000"],
        &["-O", "qcow2", "--size", "1G", "-o", "foo=bar"],
        &["-O", "qcow2", "--size", "1G", "-o", "refcount_bits=3"],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &[
            "-O",
            "qcow2",
            "--size",
            "1G",
            "-o",
            "extended_l2=on,cluster_size=4k",
        ],
        &["--size", "1G", "-o", "cluster_size=64k"],
    ];
    for args in cases {
        let q = measure("qemu-img", dir.path(), args);
        let o = measure(env!("CARGO_BIN_EXE_oxcow"), dir.path(), args);
        assert_ne!(q.0, 0, "qemu-img accepted {args:?}");
        assert_eq!(o.0, 1, "oxcow measure {args:?} should fail with exit 1");
    }
}

#[test]
fn qcow2_inputs_match_qemu_img() {
    let dir = TempDir::new("measure-qcow2");
    let p = |n: &str| path_str(&dir.join(n)).to_string();
    // Empty, partly written, with zero clusters (plain and preallocated), compressed data.
    qemu_create(&dir.join("empty.qcow2"), 64 * MIB, "");
    qemu_create(&dir.join("part.qcow2"), 64 * MIB + 12345, "cluster_size=4k");
    qemu_io(
        &dir.join("part.qcow2"),
        &[
            "write -P 1 0 1M".into(),
            "write -P 2 5M 4k".into(),
            "write -z 8M 2M".into(),
            "write -P 3 20M 512".into(),
            "write -P 4 63M 4k".into(),
        ],
    );
    qemu_create(&dir.join("zero.qcow2"), 32 * MIB, "");
    qemu_io(
        &dir.join("zero.qcow2"),
        &["write -P 5 0 4M".into(), "write -z 1M 2M".into()],
    );
    let raw = dir.join("data.raw");
    std::fs::write(&raw, tagged_data(7, 0, (3 * MIB) as usize)).unwrap();
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &p("data.raw"),
        &p("comp.qcow2"),
    ]);
    qemu_create(&dir.join("v2.qcow2"), 16 * MIB, "compat=0.10");
    qemu_io(&dir.join("v2.qcow2"), &["write -P 6 1M 1M".into()]);
    for img in [
        "empty.qcow2",
        "part.qcow2",
        "zero.qcow2",
        "comp.qcow2",
        "v2.qcow2",
    ] {
        for o in [
            "cluster_size=64k",
            "cluster_size=512",
            "cluster_size=2M",
            "compat=0.10",
        ] {
            assert_same(dir.path(), &["-O", "qcow2", "-o", o, img]);
        }
        assert_same(
            dir.path(),
            &["-O", "qcow2", "-o", "backing_file=x.qcow2", img],
        );
        assert_same(
            dir.path(),
            &["-O", "qcow2", "-o", "preallocation=full", img],
        );
        assert_same(dir.path(), &[img]);
        assert_same(dir.path(), &["-f", "qcow2", "-O", "qcow2", img]);
    }
}

#[test]
fn backing_chains_count_the_data_of_every_layer() {
    let dir = TempDir::new("measure-chain");
    let p = |n: &str| path_str(&dir.join(n)).to_string();
    std::fs::write(dir.join("base.raw"), tagged_data(1, 0, (2 * MIB) as usize)).unwrap();
    // A raw base shorter than the top, a qcow2 middle with data and zeros, a top with data.
    qemu_create_overlay(
        &dir.join("mid.qcow2"),
        Some(16 * MIB),
        "",
        "base.raw",
        "raw",
    );
    qemu_io(
        &dir.join("mid.qcow2"),
        &["write -P 2 4M 1M".into(), "write -z 1M 64k".into()],
    );
    qemu_create_overlay(&dir.join("top.qcow2"), None, "", "mid.qcow2", "qcow2");
    qemu_io(&dir.join("top.qcow2"), &["write -P 3 10M 64k".into()]);
    let _ = p;
    for img in ["top.qcow2", "mid.qcow2"] {
        assert_same(dir.path(), &["-O", "qcow2", img]);
        assert_same(dir.path(), &["-O", "qcow2", "-o", "cluster_size=4k", img]);
    }
}

#[test]
fn raw_inputs_count_data_not_holes() {
    let dir = TempDir::new("measure-raw");
    let sparse = dir.join("sparse.raw");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(100 * MIB + 7).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[9u8; 4096], 3 * MIB).unwrap();
    f.write_all_at(&[9u8; 100], 50 * MIB + 4000).unwrap();
    f.write_all_at(&[0u8; 65536], 70 * MIB).unwrap(); // written zeros are data to qemu-img
    drop(f);
    std::fs::write(dir.join("dense.raw"), tagged_data(2, 0, (5 * MIB) as usize)).unwrap();
    for img in ["sparse.raw", "dense.raw"] {
        for o in ["cluster_size=64k", "cluster_size=512", "cluster_size=2M"] {
            assert_same(dir.path(), &["-O", "qcow2", "-o", o, img]);
        }
        assert_same(dir.path(), &["-f", "raw", "-O", "qcow2", img]);
        assert_same(dir.path(), &[img]);
    }
}

#[test]
fn bitmaps_size_matches_qemu_img() {
    let dir = TempDir::new("measure-bitmaps");
    let img = dir.join("bm.qcow2");
    qemu_create(&img, 100 * MIB + 512, "");
    qemu_io(&img, &["write -P 1 0 1M".into()]);
    // No bitmaps: the line is printed with 0 for a v3 input.
    assert_same(dir.path(), &["-O", "qcow2", "bm.qcow2"]);
    qemu_bitmap_add(&img, "b1", true);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "4k",
        path_str(&img),
        "a-longer-bitmap-name",
    ]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "2M",
        "--disable",
        path_str(&img),
        "x",
    ]);
    for o in [
        "cluster_size=64k",
        "cluster_size=512",
        "compat=0.10",
        "cluster_size=2M",
    ] {
        assert_same(dir.path(), &["-O", "qcow2", "-o", o, "bm.qcow2"]);
    }
}

#[test]
fn snapshot_of_the_input_is_measured_with_l() {
    let dir = TempDir::new("measure-snap");
    let img = dir.join("s.qcow2");
    qemu_create(&img, 32 * MIB, "");
    qemu_io(&img, &["write -P 1 0 1M".into()]);
    qemu_snapshot_create(&img, "one");
    qemu_io(&img, &["write -P 2 8M 8M".into()]);
    assert_same(dir.path(), &["-O", "qcow2", "-l", "one", "s.qcow2"]);
    assert_same(
        dir.path(),
        &["-O", "qcow2", "-l", "snapshot.name=one", "s.qcow2"],
    );
    assert_same(dir.path(), &["-O", "qcow2", "s.qcow2"]);
}
