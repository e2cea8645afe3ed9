//! The io_uring write paths (overwrites in place, allocating writes' data): which writes go
//! on the ring, that allocations are linked or given back when reaped, and that control
//! operations and claim waiters wait for ring writes in flight (driving the ring themselves
//! when the owner does not poll).

use super::{AioBackend, AioOp, AioOptions, AioQueue};
use crate::format::GuestOffset;
use crate::{CreateOptions, Image, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

type Queue = AioQueue<Arc<Image>, Vec<u8>, u32>;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 4 MiB image with its first 1 MiB written (allocated, mapping cached), open with
/// `opts` (writable added).
fn image(tag: &str, opts: OpenOptions) -> (Scratch, Arc<Image>) {
    let dir = std::env::temp_dir().join(format!("oxcow-aio-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("a.qcow2");
    crate::create(&path, 4 << 20, &CreateOptions::default()).expect("create");
    let opts = OpenOptions {
        writable: true,
        ..opts
    };
    let img = Image::open(&path, &opts).expect("open");
    img.write_at(&vec![1u8; 1 << 20], 0).expect("fill");
    // Looked up once (as the first request of a slice on the pool would), the mapping is
    // in the lock-free view the ring path plans from.
    img.read_at(&mut vec![0u8; 1 << 20], 0).expect("read back");
    (Scratch(dir), Arc::new(img))
}

/// A queue with the io_uring backend, or `None` where the kernel refuses io_uring.
fn ring_queue(img: &Arc<Image>) -> Option<Queue> {
    let q = Queue::new(Arc::clone(img), &AioOptions::default()).expect("queue");
    if q.backend() != AioBackend::IoUring {
        eprintln!("io_uring unavailable here: skipped");
        return None;
    }
    Some(q)
}

fn write(q: &Queue, offset: u64, data: Vec<u8>) {
    let op = AioOp::Write {
        bufs: vec![data],
        offset,
    };
    q.submit(op, 0).map_err(|(e, _, _)| e).expect("submit");
}

fn poll_all(q: &Queue) {
    while q.in_flight() > 0 {
        for c in q.poll(usize::MAX, None) {
            c.result.expect("request");
        }
    }
}

fn ring_writes(img: &Image) -> usize {
    img.data_file().ring_writes().in_flight()
}

#[test]
fn overwrites_and_simple_allocations_go_on_the_ring_and_writes_across_clusters_to_the_pool() {
    let (_d, img) = image("ow", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    write(&q, 4096, vec![2u8; 4096]);
    write(&q, 65536 + 512, vec![3u8; 1000]);
    // Registered until reaped: both are on the ring.
    assert_eq!(ring_writes(&img), 2);
    // An unallocated cluster of a cached slice: allocated here, its data on the ring.
    write(&q, 2 << 20, vec![4u8; 4096]);
    assert_eq!(ring_writes(&img), 3);
    // A write across two clusters: the pool.
    write(&q, 65536 - 512, vec![5u8; 1024]);
    assert_eq!(ring_writes(&img), 3);
    poll_all(&q);
    assert_eq!(ring_writes(&img), 0);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 4096).expect("read");
    assert!(buf.iter().all(|&b| b == 2));
    img.read_at(&mut buf[..1000], 65536 + 512).expect("read");
    assert!(buf[..1000].iter().all(|&b| b == 3));
    img.read_at(&mut buf[..1024], 65536 - 512).expect("read");
    assert!(buf[..1024].iter().all(|&b| b == 5));
}

#[test]
fn writethrough_overwrites_stay_on_the_pool() {
    let opts = OpenOptions {
        writethrough: true,
        ..OpenOptions::default()
    };
    let (_d, img) = image("wt", opts);
    let Some(q) = ring_queue(&img) else { return };
    write(&q, 4096, vec![2u8; 4096]);
    assert_eq!(ring_writes(&img), 0);
    poll_all(&q);
}

#[test]
fn a_snapshot_taken_by_the_owner_waits_for_its_ring_writes_and_later_ones_copy() {
    let (_d, img) = image("snap", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    for i in 0..8 {
        write(&q, i * 4096, vec![7u8; 4096]);
    }
    assert_eq!(ring_writes(&img), 8);
    // Not polled: the snapshot must reap the ring writes itself rather than wait forever.
    img.snapshot_create("s1").expect("snapshot");
    assert_eq!(ring_writes(&img), 0);
    // The snapshot shares the cluster now: this overwrite must copy (pool), not go in place.
    write(&q, 0, vec![8u8; 4096]);
    assert_eq!(ring_writes(&img), 0);
    poll_all(&q);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 8));
    img.read_at(&mut buf, 4096).expect("read");
    assert!(buf.iter().all(|&b| b == 7), "a ring write was lost");
    let report = img
        .check(super::super::check::CheckFix::None, None)
        .expect("check");
    assert_eq!(report.corruptions + report.leaks, 0, "{report:?}");
}

fn unsubmitted(q: &Queue) -> usize {
    q.ring.as_ref().map_or(0, |r| r.unsubmitted())
}

#[test]
fn a_plugged_section_submits_its_ring_requests_together_at_its_end_or_at_a_poll() {
    let (_d, img) = image("plug", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    {
        let _plug = q.plug();
        for i in 0..4 {
            write(&q, i * 4096, vec![9u8; 4096]);
        }
        assert_eq!(unsubmitted(&q), 4, "submitted inside the section");
    }
    assert_eq!(
        unsubmitted(&q),
        0,
        "not submitted at the end of the section"
    );
    poll_all(&q);
    // A poll inside a section starts what is queued instead of waiting forever.
    let plug = q.plug();
    write(&q, 8192, vec![6u8; 4096]);
    assert_eq!(unsubmitted(&q), 1);
    poll_all(&q);
    drop(plug);
    let mut buf = vec![0u8; 16384];
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf[..8192].iter().all(|&b| b == 9));
    assert!(buf[8192..12288].iter().all(|&b| b == 6));
    assert!(buf[12288..].iter().all(|&b| b == 9));
}

/// Whether `fd` is readable now.
fn readable(fd: std::os::fd::RawFd) -> bool {
    crate::storage::notify::readable_now(fd)
}

#[test]
fn polls_that_wait_on_the_ring_keep_the_eventfd_readable_exactly_while_completions_wait() {
    let (_d, img) = image("efd", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    for round in 0..20u64 {
        // Only ring requests in flight: the poll waits in io_uring_enter, not on the fd.
        for i in 0..8u64 {
            write(&q, (round * 8 + i) % 256 * 4096, vec![round as u8; 4096]);
        }
        let mut got = 0;
        while got < 8 {
            got += q.poll(3, None).len();
            // What is left finishes and then makes the fd readable (bounded: 5 s).
            let mut waited = 0;
            while q.in_flight() > 0 && !readable(q.fd()) {
                assert!(
                    waited < 100_000,
                    "round {round}: completions never signalled"
                );
                std::thread::sleep(std::time::Duration::from_micros(50));
                waited += 1;
            }
        }
        assert_eq!(q.in_flight(), 0);
        assert!(
            !readable(q.fd()),
            "round {round}: readable with nothing to poll"
        );
    }
    // A timed poll with nothing finishing returns when its time is up.
    assert!(q
        .poll(1, Some(std::time::Duration::from_millis(1)))
        .is_empty());
}

/// Allocating writes whose data went on the ring so far.
fn ring_allocs(q: &Queue) -> u64 {
    q.ring.as_ref().map_or(0, |r| r.allocs())
}

/// Makes the next `n` ring allocating writes complete with `errno` (`None`: a short write).
fn inject(q: &Queue, n: usize, errno: Option<i32>) {
    if let Some(r) = &q.ring {
        *r.inject.lock().expect("inject") = (n, errno);
    }
}

/// The image's check finds neither corruptions nor leaks.
fn assert_clean(img: &Image) {
    let report = img
        .check(super::super::check::CheckFix::None, None)
        .expect("check");
    assert_eq!(
        report.corruptions + report.leaks + report.check_errors,
        0,
        "{report:?}"
    );
}

fn read(img: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    img.read_at(&mut buf, offset).expect("read");
    buf
}

/// Runs `f` on another thread and fails if it takes more than `secs` seconds (a deadlock).
fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("deadlock: did not finish in time")
}

#[test]
fn allocating_writes_of_one_cluster_put_their_data_on_the_ring_and_link_when_reaped() {
    let (_d, img) = image("alloc", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    // Unallocated clusters of an owned, cached L2 slice: partial and full-cluster writes.
    for i in 0..8u64 {
        write(&q, (2 << 20) + i * 65536 + 512, vec![10 + i as u8; 4096]);
    }
    write(&q, 3 << 20, vec![30u8; 65536]);
    assert_eq!(
        ring_allocs(&q),
        9,
        "allocating writes fell back to the pool"
    );
    assert_eq!(ring_writes(&img), 9, "registered until reaped");
    assert!(img
        .inflight
        .is_claimed(GuestOffset::new(2 << 20).cluster(&img.geo)));
    poll_all(&q);
    assert_eq!(ring_writes(&img), 0);
    assert_eq!(img.inflight.claims(), 0, "a claim outlived its link");
    for i in 0..8u64 {
        let c = read(&img, (2 << 20) + i * 65536, 65536);
        assert!(
            c[..512].iter().all(|&b| b == 0),
            "cluster {i}: head not zero"
        );
        assert!(
            c[512..4608].iter().all(|&b| b == 10 + i as u8),
            "cluster {i}"
        );
        assert!(
            c[4608..].iter().all(|&b| b == 0),
            "cluster {i}: tail not zero"
        );
    }
    assert!(read(&img, 3 << 20, 65536).iter().all(|&b| b == 30));
    assert_clean(&img);
}

#[test]
fn an_allocating_write_that_meets_a_claim_in_flight_goes_to_the_pool_and_both_land() {
    let (_d, img) = image("claim", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let at = 2u64 << 20;
    write(&q, at, vec![1u8; 4096]);
    assert_eq!(ring_allocs(&q), 1);
    // Same cluster, not polled yet: its claim is held, so this one must not plan here.
    write(&q, at + 8192, vec![2u8; 4096]);
    assert_eq!(ring_allocs(&q), 1, "planned beside a claim in flight");
    poll_all(&q);
    let c = read(&img, at, 65536);
    assert!(c[..4096].iter().all(|&b| b == 1));
    assert!(c[4096..8192].iter().all(|&b| b == 0));
    assert!(c[8192..12288].iter().all(|&b| b == 2));
    assert_clean(&img);
}

#[test]
fn a_synchronous_write_by_the_owner_into_a_cluster_its_ring_allocation_holds_does_not_hang() {
    let (_d, img) = image("own", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let q = within(10, move || {
        let at = 2u64 << 20;
        write(&q, at, vec![1u8; 4096]);
        assert_eq!(ring_allocs(&q), 1);
        // The claim is released only when the ring write is reaped: the waiter drives it.
        q.image()
            .write_at(&[2u8; 4096], at + 4096)
            .expect("sync write");
        poll_all(&q);
        q
    });
    let c = read(&img, 2 << 20, 12288);
    assert!(c[..4096].iter().all(|&b| b == 1));
    assert!(c[4096..8192].iter().all(|&b| b == 2));
    drop(q);
    assert_clean(&img);
}

#[test]
fn a_failed_ring_allocating_write_gives_its_cluster_back_and_reports_the_error() {
    let (_d, img) = image("fail", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let at = 2u64 << 20;
    inject(&q, 1, Some(libc::EIO));
    write(&q, at, vec![1u8; 4096]);
    assert_eq!(ring_allocs(&q), 1);
    let mut errors = 0;
    while q.in_flight() > 0 {
        for c in q.poll(usize::MAX, None) {
            let e = c.result.expect_err("the injected error was lost");
            assert_eq!(e.kind(), crate::ErrorKind::Io, "{e}");
            errors += 1;
        }
    }
    assert_eq!(errors, 1);
    assert_eq!(img.inflight.claims(), 0, "the claim was kept");
    let ext = img.block_status(at, 65536).expect("status");
    assert_eq!(ext.host_offset, 0, "the failed write was linked: {ext:?}");
    assert_clean(&img);
    // The cluster given back is found again by the next allocation.
    write(&q, at, vec![3u8; 4096]);
    poll_all(&q);
    assert!(read(&img, at, 4096).iter().all(|&b| b == 3));
    assert_clean(&img);
}

#[test]
fn a_short_ring_allocating_write_is_given_back_and_redone_on_the_pool() {
    let (_d, img) = image("short", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let at = 2u64 << 20;
    inject(&q, 2, None);
    write(&q, at, vec![4u8; 4096]);
    write(&q, at + 65536, vec![5u8; 65536]);
    assert_eq!(ring_allocs(&q), 2);
    // A claim kept past the redo would hold the pool's re-run forever.
    let _q = within(10, move || {
        poll_all(&q);
        q
    });
    assert!(read(&img, at, 4096).iter().all(|&b| b == 4));
    assert!(read(&img, at + 65536, 65536).iter().all(|&b| b == 5));
    assert_eq!(img.inflight.claims(), 0);
    assert_clean(&img);
}

#[test]
fn a_snapshot_from_another_thread_waits_for_ring_allocations_the_owner_does_not_poll() {
    let (_d, img) = image("qalloc", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let plug = q.plug();
    for i in 0..16u64 {
        write(&q, (2 << 20) + i * 65536, vec![40 + i as u8; 4096]);
    }
    assert_eq!(ring_allocs(&q), 16);
    assert_eq!(
        unsubmitted(&q),
        16,
        "not in flight when the snapshot starts"
    );
    // The owner neither polls nor ends its plugged section: the snapshot must submit, reap
    // and link the allocations through the drain hook.
    let other = Arc::clone(&img);
    within(10, move || other.snapshot_create("s1").expect("snapshot"));
    assert_eq!(ring_writes(&img), 0);
    assert_eq!(img.inflight.claims(), 0);
    drop(plug);
    poll_all(&q);
    for i in 0..16u64 {
        let c = read(&img, (2 << 20) + i * 65536, 4096);
        assert!(c.iter().all(|&b| b == 40 + i as u8), "cluster {i}");
    }
    assert_clean(&img);
}

#[test]
fn quiescing_operations_racing_a_polling_owner_of_ring_allocations_finish_consistent() {
    let (_d, img) = image("race", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (other, halt) = (Arc::clone(&img), Arc::clone(&stop));
    let snapper = std::thread::spawn(move || {
        let mut n = 0u32;
        while !halt.load(std::sync::atomic::Ordering::Acquire) {
            other.snapshot_create(&format!("s{n}")).expect("snapshot");
            other.snapshot_delete(&format!("s{n}")).expect("delete");
            n += 1;
        }
        n
    });
    let q = within(60, move || {
        for i in 0..40u64 {
            write(&q, (1 << 20) + i * 65536 + 4096, vec![i as u8 + 1; 4096]);
            if i % 4 == 3 {
                poll_all(&q);
            }
        }
        poll_all(&q);
        q
    });
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rounds = snapper.join().expect("snapshots");
    eprintln!(
        "{} ring allocations, {rounds} snapshot rounds",
        ring_allocs(&q)
    );
    for i in 0..40u64 {
        let c = read(&img, (1 << 20) + i * 65536, 8192);
        assert!(c[..4096].iter().all(|&b| b == 0), "cluster {i}");
        assert!(c[4096..].iter().all(|&b| b == i as u8 + 1), "cluster {i}");
    }
    assert_clean(&img);
}

#[test]
fn extended_l2_subcluster_allocations_go_on_the_ring_only_when_no_fill_is_needed() {
    let dir = std::env::temp_dir().join(format!("oxcow-aio-xl2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let _d = Scratch(dir.clone());
    let path = dir.join("x.qcow2");
    let create = CreateOptions {
        extended_l2: true,
        ..CreateOptions::default()
    };
    crate::create(&path, 4 << 20, &create).expect("create");
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = Arc::new(Image::open(&path, &opts).expect("open"));
    // An owned table with its slice cached (64 KiB clusters: 2 KiB subclusters).
    img.write_at(&[1u8; 65536], 0).expect("fill");
    let Some(q) = ring_queue(&img) else { return };
    let at = 1u64 << 20;
    // A fresh cluster, two whole subclusters: ring.
    write(&q, at + 4096, vec![2u8; 4096]);
    assert_eq!(ring_allocs(&q), 1);
    poll_all(&q);
    // The same cluster, now owned: one more whole subcluster is just the request (ring);
    // half a subcluster needs the rest of it filled (the host there was written): pool.
    write(&q, at + 16384, vec![3u8; 2048]);
    assert_eq!(ring_allocs(&q), 2);
    poll_all(&q);
    write(&q, at + 32768, vec![4u8; 1024]);
    assert_eq!(
        ring_allocs(&q),
        2,
        "a write needing a zero fill went on the ring"
    );
    poll_all(&q);
    let c = read(&img, at, 65536);
    let expect = |r: std::ops::Range<usize>, v: u8| c[r].iter().all(|&b| b == v);
    assert!(expect(0..4096, 0) && expect(4096..8192, 2) && expect(8192..16384, 0));
    assert!(expect(16384..18432, 3) && expect(18432..32768, 0));
    assert!(expect(32768..33792, 4) && expect(33792..65536, 0));
    assert_clean(&img);
}
