//! Fencing: whether the handle still accepts I/O.
//!
//! The write gate itself (every request that may write holds it shared for its whole
//! duration; control operations such as reopen or check with repair close it to see no write
//! in flight) is part of the host file's grace periods: a writer's grace pin is its entry
//! through the gate ([`crate::storage::Grace::pin_writer`],
//! [`crate::storage::Grace::exclude_writers`]). Reads never enter it. A fenced handle (after
//! a fatal inconsistency or a panic) accepts no further I/O.

use std::sync::atomic::{AtomicBool, Ordering};

/// The fence of one handle.
#[derive(Default)]
pub struct Fence {
    fenced: AtomicBool,
}

impl Fence {
    /// Stops all further I/O on the handle.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::Release);
    }

    /// Whether the handle was fenced.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }
}
