//! Bounded memory per handle, checked on the engine's own state (the integration tests cannot
//! see it): idle cache entries and tracker pages are given back at later requests without a
//! miss or a flush, and the default L2 cache grows with the image.

use super::crash_tests::{rw, Scratch};
use super::Image;
use crate::format::entry::L1Entry;
use crate::format::{GuestOffset, HostOffset};
use crate::{CreateOptions, OpenOptions};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Whether the test suite overrides the cache sizes through the environment.
fn sizes_overridden() -> bool {
    std::env::var_os("OXCOW_L2_CACHE_SIZE").is_some()
}

/// The L2 slice that maps guest offset `guest`.
fn slice_of(img: &Image, guest: u64) -> HostOffset {
    let g = GuestOffset::new(guest);
    let table = L1Entry(img.view.l1_entry(g.l1_index(&img.geo)).expect("l1")).l2_offset();
    img.view.slice_of(table, g.l2_index(&img.geo)).0
}

/// Enough requests for every thread's periodic check to come round (see `cache::tick`).
fn requests(img: &Image, at: u64) {
    let mut b = [0u8; 512];
    for _ in 0..600 {
        img.read_at(&mut b, at).expect("read");
    }
}

#[test]
fn idle_slices_are_dropped_at_later_requests_without_a_miss_or_flush() {
    let dir = Scratch::new("idle-clean");
    let path = dir.0.join("i.qcow2");
    crate::create(&path, 1024 * MIB, &CreateOptions::default()).expect("create");
    {
        let img = Image::open(&path, &rw()).expect("open");
        img.write_at(&[1u8; 4096], 0).expect("write");
        img.write_at(&[2u8; 4096], 600 * MIB).expect("write");
        img.close().expect("close");
    }
    let opts = OpenOptions {
        cache_clean_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let img = Image::open(&path, &opts).expect("open");
    let mut b = [0u8; 512];
    img.read_at(&mut b, 0).expect("read");
    requests(&img, 600 * MIB);
    let (idle, busy) = (slice_of(&img, 0), slice_of(&img, 600 * MIB));
    assert!(img.lock_meta().l2_cached(idle) && img.lock_meta().l2_cached(busy));
    // Only hits from now on (the busy slice): the first clean clears the use marks, the
    // second drops what was not used in between.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(120));
        requests(&img, 600 * MIB);
    }
    assert!(!img.lock_meta().l2_cached(idle), "the idle slice stayed");
    assert!(
        img.lock_meta().l2_cached(busy),
        "the slice in use was dropped"
    );
    assert_eq!(
        img.view
            .lookup_now(&img.geo, img.version, GuestOffset::new(0)),
        None
    );
    img.read_at(&mut b, 0).expect("read again");
    assert_eq!(b, [1u8; 512]);
}

#[test]
fn slice_memory_goes_back_to_the_allocator_once_its_slices_are_dropped() {
    let dir = Scratch::new("idle-slab");
    let path = dir.0.join("i.qcow2");
    let size = 4096 * MIB;
    crate::create(&path, size, &CreateOptions::default()).expect("create");
    {
        let img = Image::open(&path, &rw()).expect("open");
        // One L2 table per 512 MiB, so every slice of the image can be read.
        for t in 0..size / (512 * MIB) {
            img.write_at(&[1u8; 512], t * 512 * MIB).expect("write");
        }
        img.close().expect("close");
    }
    let opts = OpenOptions {
        cache_clean_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let img = Image::open(&path, &opts).expect("open");
    let cache = img.view.cache();
    let covered = cache.slice_bytes / 8 * img.geo.cluster_size();
    let mut b = [0u8; 512];
    let mut at = 0;
    while at < size {
        img.read_at(&mut b, at).expect("read");
        at += covered;
    }
    let slices = (size / covered) as usize;
    let all = img.view.slab().held_bytes();
    assert!(all >= slices.min(cache.l2_slices) * cache.slice_bytes as usize);
    // Two cleans, one periodic check each (the first clears the referenced bits, the second
    // drops the slices unused since): the second frees what it withdraws at once, as no
    // request is pinned while it runs, not at some later check.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(120));
        let mut b = [0u8; 512];
        for _ in 0..super::cache::TICK_REQUESTS {
            img.read_at(&mut b, 0).expect("read");
        }
    }
    // What stays: the chunk of the slice in use, and at most one more for a slice a
    // thread keeps to refill at its next miss.
    let chunk = (64 << 10).max(cache.slice_bytes as usize);
    let left = img.view.slab().held_bytes();
    assert!(left <= 2 * chunk, "{left} of {all} bytes kept");
    img.read_at(&mut b, 2048 * MIB).expect("read again");
    assert_eq!(b, [1u8; 512]);
}

#[test]
fn the_tracker_gives_its_pages_back_once_idle() {
    let dir = Scratch::new("idle-tracker");
    let path = dir.0.join("t.qcow2");
    crate::create(&path, 64 * MIB, &CreateOptions::default()).expect("create");
    let img = Image::open(
        &path,
        &OpenOptions {
            cache_clean_interval: Some(Duration::from_millis(50)),
            ..rw()
        },
    )
    .expect("open");
    img.write_at(&[3u8; 4096], 8 * MIB)
        .expect("allocating write");
    assert!(img.inflight.pages() > 0);
    std::thread::sleep(Duration::from_millis(80));
    requests(&img, 0);
    assert_eq!(img.inflight.pages(), 0, "pages kept after the idle clean");
    img.write_at(&[4u8; 4096], 16 * MIB)
        .expect("allocating write");
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 16 * MIB).expect("read");
    assert_eq!(b, [4u8; 4096]);
}

#[test]
fn the_default_l2_cache_grows_with_the_image_and_a_chosen_one_does_not() {
    if sizes_overridden() {
        return;
    }
    let dir = Scratch::new("grow-cache");
    let path = dir.0.join("g.qcow2");
    crate::create(&path, 1024 * MIB, &CreateOptions::default()).expect("create");
    let img = Image::open(&path, &rw()).expect("open");
    let slice = img.view.cache().slice_bytes;
    // 8 bytes of L2 per 64 KiB cluster.
    assert_eq!(img.view.cache().l2_slices as u64, (128 << 10) / slice);
    img.resize(64 << 30, false).expect("grow");
    assert_eq!(img.view.cache().l2_slices as u64, (8 * MIB) / slice);
    img.resize(1 << 40, false).expect("grow");
    assert_eq!(
        img.view.cache().l2_slices as u64,
        32 * MIB / slice,
        "capped like the default at open"
    );
    img.close().expect("close");
    let chosen = Image::open(
        &path,
        &OpenOptions {
            l2_cache_size: 64 << 10,
            ..rw()
        },
    )
    .expect("open");
    let before = chosen.view.cache().l2_slices;
    chosen.resize(2 << 40, false).expect("grow");
    assert_eq!(chosen.view.cache().l2_slices, before);
}
