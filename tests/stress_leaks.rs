//! Focused leak checks: one kind of concurrency each (16 threads allocating slices of the same
//! new clusters; discarding and reallocating their own clusters; writing, zeroing and discarding
//! the same few clusters), then a clean close.
//!
//! The oracle is `qemu-img check`: it must exit 0 (no leaked cluster, no corruption).
//!
//! Environment: `OXCOW_STRESS_SEED` and `OXCOW_STRESS_ROUNDS` as in `stress_threads`.

mod common;

use common::stress::*;
use common::*;
use oxcow::{CreateOptions, Image, ZeroFlags};
use std::time::Duration;

fn leak_check(
    tag: &str,
    threads: usize,
    cluster: u64,
    body: impl Fn(&Image, usize, &mut Rng) + Sync,
) {
    let seed = seed_override().unwrap_or(0x1ea_0000 + threads as u64);
    let what = format!("{tag}, {threads} threads (replay: OXCOW_STRESS_SEED={seed:#x})");
    let _dog = Watchdog::new(what.clone(), Duration::from_secs(120));
    let dir = TempDir::new(&format!("stress-leak-{tag}"));
    let p = dir.join("leak.qcow2");
    oxcow::create(
        &p,
        64 * cluster * 64,
        &CreateOptions {
            cluster_size: cluster as u32,
            ..Default::default()
        },
    )
    .expect("create");
    let img = open_rw(&p);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (img, body) = (&img, &body);
            s.spawn(move || body(img, t, &mut Rng::new(thread_seed(seed, t))));
        }
    });
    img.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
    let (code, out) = qemu_img_check(&p);
    assert_eq!(code, 0, "{what}: qemu-img check exited {code}:\n{out}");
}

/// All threads allocate slices of the same new clusters at once (no discards).
#[test]
fn leak_free_concurrent_allocation_of_shared_new_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("alloc", 16, 65536, |img, t, _| {
            for c in 0..64u64 {
                let off = c * 65536 + t as u64 * 4096;
                img.write_at(&pat(otag(t, c), off, 4096), off)
                    .expect("write");
            }
        });
    }
}

/// Threads write and discard their own clusters (allocate, free, reallocate), flushing now
/// and then.
#[test]
fn leak_free_discard_and_reallocate_own_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("discard-own", 16, 65536, |img, t, r| {
            for i in 0..60u64 {
                let c = t as u64 * 4 + r.below(4);
                let off = c * 65536;
                match r.below(4) {
                    0 => img.discard(off, 65536).expect("discard"),
                    1 => img
                        .write_zeroes(off, 65536, ZeroFlags { may_unmap: true })
                        .expect("zero"),
                    _ => img
                        .write_at(&pat(otag(t, i), off, 65536), off)
                        .expect("write"),
                }
                if i % 16 == 15 {
                    img.flush().expect("flush");
                }
            }
        });
    }
}

/// All threads write, zero and discard the same few clusters.
#[test]
fn leak_free_discard_racing_writes_on_shared_clusters() {
    for _ in 0..3 * rounds_factor() {
        leak_check("discard-shared", 16, 65536, |img, t, r| {
            for i in 0..60u64 {
                let c = r.below(4);
                let off = c * 65536 + r.below(16) * 4096;
                match r.below(5) {
                    0 => img.discard(c * 65536, 65536).expect("discard"),
                    1 => img
                        .write_zeroes(c * 65536, 65536, ZeroFlags { may_unmap: true })
                        .expect("zero"),
                    2 => img.flush().expect("flush"),
                    _ => img
                        .write_at(&pat(otag(t, i), off, 4096), off)
                        .expect("write"),
                }
            }
        });
    }
}
