//! The io_uring overwrite path: which writes go on the ring, and that control operations
//! wait for ring writes in flight (driving the ring themselves when the owner does not poll).

use super::{AioBackend, AioOp, AioOptions, AioQueue};
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
fn overwrites_of_owned_clusters_go_on_the_ring_and_others_to_the_pool() {
    let (_d, img) = image("ow", OpenOptions::default());
    let Some(q) = ring_queue(&img) else { return };
    write(&q, 4096, vec![2u8; 4096]);
    write(&q, 65536 + 512, vec![3u8; 1000]);
    // Registered until reaped: both are on the ring.
    assert_eq!(ring_writes(&img), 2);
    // Unallocated cluster (allocating write) and a write across two clusters: the pool.
    write(&q, 2 << 20, vec![4u8; 4096]);
    write(&q, 65536 - 512, vec![5u8; 1024]);
    assert_eq!(ring_writes(&img), 2);
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
