//! Open modes never write what they must not: writes on a read-only open fail with ReadOnly
//! (EROFS), a read-only open never modifies the file (bytes and mtime, backing file included),
//! a writable open clears unknown autoclear bits, the corrupt bit refuses a writable open but
//! allows reads, and a rejected writable open changes nothing.
//!
//! The oracle: the error kind and errno, the header fields and file bytes read back from disk,
//! `qemu-img check` and qemu-io reading the data.

mod common;

use common::malformed::*;
use common::*;
use oxcow::{ErrorKind, Image, OpenOptions, ZeroFlags};
use std::path::Path;
use std::time::Duration;

#[test]
fn writes_on_read_only_open_fail_with_read_only() {
    let dir = TempDir::new("ro-writes");
    let p = dir.join("img.qcow2");
    qemu_create_with_data(&p, 2 * MIB, "cluster_size=4096", 0x5a, 10000);
    let before = read_file(&p);
    let img = open_ro(&p);
    assert!(img.info().unwrap().read_only);
    let check = |r: oxcow::Result<()>, what: &str| match r {
        Err(e) if e.kind() == ErrorKind::ReadOnly => assert_eq!(e.errno(), EROFS, "{what}"),
        other => panic!("{what} on a read-only image: expected ReadOnly, got {other:?}"),
    };
    check(img.write_at(&[1, 2, 3], 0), "write_at");
    check(img.write_at(&[1; 4096], 4096), "write_at aligned");
    check(
        img.write_vectored_at(&[&[1, 2], &[3]], 100),
        "write_vectored_at",
    );
    check(
        img.write_zeroes(0, 4096, ZeroFlags::default()),
        "write_zeroes",
    );
    check(
        img.write_zeroes(0, 8192, ZeroFlags { may_unmap: true }),
        "write_zeroes unmap",
    );
    check(img.discard(0, 8192), "discard");
    img.flush().expect("flush of a read-only image is a no-op");
    let mut b = vec![0u8; 100];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    img.close().unwrap();
    assert!(read_file(&p) == before, "read-only image was modified");
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn read_only_open_never_modifies_the_file() {
    let dir = TempDir::new("ro-untouched");
    let base = dir.join("base.qcow2");
    qemu_create_with_data(&base, 4 * MIB, "cluster_size=4096", 0x11, 300000);
    let top = dir.join("top.qcow2");
    qemu_create_overlay(&top, None, "cluster_size=512", "base.qcow2", "qcow2");
    qemu_io(
        &top,
        &[
            "write -P 0x22 1000 5000".to_string(),
            "write -z 100000 5000".to_string(),
        ],
    );
    // Unknown autoclear and compatible bits must not be cleared by a read-only open.
    put_be64(&top, H_AUTOCLEAR, 1 << 20);
    put_be64(&top, 80, 1 << 33);
    std::thread::sleep(Duration::from_millis(20));
    let files = [top.clone(), base.clone()];
    let before: Vec<_> = files.iter().map(|f| (read_file(f), mtime(f))).collect();
    {
        let img = open_ro(&top);
        let mut all = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut all, 0).unwrap();
        let _ = img.info().unwrap();
        let _ = img.block_status(0, 4 * MIB).unwrap();
        img.flush().unwrap();
        img.close().unwrap();
    }
    {
        // Dropping without close.
        let img = open_ro(&top);
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, 0).unwrap();
    }
    {
        let img = Image::open(
            &top,
            &OpenOptions {
                force_share: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, 0).unwrap();
    }
    for (f, (bytes, mt)) in files.iter().zip(before) {
        assert!(
            read_file(f) == bytes,
            "read-only open modified {}",
            f.display()
        );
        assert_eq!(
            mtime(f),
            mt,
            "read-only open changed the mtime of {}",
            f.display()
        );
    }
}

#[test]
fn writable_open_clears_unknown_autoclear_bits() {
    let dir = TempDir::new("autoclear");
    let p = dir.join("img.qcow2");
    qemu_create_with_data(&p, 2 * MIB, "cluster_size=65536", 0x33, 70000);
    put_be64(&p, H_AUTOCLEAR, (1 << 7) | (1 << 40));
    {
        let img = open_ro(&p);
        drop(img);
        assert_eq!(
            be64(&p, H_AUTOCLEAR),
            (1 << 7) | (1 << 40),
            "read-only open touched autoclear bits"
        );
    }
    let img = open_rw(&p);
    let mut b = vec![0u8; 70000];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    img.write_at(&[0x44; 100], 5).unwrap();
    img.close().unwrap();
    assert_eq!(
        be64(&p, H_AUTOCLEAR),
        0,
        "unknown autoclear bits not cleared by a writable open"
    );
    assert_check_clean(&p);
    let o = qemu_io(&p, &["read -P 0x44 5 100".to_string()]);
    assert!(o.stdout.contains("read 100/100"), "{}", o.stdout);
}

#[test]
fn corrupt_bit_refuses_writable_open_but_allows_reads() {
    let dir = TempDir::new("corrupt-bit");
    let p = dir.join("img.qcow2");
    qemu_create_with_data(&p, 2 * MIB, "cluster_size=4096", 0x33, 7000);
    put_be64(&p, H_INCOMPAT, 1 << 1);
    let before = read_file(&p);
    match Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("writable open of an image with the corrupt bit succeeded"),
        Err(e) => {
            assert!(
                e.kind() == ErrorKind::Corrupt,
                "unexpected error kind: {e:?}"
            );
            assert!(e.to_string().to_lowercase().contains("corrupt"), "{e}");
        }
    }
    let img = open_ro(&p);
    assert!(img.info().unwrap().corrupt);
    let mut b = vec![0u8; 7000];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    drop(img);
    assert!(
        read_file(&p) == before,
        "opens of a corrupt image modified it"
    );
}

#[test]
fn rejected_writable_open_changes_nothing() {
    // An unknown incompatible bit together with unknown autoclear bits: the open must fail
    // before anything (e.g. clearing autoclear bits) is written.
    let dir = TempDir::new("rejected-rw");
    let p = base_image(&dir, "img.qcow2");
    put_be64(&p, H_INCOMPAT, 1 << 9);
    put_be64(&p, H_AUTOCLEAR, 1 << 9);
    let before = read_file(&p);
    let r = Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Unsupported),
        "expected Unsupported, got {:?}",
        r.err()
    );
    assert!(
        read_file(&p) == before,
        "a rejected writable open modified the file"
    );
}
