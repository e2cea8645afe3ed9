//! Issue 18, sliced metadata caches under constant eviction: the multi-threaded stress
//! workload (tests/stress_threads.rs, checked against the byte model, then `qemu-img check`
//! and `qemu-img compare`) on handles whose L2 and refcount caches hold two 512-byte slices
//! each, so nearly every mapping lookup and refcount update misses, evicts and (with dirty
//! slices) writes back in the middle of requests.
//!
//! The cache sizes come from the environment overrides the engine reads at open
//! (`OXCOW_L2_SLICE_SIZE`, `OXCOW_L2_CACHE_SIZE`, `OXCOW_REFCOUNT_CACHE_SIZE`), set once by
//! the single test below before any image is opened (one test, so no other test thread reads
//! the environment while it is set).

mod common;

use common::stress_model::*;
use common::stress_run::*;
use common::*;

#[test]
fn two_slice_caches_keep_every_byte_under_constant_eviction() {
    std::env::set_var("OXCOW_L2_SLICE_SIZE", "512");
    std::env::set_var("OXCOW_L2_CACHE_SIZE", "1");
    std::env::set_var("OXCOW_REFCOUNT_CACHE_SIZE", "1");
    run_stress(Cfg::new(4, 64 * KIB, 0x0004_5115_0064));
    run_stress(Cfg::new(4, 4 * KIB, 0x0004_5115_0004));
    run_stress(Cfg::new(2, 32 * KIB, 0x0002_5115_e232).extended_l2());
    run_stress(Cfg::new(4, 4 * KIB, 0x0004_5115_1a2e).lazy());
}
