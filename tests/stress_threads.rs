//! Issue 6, "many writers at once": N threads (2 to 16) hammer ONE image handle with reads,
//! writes (aligned and unaligned, allocating and overwriting, vectored), write_zeroes (with and
//! without may_unmap), discards, flushes and block_status, on images without a backing file:
//! 4k, 32k and 64k clusters, extended L2, lazy refcounts. `common::stress_model` describes the
//! regions (owned stripes, storm clusters, overlap clusters, contested region).
//!
//! The oracle is the stress model: every byte read during and after the run is checked against
//! it; afterwards `qemu-img check` must exit 0, `qemu-img compare` against a raw file built from
//! the model must find them identical, and a fresh read-only open reads the model again.
//!
//! Environment: `OXCOW_STRESS_SEED=<n>` replays one seed (decimal or 0x-hex),
//! `OXCOW_STRESS_ROUNDS=<n>` multiplies the number of rounds, `OXCOW_STRESS_SECONDS=<s>` is how
//! long the ignored `soak` test runs random configurations and seeds (default 60;
//! `cargo test --release --test stress_threads soak -- --ignored`). A failure message names the
//! configuration and the seed; interleavings are not reproducible, the operations each thread
//! issues are.

mod common;

use common::stress::*;
use common::stress_model::*;
use common::stress_run::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn threads_2_clusters_64k() {
    run_stress(Cfg::new(2, 64 * KIB, 0x0002_0064));
}

#[test]
fn threads_4_clusters_64k() {
    run_stress(Cfg::new(4, 64 * KIB, 0x0004_0064));
}

#[test]
fn threads_8_clusters_64k() {
    run_stress(Cfg::new(8, 64 * KIB, 0x0008_0064));
}

#[test]
fn threads_16_clusters_64k() {
    run_stress(Cfg::new(16, 64 * KIB, 0x0016_0064));
}

#[test]
fn threads_8_clusters_4k() {
    run_stress(Cfg::new(8, 4 * KIB, 0x0008_0004));
}

#[test]
fn threads_4_extended_l2_clusters_32k() {
    run_stress(Cfg::new(4, 32 * KIB, 0x0004_e232).extended_l2());
}

#[test]
fn threads_8_lazy_refcounts_clusters_4k() {
    run_stress(Cfg::new(8, 4 * KIB, 0x0008_1a2e_0004).lazy());
}

/// Random configurations and seeds for `OXCOW_STRESS_SECONDS` seconds (default 60), for local
/// soak runs: `cargo test --release --test stress_threads soak -- --ignored`.
#[test]
#[ignore = "soak mode: run with --ignored (OXCOW_STRESS_SECONDS sets the duration)"]
fn soak() {
    let secs = std::env::var("OXCOW_STRESS_SECONDS")
        .ok()
        .and_then(|s| parse_u64(&s))
        .unwrap_or(60);
    let t0 = Instant::now();
    let mut r = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut runs = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let threads = [2, 4, 8, 16, 32][r.below(5) as usize];
        let cluster = [4, 16, 32, 64, 128][r.below(5) as usize] * KIB;
        let mut cfg = Cfg::new(threads, cluster, r.next_u64());
        if cluster >= 16 * KIB && r.chance(30) {
            cfg = cfg.extended_l2();
        }
        if r.chance(25) {
            cfg = cfg.lazy();
        }
        if r.chance(50) {
            cfg = cfg.backing([4, 64][r.below(2) as usize] * KIB);
        }
        run_stress(cfg);
        runs += 1;
    }
    eprintln!("soak: {runs} runs in {:?}", t0.elapsed());
}
