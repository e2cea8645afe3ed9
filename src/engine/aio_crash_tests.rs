//! Crash consistency of the asynchronous queue, with the host file simulated in memory as in
//! `crash_tests`: a workload runs through an [`AioQueue`] (rounds of requests in flight
//! together: writes, vectored writes, write_zeroes, discards, reads, flushes), and every
//! crash point of its write-back (prefixes of the journal since the last durable state, and
//! reorderings of the writes between two syncs) must pass `qemu-img check` with at worst
//! leaks, with every byte acknowledged by a completed flush intact.
//!
//! Backends: the simulated file has no descriptor, so a queue on it runs every request on
//! its worker pool (the same engine calls as the synchronous tests, now from several workers
//! at once and in completion order). A queue created with io_uring allowed still sets up its
//! ring and its drain hook, and its overwrites still take the ring-write registration and
//! the grace pin before `plan_overwrite` finds no descriptor and hands them to the pool; that
//! variant runs too. The io_uring I/O itself needs a real file, whose crash states a test
//! cannot enumerate: `tests/aio_stress.rs` kills a process with io_uring writes in flight
//! instead.

use super::aio::{AioBackend, AioOp, AioOptions, AioQueue};
use super::crash_tests::{
    check_state, each_crash_state, open_sim_with, rw, Model, Rng, Scratch, SIZE,
};
use super::Image;
use crate::{CreateOptions, OpenOptions, ZeroFlags};
use std::sync::Arc;

type Queue = AioQueue<Arc<Image>, Vec<u8>, ()>;

/// Requests per round, each inside its own stripe of the disk so that requests in flight
/// together never overlap (their order is not defined).
const STRIPES: u64 = 8;

/// One request of a round inside `[lo, lo + stripe)`, applied to the model as submitted
/// (phase-two ranges are marked touched first: a crash may leave them anything).
fn request(
    m: &mut Model,
    rng: &mut Rng,
    lo: u64,
    stripe: u64,
    phase2: bool,
    cs: u64,
) -> AioOp<Vec<u8>> {
    let off = lo + rng.below(stripe - 1);
    let len = (1 + rng.below(3 * cs)).min(lo + stripe - off);
    if phase2 {
        m.touched[off as usize..(off + len) as usize].fill(true);
    }
    let tag = rng.next() as u8 | 1;
    let data = || -> Vec<u8> { (0..len).map(|i| tag ^ (i as u8)).collect() };
    match rng.below(10) {
        0 => {
            m.zero(off, len, phase2);
            AioOp::WriteZeroes {
                offset: off,
                count: len,
                flags: ZeroFlags {
                    may_unmap: rng.below(2) == 0,
                },
            }
        }
        1 => {
            let (a, b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
            if a < b {
                m.zero(a, b - a, phase2);
            }
            AioOp::Discard {
                offset: off,
                count: len,
            }
        }
        2 => AioOp::Read {
            bufs: vec![vec![0xee; len as usize]],
            offset: off,
        },
        3 => AioOp::Flush,
        4 if len > 2 => {
            let d = data();
            m.write(off, &d, phase2);
            let (a, b) = d.split_at(len as usize / 2);
            AioOp::Write {
                bufs: vec![a.to_vec(), b.to_vec()],
                offset: off,
            }
        }
        _ => {
            let d = data();
            m.write(off, &d, phase2);
            AioOp::Write {
                bufs: vec![d],
                offset: off,
            }
        }
    }
}

/// `rounds` rounds of [`STRIPES`] requests in flight together, each round polled to the
/// end; every request must succeed and every read must see the model as the round began.
fn workload(q: &Queue, m: &mut Model, rng: &mut Rng, rounds: usize, phase2: bool, cs: u64) {
    let stripe = SIZE / STRIPES;
    for round in 0..rounds {
        let before = m.data.clone();
        for s in 0..STRIPES {
            let op = request(m, rng, s * stripe, stripe, phase2, cs);
            if let Err((e, ..)) = q.submit(op, ()) {
                panic!("round {round}: submit: {e}");
            }
        }
        while q.in_flight() > 0 {
            for c in q.poll(usize::MAX, None) {
                if let Err(e) = c.result {
                    panic!("round {round}: request {}: {e}", c.cookie);
                }
                if let AioOp::Read { bufs, offset } = &c.op {
                    let at = *offset as usize;
                    assert!(
                        bufs[0] == before[at..at + bufs[0].len()],
                        "round {round}: the read at {offset:#x} differs from the model"
                    );
                }
            }
        }
    }
}

/// Submits a flush and waits for it.
fn flush(q: &Queue) {
    q.submit(AioOp::Flush, ())
        .map_err(|(e, ..)| e)
        .expect("submit flush");
    let c = q.poll(1, None).pop().expect("flush completion");
    c.result.expect("flush");
}

/// The crash points of one workload through a queue with `aio` options.
fn aio_crash_points(
    tag: &str,
    create: CreateOptions,
    open: &OpenOptions,
    aio: AioOptions,
    seed: u64,
) {
    let dir = Scratch::new(tag);
    let path = dir.0.join("img.qcow2");
    let cs = create.cluster_size as u64;
    let lazy = create.lazy_refcounts;
    crate::create(&path, SIZE, &create).expect("create");
    let (sim, img) = open_sim_with(std::fs::read(&path).expect("read"), &path, open);
    let img = Arc::new(img);
    let q: Queue = AioQueue::new(Arc::clone(&img), &aio).expect("queue");
    if aio.force_threads {
        assert_eq!(q.backend(), AioBackend::Threads, "{tag}: backend");
    }
    let mut rng = Rng(seed);
    let mut m = Model {
        data: vec![0; SIZE as usize],
        touched: vec![false; SIZE as usize],
    };
    workload(&q, &mut m, &mut rng, 6, false, cs);
    flush(&q);
    let base = sim.contents();
    let start = sim.journal().len();
    let flushed = m.data.clone();
    workload(&q, &mut m, &mut rng, 6, true, cs);
    flush(&q);
    let journal = sim.journal()[start..].to_vec();
    drop(q);
    std::mem::forget(img); // the process "dies" here
    let flushed = Model {
        data: flushed,
        touched: m.touched.clone(),
    };
    let states = each_crash_state(
        &base,
        &journal,
        60,
        |_| rng.next(),
        |bytes, what| check_state(&dir.0, bytes, &flushed, lazy, &format!("{tag}: {what}")),
    );
    let done = Model {
        data: m.data.clone(),
        touched: vec![false; SIZE as usize],
    };
    let all = super::crash_tests::state_at(&base, &journal, journal.len(), &|_| false);
    check_state(
        &dir.0,
        &all,
        &done,
        lazy,
        &format!("{tag}: after the last flush"),
    );
    assert!(states > 20, "{tag}: too few crash states ({states})");
}

#[test]
fn every_crash_point_of_one_pool_worker_leaves_at_most_leaks_and_keeps_flushed_data() {
    // One worker: requests run in submission order, so the journal is the same every run.
    aio_crash_points(
        "aio-c4k-one-worker",
        CreateOptions {
            cluster_size: 4096,
            refcount_bits: 16,
            ..Default::default()
        },
        &OpenOptions {
            l2_cache_size: 1,
            refcount_cache_size: 1,
            l2_slice_size: 512,
            ..rw()
        },
        AioOptions {
            depth: 16,
            workers: 1,
            force_threads: true,
        },
        31,
    );
}

#[test]
fn every_crash_point_of_four_pool_workers_leaves_at_most_leaks_and_keeps_flushed_data() {
    aio_crash_points(
        "aio-c16k-extl2-workers",
        CreateOptions {
            cluster_size: 16384,
            extended_l2: true,
            ..Default::default()
        },
        &rw(),
        AioOptions {
            depth: 16,
            workers: 4,
            force_threads: true,
        },
        32,
    );
}

#[test]
fn every_crash_point_of_a_queue_with_io_uring_allowed_on_a_lazy_refcounts_image_is_repaired() {
    // The ring and its drain hook exist (where the kernel allows io_uring); the simulated
    // file has no descriptor, so the I/O runs on the pool after the ring path declined it.
    aio_crash_points(
        "aio-c4k-lazy-ring",
        CreateOptions {
            cluster_size: 4096,
            lazy_refcounts: true,
            ..Default::default()
        },
        &rw(),
        AioOptions {
            depth: 16,
            workers: 2,
            force_threads: false,
        },
        33,
    );
}
