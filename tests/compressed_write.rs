//! Compressed cluster writes: oxcow packs compressed clusters like QEMU, QEMU reads them back
//! identically, `qemu-img check` stays clean through overwrites, discards and reopen, and bad
//! requests are refused without changing anything.

mod common;

use common::*;
use oxcow::{CompressionType, CreateOptions, ZeroFlags};

const KIB: u64 = 1024;

/// Cluster contents that compress to very different sizes (so packing crosses host-cluster
/// boundaries at odd byte offsets), plus incompressible ones.
fn cluster_data(i: u64, cs: u64, rng: &mut Rng) -> Vec<u8> {
    let mut v = vec![0u8; cs as usize];
    match i % 4 {
        0 => v
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (j / 97) as u8 ^ i as u8),
        1 => {
            // Mostly compressible with a random run whose length varies.
            let n = (rng.next_u64() % (cs / 2)) as usize;
            for b in v.iter_mut().take(n) {
                *b = rng.next_u64() as u8;
            }
        }
        2 => v.iter_mut().for_each(|b| *b = rng.next_u64() as u8),
        _ => v.copy_from_slice(&tagged_data(i as u8 | 1, i * cs, cs as usize)),
    }
    v
}

fn run(opts: CreateOptions, size: u64, tag: &str) {
    let dir = TempDir::new(tag);
    let path = dir.path().join("c.qcow2");
    let cs = opts.cluster_size as u64;
    oxcow::create(&path, size, &opts).expect("create");
    let mut model = RawModel::new(size, cs);
    let mut rng = Rng::new(size ^ cs);
    {
        let img = open_rw(&path);
        let clusters = size.div_ceil(cs);
        for i in 0..clusters {
            let len = cs.min(size - i * cs);
            let data = cluster_data(i, cs, &mut rng);
            img.write_compressed(&data[..len as usize], i * cs)
                .expect("write_compressed");
            model.write(i * cs, &data[..len as usize]);
        }
        img.flush().expect("flush");
        // Overwrite some compressed clusters (partially, so the old contents are decompressed
        // for the copy), rewrite some compressed again, zero and discard others.
        for i in (0..clusters).step_by(3) {
            let off = (i * cs + cs / 3).min(size - 1);
            let len = (cs / 2).min(size - off);
            let d = tagged_data(0x5a, off, len as usize);
            img.write_at(&d, off).expect("overwrite");
            model.write(off, &d);
        }
        for i in (1..clusters).step_by(5) {
            let len = cs.min(size - i * cs);
            let data = cluster_data(i + 1, cs, &mut rng);
            img.write_compressed(&data[..len as usize], i * cs)
                .expect("recompress");
            model.write(i * cs, &data[..len as usize]);
        }
        for i in (2..clusters).step_by(7) {
            let len = cs.min(size - i * cs);
            img.write_zeroes(i * cs, len, ZeroFlags { may_unmap: true })
                .expect("zero");
            model.zero(i * cs, len);
        }
        img.close().expect("close");
    }
    assert_check_clean(&path);
    let raw = dir.path().join("ref.raw");
    model.save(&raw);
    assert_compare_identical(&path, &raw);
    let map = qemu_map(&path);
    assert!(
        map.iter().any(|e| e.compressed),
        "qemu-img map shows no compressed cluster"
    );
    let img = open_ro(&path);
    assert_same_bytes(&oxcow_read_all(&img), &model.data, "oxcow read-back");
}

#[test]
fn compressed_writes_pack_and_read_back_in_qemu_deflate_64k() {
    run(
        CreateOptions::default(),
        3 * 1024 * KIB + 1536,
        "cw-deflate",
    );
}

#[test]
fn compressed_writes_pack_and_read_back_in_qemu_zstd_4k_refcount_1() {
    // One-bit refcounts cannot count two compressed clusters in one host cluster: each gets
    // its own, and check must still be clean.
    run(
        CreateOptions {
            cluster_size: 4096,
            refcount_bits: 1,
            compression: CompressionType::Zstd,
            ..Default::default()
        },
        700 * KIB,
        "cw-zstd-rc1",
    );
}

#[test]
fn compressed_writes_work_on_v2_and_extended_l2_images() {
    run(
        CreateOptions {
            version: 2,
            cluster_size: 512,
            ..Default::default()
        },
        200 * KIB,
        "cw-v2-512",
    );
    run(
        CreateOptions {
            extended_l2: true,
            cluster_size: 32768,
            refcount_bits: 8,
            ..Default::default()
        },
        2 * 1024 * KIB,
        "cw-ext-l2",
    );
}

#[test]
fn compressed_write_requests_must_be_whole_clusters() {
    let dir = TempDir::new("cw-bad");
    let path = dir.path().join("c.qcow2");
    oxcow::create(&path, 1024 * KIB, &CreateOptions::default()).expect("create");
    let before = read_file(&path);
    let img = open_rw(&path);
    let cs = 64 * KIB as usize;
    let buf = vec![7u8; cs];
    for (len, off) in [(cs, 512u64), (cs - 1, 0), (0, 0), (cs, 1024 * KIB)] {
        let e = img
            .write_compressed(&buf[..len], off)
            .expect_err("bad compressed write accepted");
        assert_eq!(e.errno(), libc_einval(), "{len} bytes at {off}: {e}");
    }
    img.close().expect("close");
    assert_eq!(
        read_file(&path),
        before,
        "a refused request changed the file"
    );
    let ro = open_ro(&path);
    let e = ro
        .write_compressed(&buf, 0)
        .expect_err("read-only accepted");
    assert_eq!(e.errno(), 30, "EROFS expected: {e}");
}

fn libc_einval() -> i32 {
    22
}

#[test]
fn compressed_clusters_written_by_oxcow_survive_qemu_writes_and_reopen() {
    let dir = TempDir::new("cw-qemu");
    let path = dir.path().join("c.qcow2");
    let cs = 64 * KIB;
    oxcow::create(&path, 16 * cs, &CreateOptions::default()).expect("create");
    let mut model = RawModel::new(16 * cs, cs);
    let mut rng = Rng::new(7);
    {
        let img = open_rw(&path);
        for i in 0..16 {
            let d = cluster_data(i, cs, &mut rng);
            img.write_compressed(&d, i * cs).expect("write_compressed");
            model.write(i * cs, &d);
        }
        img.close().expect("close");
    }
    qemu_io(
        &path,
        &[
            "write -P 0x33 100000 70000".to_string(),
            "discard 0 65536".to_string(),
        ],
    );
    model.write(100000, &[0x33; 70000]);
    model.zero(0, cs);
    assert_check_clean(&path);
    let img = open_rw(&path);
    let d = cluster_data(99, cs, &mut rng);
    img.write_compressed(&d, 5 * cs)
        .expect("write_compressed after qemu");
    model.write(5 * cs, &d);
    img.close().expect("close");
    assert_check_clean(&path);
    let raw = dir.path().join("ref.raw");
    model.save(&raw);
    assert_compare_identical(&path, &raw);
}

#[test]
fn small_compressed_clusters_share_host_clusters() {
    let dir = TempDir::new("cw-pack");
    let path = dir.path().join("c.qcow2");
    let cs = 64 * KIB;
    oxcow::create(&path, 64 * cs, &CreateOptions::default()).expect("create");
    let empty_len = std::fs::metadata(&path).expect("stat").len();
    let img = open_rw(&path);
    for i in 0..64u64 {
        let d: Vec<u8> = (0..cs).map(|j| (j / 4096) as u8 ^ i as u8).collect();
        img.write_compressed(&d, i * cs).expect("write_compressed");
    }
    img.close().expect("close");
    let grown = std::fs::metadata(&path).expect("stat").len() - empty_len;
    // 64 clusters of a few hundred compressed bytes each, plus one L2 table: a handful of
    // host clusters, not 64.
    assert!(
        grown <= 4 * cs,
        "64 compressed clusters took {grown} bytes of host file"
    );
    assert_check_clean(&path);
}
