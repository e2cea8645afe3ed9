//! Many writers on one handle opened with discard_unmap: discards and unmapping write_zeroes
//! free clusters that are punched while other threads read, write and reuse them. The stress
//! model (see tests/stress_threads.rs) checks every byte read during and after the run;
//! `qemu-img check` and `qemu-img compare` judge the image afterwards.

mod common;

use common::stress_model::*;
use common::stress_run::*;
use common::*;

#[test]
fn threads_4_discard_unmap_clusters_4k() {
    run_stress(Cfg::new(4, 4 * KIB, 0x05d1_0004).discard_unmap());
}

#[test]
fn threads_8_discard_unmap_clusters_64k() {
    run_stress(Cfg::new(8, 64 * KIB, 0x05d1_0064).discard_unmap());
}

#[test]
fn threads_4_discard_unmap_extended_l2_over_a_backing_file() {
    run_stress(
        Cfg::new(4, 32 * KIB, 0x05d1_0032)
            .extended_l2()
            .backing(64 * KIB)
            .discard_unmap(),
    );
}
