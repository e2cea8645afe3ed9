//! Persistent dirty bitmaps with QEMU as the oracle: what oxcow records is what QEMU reports
//! (its dirty set exported by `qemu-nbd -B` and read with `qemu-img map`), what QEMU records
//! is what `Image::bitmap_status` reports, and images stay clean for `qemu-img check`.

mod common;

use common::bitmaps::*;
use common::*;
use oxcow::{Image, OpenOptions, ZeroFlags};
use std::sync::Arc;

const SIZE: u64 = 64 * MIB;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn add(p: &std::path::Path, name: &str, gran: &str, enabled: bool) {
    let mut a = vec!["bitmap", "--add", "-g", gran];
    if !enabled {
        a.push("--disable");
    }
    a.extend([path_str(p), name]);
    qemu_img(&a);
}

/// Scattered, sub-granule, zeroing, discarding and multi-threaded writes through oxcow; the
/// byte ranges they touched.
fn oxcow_workload(img: &Arc<Image>) -> Vec<(u64, u64)> {
    let mut touched = vec![
        (100, 1),              // sub-granule, first granule
        (3 * MIB + 4095, 2),   // straddles a 4 KiB boundary
        (10 * MIB, 300 * KIB), // several granules
        (SIZE - 512, 512),     // the last sector
    ];
    for &(o, l) in &touched {
        img.write_at(&tagged_data(7, o, l as usize), o)
            .expect("write");
    }
    img.write_zeroes(20 * MIB + 1000, 70 * KIB, ZeroFlags { may_unmap: true })
        .expect("zeroes");
    touched.push((20 * MIB + 1000, 70 * KIB));
    img.discard(30 * MIB, 2 * MIB).expect("discard");
    touched.push((30 * MIB, 2 * MIB));
    img.write_vectored_at(&[&[1u8; 700], &[2u8; 900]], 40 * MIB + 10)
        .expect("writev");
    touched.push((40 * MIB + 10, 1600));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = Arc::clone(img);
            std::thread::spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut mine = Vec::new();
                for _ in 0..50 {
                    let o = rng.below(SIZE - 8192);
                    let l = 1 + rng.below(8192);
                    img.write_at(&vec![t as u8 + 1; l as usize], o)
                        .expect("thread write");
                    mine.push((o, l));
                }
                mine
            })
        })
        .collect();
    for t in threads {
        touched.extend(t.join().expect("writer thread"));
    }
    touched
}

#[test]
fn oxcow_writes_are_the_dirty_set_qemu_reports_and_disabled_bitmaps_stay_unchanged() {
    let dir = TempDir::new("bm-oracle");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=65536");
    add(&p, "fine", "4096", true);
    add(&p, "coarse", "1048576", true);
    add(&p, "off", "65536", false);
    // A disabled bitmap with history: QEMU records into it, then it is disabled.
    qemu_io(&p, &["write 50M 64k".to_string()]);
    qemu_img(&["bitmap", "--disable", path_str(&p), "fine"]);
    qemu_img(&["bitmap", "--clear", path_str(&p), "fine"]);
    qemu_img(&["bitmap", "--enable", path_str(&p), "fine"]);
    let off_before = qemu_dirty_ranges(&p, "off");
    let coarse_before = qemu_dirty_ranges(&p, "coarse");
    assert_eq!(off_before, vec![]);
    assert_eq!(coarse_before, vec![(50 * MIB, MIB)]);

    let img = Arc::new(Image::open(&p, &rw()).expect("open"));
    let touched = oxcow_workload(&img);
    let want_fine = granules(&touched, 4096, SIZE);
    assert_eq!(
        oxcow_dirty_ranges(&img, "fine"),
        want_fine,
        "oxcow's own view"
    );
    Arc::try_unwrap(img)
        .ok()
        .expect("sole handle")
        .close()
        .expect("close");

    let info = qemu_bitmaps(&p);
    assert_eq!(
        info,
        vec![
            ("fine".to_string(), 4096, vec!["auto".to_string()]),
            ("coarse".to_string(), MIB, vec!["auto".to_string()]),
            ("off".to_string(), 65536, vec![]),
        ]
    );
    assert_check_clean(&p);
    assert_eq!(qemu_dirty_ranges(&p, "fine"), want_fine);
    let mut coarse = touched.clone();
    coarse.push((50 * MIB, 64 * KIB));
    assert_eq!(
        qemu_dirty_ranges(&p, "coarse"),
        granules(&coarse, MIB, SIZE)
    );
    assert_eq!(qemu_dirty_ranges(&p, "off"), off_before);
}

#[test]
fn qemu_writes_are_the_dirty_set_oxcow_reports() {
    let dir = TempDir::new("bm-reverse");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=4096");
    add(&p, "b", "512", true);
    add(&p, "g64k", "65536", true);
    let cmds = [
        "write 0 1",
        "write 1M 3000",
        "write 5000000 65537",
        "write -z 20M 1M",
        "discard 30M 512k",
        "write 67108352 512",
    ];
    qemu_io(&p, &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    let img = Image::open(&p, &OpenOptions::default()).expect("open read-only");
    for name in ["b", "g64k"] {
        let q = qemu_dirty_ranges(&p, name);
        assert!(!q.is_empty(), "{name}: QEMU recorded nothing");
        assert_eq!(oxcow_dirty_ranges(&img, name), q, "{name}");
    }
    drop(img);
    // Loaded read-write, marked in use, stored again by oxcow: the same set.
    let img = Image::open(&p, &rw()).expect("open rw");
    img.close().expect("close");
    assert_check_clean(&p);
    let img = Image::open(&p, &OpenOptions::default()).expect("open read-only");
    for name in ["b", "g64k"] {
        assert_eq!(
            oxcow_dirty_ranges(&img, name),
            qemu_dirty_ranges(&p, name),
            "{name} after an oxcow store"
        );
    }
}

#[test]
fn bitmaps_are_in_use_on_disk_while_oxcow_has_the_image_open_read_write() {
    let dir = TempDir::new("bm-inuse");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "");
    add(&p, "b0", "65536", true);
    let img = Image::open(&p, &rw()).expect("open");
    let o = run("qemu-img", &["info", "-U", "--output=json", path_str(&p)]);
    assert!(
        o.stdout.contains("in-use"),
        "not in use on disk: {}",
        o.stdout
    );
    img.write_at(&[1; 10], 0).expect("write");
    img.reopen(&OpenOptions::default())
        .expect("reopen read-only");
    assert_eq!(
        qemu_bitmaps(&p),
        vec![("b0".to_string(), 65536, vec!["auto".to_string()])]
    );
    assert_eq!(qemu_dirty_ranges(&p, "b0"), vec![(0, 65536)]);
    img.reopen(&rw()).expect("reopen read-write");
    let o = run("qemu-img", &["info", "-U", "--output=json", path_str(&p)]);
    assert!(
        o.stdout.contains("in-use"),
        "not in use again: {}",
        o.stdout
    );
    img.write_at(&[1; 10], MIB).expect("write");
    drop(img);
    assert_check_clean(&p);
    assert_eq!(qemu_dirty_ranges(&p, "b0"), vec![(0, 65536), (MIB, 65536)]);
}

#[test]
fn read_only_opens_list_and_report_bitmaps_without_writing_a_byte() {
    let dir = TempDir::new("bm-ro");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "");
    add(&p, "b0", "65536", true);
    qemu_io(&p, &["write 1M 1k".to_string()]);
    let before = read_file(&p);
    let img = Image::open(&p, &OpenOptions::default()).expect("open read-only");
    assert_eq!(oxcow_bitmaps(&img), qemu_bitmaps(&p));
    assert_eq!(oxcow_dirty_ranges(&img, "b0"), vec![(MIB, 65536)]);
    assert_eq!(
        img.bitmap_add("x", Default::default())
            .expect_err("add")
            .kind(),
        oxcow::ErrorKind::ReadOnly
    );
    img.close().expect("close");
    assert!(read_file(&p) == before, "a read-only open changed the file");
}

#[test]
fn tracking_matches_qemu_across_image_variants() {
    for opts in [
        "lazy_refcounts=on",
        "extended_l2=on,cluster_size=131072",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=2097152",
    ] {
        let dir = TempDir::new("bm-variants");
        let p = dir.join("img.qcow2");
        qemu_create(&p, SIZE, opts);
        add(&p, "b", "8192", true);
        let img = Image::open(&p, &rw()).expect("open");
        let touched = [(5, 9000), (33 * MIB, 1), (SIZE - 100, 100)];
        for &(o, l) in &touched {
            img.write_at(&vec![0xaa; l as usize], o).expect("write");
        }
        img.write_zeroes(40 * MIB, 3 * MIB, ZeroFlags { may_unmap: false })
            .expect("zeroes");
        let mut all = touched.to_vec();
        all.push((40 * MIB, 3 * MIB));
        img.close().expect("close");
        assert_check_clean(&p);
        assert_eq!(
            qemu_dirty_ranges(&p, "b"),
            granules(&all, 8192, SIZE),
            "{opts}"
        );
        assert_eq!(
            qemu_bitmaps(&p),
            vec![("b".to_string(), 8192, vec!["auto".to_string()])],
            "{opts}"
        );
    }
}

#[test]
fn compressed_writes_are_tracked() {
    let dir = TempDir::new("bm-compressed");
    let p = dir.join("img.qcow2");
    qemu_create(&p, SIZE, "cluster_size=65536");
    add(&p, "b", "4096", true);
    let img = Image::open(&p, &rw()).expect("open");
    img.write_compressed(&[0x33; 65536], 3 * 65536)
        .expect("compressed write");
    let noisy: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    img.write_compressed(&noisy, 10 * 65536)
        .expect("incompressible write");
    img.close().expect("close");
    assert_check_clean(&p);
    assert_eq!(
        qemu_dirty_ranges(&p, "b"),
        vec![(3 * 65536, 65536), (10 * 65536, 65536)]
    );
}
