//! oxcow and QEMU around crashes and locks: a dirty lazy-refcounts image left by a crashed
//! qemu-io is repaired on a writable open, a handle lost after a flush leaves at most leaked
//! clusters, and oxcow's image locks interoperate with qemu-img, qemu-io and qemu-nbd.
//!
//! The oracle is QEMU: `qemu-img check` (exit 0, or 3 for leaks only, never 2), `qemu-img
//! compare` against a raw reference model, and QEMU's own lock refusals; flushed data must
//! read back through oxcow.

mod common;

use common::workload::*;
use common::*;
use oxcow::{Image, OpenOptions};

/// DESIGN: "a read-write open of a dirty image repairs the refcounts first". QEMU leaves the
/// dirty bit set when a writer with lazy refcounts dies.
#[test]
fn dirty_lazy_refcounts_image_left_by_crashed_qemu_is_repaired_on_writable_open() {
    let dir = TempDir::new("dirty");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=4096,lazy_refcounts=on");
    // qemu-io aborts after writing: the image keeps the dirty bit and stale refcounts.
    let o = run(
        "sh",
        &["-c", &format!("ulimit -c 0; qemu-io -f qcow2 -c 'write -P 0x5a 0 300000' -c 'write -P 0x6b 1000000 5000' -c abort {}", path_str(&p))],
    );
    assert_ne!(o.code, 0, "qemu-io abort did not abort");
    let mut model = RawModel::new(4 * MIB, 4096);
    model.data[..300000].fill(0x5a);
    model.data[1000000..1005000].fill(0x6b);
    {
        let img = open_ro(&p);
        assert!(img.info().unwrap().dirty, "setup: image is not dirty");
        assert_same_bytes(
            &oxcow_read_all(&img),
            &model.data,
            "read-only read of a dirty image",
        );
    }
    let (code, _) = qemu_img_check(&p);
    assert_eq!(code, 2, "setup: dirty image should have stale refcounts");
    let img =
        Image::open(&p, &rw()).unwrap_or_else(|e| panic!("writable open of a dirty image: {e}"));
    img.write_at(&[0x77; 10000], 2 * MIB).unwrap();
    model.write(2 * MIB, &[0x77; 10000]);
    img.close().unwrap();
    let info = open_ro(&p).info().unwrap();
    assert!(
        !info.dirty,
        "dirty bit still set after a writable open and close"
    );
    verify_all(&dir, &p, &model, "repaired dirty image");
}

/// A process that dies after a flush loses at most leaked clusters: simulate it by leaking the
/// handle (no close, no Drop write-back) after more unflushed writes, including writes that
/// grow the refcount table. `qemu-img check` must exit 0 or 3 (never 2), and every byte written
/// before the last flush, in the range not written afterwards, must read back.
#[test]
fn handle_lost_after_flush_leaves_at_most_leaks_and_keeps_flushed_data() {
    for (cs, rb, by_qemu, seed) in [
        (512u64, 64u32, false, 901u64),
        (4 * KIB, 16, true, 902),
        (64 * KIB, 1, false, 903),
    ] {
        let v = Variant {
            cs,
            vsize: 8 * MIB,
            refcount_bits: rb,
            by_qemu,
            ..Default::default()
        };
        let dir = TempDir::new("lost-handle");
        let (p, mut model) = setup(&dir, &v);
        let half = 4 * MIB;
        let g = Geometry {
            vsize: half,
            cs,
            l2cov: v.geometry().l2cov,
        };
        // Phase 1: random workload confined to the lower half, then flush.
        let ops = gen_ops(seed, 150, &g, false);
        let img = open_rw(&p);
        for op in &ops {
            apply_op(&img, &mut model, op, false).unwrap();
        }
        img.flush().unwrap();
        // Phase 2: unflushed writes to the upper half only (4 MiB: with 512-byte clusters and
        // 64-bit refcounts this grows the refcount table), then the handle is lost.
        let mut rng = Rng::new(seed);
        let mut off = half;
        while off < 8 * MIB {
            let len = rng.range(1, 300 * KIB).min(8 * MIB - off);
            img.write_at(&tagged_data(0xee, off, len as usize), off)
                .unwrap();
            off += len;
        }
        std::mem::forget(img);
        // What a crashed process leaves behind: the file as it is now (the leaked handle still
        // holds its locks, so work on a copy).
        let crashed = dir.join("crashed.qcow2");
        std::fs::copy(&p, &crashed).unwrap();
        let p = crashed;
        assert_check_no_corruption(&p, &format!("cs={cs}: check after a lost handle"));
        let img = open_ro(&p);
        let mut got = vec![0u8; half as usize];
        img.read_at(&mut got, 0).unwrap();
        assert_same_bytes(
            &got,
            &model.data[..half as usize],
            &format!("cs={cs}: flushed data after a lost handle"),
        );
    }
}

/// DESIGN: "Images written by oxcow interoperate with QEMU's image locking (OFD locks on the
/// same bytes)". While oxcow holds an image read-write, QEMU's read-only openers without -U
/// must be refused, -U must still work; while qemu-nbd serves an image read-write, a writable
/// oxcow open must fail with Locked (EAGAIN).
#[test]
fn image_locking_interoperates_with_qemu() {
    let dir = TempDir::new("locking");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=65536");
    {
        let img = open_rw(&p);
        img.write_at(&[1; 1000], 0).unwrap();
        let o = qemu_info_status(&p, false);
        assert_ne!(
            o.code, 0,
            "qemu-img info (no -U) succeeded while oxcow holds the image read-write"
        );
        assert!(
            o.stderr.contains("lock"),
            "unexpected qemu-img error: {}",
            o.stderr
        );
        let o = qemu_info_status(&p, true);
        assert_eq!(o.code, 0, "qemu-img info -U failed: {}", o.stderr);
        let o = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write 0 512", path_str(&p)],
        );
        assert_ne!(
            o.code, 0,
            "qemu-io wrote to an image oxcow holds read-write"
        );
        img.close().unwrap();
    }
    // qemu-nbd holding the image read-write.
    let sock = dir.join("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", path_str(&sock), path_str(&p)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    // qemu-nbd may create its socket before it opens (and locks) the image: wait until
    // QEMU's own reader sees the write lock.
    let t0 = std::time::Instant::now();
    while !(sock.exists() && qemu_info_status(&p, false).code != 0)
        && t0.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rw_result = Image::open(&p, &rw());
    let ro_result = Image::open(&p, &OpenOptions::default());
    let fs_result = Image::open(
        &p,
        &OpenOptions {
            force_share: true,
            ..Default::default()
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(sock.exists(), "setup: qemu-nbd did not start");
    match rw_result {
        Err(e) => assert_eq!(
            e.errno(),
            11,
            "writable open while qemu-nbd holds the image: {e}"
        ),
        Ok(_) => panic!("writable open succeeded while qemu-nbd holds the image read-write"),
    }
    match ro_result {
        Err(e) => assert_eq!(e.errno(), 11, "read-only open while qemu-nbd writes: {e}"),
        Ok(_) => panic!(
            "read-only open (no force_share) succeeded while qemu-nbd holds the image read-write"
        ),
    }
    fs_result
        .unwrap_or_else(|e| panic!("force_share open failed while qemu-nbd holds the image: {e}"));
}
