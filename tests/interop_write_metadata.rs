//! oxcow's metadata as QEMU sees it: refcount-table growth, what write_zeroes (with and without
//! may_unmap) and discard leave allocated, the create options, persistent bitmaps invalidated on
//! write, and unknown header extensions kept across header rewrites.
//!
//! The oracle is QEMU: `qemu-img check`, `qemu-img info` and `qemu-img map` report the expected
//! structure, and `qemu-img compare` finds the guest data identical to a raw reference model.

mod common;

use common::workload::*;
use common::*;
use oxcow::{BackingFormat, CompressionType, CreateOptions, Preallocation, ZeroFlags};
use std::path::Path;

// --- refcount-table growth ---------------------------------------------------------------------

fn refcount_growth_case(by_qemu: bool, seed: u64) {
    let v = Variant {
        cs: 512,
        vsize: 6 * MIB,
        refcount_bits: 64,
        by_qemu,
        ..Default::default()
    };
    let dir = TempDir::new("reftable-growth");
    let (p, mut model) = setup(&dir, &v);
    let g = v.geometry();
    // Sequential writes of odd sizes covering > 4 MiB, then random ones.
    let mut ops = Vec::new();
    let mut off = 0u64;
    let mut rng = Rng::new(seed);
    let mut i = 0u64;
    while off < 5 * MIB {
        let len = rng.range(1, 200 * KIB);
        ops.push(Op::Write {
            off,
            len,
            tag: (i % 250 + 1) as u8,
            random: i % 3 == 0,
        });
        off += len;
        i += 1;
        if i % 10 == 0 {
            ops.push(Op::Flush);
        }
        if i % 25 == 0 {
            ops.push(Op::Reopen);
        }
    }
    ops.extend(gen_ops(seed, 100, &g, true));
    apply_ops(&p, &mut model, &ops, seed, &rw());
    let reftable_clusters = be32(&p, 56);
    assert!(
        reftable_clusters >= 3,
        "refcount table did not grow: {reftable_clusters} clusters"
    );
    verify_all(&dir, &p, &model, "refcount-table growth");
    qemu_then_oxcow_round(&dir, &p, &mut model, &g, seed);
}

#[test]
fn refcount_table_growth_with_512_byte_clusters_and_64_bit_refcounts_passes_qemu_check() {
    refcount_growth_case(false, 601);
}

#[test]
fn refcount_table_growth_on_qemu_created_image_passes_qemu_check() {
    refcount_growth_case(true, 602);
}

fn map_at(p: &Path, off: u64) -> MapEntry {
    qemu_map(p)
        .into_iter()
        .find(|e| e.start <= off && off < e.start + e.length)
        .expect("offset covered by qemu-img map")
}

#[test]
fn write_zeroes_keeps_or_unmaps_clusters_as_requested_and_discard_deallocates() {
    let cs = 64 * KIB;
    for version in [3u32, 2] {
        let dir = TempDir::new("zero-semantics");
        let p = dir.join("img.qcow2");
        oxcow::create(
            &p,
            8 * MIB,
            &CreateOptions {
                version,
                ..Default::default()
            },
        )
        .unwrap();
        let img = open_rw(&p);
        img.write_at(&vec![0x61; (8 * cs) as usize], 0).unwrap();
        // Whole clusters, no unmap: v3 keeps them allocated (preallocated zero clusters).
        img.write_zeroes(cs, 2 * cs, ZeroFlags { may_unmap: false })
            .unwrap();
        // Whole clusters with unmap.
        img.write_zeroes(4 * cs, 2 * cs, ZeroFlags { may_unmap: true })
            .unwrap();
        // Discard of one whole cluster plus partial neighbours.
        img.discard(7 * cs - 100, cs + 200).unwrap();
        img.close().unwrap();
        assert_check_clean(&p);
        let mut model = RawModel::new(8 * MIB, cs);
        model.write(0, &vec![0x61; (8 * cs) as usize]);
        model.zero(cs, 2 * cs);
        model.zero(4 * cs, 2 * cs);
        model.discard(7 * cs - 100, cs + 200);
        assert_compare_model(&p, &model, &dir);
        let e = map_at(&p, cs);
        assert!(
            e.zero && !e.data,
            "v{version}: zeroed range does not read as zero in qemu-img map: {e:?}"
        );
        if version == 3 {
            assert!(
                e.offset.is_some(),
                "v3: write_zeroes without may_unmap deallocated the cluster: {e:?}"
            );
            let e = map_at(&p, 4 * cs);
            assert!(
                e.zero && e.offset.is_none(),
                "v3: write_zeroes with may_unmap kept the host cluster: {e:?}"
            );
        }
        let e = map_at(&p, 7 * cs);
        assert!(
            e.zero && e.offset.is_none(),
            "v{version}: discarded cluster is still allocated: {e:?}"
        );
        let e = map_at(&p, 6 * cs + 10);
        assert!(
            e.data,
            "v{version}: partial discard at the edge touched the neighbour cluster: {e:?}"
        );
        check_block_status(&p, false);
    }
}

#[test]
fn oxcow_create_options_are_what_qemu_img_info_reports() {
    let dir = TempDir::new("create-info");
    let cases: Vec<(&str, u64, CreateOptions)> = vec![
        ("default", 64 * MIB, CreateOptions::default()),
        (
            "c512-rb64",
            3 * MIB,
            CreateOptions {
                cluster_size: 512,
                refcount_bits: 64,
                ..Default::default()
            },
        ),
        (
            "v2",
            10 * MIB,
            CreateOptions {
                version: 2,
                cluster_size: 4096,
                ..Default::default()
            },
        ),
        (
            "extl2-zstd-lazy",
            100 * MIB,
            CreateOptions {
                extended_l2: true,
                compression: CompressionType::Zstd,
                lazy_refcounts: true,
                ..Default::default()
            },
        ),
        (
            "c2m-rb1",
            64 * MIB,
            CreateOptions {
                cluster_size: 2 << 20,
                refcount_bits: 1,
                ..Default::default()
            },
        ),
        (
            "prealloc",
            4 * MIB,
            CreateOptions {
                cluster_size: 4096,
                preallocation: Preallocation::Metadata,
                ..Default::default()
            },
        ),
    ];
    for (name, size, o) in cases {
        let p = dir.join(&format!("{name}.qcow2"));
        oxcow::create(&p, size, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_check_clean(&p);
        let j = qemu_info(&p);
        let d = j.get("format-specific").get("data");
        assert_eq!(j.get("virtual-size").as_u64(), size, "{name}");
        assert_eq!(
            j.get("cluster-size").as_u64(),
            o.cluster_size as u64,
            "{name}"
        );
        assert_eq!(
            d.get("compat").as_str(),
            if o.version == 2 { "0.10" } else { "1.1" },
            "{name}"
        );
        assert_eq!(
            d.get("refcount-bits").as_u64(),
            o.refcount_bits as u64,
            "{name}"
        );
        if o.version == 3 {
            assert_eq!(d.get("extended-l2").as_bool(), o.extended_l2, "{name}");
            assert_eq!(
                d.get("lazy-refcounts").as_bool(),
                o.lazy_refcounts,
                "{name}"
            );
            let ct = if o.compression == CompressionType::Zstd {
                "zstd"
            } else {
                "zlib"
            };
            assert_eq!(d.get("compression-type").as_str(), ct, "{name}");
        }
        if o.preallocation == Preallocation::Metadata {
            let map = qemu_map(&p);
            assert!(
                map.iter().all(|e| e.offset.is_some()),
                "{name}: preallocation=metadata left unallocated ranges: {map:?}"
            );
        }
        // oxcow reads zeros everywhere, and QEMU can write to it.
        let img = open_ro(&p);
        let mut b = vec![0xffu8; 100_000];
        img.read_at(&mut b, size / 2).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{name}: fresh image not zero");
        drop(img);
        qemu_io(&p, &["write -P 0x42 1000 200000".into()]);
        assert_check_clean(&p);
        let img = open_ro(&p);
        let mut b = vec![0u8; 200_000];
        img.read_at(&mut b, 1000).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x42),
            "{name}: data written by QEMU not read back"
        );
    }
    // Backing file with size 0: the overlay takes the backing file's size; relative name kept.
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x11, 0, (3 * MIB) as usize)).unwrap();
    let top = dir.join("top.qcow2");
    oxcow::create(
        &top,
        0,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some(BackingFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let j = qemu_info(&top);
    assert_eq!(j.get("virtual-size").as_u64(), 3 * MIB);
    assert_eq!(j.get("backing-filename").as_str(), "base.raw");
    assert_eq!(j.get("backing-filename-format").as_str(), "raw");
    assert_check_clean(&top);
    assert_compare_identical(&top, &base);
}

/// oxcow maintains persistent bitmaps (issue 12): a writable open keeps autoclear bit 0, the
/// bitmap records the write and is stored consistent at close; the image stays consistent.
#[test]
fn writing_an_image_with_persistent_bitmaps_keeps_them_and_stays_consistent() {
    let dir = TempDir::new("bitmaps");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=65536");
    qemu_bitmap_add(&p, "b0", true);
    qemu_io(&p, &["write -P 0x11 0 100000".into()]);
    assert_eq!(be64(&p, 88) & 1, 1, "setup: bitmaps autoclear bit not set");
    {
        let img = open_ro(&p);
        let mut b = vec![0u8; 100000];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x11));
    }
    assert_eq!(
        be64(&p, 88) & 1,
        1,
        "read-only open cleared the bitmaps bit"
    );
    let img = open_rw(&p);
    img.write_at(&[0x22; 5000], 200_000).unwrap();
    img.close().unwrap();
    assert_eq!(
        be64(&p, 88) & 1,
        1,
        "bitmaps autoclear bit cleared by oxcow, which keeps the bitmaps"
    );
    let info = run_ok("qemu-img", &["info", path_str(&p)]).stdout;
    assert!(info.contains("b0") && !info.contains("in-use"), "{info}");
    assert_check_no_corruption(&p, "after oxcow wrote an image with bitmaps");
    let mut model = RawModel::new(4 * MIB, 65536);
    model.data[..100000].fill(0x11);
    model.data[200_000..205_000].fill(0x22);
    assert_compare_model(&p, &model, &dir);
}

/// Unknown header extensions are kept when oxcow updates the header (here: refcount-table
/// growth rewrites the header's table pointer).
#[test]
fn unknown_header_extensions_survive_oxcow_writes() {
    let dir = TempDir::new("unknown-ext");
    let p = dir.join("img.qcow2");
    oxcow::create(
        &p,
        8 * MIB,
        &CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    )
    .unwrap();
    // Append an unknown extension in place of the end marker (cluster 0 is 512 bytes here).
    let hl = be32(&p, 100) as u64;
    let mut off = hl;
    loop {
        let t = be32(&p, off);
        if t == 0 {
            break;
        }
        off += 8 + (be32(&p, off + 4) as u64).div_ceil(8) * 8;
    }
    assert!(off + 8 + 16 + 8 <= 512, "no room for an extension");
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&13u32.to_be_bytes());
    ext.extend_from_slice(b"hello, qcow2!\0\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    poke(&p, off, &ext);
    assert_check_clean(&p);
    let img = open_rw(&p);
    let data = tagged_data(0x31, 0, (6 * MIB) as usize);
    for (i, c) in data.chunks(100_000).enumerate() {
        img.write_at(c, i as u64 * 100_000).unwrap();
    }
    img.close().unwrap();
    assert!(be32(&p, 56) > 1, "setup: refcount table did not grow");
    assert_eq!(
        peek(&p, off, ext.len()),
        ext,
        "unknown header extension was lost or changed"
    );
    assert_check_clean(&p);
    let mut model = RawModel::new(8 * MIB, 512);
    model.write(0, &data);
    assert_compare_model(&p, &model, &dir);
}

// --- discard leaves what QEMU's discard leaves ----------------------------------------------

/// `qemu-img map` without host offsets (allocation order may differ), merged so that equal
/// neighbours compare equal however each tool split them.
fn map_shape(p: &Path) -> Vec<(u64, u64, u64, bool, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, u64, bool, bool, bool, bool)> = Vec::new();
    for e in qemu_map(p) {
        let row = (
            e.start,
            e.length,
            e.depth,
            e.present,
            e.zero,
            e.data,
            e.offset.is_some(),
        );
        match out.last_mut() {
            Some(last)
                if last.0 + last.1 == row.0
                    && (last.2, last.3, last.4, last.5, last.6)
                        == (row.2, row.3, row.4, row.5, row.6) =>
            {
                last.1 += row.1
            }
            _ => out.push(row),
        }
    }
    out
}

/// One image of each kind QEMU discards differently: v3 (zero flag), v2 (no zero flag),
/// extended L2 (zero bits), an overlay (backing data must not show through), an external
/// data file. Both copies get the same qemu-io history; then qemu-io discards on one copy and
/// oxcow on the other, and `qemu-img map` and `qemu-img compare` must agree.
#[test]
fn discard_leaves_the_same_map_as_qemu_io_discard() {
    let k = 64 * KIB;
    let cases: [(&str, &str, bool); 5] = [
        ("v3", "cluster_size=65536", false),
        ("v2", "compat=0.10,cluster_size=65536", false),
        ("extended", "extended_l2=on,cluster_size=65536", false),
        ("overlay", "cluster_size=65536", true),
        ("data-file", "cluster_size=65536,data_file=DATA", false),
    ];
    for (name, opts, overlay) in cases {
        let dir = TempDir::new("discard-like-qemu");
        let mut paths = Vec::new();
        for who in ["qemu", "oxcow"] {
            let p = dir.join(&format!("{who}.qcow2"));
            let data = dir.join(&format!("{who}.data"));
            let opts = opts.replace("DATA", path_str(&data));
            if overlay {
                let base = dir.join(&format!("{who}-base.qcow2"));
                qemu_create_with_data(&base, 16 * k, "cluster_size=65536", 0x42, 16 * k);
                qemu_create_overlay(&p, None, &opts, path_str(&base), "qcow2");
            } else {
                qemu_create(&p, 16 * k, &opts);
            }
            // Data in 0..6, a kept zero cluster at 6 (v3), an unmapped zero cluster at 7,
            // data again in 10..12; 8, 9 and 12.. never written.
            let mut cmds = vec![
                format!("write -P 0x61 0 {}", 6 * k),
                format!("write -P 0x62 {} {}", 10 * k, 2 * k),
            ];
            if name != "v2" {
                cmds.push(format!("write -z {} {k}", 6 * k));
                cmds.push(format!("write -z -u {} {k}", 7 * k));
            }
            qemu_io(&p, &cmds);
            paths.push(p);
        }
        // Whole clusters 1..11 (partial edges around them), and one more whole cluster at 14.
        let discards = [(k + 100, 10 * k - 200), (k, 10 * k), (14 * k, k)];
        let cmds: Vec<String> = discards
            .iter()
            .map(|(o, l)| format!("discard {o} {l}"))
            .collect();
        qemu_io(&paths[0], &cmds);
        let img = open_rw(&paths[1]);
        for (o, l) in discards {
            img.discard(o, l).unwrap();
        }
        img.close().unwrap();
        assert_check_clean(&paths[1]);
        assert_eq!(
            map_shape(&paths[1]),
            map_shape(&paths[0]),
            "{name}: qemu-img map after discard"
        );
        qemu_img(&["compare", "-q", path_str(&paths[0]), path_str(&paths[1])]);
    }
}
