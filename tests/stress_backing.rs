//! Issue 6, "many writers at once", over a backing file: N threads hammer ONE overlay handle
//! whose qcow2 backing file (written by qemu-io, ending in the middle of a cluster of the
//! overlay) has other cluster sizes, so every first write to a cluster copies backing data while
//! other threads write the same cluster; also with extended L2 (subcluster allocation).
//!
//! The oracle is the stress model (`common::stress_model`) with the backing content as the
//! initial data: every byte read during and after the run must match it; afterwards `qemu-img
//! check` must exit 0, `qemu-img compare` against a raw file built from the model must find the
//! overlay (with its backing chain) identical, and a fresh read-only open reads the model again.
//!
//! Environment: `OXCOW_STRESS_SEED` and `OXCOW_STRESS_ROUNDS` as in `stress_threads`.

mod common;

use common::stress_model::*;
use common::stress_run::*;
use common::*;

#[test]
fn threads_16_clusters_4k_backing_64k() {
    run_stress(Cfg::new(16, 4 * KIB, 0x0016_0004_b064).backing(64 * KIB));
}

#[test]
fn threads_4_clusters_64k_backing_4k() {
    run_stress(Cfg::new(4, 64 * KIB, 0x0004_0064_b004).backing(4 * KIB));
}

#[test]
fn threads_8_clusters_64k_backing_64k() {
    run_stress(Cfg::new(8, 64 * KIB, 0x0008_0064_b064).backing(64 * KIB));
}

#[test]
fn threads_8_extended_l2_clusters_64k_backing() {
    run_stress(
        Cfg::new(8, 64 * KIB, 0x0008_e264_b064)
            .extended_l2()
            .backing(64 * KIB),
    );
}
