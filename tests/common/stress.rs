//! The kit every `stress_*` test shares: seeds and their environment overrides, per-thread
//! seeds, data patterns that name their writer and their offset, and a hang watchdog.
//!
//! Environment:
//! - `OXCOW_STRESS_SEED=<n>` replays one seed (decimal or 0x-hex) in every test.
//! - `OXCOW_STRESS_ROUNDS=<n>` multiplies the number of rounds (default 1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn seed_override() -> Option<u64> {
    std::env::var("OXCOW_STRESS_SEED")
        .ok()
        .and_then(|s| parse_u64(&s))
}

pub fn rounds_factor() -> usize {
    std::env::var("OXCOW_STRESS_ROUNDS")
        .ok()
        .and_then(|s| parse_u64(&s))
        .map(|n| n.max(1) as usize)
        .unwrap_or(1)
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn thread_seed(seed: u64, t: usize) -> u64 {
    mix(seed ^ mix(0x7468_7265_6164 + t as u64))
}

// ---------------------------------------------------------------------------------------------
// Data patterns: byte at guest position `pos` of a write tagged `tag`. Different tags give
// different data almost everywhere, and data moved to a wrong offset does not match.
// ---------------------------------------------------------------------------------------------

pub fn pat_word(tag: u64, word: u64) -> u64 {
    mix(tag ^ word.wrapping_mul(0xff51_afd7_ed55_8ccd))
}

pub fn pat_byte(tag: u64, pos: u64) -> u8 {
    (pat_word(tag, pos >> 3) >> ((pos & 7) * 8)) as u8
}

pub fn fill_pat(tag: u64, off: u64, buf: &mut [u8]) {
    let mut cur = u64::MAX;
    let mut w = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = off + i as u64;
        if pos >> 3 != cur {
            cur = pos >> 3;
            w = pat_word(tag, cur);
        }
        *b = (w >> ((pos & 7) * 8)) as u8;
    }
}

pub fn pat(tag: u64, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    fill_pat(tag, off, &mut v);
    v
}

/// Data of thread `t` in the contested and overlap regions (the same for all its writes, so
/// the model only needs to know which threads may have written a byte).
pub fn ctag(t: usize) -> u64 {
    0xc0c0_0000_0000 + t as u64
}

/// Data of thread `t`'s slice of the storm cluster of `round`.
pub fn stag(t: usize, round: usize) -> u64 {
    0x5707_0000_0000 + ((t as u64) << 20) + round as u64
}

/// Data of thread `t`'s `seq`-th write to its own stripes.
pub fn otag(t: usize, seq: u64) -> u64 {
    ((t as u64 + 1) << 40) + seq
}

/// Aborts the whole test binary if a test hangs (a deadlock in the engine), naming the seed.
pub struct Watchdog {
    pub done: std::sync::Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(what: String, limit: Duration) -> Watchdog {
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < limit {
                if d.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("HANG: {what} did not finish within {limit:?}; aborting");
            std::process::abort();
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}
