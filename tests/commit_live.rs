//! Commit on a live handle: while writer threads write one half of the disk and reader
//! threads keep reading the other half (written before, so its contents are known), commits
//! empty the top into its backing file again and again. Readers never see a wrong byte (the
//! dropped clusters stay readable until they finish, also when the file is cut), no write
//! is lost, and both files check clean.

mod common;

use common::*;
use oxcow::CommitOptions;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

const SIZE: u64 = 8 * MIB;
const HALF: u64 = SIZE / 2;
const BLK: u64 = 4096;

fn block(tag: u64, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLK as usize];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (tag.wrapping_mul(31) ^ ((off + i as u64) / 7)) as u8 | 1;
    }
    b
}

#[test]
fn readers_and_writers_run_through_repeated_commits_without_a_wrong_byte() {
    let dir = TempDir::new("commit-live");
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create_with_data(&base, SIZE, "cluster_size=16k", 0x11, HALF);
    qemu_create_overlay(&top, None, "cluster_size=16k", "base.qcow2", "qcow2");
    let img = open_rw(&top);
    // The stable half: known data in the top (copied into the base by the first commit).
    let mut stable = vec![0x11u8; HALF as usize];
    for off in (0..HALF).step_by(BLK as usize * 3) {
        let b = block(1, off);
        img.write_at(&b, off).expect("stable data");
        stable[off as usize..(off + BLK) as usize].copy_from_slice(&b);
    }
    assert_same_bytes(&oxcow_read_all(&img)[..HALF as usize], &stable, "before");
    let model = Mutex::new(vec![0u8; HALF as usize]);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (img, model, stop) = (&img, &model, &stop);
            s.spawn(move || {
                let mut rng = Rng::new(w + 1);
                let mut tag = w;
                while !stop.load(Ordering::SeqCst) {
                    // Blocks b with b % 2 == w: no two writers share one.
                    let off = HALF + (rng.below(HALF / BLK / 2) * 2 + w) * BLK;
                    tag += 2;
                    let b = block(tag, off);
                    img.write_at(&b, off).expect("write during commit");
                    let i = (off - HALF) as usize;
                    model.lock().unwrap()[i..i + BLK as usize].copy_from_slice(&b);
                }
            });
        }
        for r in 0..2u64 {
            let (img, stop, stable, reads) = (&img, &stop, &stable, &reads);
            s.spawn(move || {
                let mut rng = Rng::new(100 + r);
                let mut buf = vec![0u8; 3 * BLK as usize];
                while !stop.load(Ordering::SeqCst) {
                    let off = rng.below(HALF / BLK - 3) * BLK;
                    img.read_at(&mut buf, off).expect("read during commit");
                    let want = &stable[off as usize..off as usize + buf.len()];
                    assert!(buf == want, "wrong bytes read at {off:#x} during a commit");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for round in 0..6 {
            img.commit(&CommitOptions {
                keep_top: round % 3 == 2,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("commit {round}: {e}"));
        }
        stop.store(true, Ordering::SeqCst);
    });
    assert!(reads.load(Ordering::Relaxed) > 0);
    let got = oxcow_read_all(&img);
    assert_same_bytes(&got[..HALF as usize], &stable, "stable half");
    assert_same_bytes(
        &got[HALF as usize..],
        &model.lock().unwrap(),
        "written half",
    );
    img.close().expect("close");
    assert_check_clean(&base);
    assert_check_clean(&top);
}
