//! The fuzz targets' operations (see `ops.rs`, which `tests/fuzz_regressions.rs` in the main
//! crate also includes, so that reproducers replay exactly what the fuzzer ran), and a
//! watchdog for hangs.

mod ops;
pub use ops::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When the current input started (ms since the epoch), 0 between inputs.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static WATCHDOG: Once = Once::new();

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs one input under a watchdog thread that aborts the process when an input runs longer
/// than `$OXCOW_FUZZ_WATCHDOG_SECS` (default 20 s; scripts/fuzz.sh sets it to FUZZ_TIMEOUT and
/// passes libFuzzer a -timeout 20 s longer as a backstop). Needed because libFuzzer's own -timeout handler runs in a SIGALRM handler on the
/// fuzzing thread and allocates: when the hang is a loop that allocates, the handler can
/// deadlock on malloc's lock and the fuzzer then sleeps forever. The abort comes from the
/// watchdog thread, so libFuzzer's crash handler runs there and saves the input as a
/// `crash-` artifact.
pub fn guarded(f: impl FnOnce()) {
    WATCHDOG.call_once(|| {
        let limit_ms = std::env::var("OXCOW_FUZZ_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(20)
            * 1000;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let started = STARTED_MS.load(Ordering::Acquire);
            if started != 0 && now_ms().saturating_sub(started) > limit_ms {
                eprintln!(
                    "==oxcow-fuzz watchdog== HANG: one input has run for more than {} s",
                    limit_ms / 1000
                );
                std::process::abort();
            }
        });
    });
    STARTED_MS.store(now_ms(), Ordering::Release);
    f();
    STARTED_MS.store(0, Ordering::Release);
}
