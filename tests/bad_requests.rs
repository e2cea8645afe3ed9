//! Bad requests are rejected without touching the file: out-of-range and overflowing offsets and
//! lengths on every request type fail with InvalidArgument (EINVAL), zero-length requests
//! succeed and change nothing, and requests ending exactly at a non-cluster-aligned virtual
//! size are accepted.
//!
//! The oracle: the error kind and errno, the image file compared byte for byte before and
//! after, and `qemu-img check`.

mod common;

use common::malformed::*;
use common::*;
use oxcow::{ErrorKind, ZeroFlags};

fn assert_einval<T: std::fmt::Debug>(r: oxcow::Result<T>, what: &str) {
    match r {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => assert_eq!(e.errno(), EINVAL),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn out_of_range_requests_are_rejected_and_change_nothing() {
    let dir = TempDir::new("range");
    let p = dir.join("img.qcow2");
    let vsize = 4 * MIB;
    qemu_create(&p, vsize, "cluster_size=4096");
    qemu_io(
        &p,
        &[
            "write -P 0x5a 0 100000".to_string(),
            format!("write -P 0x6b {} 4096", vsize - 4096),
        ],
    );
    let before = read_file(&p);
    let img = open_rw(&p);
    let buf = vec![0x77u8; 8192];
    let mut rbuf = vec![0u8; 8192];
    // (offset, len) pairs that are out of range or overflow.
    let bad: Vec<(u64, u64)> = vec![
        (vsize, 1),
        (vsize - 1, 2),
        (vsize - 4096, 8192),
        (vsize + 4096, 4096),
        (u64::MAX, 1),
        (u64::MAX - 10, 4096),
        (u64::MAX - 4095, 8192),
        (1 << 63, 4096),
    ];
    for &(off, len) in &bad {
        let what = format!("[{off:#x}, +{len:#x})");
        let l = len.min(8192) as usize;
        assert_einval(img.read_at(&mut rbuf[..l], off), &format!("read {what}"));
        assert_einval(img.write_at(&buf[..l], off), &format!("write {what}"));
        assert_einval(
            img.write_vectored_at(&[&buf[..l / 2], &buf[l / 2..l]], off),
            &format!("writev {what}"),
        );
        {
            let (a, b) = rbuf[..l].split_at_mut(l / 2);
            let mut v: Vec<&mut [u8]> = vec![a, b];
            assert_einval(img.read_vectored_at(&mut v, off), &format!("readv {what}"));
        }
        assert_einval(
            img.write_zeroes(off, len, ZeroFlags::default()),
            &format!("zeroes {what}"),
        );
        assert_einval(
            img.write_zeroes(off, len, ZeroFlags { may_unmap: true }),
            &format!("zeroes unmap {what}"),
        );
        assert_einval(img.discard(off, len), &format!("discard {what}"));
        assert_einval(img.block_status(off, len), &format!("block_status {what}"));
    }
    // Huge counts from a valid offset.
    assert_einval(
        img.write_zeroes(4096, u64::MAX, ZeroFlags::default()),
        "zeroes u64::MAX",
    );
    assert_einval(img.discard(4096, u64::MAX - 4095), "discard overflow");
    assert_einval(
        img.write_zeroes(0, vsize + 1, ZeroFlags { may_unmap: true }),
        "zeroes whole+1",
    );
    assert_einval(img.discard(0, vsize + 512), "discard whole+512");
    img.flush().unwrap();
    img.close().unwrap();
    assert!(
        read_file(&p) == before,
        "rejected requests modified the image file"
    );
    assert_check_clean(&p);
}

#[test]
fn zero_length_requests_succeed_and_change_nothing() {
    let dir = TempDir::new("zero-len");
    let p = dir.join("img.qcow2");
    let vsize = 2 * MIB;
    qemu_create_with_data(&p, vsize, "cluster_size=4096", 0x5a, 10000);
    let before = read_file(&p);
    let img = open_rw(&p);
    for off in [0, 1, 4096, 12345, vsize - 1, vsize] {
        img.read_at(&mut [], off)
            .unwrap_or_else(|e| panic!("empty read at {off}: {e}"));
        img.write_at(&[], off)
            .unwrap_or_else(|e| panic!("empty write at {off}: {e}"));
        img.write_vectored_at(&[], off)
            .unwrap_or_else(|e| panic!("empty writev at {off}: {e}"));
        img.write_vectored_at(&[&[], &[]], off)
            .unwrap_or_else(|e| panic!("writev of empty bufs at {off}: {e}"));
        img.read_vectored_at(&mut [], off)
            .unwrap_or_else(|e| panic!("empty readv at {off}: {e}"));
        img.write_zeroes(off, 0, ZeroFlags::default())
            .unwrap_or_else(|e| panic!("empty zeroes at {off}: {e}"));
        img.write_zeroes(off, 0, ZeroFlags { may_unmap: true })
            .unwrap_or_else(|e| panic!("empty zeroes at {off}: {e}"));
        img.discard(off, 0)
            .unwrap_or_else(|e| panic!("empty discard at {off}: {e}"));
    }
    img.close().unwrap();
    assert!(
        read_file(&p) == before,
        "zero-length requests modified the image file"
    );
}

#[test]
fn small_cluster_and_tail_edge_requests_are_accepted() {
    // Requests ending exactly at the (non cluster-aligned) virtual size are valid.
    let dir = TempDir::new("tail");
    let p = dir.join("img.qcow2");
    let vsize = MIB + 3 * 512;
    qemu_create(&p, vsize, "cluster_size=4096");
    let img = open_rw(&p);
    img.write_at(&[0x42; 1000], vsize - 1000).unwrap();
    img.write_zeroes(vsize - 100, 100, ZeroFlags::default())
        .unwrap();
    img.discard(vsize - 3 * 512, 3 * 512).unwrap();
    let mut b = vec![0u8; 1];
    img.read_at(&mut b, vsize - 1).unwrap();
    let x = img.block_status(vsize - 1, 1).unwrap();
    assert_eq!(x.length, 1);
    img.close().unwrap();
    assert_check_clean(&p);
}
