//! How a handle is open: the options a reopen may change (read-only, writethrough,
//! force-share) and those fixed at open (O_DIRECT, no backing file, keep-read-only).

use crate::options::OpenOptions;
use std::sync::atomic::{AtomicBool, Ordering};

/// The open mode of one handle. The changeable flags change only in a reopen, with every
/// mutating request drained, so readers need no more than an acquire load.
pub struct OpenMode {
    read_only: AtomicBool,
    writethrough: AtomicBool,
    force_share: AtomicBool,
    /// The caller promised never to need write access (OXCOW_OPEN_KEEP_READ_ONLY).
    pub keep_read_only: bool,
    /// Opened with O_DIRECT (cannot change in a reopen).
    pub direct: bool,
    /// Opened without the backing chain (cannot change in a reopen).
    pub no_backing: bool,
}

impl OpenMode {
    /// The mode `opts` ask for.
    pub fn new(opts: &OpenOptions) -> OpenMode {
        OpenMode {
            read_only: AtomicBool::new(!opts.writable),
            writethrough: AtomicBool::new(opts.writethrough),
            force_share: AtomicBool::new(opts.force_share),
            keep_read_only: opts.keep_read_only,
            direct: opts.direct,
            no_backing: opts.no_backing,
        }
    }

    /// Whether the handle is read-only now.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Whether every write must be durable when it returns.
    pub fn writethrough(&self) -> bool {
        self.writethrough.load(Ordering::Acquire)
    }

    /// Whether the current open ignores other writers (read-only, like `qemu-img -U`).
    pub fn force_share(&self) -> bool {
        self.force_share.load(Ordering::Acquire)
    }

    /// Applies the changeable part of `opts` (called by reopen with writers drained).
    pub fn switch(&self, opts: &OpenOptions) {
        self.read_only.store(!opts.writable, Ordering::Release);
        self.writethrough
            .store(opts.writethrough, Ordering::Release);
        self.force_share.store(opts.force_share, Ordering::Release);
    }
}
