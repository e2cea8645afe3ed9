//! The I/O gate and fencing: who may write now, and whether the handle still accepts I/O.
//!
//! Every request that may write (write, zeroes, discard, compressed writes, flush) holds the
//! gate shared for its whole duration; control operations (reopen, check with repair) hold it
//! exclusively so that they see no write in flight. Reads never take it. A fenced handle
//! (after a fatal inconsistency or a panic) accepts no further I/O.

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use std::sync::atomic::{AtomicBool, Ordering};

/// The write gate and the fence of one handle.
#[derive(Default)]
pub struct IoGate {
    gate: ShardedLock<()>,
    fenced: AtomicBool,
}

impl IoGate {
    /// Enters as one of many concurrent writers.
    pub fn enter_write(&self) -> ShardedLockReadGuard<'_, ()> {
        // Poisoning means a panic elsewhere; the gate guards no data.
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for every writer in flight and keeps new ones out until the guard is dropped.
    pub fn quiesce(&self) -> ShardedLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops all further I/O on the handle.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
    }

    /// Whether the handle was fenced.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }
}
