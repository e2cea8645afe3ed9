//! The metadata mutex's entry (`Image::lock_meta`): a waiter that spins and then sleeps
//! still excludes the holder, and a panic while holding it does not lock the image out.

use super::crash_tests::scratch_image;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::Duration;

#[test]
fn a_waiter_gets_the_metadata_mutex_only_after_a_long_holder_releases_it() {
    let (_dir, img) = scratch_image("metalock-exclusion");
    let released = AtomicBool::new(false);
    let held = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            let m = img.lock_meta();
            held.wait();
            // Far longer than the waiter spins: it must fall back to sleeping on the mutex.
            std::thread::sleep(Duration::from_millis(30));
            released.store(true, Ordering::SeqCst);
            drop(m);
        });
        held.wait();
        let _m = img.lock_meta();
        assert!(
            released.load(Ordering::SeqCst),
            "the waiter got the mutex while the holder still had it"
        );
    });
}

#[test]
fn many_threads_taking_the_metadata_mutex_never_overlap() {
    let (_dir, img) = scratch_image("metalock-overlap");
    let inside = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..2000u32 {
                    let _m = img.lock_meta();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    // Some sections outlast the waiters' spin, most do not.
                    if i % 500 == 0 {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    inside.store(false, Ordering::SeqCst);
                }
            });
        }
    });
}

#[test]
fn a_panic_while_holding_the_metadata_mutex_does_not_lock_the_image_out() {
    let (_dir, img) = scratch_image("metalock-poison");
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let _m = img.lock_meta();
            panic!("a panic under the metadata mutex (expected by this test)");
        })
        .join()
    });
    assert!(r.is_err(), "the holder panicked");
    drop(img.lock_meta());
    img.read_at(&mut [0u8; 512], 0)
        .expect("read after the panic");
}
