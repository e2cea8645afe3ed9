//! QEMU writes, oxcow reads: images built with qemu-img/qemu-io in many variants are read
//! through oxcow and compared byte-for-byte with `qemu-img convert -O raw`.

mod common;

use common::*;
use oxcow::{CompressionType, Image, OpenOptions};
use std::path::Path;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn pat(i: usize) -> u8 {
    ((i * 37 + 0x11) % 254 + 1) as u8
}

/// A set of qemu-io writes that exercise one cluster size: aligned, unaligned, cluster-crossing,
/// L2-table-crossing, the last byte, overwrites, and seeded random ones.
fn pattern_writes(cs: u64, l2_cov: u64, vsize: u64, seed: u64, nrandom: usize) -> Vec<String> {
    let mut v = Vec::new();
    let mut i = 0usize;
    let mut w = |off: u64, len: u64| {
        if off < vsize && len > 0 {
            let len = len.min(vsize - off);
            v.push(format!("write -P {:#x} {off} {len}", pat(i)));
            i += 1;
        }
    };
    w(0, cs); // one whole cluster
    w(2 * cs - 100, 300); // crosses a cluster boundary, unaligned
    w(5 * cs + 1, 2 * cs + 5); // spans three clusters
    w(9 * cs + 17, 3); // tiny, inside a cluster
    w(vsize - 1, 1); // the last byte
    w(vsize - cs - 3, 2); // near the end
    if l2_cov < vsize {
        w(l2_cov - 333, 1000); // crosses an L2 table boundary
        w(l2_cov * 2 - cs, 2 * cs); // exactly around the second boundary (if any)
    }
    let mut rng = Rng::new(seed);
    for _ in 0..nrandom {
        let len = rng.range(1, 3 * cs);
        let off = rng.below(vsize);
        w(off, len);
    }
    w(cs / 2, cs); // overwrite part of the first writes
    w(2 * cs - 50, 20);
    v
}

fn l2_coverage(cs: u64, extended: bool) -> u64 {
    cs * (cs / if extended { 16 } else { 8 })
}

/// Opens `path` read-only with oxcow and compares every byte with qemu's view.
fn verify(dir: &TempDir, path: &Path, seed: u64) {
    let raw = qemu_to_raw_file(path, "qcow2", dir);
    let img = open_ro(path);
    assert_oxcow_matches_raw_file(&img, &raw, seed);
    drop(img);
    std::fs::remove_file(&raw).unwrap();
}

fn build_and_verify(tag: &str, cs: u64, vsize: u64, opts: &str, extended: bool, seed: u64) {
    let dir = TempDir::new(tag);
    let p = dir.join("img.qcow2");
    let o = if opts.is_empty() {
        format!("cluster_size={cs}")
    } else {
        format!("cluster_size={cs},{opts}")
    };
    qemu_create(&p, vsize, &o);
    let cmds = pattern_writes(cs, l2_coverage(cs, extended), vsize, seed, 40);
    qemu_io(&p, &cmds);
    verify(&dir, &p, seed);
}

#[test]
fn qemu_written_512_byte_clusters_read_identically() {
    build_and_verify("c512", 512, 4 * MIB, "", false, 1);
}

#[test]
fn qemu_written_4k_clusters_read_identically() {
    // 4 KiB clusters: one L2 table covers 2 MiB, so 8 MiB crosses three L2 boundaries.
    build_and_verify("c4k", 4 * KIB, 8 * MIB, "", false, 2);
}

#[test]
fn qemu_written_64k_clusters_crossing_l2_boundary_read_identically() {
    // One L2 table covers 512 MiB: a sparse 640 MiB disk crosses it.
    build_and_verify("c64k", 64 * KIB, 640 * MIB, "", false, 3);
}

#[test]
fn qemu_written_2m_clusters_read_identically() {
    build_and_verify("c2m", 2 * MIB, 64 * MIB, "", false, 4);
}

#[test]
fn qemu_written_refcount_bits_1_read_identically() {
    build_and_verify("rc1", 4 * KIB, 8 * MIB, "refcount_bits=1", false, 5);
}

#[test]
fn qemu_written_refcount_bits_16_read_identically() {
    build_and_verify("rc16", 512, 3 * MIB, "refcount_bits=16", false, 6);
}

#[test]
fn qemu_written_refcount_bits_64_with_grown_refcount_table_read_identically() {
    // 512-byte clusters with 64-bit refcounts: one refblock covers 64 clusters, a one-cluster
    // refcount table covers 2 MiB of file. Writing > 4 MiB makes QEMU grow the table.
    let dir = TempDir::new("rc64");
    let p = dir.join("img.qcow2");
    let vsize = 6 * MIB;
    qemu_create(&p, vsize, "cluster_size=512,refcount_bits=64");
    let mut cmds = Vec::new();
    let mut off = 0;
    let mut i = 0;
    while off < 5 * MIB {
        let len = 256 * KIB + 511;
        cmds.push(format!("write -P {:#x} {off} {len}", pat(i)));
        off += len;
        i += 1;
    }
    cmds.extend(pattern_writes(512, l2_coverage(512, false), vsize, 7, 20));
    qemu_io(&p, &cmds);
    let reftable_clusters = be32(&p, 56);
    assert!(
        reftable_clusters > 1,
        "test setup: refcount table did not grow ({reftable_clusters} clusters)"
    );
    verify(&dir, &p, 7);
}

#[test]
fn qemu_written_compat_0_10_images_read_identically() {
    build_and_verify("v2-4k", 4 * KIB, 6 * MIB, "compat=0.10", false, 8);
    build_and_verify("v2-64k", 64 * KIB, 16 * MIB, "compat=0.10", false, 9);
    build_and_verify("v2-512", 512, 2 * MIB, "compat=0.10", false, 10);
}

#[test]
fn qemu_written_compat_1_1_lazy_refcounts_read_identically() {
    build_and_verify(
        "lazy",
        4 * KIB,
        4 * MIB,
        "compat=1.1,lazy_refcounts=on",
        false,
        11,
    );
}

/// Sub-cluster writes and sub-cluster zero writes on an extended-L2 image.
fn subcluster_cmds(cs: u64, vsize: u64, seed: u64) -> Vec<String> {
    let sc = cs / 32;
    let mut v = vec![
        format!("write -P 0x21 0 {sc}"), // first subcluster only
        format!("write -P 0x22 {} {}", cs + 3 * sc, sc), // one subcluster in the middle
        format!("write -P 0x23 {} {}", 2 * cs + 5, 10), // a few bytes of a subcluster
        format!("write -P 0x24 {} {}", 3 * cs - sc / 2, sc), // crosses a cluster boundary
        format!("write -P 0x25 {} {}", 4 * cs, cs), // a whole cluster
        format!("write -z {} {}", 4 * cs + 2 * sc, 3 * sc), // zero subclusters of allocated cluster
        format!("write -z {} {}", 6 * cs + sc, 2 * sc), // zero subclusters of unallocated cluster
        format!("write -z -u {} {}", 4 * cs + 10 * sc, sc), // zero+unmap subcluster
        format!("write -P 0x26 {} {}", 4 * cs + 11 * sc + 7, 100), // data after zeroed ones
        format!("write -z {} {}", 7 * cs, cs), // whole-cluster zero
        format!("write -P 0x27 {} {}", 7 * cs + 31 * sc, sc), // last subcluster of a zero cluster
    ];
    v.extend(pattern_writes(cs, l2_coverage(cs, true), vsize, seed, 15));
    v
}

#[test]
fn qemu_written_extended_l2_subclusters_read_identically() {
    for (cs, vsize) in [
        (64 * KIB, 32 * MIB),
        (16 * KIB, 8 * MIB),
        (2 * MIB, 128 * MIB),
    ] {
        let dir = TempDir::new("ext-l2");
        let p = dir.join("img.qcow2");
        qemu_create(&p, vsize, &format!("cluster_size={cs},extended_l2=on"));
        qemu_io(&p, &subcluster_cmds(cs, vsize, cs));
        verify(&dir, &p, 12);
    }
}

#[test]
fn qemu_written_extended_l2_over_backing_file_reads_unallocated_subclusters_from_backing() {
    let dir = TempDir::new("ext-l2-backing");
    let cs = 64 * KIB;
    let vsize = 8 * MIB;
    let base = dir.join("base.qcow2");
    qemu_create(&base, vsize, "cluster_size=65536");
    qemu_io(&base, &[format!("write -P 0x5a 0 {vsize}")]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,extended_l2=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(&top, &subcluster_cmds(cs, vsize, 13));
    verify(&dir, &top, 13);
}

/// A raw source with random (incompressible), patterned (compressible), zero and half-zero
/// clusters, used to build compressed images with `qemu-img convert -c`.
fn mixed_raw(len: u64, cs: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = vec![0u8; len as usize];
    let mut off = 0u64;
    while off < len {
        let n = cs.min(len - off) as usize;
        let c = &mut v[off as usize..off as usize + n];
        match rng.below(5) {
            0 => rng.fill(c),
            1 => c.copy_from_slice(&tagged_data(rng.below(250) as u8 + 1, off, n)),
            2 => {}
            3 => {
                let h = n / 2;
                c[h..].copy_from_slice(&tagged_data(0x77, off, n - h))
            }
            _ => c.fill(rng.below(255) as u8 + 1),
        }
        off += n as u64;
    }
    v
}

fn compressed_case(tag: &str, cs: u64, vsize: u64, ctype: &str, extra_writes: bool) {
    let dir = TempDir::new(tag);
    let src = dir.join("src.raw");
    let data = mixed_raw(vsize, cs, cs ^ vsize);
    std::fs::write(&src, &data).unwrap();
    let p = dir.join("img.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("cluster_size={cs},compression_type={ctype}"),
        path_str(&src),
        path_str(&p),
    ]);
    // The image really holds compressed clusters.
    assert!(
        qemu_map(&p).iter().any(|e| e.compressed),
        "test setup: no compressed clusters in {tag}"
    );
    {
        let img = open_ro(&p);
        let info = img.info().unwrap();
        let want = if ctype == "zstd" {
            CompressionType::Zstd
        } else {
            CompressionType::Deflate
        };
        assert_eq!(info.compression, want);
        assert_oxcow_matches_raw_file(&img, &src, cs);
    }
    if extra_writes {
        // Partial overwrites of compressed clusters make QEMU decompress and rewrite them.
        qemu_io(
            &p,
            &pattern_writes(cs, l2_coverage(cs, false), vsize, 99, 20),
        );
        verify(&dir, &p, 14);
    }
}

#[test]
fn qemu_compressed_zlib_images_read_identically() {
    compressed_case("zlib-512", 512, MIB, "zlib", true);
    compressed_case("zlib-4k", 4 * KIB, 4 * MIB, "zlib", true);
    compressed_case("zlib-64k", 64 * KIB, 8 * MIB, "zlib", true);
}

#[test]
fn qemu_compressed_zstd_images_read_identically() {
    compressed_case("zstd-4k", 4 * KIB, 2 * MIB, "zstd", false);
    compressed_case("zstd-64k", 64 * KIB, 8 * MIB, "zstd", true);
    compressed_case("zstd-2m", 2 * MIB, 16 * MIB, "zstd", true);
}

#[test]
fn qemu_zero_clusters_read_as_zeros() {
    for cs in [512, 4 * KIB, 64 * KIB] {
        let dir = TempDir::new("zero");
        let p = dir.join("img.qcow2");
        let vsize = 4 * MIB;
        qemu_create(&p, vsize, &format!("cluster_size={cs}"));
        let mut cmds = pattern_writes(cs, l2_coverage(cs, false), vsize, 15, 20);
        cmds.extend([
            format!("write -P 0x61 0 {}", 16 * cs),
            // Preallocated zero clusters: data first, then write -z without -u (v3).
            format!("write -z {} {}", 2 * cs, 3 * cs),
            // Unmapped zero clusters.
            format!("write -z -u {} {}", 6 * cs, 2 * cs),
            // Unaligned zero writes (partial clusters get explicit zeros).
            format!("write -z {} {}", 9 * cs + 7, cs + 9),
            // Zero clusters where nothing was allocated.
            format!("write -z {} {}", 40 * cs, 4 * cs),
            // Data written into a zero cluster afterwards.
            format!("write -P 0x62 {} {}", 3 * cs + 5, 17),
        ]);
        qemu_io(&p, &cmds);
        let map = qemu_map(&p);
        assert!(
            map.iter()
                .any(|e| e.depth == 0 && e.zero && e.present && e.offset.is_some()),
            "test setup: no preallocated zero clusters: {map:?}"
        );
        verify(&dir, &p, 15);
    }
}

#[test]
fn qemu_zero_clusters_over_backing_file_hide_backing_data() {
    let dir = TempDir::new("zero-backing");
    let cs = 4 * KIB;
    let vsize = 2 * MIB;
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x3c, 0, vsize as usize)).unwrap();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&top),
    ]);
    qemu_io(
        &top,
        &[
            format!("write -P 0x71 0 {}", 8 * cs),
            format!("write -z {} {}", 2 * cs, 2 * cs),
            format!("write -z -u {} {}", 5 * cs, cs),
            format!("write -z {} {}", 20 * cs, 3 * cs),
            format!("write -z -u {} {}", 30 * cs, 3 * cs),
            format!("write -z {} {}", 40 * cs + 100, 200),
        ],
    );
    verify(&dir, &top, 16);
}

#[test]
fn qemu_v2_zero_writes_read_identically() {
    let dir = TempDir::new("v2-zero");
    let cs = 4 * KIB;
    let vsize = 2 * MIB;
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x3d, 0, vsize as usize)).unwrap();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&top),
    ]);
    qemu_io(
        &top,
        &[
            format!("write -P 0x71 0 {}", 8 * cs),
            format!("write -z {} {}", 2 * cs, 2 * cs),
            format!("write -z {} {}", 20 * cs + 3, 3 * cs),
        ],
    );
    verify(&dir, &top, 17);
}

#[test]
fn qemu_three_deep_backing_chain_with_raw_base_and_relative_names_reads_identically() {
    let dir = TempDir::new("chain");
    // raw base (1 MiB + 1000 bytes, not cluster aligned) <- qcow2 mid (3 MiB) <- qcow2 top (5 MiB)
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x41, 0, (MIB + 1000) as usize)).unwrap();
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mid = sub.join("mid.qcow2");
    // Relative name, resolved against mid's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        path_str(&mid),
        &(3 * MIB).to_string(),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x42 4096 8192".into(),
            "write -P 0x43 1048000 5000".into(), // straddles the end of the base
            format!("write -P 0x44 {} 4096", 2 * MIB),
            "write -z 20480 4096".into(), // hides base data
        ],
    );
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        "-b",
        "sub/mid.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
        &(5 * MIB).to_string(),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x51 6000 100".into(), // partial cluster: the rest comes from mid/base
            format!("write -P 0x52 {} 3000", 3 * MIB - 1000), // straddles the end of mid
            format!("write -P 0x53 {} 4096", 4 * MIB),
        ],
    );
    // Open from a different working directory to make sure relative names follow the image.
    let info = open_ro(&top).info().unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("sub/mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    verify(&dir, &top, 18);
    // Reads past the end of a shorter backing file are zeros.
    let img = open_ro(&top);
    let mut buf = vec![0xffu8; 8192];
    img.read_at(&mut buf, 3 * MIB + 4096).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "data past the end of the backing chain is not zero"
    );
    // Opening without the backing chain reads zeros for unallocated clusters.
    let nb = Image::open(
        &top,
        &OpenOptions {
            no_backing: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0xffu8; 4096];
    nb.read_at(&mut buf, 65536 * 2).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "no_backing open still reads the backing file"
    );
}

#[test]
fn qemu_image_with_internal_snapshot_and_later_writes_reads_identically() {
    let dir = TempDir::new("snap");
    let p = dir.join("img.qcow2");
    let cs = 4 * KIB;
    let vsize = 4 * MIB;
    qemu_create(&p, vsize, "cluster_size=4096");
    qemu_io(
        &p,
        &pattern_writes(cs, l2_coverage(cs, false), vsize, 19, 30),
    );
    qemu_img(&["snapshot", "-c", "snap1", path_str(&p)]);
    qemu_io(
        &p,
        &pattern_writes(cs, l2_coverage(cs, false), vsize, 20, 30),
    );
    qemu_img(&["snapshot", "-c", "snap2", path_str(&p)]);
    qemu_io(
        &p,
        &[
            format!("write -P 0x99 {} {}", cs / 2, 5 * cs),
            format!("write -z {} {}", 8 * cs, 2 * cs),
        ],
    );
    assert_eq!(open_ro(&p).info().unwrap().snapshot_count, 2);
    verify(&dir, &p, 21);
    // Reverting to a snapshot (QEMU copies its L1 into the active one) also reads identically.
    qemu_img(&["snapshot", "-a", "snap1", path_str(&p)]);
    verify(&dir, &p, 22);
}

#[test]
fn qemu_preallocated_images_read_identically() {
    for prealloc in ["metadata", "falloc"] {
        for cs in [512, 64 * KIB] {
            let dir = TempDir::new("prealloc");
            let p = dir.join("img.qcow2");
            let vsize = 3 * MIB;
            qemu_create(
                &p,
                vsize,
                &format!("cluster_size={cs},preallocation={prealloc}"),
            );
            verify(&dir, &p, 23);
            qemu_io(
                &p,
                &pattern_writes(cs, l2_coverage(cs, false), vsize, 23, 20),
            );
            verify(&dir, &p, 24);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// info() and block_status() against qemu-img info / map
// ---------------------------------------------------------------------------------------------

fn check_info(p: &Path) {
    let j = qemu_info(p);
    let img = open_ro(p);
    let info = img.info().unwrap();
    assert_eq!(
        info.virtual_size,
        j.get("virtual-size").as_u64(),
        "virtual size of {}",
        p.display()
    );
    assert_eq!(
        info.cluster_size as u64,
        j.get("cluster-size").as_u64(),
        "cluster size"
    );
    let d = j.get("format-specific").get("data");
    let compat = d.get("compat").as_str();
    assert_eq!(
        info.version,
        if compat == "0.10" { 2 } else { 3 },
        "version (compat {compat})"
    );
    assert_eq!(
        info.refcount_bits as u64,
        d.get("refcount-bits").as_u64(),
        "refcount bits"
    );
    if let Some(x) = d.opt("extended-l2") {
        assert_eq!(info.extended_l2, x.as_bool(), "extended l2");
    } else {
        assert!(!info.extended_l2);
    }
    if let Some(x) = d.opt("lazy-refcounts") {
        assert_eq!(info.lazy_refcounts, x.as_bool(), "lazy refcounts");
    }
    if let Some(x) = d.opt("corrupt") {
        assert_eq!(info.corrupt, x.as_bool(), "corrupt");
    }
    let ctype = d.get("compression-type").as_str();
    let want = if ctype == "zstd" {
        CompressionType::Zstd
    } else {
        CompressionType::Deflate
    };
    assert_eq!(info.compression, want, "compression");
    assert_eq!(info.dirty, j.get("dirty-flag").as_bool(), "dirty");
    assert!(info.read_only);
    assert_eq!(
        info.backing_file.as_deref(),
        j.opt("backing-filename").map(|v| v.as_str()),
        "backing file"
    );
    assert_eq!(
        info.backing_format.as_deref(),
        j.opt("backing-filename-format").map(|v| v.as_str()),
        "backing format"
    );
    let nsnap = j.opt("snapshots").map(|s| s.as_array().len()).unwrap_or(0);
    assert_eq!(info.snapshot_count as usize, nsnap, "snapshot count");
    assert_eq!(
        info.file_size,
        std::fs::metadata(p).unwrap().len(),
        "file size"
    );
}

#[test]
fn info_matches_qemu_img_info() {
    let dir = TempDir::new("info");
    let cases: &[(&str, &str, u64)] = &[
        ("a.qcow2", "cluster_size=65536", 64 * MIB),
        (
            "b.qcow2",
            "cluster_size=512,refcount_bits=64",
            3 * MIB + 512,
        ),
        ("c.qcow2", "cluster_size=4096,compat=0.10", 10 * MIB),
        (
            "d.qcow2",
            "cluster_size=65536,extended_l2=on,compression_type=zstd",
            100 * MIB,
        ),
        (
            "e.qcow2",
            "cluster_size=4096,lazy_refcounts=on,refcount_bits=1",
            5 * MIB + 12345 * 512,
        ),
    ];
    for (name, opts, size) in cases {
        let p = dir.join(name);
        qemu_create(&p, *size, opts);
        qemu_io(&p, &["write -P 0x11 0 100000".to_string()]);
        check_info(&p);
    }
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    check_info(&top);
    let snap = dir.join("b.qcow2");
    qemu_img(&["snapshot", "-c", "s1", path_str(&snap)]);
    qemu_img(&["snapshot", "-c", "s2", path_str(&snap)]);
    check_info(&snap);
}

#[test]
fn block_status_matches_qemu_img_map() {
    // Plain image with data, preallocated zeros, unmapped zeros and holes.
    let dir = TempDir::new("map");
    for cs in [512, 64 * KIB] {
        let p = dir.join(&format!("plain-{cs}.qcow2"));
        let vsize = 4 * MIB;
        qemu_create(&p, vsize, &format!("cluster_size={cs}"));
        let mut cmds = pattern_writes(cs, l2_coverage(cs, false), vsize, 25, 10);
        cmds.push(format!("write -z {} {}", 0, 2 * cs));
        cmds.push(format!("write -z {} {}", 30 * cs, 2 * cs));
        qemu_io(&p, &cmds);
        check_block_status(&p, false);
    }
    // Overlay with a backing file, zero clusters over backing data.
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x3c, 0, (2 * MIB) as usize)).unwrap();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x71 8192 20000".into(),
            "write -z 65536 8192".into(),
            "write -z -u 131072 4096".into(),
        ],
    );
    check_block_status(&top, true);
    // Compressed clusters.
    let src = dir.join("src.raw");
    std::fs::write(&src, mixed_raw(2 * MIB, 4096, 5)).unwrap();
    let c = dir.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(&src),
        path_str(&c),
    ]);
    check_block_status(&c, false);
    // Extended L2 with partially allocated clusters.
    let x = dir.join("ext.qcow2");
    qemu_create(&x, 8 * MIB, "cluster_size=65536,extended_l2=on");
    qemu_io(&x, &subcluster_cmds(64 * KIB, 8 * MIB, 26));
    check_block_status(&x, false);
}
