//! Malformed qcow2 headers give clean errors: a bad magic, version, cluster bits, header
//! length, L1 and refcount-table geometry, snapshot table, unknown incompatible features,
//! encryption, compression type, extension lengths, backing-file name and format, refcount
//! order and virtual size.
//!
//! The oracle is the expected errno and a message naming the field (QEMU's behaviour is the
//! reference for what is an error), for read-only and writable opens, with no panic, no hang
//! and no write to the file beyond the corrupt bit (`common::malformed::run_cases`).

mod common;

use common::malformed::*;
use common::*;

#[test]
fn unmodified_base_image_opens_and_reads() {
    let dir = TempDir::new("bad-base");
    let p = base_image(&dir, "base.qcow2");
    assert!(matches!(open_and_read(&p, false), Ok(Outcome::Ok)));
    assert!(matches!(open_and_read(&p, true), Ok(Outcome::Ok)));
    assert_check_clean(&p);
}

#[test]
fn malformed_headers_give_clean_errors() {
    let dir = TempDir::new("bad-header");
    let base = base_image(&dir, "base.qcow2");
    let cs = 65536u64;
    let mut cases = vec![
        case("magic", &[EINVAL], &["qcow2", "magic", "format"], |p| {
            poke(p, H_MAGIC, b"QFIX")
        }),
        case(
            "magic-zero",
            &[EINVAL],
            &["qcow2", "magic", "format"],
            |p| put_be32(p, H_MAGIC, 0),
        ),
        case("version-1", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 1)
        }),
        case("version-4", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 4)
        }),
        case("version-huge", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 0xffff_ffff)
        }),
        case("cluster-bits-8", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 8)
        }),
        case("cluster-bits-0", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 0)
        }),
        case("cluster-bits-22", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 22)
        }),
        case("cluster-bits-64", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 64)
        }),
        case(
            "cluster-bits-huge",
            &[ENOTSUP, EUCLEAN],
            &["cluster"],
            |p| put_be32(p, H_CLUSTER_BITS, 0xffff_fff0),
        ),
        case("header-length-short", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 72)
        }),
        case("header-length-zero", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 0)
        }),
        case(
            "header-length-beyond-cluster",
            &[EUCLEAN],
            &["header"],
            move |p| put_be32(p, H_HEADER_LEN, cs as u32 + 8),
        ),
        case("header-length-huge", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 0xffff_fff8)
        }),
        case("l1-size-too-small", &[EUCLEAN], &["l1"], |p| {
            put_be32(p, H_L1_SIZE, 0)
        }),
        case("l1-size-huge", &[EUCLEAN], &["l1"], |p| {
            put_be32(p, H_L1_SIZE, 0x7fff_ffff)
        }),
        case("l1-offset-unaligned", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0x30200)
        }),
        case("l1-offset-overflow", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0xffff_ffff_ffff_0000)
        }),
        case("l1-offset-zero", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0)
        }),
        case(
            "reftable-offset-zero",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0),
        ),
        case(
            "reftable-offset-unaligned",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0x10008),
        ),
        case(
            "reftable-offset-overflow",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0xffff_ffff_ffff_0000),
        ),
        case(
            "reftable-clusters-zero",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_RT_CLUSTERS, 0),
        ),
        case(
            "reftable-clusters-huge",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_RT_CLUSTERS, 0xffff_ffff),
        ),
        case("nb-snapshots-huge", &[EUCLEAN], &["snapshot"], |p| {
            put_be32(p, H_NB_SNAP, 0xffff_ffff)
        }),
        case("nb-snapshots-65537", &[EUCLEAN], &["snapshot"], |p| {
            put_be32(p, H_NB_SNAP, 65537)
        }),
        case(
            "snapshots-offset-unaligned",
            &[EUCLEAN],
            &["snapshot"],
            |p| put_be64(p, H_SNAP_OFF, 0x1234),
        ),
        case(
            "snapshot-table-past-eof",
            &[EUCLEAN, EIO],
            &["snapshot"],
            |p| {
                put_be32(p, H_NB_SNAP, 3);
                put_be64(p, H_SNAP_OFF, 0x10_0000_0000);
            },
        ),
        // Entries from the last aligned cluster of the offset space run past u64::MAX: QEMU
        // refuses the offset ("Snapshot table offset invalid"); reading must not wrap around
        // to the start of the file.
        case(
            "snapshot-table-offset-wraps",
            &[EUCLEAN, EINVAL],
            &["snapshot table offset"],
            |p| {
                put_be32(p, H_NB_SNAP, 2000);
                put_be64(p, H_SNAP_OFF, 0xffff_ffff_ffff_0000);
            },
        ),
        case(
            "unknown-incompat-bit-unnamed",
            &[ENOTSUP],
            &["feature", "incompatible"],
            |p| put_be64(p, H_INCOMPAT, 1 << 40),
        ),
        case(
            "unknown-incompat-bit-named",
            &[ENOTSUP],
            &["frobnicate"],
            |p| {
                // Rename the last feature-table entry to describe incompatible bit 5.
                let (off, len) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                let last = off + 8 + (len as u64 / 48 - 1) * 48;
                let mut e = vec![0u8; 48];
                e[0] = 0; // incompatible
                e[1] = 5;
                e[2..2 + 18].copy_from_slice(b"frobnicate widgets");
                poke(p, last, &e);
                put_be64(p, H_INCOMPAT, 1 << 5);
            },
        ),
        case(
            "external-data-file-bit",
            // The bit without a data-file name: "'data-file' is required for this image".
            &[EINVAL],
            &["data file", "data-file", "data_file"],
            |p| put_be64(p, H_INCOMPAT, 1 << 2),
        ),
        case(
            "crypt-method-aes",
            &[ENOTSUP],
            &["encrypt", "crypt", "aes"],
            |p| put_be32(p, H_CRYPT, 1),
        ),
        case(
            "crypt-method-luks",
            &[ENOTSUP],
            &["encrypt", "crypt", "luks"],
            |p| put_be32(p, H_CRYPT, 2),
        ),
        case(
            "crypt-method-unknown",
            &[ENOTSUP, EUCLEAN],
            &["encrypt", "crypt"],
            |p| put_be32(p, H_CRYPT, 7),
        ),
        case(
            "compression-type-without-bit",
            &[EUCLEAN],
            &["compression"],
            |p| poke(p, H_COMPRESSION, &[1]),
        ),
        case(
            "compression-bit-without-type",
            &[EUCLEAN],
            &["compression"],
            |p| put_be64(p, H_INCOMPAT, 1 << 3),
        ),
        case(
            "compression-type-unknown",
            &[ENOTSUP],
            &["compression"],
            |p| {
                poke(p, H_COMPRESSION, &[2]);
                put_be64(p, H_INCOMPAT, 1 << 3);
            },
        ),
        case(
            "extension-length-overflow",
            &[EUCLEAN],
            &["extension"],
            |p| {
                let (off, _) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                put_be32(p, off + 4, 0xffff_fff0);
            },
        ),
        case(
            "extension-length-past-cluster",
            &[EUCLEAN],
            &["extension"],
            |p| {
                let (off, _) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                put_be32(p, off + 4, 65536);
            },
        ),
        case(
            "backing-offset-past-cluster",
            &[EUCLEAN],
            &["backing"],
            |p| {
                put_be64(p, H_BACKING_OFF, 0x2_0000);
                put_be32(p, H_BACKING_SIZE, 8);
            },
        ),
        case("backing-offset-huge", &[EUCLEAN], &["backing"], |p| {
            put_be64(p, H_BACKING_OFF, u64::MAX - 3);
            put_be32(p, H_BACKING_SIZE, 8);
        }),
        case("backing-size-too-long", &[EUCLEAN], &["backing"], |p| {
            put_be64(p, H_BACKING_OFF, 0x1000);
            put_be32(p, H_BACKING_SIZE, 2000);
        }),
        case(
            "backing-name-crosses-cluster-end",
            &[EUCLEAN],
            &["backing"],
            |p| {
                put_be64(p, H_BACKING_OFF, 0xfff0);
                put_be32(p, H_BACKING_SIZE, 0x100);
            },
        ),
        case(
            "refcount-order-7",
            &[ENOTSUP, EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_REFCOUNT_ORDER, 7),
        ),
        case(
            "refcount-order-huge",
            &[ENOTSUP, EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_REFCOUNT_ORDER, 0xffff_ffff),
        ),
        case(
            "virtual-size-huge",
            &[EUCLEAN, ENOTSUP],
            &["size", "big", "l1"],
            |p| put_be64(p, H_SIZE, 1 << 62),
        ),
        case(
            "virtual-size-max",
            &[EUCLEAN, ENOTSUP],
            &["size", "big", "l1"],
            |p| put_be64(p, H_SIZE, u64::MAX),
        ),
    ];
    for c in cases.iter_mut() {
        // QEMU opens both and serves the active layer (tests/open_like_qemu.rs asserts that
        // oxcow does too).
        c.allow_ok = matches!(c.name, "reftable-offset-zero" | "snapshot-table-past-eof");
    }
    run_cases(&dir, &base, cases);
}

#[test]
fn unknown_backing_format_is_rejected_with_its_name() {
    let dir = TempDir::new("bad-backing-fmt");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    qemu_create_overlay(&top, None, "", "base.raw", "raw");
    let (off, len) = find_ext(&top, EXT_BACKING_FORMAT).expect("backing format extension");
    assert_eq!(len, 3);
    let mut c = case(
        "backing-format-unknown",
        &[ENOTSUP, EINVAL],
        &["xyz"],
        |_| {},
    );
    c.mutate = Box::new(move |p| poke(p, off + 8, b"xyz"));
    let mut c2 = case(
        "backing-format-too-long",
        &[EUCLEAN],
        &["format", "ext_backing_format", "backing"],
        |_| {},
    );
    c2.mutate = Box::new(move |p| put_be32(p, off + 4, 40));
    let mut c3 = case(
        "backing-file-missing",
        &[2 /* ENOENT */],
        &["nonexist", "backing"],
        |_| {},
    );
    c3.mutate = Box::new(|p| {
        // The backing name "base.raw" becomes "nonexist" (same length).
        let off = be64(p, H_BACKING_OFF);
        poke(p, off, b"nonexist");
    });
    run_cases(&dir, &top, vec![c, c2, c3]);
}
