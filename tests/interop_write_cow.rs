//! oxcow writes, QEMU checks, where a write must copy data first: overlays over raw and qcow2
//! backing files (v3, v2 where a discard reveals the backing data again, extended L2, a
//! two-level chain), clusters compressed by `qemu-img convert -c` (zlib and zstd), and clusters
//! shared with an internal snapshot.
//!
//! The oracle is QEMU plus a raw reference model: `qemu-img check` clean, `qemu-img compare`
//! identical to the model, oxcow reading the model back; the snapshot reverted by `qemu-img
//! snapshot -a` and the backing files must still hold their old data.

mod common;

use common::workload::*;
use common::*;
use oxcow::{BackingFormat, CreateOptions};

// --- with a backing file -----------------------------------------------------------------------

#[test]
fn v3_overlay_over_raw_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            backing: Some(BackingFormat::Raw),
            short_backing: true,
            ..Default::default()
        },
        301,
        200,
    );
    run_variant(
        Variant {
            cs: 512,
            vsize: MIB,
            backing: Some(BackingFormat::Raw),
            by_qemu: true,
            ..Default::default()
        },
        302,
        150,
    );
}

#[test]
fn v2_overlay_discard_reveals_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            version: 2,
            backing: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
        303,
        200,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 4 * MIB,
            version: 2,
            backing: Some(BackingFormat::Raw),
            short_backing: true,
            by_qemu: true,
            ..Default::default()
        },
        304,
        120,
    );
}

#[test]
fn extended_l2_overlay_over_qcow2_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            extended_l2: true,
            backing: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
        305,
        200,
    );
}

// --- COW of shared and compressed clusters -----------------------------------------------------

fn compressed_base_case(cs: u64, vsize: u64, ctype: &str, seed: u64) {
    let dir = TempDir::new(&format!("compressed-{ctype}-{cs}"));
    // Mixed content: random, patterned, zero, half-zero clusters.
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; vsize as usize];
    for (i, c) in data.chunks_mut(cs as usize).enumerate() {
        match rng.below(4) {
            0 => rng.fill(c),
            1 => c.copy_from_slice(&tagged_data(0x21, i as u64 * cs, c.len())),
            2 => {}
            _ => {
                let h = c.len() / 2;
                c[h..].fill(0x5e)
            }
        }
    }
    let src = dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    let p = dir.join("img.qcow2");
    qemu_convert_raw_to_qcow2(
        &src,
        &p,
        &format!("cluster_size={cs},compression_type={ctype}"),
        true,
    );
    assert!(
        qemu_map(&p).iter().any(|e| e.compressed),
        "setup: no compressed clusters"
    );
    let mut model = RawModel::new(vsize, cs);
    model.data = data;
    let g = Geometry::new(vsize, cs);
    let ops = gen_ops(seed, 200, &g, true);
    let what = format!("writes over {ctype} compressed clusters");
    apply_and_verify(&dir, &p, &mut model, &ops, seed, &what);
    qemu_then_oxcow_round(&dir, &p, &mut model, &g, seed);
}

#[test]
fn writes_over_zlib_compressed_clusters_pass_qemu_check_and_compare() {
    compressed_base_case(4 * KIB, 4 * MIB, "zlib", 401);
    compressed_base_case(512, MIB, "zlib", 402);
}

#[test]
fn writes_over_zstd_compressed_clusters_pass_qemu_check_and_compare() {
    compressed_base_case(64 * KIB, 8 * MIB, "zstd", 403);
}

#[test]
fn writes_over_clusters_shared_with_internal_snapshot_pass_qemu_check_and_keep_snapshot_intact() {
    for (cs, vsize, rb, seed) in [
        (4 * KIB, 4 * MIB, 16, 501u64),
        (512, MIB, 64, 502),
        (64 * KIB, 8 * MIB, 2, 503),
    ] {
        let dir = TempDir::new("snapshot-cow");
        let p = dir.join("img.qcow2");
        qemu_create(&p, vsize, &format!("cluster_size={cs},refcount_bits={rb}"));
        let g = Geometry::new(vsize, cs);
        // Fill with qemu-io so that many clusters are allocated, then snapshot.
        let mut model = RawModel::new(vsize, cs);
        let mut cmds = Vec::new();
        let mut rng = Rng::new(seed);
        for i in 0..40 {
            let off = gen_offset(&mut rng, &g);
            let len = clamp(off, gen_len(&mut rng, &g), &g);
            let pt = (i * 13 % 250 + 3) as u8;
            cmds.push(format!("write -P {pt:#x} {off} {len}"));
            model.data[off as usize..(off + len) as usize].fill(pt);
        }
        qemu_io(&p, &cmds);
        qemu_snapshot_create(&p, "snap1");
        let snap_data = model.data.clone();
        let ops = gen_ops(seed, 200, &g, true);
        let what = format!("writes over snapshot-shared clusters cs={cs}");
        apply_and_verify(&dir, &p, &mut model, &ops, seed, &what);
        // The snapshot still holds the old data.
        let snap_raw = dir.join("snap.raw");
        std::fs::write(&snap_raw, &snap_data).unwrap();
        let copy = dir.join("copy.qcow2");
        std::fs::copy(&p, &copy).unwrap();
        qemu_snapshot_apply(&copy, "snap1");
        assert_check_clean(&copy);
        assert_compare_identical(&copy, &snap_raw);
        let img = open_ro(&copy);
        assert_same_bytes(
            &oxcow_read_all(&img),
            &snap_data,
            "oxcow read of reverted snapshot",
        );
        drop(img);
        // Deleting the snapshot after oxcow's writes leaves a clean image.
        qemu_snapshot_delete(&p, "snap1");
        verify_all(&dir, &p, &model, "after deleting the snapshot");
    }
}

/// Writes to an overlay whose backing file itself has a backing file (qcow2 -> qcow2 -> raw)
/// copy the right data on COW.
#[test]
fn writes_over_a_two_level_backing_chain_pass_qemu_check_and_compare() {
    let dir = TempDir::new("chain-write");
    let vsize = 4 * MIB;
    let base = dir.join("base.raw");
    let base_data = tagged_data(0x71, 0, (3 * MIB) as usize);
    std::fs::write(&base, &base_data).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_create_overlay(&mid, Some(vsize), "cluster_size=4096", "base.raw", "raw");
    qemu_io(
        &mid,
        &[
            "write -P 0x72 100000 300000".into(),
            "write -z 600000 100000".into(),
        ],
    );
    let top = dir.join("top.qcow2");
    oxcow::create(
        &top,
        vsize,
        &CreateOptions {
            cluster_size: 65536,
            backing_file: Some("mid.qcow2".into()),
            backing_format: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap();
    let mid_view = qemu_to_raw(&mid, "qcow2", &dir);
    let mut model = RawModel::with_backing(vsize, 65536, &mid_view, 3);
    let g = Geometry::new(vsize, 65536);
    let ops = gen_ops(904, 150, &g, true);
    apply_and_verify(
        &dir,
        &top,
        &mut model,
        &ops,
        904,
        "overlay over a two-level chain",
    );
    // The backing files were not modified.
    assert_same_bytes(
        &read_file(&base),
        &base_data,
        "raw base after writes to the overlay",
    );
    assert_same_bytes(
        &qemu_to_raw(&mid, "qcow2", &dir),
        &mid_view,
        "mid image after writes to the overlay",
    );
}
