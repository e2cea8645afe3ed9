//! Random sequences of snapshot operations and guest writes, zeroes and discards, run through
//! QEMU's tools on one copy and through oxcow on another: both must end clean and equal
//! (active state, every snapshot's contents, the snapshot tables apart from dates).

mod common;
mod snapshots_support;

use common::*;
use snapshots_support::Step;
use snapshots_support::*;

const SIZE: u64 = 2 * MIB;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A sequence that only applies or deletes snapshots that exist (by name, like the CLI).
fn random_steps(rng: &mut Rng, n: usize, cs: u64) -> Vec<Step> {
    let mut live: Vec<&'static str> = Vec::new();
    let mut steps = Vec::new();
    for _ in 0..n {
        let off = rng.below(SIZE / 512 - 1) * 512;
        let len = ((1 + rng.below(3 * cs / 512)) * 512).min(SIZE - off);
        let step = match rng.below(10) {
            0 | 1 if live.len() < 4 => {
                let name = NAMES[rng.below(4) as usize];
                live.push(name);
                Step::Create(name)
            }
            2 if !live.is_empty() => Step::Apply(live[rng.below(live.len() as u64) as usize]),
            3 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                // Deleting by name removes the first snapshot with that name.
                let name = live[i];
                let first = live.iter().position(|&n| n == name).unwrap_or(i);
                live.remove(first);
                Step::Delete(name)
            }
            4 => Step::Zero(off, len),
            5 => Step::Discard(off, len),
            _ => Step::Write(off, len, (rng.below(250) + 1) as u8),
        };
        steps.push(step);
    }
    steps
}

/// Runs `seeds` (more with OXCOW_RANDOM_SEEDS=N: N seeds from the range's start).
fn random_runs(tag: &str, opts: &str, cs: u64, seeds: std::ops::Range<u64>) {
    let n = std::env::var("OXCOW_RANDOM_SEEDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(seeds.end - seeds.start);
    for seed in seeds.start..seeds.start + n {
        let dir = TempDir::new(&format!("{tag}-{seed}"));
        let q = dir.join("q.qcow2");
        qemu_create(&q, SIZE, opts);
        qemu_io(&q, &["write -P 0x17 0 1m".into()]);
        let o = dir.join("o.qcow2");
        std::fs::copy(&q, &o).expect("copy");
        let steps = random_steps(&mut Rng::new(seed), 24, cs);
        eprintln!("{tag} seed {seed}: {steps:?}");
        run_both(&dir, &q, &o, &steps);
    }
}

#[test]
fn random_sequences_match_qemu_with_64k_clusters() {
    random_runs("rand64k", "", 65536, 1..4);
}

#[test]
fn random_sequences_match_qemu_with_small_clusters() {
    random_runs("rand1k", "cluster_size=1024", 1024, 100..103);
}

#[test]
fn random_sequences_match_qemu_with_extended_l2() {
    random_runs(
        "randext",
        "cluster_size=16k,extended_l2=on",
        16384,
        200..203,
    );
}

#[test]
fn random_sequences_match_qemu_on_version_2() {
    random_runs("randv2", "compat=0.10,cluster_size=4k", 4096, 300..303);
}
