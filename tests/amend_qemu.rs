//! `oxcow amend` against `qemu-img amend` (QEMU 10): each option in each direction on two
//! copies of an image gives the same exit code and message, clean images, the original
//! guest content, the same own allocation and the same `qemu-img info`.

mod common;
mod rebase_support;

use rebase_support::both;

/// A version-3 image with data, an unallocated zero cluster, an internal snapshot, then
/// more data, a zero-allocated cluster (written, then zeroed) and another zero cluster.
const V3: &str = "qemu-img create -q -f qcow2 -o lazy_refcounts=on top.qcow2 4M
    qemu-io -c 'write -P 1 0 1M' -c 'write -z 1M 64k' top.qcow2 >/dev/null
    qemu-img snapshot -c s1 top.qcow2
    qemu-io -c 'write -P 3 0 64k' -c 'write -P 4 3M 64k' -c 'write -z 3M 64k' -c 'write -z 2M 64k' top.qcow2 >/dev/null";

/// A version-2 image with data and an internal snapshot.
const V2: &str = "qemu-img create -q -f qcow2 -o compat=0.10 top.qcow2 4M
    qemu-io -c 'write -P 1 0 1M' top.qcow2 >/dev/null
    qemu-img snapshot -c s1 top.qcow2
    qemu-io -c 'write -P 3 0 64k' top.qcow2 >/dev/null";

fn same(tag: &str, setup: &str, opts: &str) {
    let o = both(tag, setup, "amend", &["-o", opts]);
    assert_eq!(o.oxcow.code, 0, "{opts}: {}", o.oxcow.all());
    o.assert_same_images();
    o.assert_guest_kept();
}

#[test]
fn compat_downgrade_and_upgrade_like_qemu_img() {
    same("am-down", V3, "compat=0.10");
    same("am-up", V2, "compat=1.1");
    same(
        "am-up-all",
        V2,
        "compat=1.1,lazy_refcounts=on,refcount_bits=2",
    );
    let over_backing = "qemu-img create -q -f qcow2 b.qcow2 1M
        qemu-io -c 'write -P 7 0 1M' b.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 top.qcow2 1M
        qemu-io -c 'write -P 1 0 64k' -c 'write -z 128k 64k' top.qcow2 >/dev/null
        qemu-img snapshot -c s1 top.qcow2
        qemu-io -c 'write -z 512k 128k' top.qcow2 >/dev/null";
    same("am-down-backing", over_backing, "compat=0.10");
    let zstd = "qemu-img create -q -f qcow2 -o compression_type=zstd top.qcow2 1M";
    same("am-down-zstd", zstd, "compat=0.10");
}

#[test]
fn refcount_bits_both_ways_like_qemu_img() {
    for bits in ["2", "8", "32", "64"] {
        same("am-rc", V3, &format!("refcount_bits={bits}"));
    }
    let wide = format!("{V3}\nqemu-img amend -o refcount_bits=64 top.qcow2");
    same("am-rc-back", &wide, "refcount_bits=16");
    same("am-rc-down", &wide, "refcount_bits=16,compat=0.10");
}

#[test]
fn lazy_refcounts_on_and_off_like_qemu_img() {
    same("am-lazy-off", V3, "lazy_refcounts=off");
    let plain = "qemu-img create -q -f qcow2 top.qcow2 1M
        qemu-io -c 'write -P 1 0 64k' top.qcow2 >/dev/null";
    same("am-lazy-on", plain, "lazy_refcounts=on");
    // Keeping lazy refcounts on through a downgrade is no change, so no refusal.
    same("am-lazy-down", V3, "compat=0.10,lazy_refcounts=on");
}

#[test]
fn size_grows_and_shrinks_like_qemu_img() {
    let setup = "qemu-img create -q -f qcow2 top.qcow2 4M
        qemu-io -c 'write -P 1 1M 64k' -c 'write -P 2 3M 64k' top.qcow2 >/dev/null";
    for opts in ["size=2M", "size=8M", "size=8M,refcount_bits=32"] {
        let o = both("am-size", setup, "amend", &["-o", opts]);
        assert_eq!(o.oxcow.code, 0, "{opts}: {}", o.oxcow.all());
        o.assert_same_images();
    }
}

#[test]
fn refusals_match_qemu_img_and_change_nothing() {
    let cases: &[(&str, &str)] = &[
        (V3, "refcount_bits=1"), // the snapshot's clusters have refcount 2
        (V3, "refcount_bits=3"),
        (V3, "compat=2"),
        (V3, "size=8000001"),
        (V3, "foo=1"),
        (V3, "cluster_size=4k"),
        (V3, "backing_file=x.qcow2"),
        (V2, "lazy_refcounts=on"),
        (V2, "refcount_bits=8"),
        (
            "qemu-img create -q -f qcow2 top.qcow2 1M",
            "compat=0.10,lazy_refcounts=on",
        ),
        (
            "qemu-img create -q -f qcow2 -o refcount_bits=8 top.qcow2 1M",
            "compat=0.10",
        ),
        (
            "qemu-img create -q -f qcow2 -o extended_l2=on top.qcow2 1M",
            "compat=0.10",
        ),
        (
            "qemu-img create -q -f qcow2 -o compression_type=zstd top.qcow2 1M
             qemu-io -c 'write -c -P 1 0 64k' top.qcow2 >/dev/null",
            "compat=0.10",
        ),
    ];
    for (setup, opts) in cases {
        let o = both("am-refuse", setup, "amend", &["-o", opts]);
        assert_ne!(o.oxcow.code, 0, "{opts}");
        let top = std::fs::read(o.o("top.qcow2")).expect("top");
        let orig = std::fs::read(o.o("orig.qcow2")).expect("orig");
        assert!(top == orig, "{opts}: a refused amend changed the file");
    }
}

#[test]
fn downgrades_qemu_img_would_damage_are_refused() {
    // QEMU 10 zeroes a zero-allocated cluster shared with a snapshot and leaves the image
    // with a COPIED flag on a cluster of refcount 2 (check reports an error); with bitmaps
    // it leaks their clusters. oxcow refuses both and changes nothing.
    let shared = "qemu-img create -q -f qcow2 top.qcow2 1M
        qemu-io -c 'write -P 2 0 64k' -c 'write -z 0 64k' top.qcow2 >/dev/null
        qemu-img snapshot -c s1 top.qcow2";
    let bitmaps = "qemu-img create -q -f qcow2 top.qcow2 1M
        qemu-img bitmap --add top.qcow2 b0";
    for setup in [shared, bitmaps] {
        let dir = common::TempDir::new("am-damage");
        let s = common::run_in(dir.path(), "sh", &["-c", setup]);
        assert_eq!(s.code, 0, "{}", s.all());
        let top = dir.join("top.qcow2");
        let before = std::fs::read(&top).expect("read");
        let r = common::run_in(
            dir.path(),
            env!("CARGO_BIN_EXE_oxcow"),
            &["amend", "-o", "compat=0.10", "top.qcow2"],
        );
        assert_eq!(r.code, 1, "{}", r.all());
        assert!(std::fs::read(&top).expect("read") == before);
        common::assert_check_clean(&top);
    }
}
