//! The host file: positioned I/O, durability, growth, and the one choke point every write to
//! an image file passes through.
//!
//! [`Backend`] is the raw device (a POSIX file here; tests can plug in a fault-injecting one).
//! [`HostFile`] wraps it with the image's name for error messages and funnels every write
//! through [`HostFile::write`], where the metadata-overlap guard and fault injection hang.

mod absent;
mod aligned;
pub mod extents;
pub mod grace;
pub mod guard;
pub mod lock;
pub mod notify;
pub mod pinned;
mod posix;
pub mod ringwrites;
#[cfg(test)]
pub mod sim;
pub mod slab;
#[cfg(target_os = "linux")]
pub mod uring;

pub use absent::Absent;
pub use grace::{GateEntry, Grace, Pin, PinToken, Pinned, WritersExcluded};
pub use guard::{MetaKind, OverlapCheck, OverlapGuard, OverlapHit};
pub use lock::{ImageLock, LockMode};
pub use pinned::{GridWriter, PinnedGrid, RowsExhausted};
pub use posix::PosixFile;
pub use ringwrites::{Drain, Excluded, RingWrites};
pub use slab::{SlabWords, WordSlab};

use crate::error::{Error, Result};
use crate::format::HostOffset;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A positioned-I/O device holding one image file.
pub trait Backend: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns the count read (short only at EOF).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Current size of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros without writing them, where the device can
    /// do it cheaply (`fallocate` ZERO_RANGE, else PUNCH_HOLE|KEEP_SIZE); never changes the
    /// file's size. Like a write, the change is durable after the next [`Self::sync`].
    /// Returns `Ok(false)` when the device cannot (the caller writes zeros instead).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    /// Gives the host blocks of `[offset, offset+len)` back to the file system
    /// (`fallocate` PUNCH_HOLE|KEEP_SIZE): the range reads as zeros afterwards and the file
    /// keeps its size. Returns `Ok(false)` when the device cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    /// The descriptor and O_DIRECT alignment (0: buffered) for I/O submitted outside the
    /// backend (the asynchronous queue's io_uring path); `None` when the device has no
    /// descriptor of its own (simulated files), which keeps such I/O on the backend.
    fn uring_target(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// Whether a write of `[offset, offset+len)` reads and rewrites blocks around it
    /// (O_DIRECT with an unaligned range), so it must not run beside a ring write. Only
    /// asked for ranges not aligned to [`posix::DIRECT_ALIGN`].
    fn rewrites_around(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Whether the file should be kept longer than its data ([`HostFile::grow_ahead`]):
    /// an O_DIRECT write past the end of a regular file runs with the inode locked and
    /// waits for the device (ext4, xfs), so writes of new clusters there go one at a time,
    /// while writes into a hole inside the file's length run in parallel; a buffered write
    /// into reserved blocks skips the delayed allocation ext4 otherwise books for every new
    /// page and does at write-back.
    fn grows_ahead(&self) -> bool {
        false
    }
    /// Grows the file from `len` to `target` bytes for [`HostFile::grow_ahead`]; the new
    /// range reads as zeros. Devices that can reserve the blocks (as unwritten extents) do:
    /// a write into reserved blocks is an overwrite to the file system, which runs beside
    /// others (ext4 takes the inode lock shared), where a write into a hole allocates under
    /// the exclusive lock. A device that cannot reserve refuses, and the writes extend the
    /// file as before.
    fn grow(&self, len: u64, target: u64) -> io::Result<()> {
        let _ = len;
        self.set_len(target)
    }
    /// Reopens the same file with new access and lock mode, atomically for concurrent I/O
    /// (see [`PosixFile::reopen_in_place`]). Backends that cannot do that refuse.
    fn reopen(&self, name: &str, writable: bool, mode: LockMode) -> Result<()> {
        let _ = (writable, mode);
        Err(Error::unsupported(format!(
            "{name}: this backend cannot be reopened"
        )))
    }
}

/// What a host write is for; the overlap guard exempts the structure being updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Guest data or copy-on-write of guest data.
    Data,
    /// The image header (cluster 0).
    Header,
    /// The active L1 table.
    L1,
    /// An active L2 table.
    L2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
}

impl WriteKind {
    /// The structure a write of this kind legitimately updates (the guard's ignore mask).
    pub fn updates(self) -> Option<MetaKind> {
        match self {
            WriteKind::Data => None,
            WriteKind::Header => Some(MetaKind::Header),
            WriteKind::L1 => Some(MetaKind::ActiveL1),
            WriteKind::L2 => Some(MetaKind::ActiveL2),
            WriteKind::RefcountTable => Some(MetaKind::RefcountTable),
            WriteKind::RefcountBlock => Some(MetaKind::RefcountBlock),
        }
    }
}

/// The largest offset a file can have (off_t is signed 64-bit).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// [`HostFile::grow_ahead`] grows to a multiple of this (a multiple of every cluster size
/// up to 2 MiB and of every O_DIRECT block).
const GROW_ALIGN: u64 = 2 << 20;

/// How far past `end` [`HostFile::grow_ahead`] grows: an eighth of the file (so the number
/// of grows grows with the log of the size), at least 2 MiB, at most 64 MiB (the blocks it
/// reserves are unused until written, and until the handle is dropped after a crash).
fn grow_chunk(end: u64) -> u64 {
    (end / 8).clamp(GROW_ALIGN, 64 << 20)
}

impl Drop for HostFile {
    fn drop(&mut self) {
        self.trim_growth();
    }
}

/// One image file: a backend plus its name, with every write funnelled through [`Self::write`].
pub struct HostFile {
    backend: Arc<dyn Backend>,
    name: String,
    /// Checked before every write; the engine keeps its index current.
    guard: Arc<OverlapGuard>,
    /// Keeps freed clusters from reuse while requests that may touch them run (shared: the
    /// mapping view's slice directory frees what it withdraws by the same grace periods;
    /// on the heap either way, its cache-padded shards are large).
    grace: Arc<Grace>,
    /// Data writes on an asynchronous queue's io_uring, in flight on this file.
    ring_writes: RingWrites,
    /// Set when a sync failed. The kernel may have dropped the failed dirty pages and
    /// marked them clean, so a later successful fsync would prove nothing: every later sync
    /// fails too (the PostgreSQL/QEMU lesson), and the caller must treat unflushed data as lost.
    sync_failed: AtomicBool,
    /// No byte at or past this offset has ever been written through this handle (or belongs
    /// to a data cluster handed out for writing, see [`Self::count_as_written`]), and the file
    /// held none there when it was opened (or last resized): host ranges from here on read as
    /// zeros. Raised before every write starts, so it never lags a write in progress.
    written_end: AtomicU64,
    /// The same mark without whole clusters counted ahead: where the bytes written end.
    /// Kept only by a file that grows ahead ([`Backend::grows_ahead`], see `exact_end`),
    /// whose length ([`Self::len`]) and cut-off ([`Self::trim_growth`]) follow it, so that
    /// the file ends where the same writes leave a file that does not grow.
    data_end: AtomicU64,
    /// Whether `data_end` is kept (the backend grows ahead).
    exact_end: bool,
    /// Set once the backend refused `zero_range`, so the allocating write path stops asking.
    no_zero_range: AtomicBool,
    /// The device length [`Self::grow_ahead`] last saw or set (0: never grown); the mutex
    /// orders growth against [`Self::set_len`] so that no grow can shrink the file.
    grown_to: AtomicU64,
    grow_lock: std::sync::Mutex<()>,
}

/// Raises `mark` to `end` if below. Most writes (overwrites, metadata) end below the mark: a
/// load keeps the shared cache line clean for them; only a write past it pays the
/// read-modify-write.
#[inline(always)]
fn raise(mark: &AtomicU64, end: u64) {
    if end > mark.load(Ordering::Acquire) {
        mark.fetch_max(end, Ordering::AcqRel);
    }
}

impl HostFile {
    /// Wraps a backend; `name` appears in error messages.
    pub fn new(backend: Arc<dyn Backend>, name: impl Into<String>) -> HostFile {
        // A size we cannot learn is taken as "everything may hold data": no range is then
        // assumed to read as zeros.
        let end = backend.len().unwrap_or(u64::MAX);
        let backend_grows = backend.grows_ahead();
        HostFile {
            backend,
            name: name.into(),
            guard: Arc::new(OverlapGuard::default()),
            grace: Arc::default(),
            ring_writes: RingWrites::default(),
            sync_failed: AtomicBool::new(false),
            written_end: AtomicU64::new(end),
            data_end: AtomicU64::new(end),
            exact_end: backend_grows,
            no_zero_range: AtomicBool::new(false),
            grown_to: AtomicU64::new(0),
            grow_lock: std::sync::Mutex::new(()),
        }
    }

    /// Keeps the device's length ahead of the allocator: called (under the allocator's lock)
    /// with the end of a cluster just handed out for data; when that end reaches past the
    /// length, grows the file by a chunk in one call ([`Backend::grow`]: reserved blocks where
    /// the device can), so the coming data writes land inside the file's length instead of
    /// extending it (see [`Backend::grows_ahead`]). The chunk reads as zeros and nobody wrote
    /// it: the written end is not raised (so [`Self::reads_as_zeros_from`] still holds there
    /// and the allocating write skips the zero fill), [`Self::len`] does not count it, and
    /// dropping the handle (or reopening it read-only) cuts it off again. A crash leaves the
    /// longer file: zeros past the last cluster, which no metadata references and qemu-img
    /// check accepts. Best effort: a failed grow leaves the writes to extend the file.
    pub fn grow_ahead(&self, end: HostOffset) {
        let end = end.get();
        if end <= self.grown_to.load(Ordering::Acquire) || !self.backend.grows_ahead() {
            return;
        }
        let Ok(_held) = self.grow_lock.lock() else {
            return;
        };
        if end <= self.grown_to.load(Ordering::Acquire) {
            return;
        }
        let Ok(len) = self.backend.len() else {
            return;
        };
        // Past `end` only when grown; otherwise the coming write takes the file to about
        // `end`, and the next cluster past that asks again (not every one before it).
        let mut reached = len.max(end);
        // A cluster far past the end (an external data file written at a high guest
        // offset) is left to extend the file: reserving the gap would cost its blocks.
        if end > len && end - len <= grow_chunk(end) {
            let target = (end + grow_chunk(end)).next_multiple_of(GROW_ALIGN);
            if target <= MAX_FILE_OFFSET && self.backend.grow(len, target).is_ok() {
                reached = target;
            }
        }
        self.grown_to.store(reached, Ordering::Release);
    }

    /// Whether [`Self::grow_ahead`] with `end` would ask the device (its length, or a
    /// grow): false when the file is known to be grown past `end` or is not grown ahead.
    /// A thread that must not wait for the device plans an allocation only when false.
    pub fn grow_ahead_pending(&self, end: HostOffset) -> bool {
        end.get() > self.grown_to.load(Ordering::Acquire) && self.backend.grows_ahead()
    }

    /// Cuts off what [`Self::grow_ahead`] added past the written end, so the file ends
    /// where the same writes without growing would have left it. Callers hold no writer
    /// (drop, reopen, quiesced operations).
    fn trim_growth(&self) {
        if self.grown_to.load(Ordering::Acquire) == 0 {
            return;
        }
        let Ok(_held) = self.grow_lock.lock() else {
            return;
        };
        let written = self.data_end.load(Ordering::Acquire);
        if let Ok(len) = self.backend.len() {
            if len > written {
                let _ = self.backend.set_len(written);
            }
        }
        self.grown_to.store(0, Ordering::Release);
    }

    /// Whether `[offset, ..)` is known to read as zeros: nothing was ever written at or past
    /// `offset` (the allocator hands out clusters past the end of the file, which hold no
    /// stale data). Callers decide this for a cluster nobody else may write (freshly
    /// allocated, under the allocator's lock), so the answer stays true until they write it.
    pub fn reads_as_zeros_from(&self, offset: HostOffset) -> bool {
        offset.get() >= self.written_end.load(Ordering::Acquire)
    }

    /// Counts `[.., end)` as possibly written from now on: called (under the allocator's
    /// lock, before any write to it) with the end of a data cluster just handed out, so that
    /// the writes filling that cluster find the mark raised already (sequential 4 KiB writes
    /// raised it fifteen times per 64 KiB cluster, each a read-modify-write of a cache line
    /// every writer reads). Only the rest of that cluster, which nobody else may be given,
    /// stops counting as zeros; the file's length still follows the bytes written.
    pub fn count_as_written(&self, end: HostOffset) {
        raise(&self.written_end, end.get());
    }

    fn raise_written_end(&self, end: u64) {
        raise(&self.written_end, end);
        if self.exact_end {
            raise(&self.data_end, end);
        }
    }

    /// See [`Backend::uring_target`].
    pub fn uring_target(&self) -> Option<(std::os::fd::RawFd, usize)> {
        self.backend.uring_target()
    }

    /// The metadata-overlap guard consulted by [`Self::write`] (empty until the engine fills
    /// it).
    pub fn guard(&self) -> &OverlapGuard {
        &self.guard
    }

    /// Grace periods of this file's clusters: requests pin, the allocator waits for them.
    pub fn grace(&self) -> &Grace {
        &self.grace
    }

    /// The grace periods, shared (for structures readers reach under these pins).
    pub fn shared_grace(&self) -> Arc<Grace> {
        Arc::clone(&self.grace)
    }

    /// The io_uring data writes in flight on this file.
    pub fn ring_writes(&self) -> &RingWrites {
        &self.ring_writes
    }

    /// What [`Self::write`] does before the bytes go to the device, for a data write that
    /// goes to it through io_uring instead: the overlap guard's check and the written-end
    /// mark. The caller has registered the write in [`Self::ring_writes`].
    pub fn prepare_ring_write(&self, offset: HostOffset, len: u64) -> Result<()> {
        let offset = offset.get();
        self.guard.check_write(offset, len, None)?;
        self.raise_written_end(offset.saturating_add(len));
        Ok(())
    }

    /// The name used in messages (normally the path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as
    /// zeros, like a sparse file.
    #[inline]
    pub fn read_zero_padded(&self, buf: &mut [u8], offset: HostOffset, what: &str) -> Result<()> {
        // The rule is one backend call that fills the buffer: only that stays inline, in
        // the caller's frame; anything else continues out of line.
        let first = if offset.get() <= MAX_FILE_OFFSET.saturating_sub(buf.len() as u64) {
            match self.backend.read_at(buf, offset.get()) {
                Ok(n) if n == buf.len() => return Ok(()),
                r => Some(r),
            }
        } else {
            None
        };
        self.finish_zero_padded(buf, offset, what, first)
    }

    /// The rest of [`Self::read_zero_padded`] after the backend's `first` answer (None: not
    /// asked yet).
    #[inline(never)]
    fn finish_zero_padded(
        &self,
        buf: &mut [u8],
        offset: HostOffset,
        what: &str,
        first: Option<io::Result<usize>>,
    ) -> Result<()> {
        let done = match first {
            Some(Ok(0)) => 0,
            Some(Ok(n)) => n + self.read_some(&mut buf[n..], offset + n as u64, what)?,
            Some(Err(e)) => return Err(self.read_error(what, offset.get(), e)),
            None => self.read_some(buf, offset, what)?,
        };
        buf[done..].fill(0);
        Ok(())
    }

    /// Reads `words.len() * 8` bytes at `offset` straight into `words` (in file byte order)
    /// and returns how many the file had; the bytes past those read as zeros. Lets a table
    /// that lock-free readers will share as atomics be filled from disk without a bounce
    /// buffer and a copy: the exclusive borrow means nobody can observe it yet.
    pub fn read_words_zero_padded(
        &self,
        words: &mut SlabWords,
        offset: HostOffset,
        what: &str,
    ) -> Result<usize> {
        let bytes = words.as_mut_bytes();
        let n = self.read_some(bytes, offset, what)?;
        if n < bytes.len() {
            bytes[n..].fill(0);
        }
        Ok(n)
    }

    /// Reads up to `buf.len()` bytes and returns how many the file had.
    pub fn read_some(&self, buf: &mut [u8], offset: HostOffset, what: &str) -> Result<usize> {
        let offset = offset.get();
        // No file reaches past the largest off_t: what an image places there (a hostile
        // offset) reads as past the end of the file, not as an I/O error.
        let readable = MAX_FILE_OFFSET.saturating_sub(offset).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < readable {
            let at = offset + done as u64;
            let n = match self.backend.read_at(&mut buf[done..readable], at) {
                Ok(n) => n,
                Err(e) => return Err(self.read_error(what, at, e)),
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// The error of a failed read (out of line: formatting stays off the read path).
    #[cold]
    #[inline(never)]
    fn read_error(&self, what: &str, at: u64, e: std::io::Error) -> Error {
        Error::io(format!("reading {what} at {at:#x} of {}", self.name), e)
    }

    /// Writes an in-place header field update (its version check already passed when the
    /// update was built) through the same choke point as every other write.
    pub fn write_header_fields(
        &self,
        update: &crate::format::header::layout::FieldUpdate,
    ) -> Result<()> {
        self.write(update.bytes(), update.offset(), WriteKind::Header)
    }

    /// The choke point for every write to the image file: the metadata-overlap guard checks
    /// the target range first (a write may overlap only the structure its `kind` updates),
    /// then the bytes go to the backend.
    #[inline(always)]
    pub fn write(&self, buf: &[u8], offset: HostOffset, kind: WriteKind) -> Result<()> {
        let offset = offset.get();
        self.guard
            .check_write(offset, buf.len() as u64, kind.updates())?;
        self.raise_written_end(offset.saturating_add(buf.len() as u64));
        // Ring writes go only to data clusters of at least one O_DIRECT block, so only a
        // data write can rewrite a block one of them is changing. Aligned writes (the
        // common case) skip the backend's check: no backend rewrites around a range
        // aligned to its largest block.
        if matches!(kind, WriteKind::Data)
            && (offset | buf.len() as u64) % posix::DIRECT_ALIGN != 0
            && self.backend.rewrites_around(offset, buf.len() as u64)
        {
            let _excluded = self.ring_writes.exclude();
            return self.write_to_backend(buf, offset, kind);
        }
        self.write_to_backend(buf, offset, kind)
    }

    #[inline(always)]
    fn write_to_backend(&self, buf: &[u8], offset: u64, kind: WriteKind) -> Result<()> {
        match self.backend.write_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.write_error(e, buf.len(), offset, kind)),
        }
    }

    /// The error of a failed write (out of line: every write's path stays small).
    #[cold]
    #[inline(never)]
    fn write_error(&self, e: io::Error, len: usize, offset: u64, kind: WriteKind) -> Error {
        Error::io(
            format!(
                "writing {len} bytes of {kind:?} at {offset:#x} of {}",
                self.name
            ),
            e,
        )
    }

    /// Makes every completed write durable. Once a sync has failed, every later sync fails
    /// with EIO: durability can no longer be promised for this handle.
    pub fn sync(&self) -> Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(Error::io(
                format!(
                    "syncing {}: an earlier sync failed, so writes since the last successful flush may be lost",
                    self.name
                ),
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.backend.sync().map_err(|e| {
            self.sync_failed.store(true, Ordering::Release);
            Error::io(format!("syncing {}", self.name), e)
        })
    }

    /// Size of the file, not counting a tail [`Self::grow_ahead`] added that nothing was
    /// written to yet: the length the file has after the handle is dropped.
    pub fn len(&self) -> Result<u64> {
        let len = self
            .backend
            .len()
            .map_err(|e| Error::io(format!("getting the size of {}", self.name), e))?;
        if self.grown_to.load(Ordering::Acquire) == 0 {
            return Ok(len);
        }
        Ok(len.min(self.data_end.load(Ordering::Acquire)))
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reopens the file in place with new access and lock mode (see [`Backend::reopen`]).
    pub fn reopen(&self, writable: bool, mode: LockMode) -> Result<()> {
        // Quiesced: the reopened handle starts from the file's real end (a read-only one
        // could not cut it off later, and a read-write one would count it as written).
        self.trim_growth();
        self.backend.reopen(&self.name, writable, mode)?;
        // Another writer may have grown the file while this handle was read-only.
        self.raise_written_end(self.backend.len().unwrap_or(u64::MAX));
        Ok(())
    }

    /// Truncates or extends the file. Callers quiesce writers first (resize, create, repair).
    pub fn set_len(&self, len: u64) -> Result<()> {
        let _held = self.grow_lock.lock();
        // The file now ends where the caller says; growing ahead starts over from there.
        self.grown_to.store(0, Ordering::Release);
        // Conservative while the size changes: a failed resize leaves the old bytes.
        self.raise_written_end(len);
        self.backend
            .set_len(len)
            .map_err(|e| Error::io(format!("resizing {} to {len}", self.name), e))?;
        // Bytes past the new length are gone; an extension reads as zeros.
        self.written_end.store(len, Ordering::Release);
        self.data_end.store(len, Ordering::Release);
        Ok(())
    }

    /// Makes the guest-data range `[offset, offset+len)` read as zeros without writing it,
    /// if the backend can do that cheaply (see [`Backend::zero_range`]); the overlap guard
    /// checks the range like a data write. Returns `Ok(false)` when it cannot: the caller
    /// writes zeros. The change is durable after the next [`Self::sync`], like a write.
    pub fn zero_range(&self, offset: HostOffset, len: u64) -> Result<bool> {
        if len == 0 || self.no_zero_range.load(Ordering::Relaxed) {
            return Ok(len == 0);
        }
        let at = offset.get();
        self.guard.check_write(at, len, None)?;
        let done = self.backend.zero_range(at, len).map_err(|e| {
            Error::io(
                format!("zeroing {len} bytes at {at:#x} of {}", self.name),
                e,
            )
        })?;
        if !done {
            self.no_zero_range.store(true, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// Gives the host blocks of `[offset, offset+len)` back to the file system (discard=unmap
    /// of freed clusters); the file keeps its size. Returns `Ok(false)` when the backend
    /// cannot. Callers punch only clusters that no durable metadata references and no request
    /// can still touch.
    pub fn punch_hole(&self, offset: HostOffset, len: u64) -> Result<bool> {
        let at = offset.get();
        self.guard.check_write(at, len, None)?;
        self.backend.punch_hole(at, len).map_err(|e| {
            Error::io(
                format!("punching {len} bytes at {at:#x} of {}", self.name),
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A device whose first sync fails (as after a lost write-back), later ones succeed.
    struct FlakySync {
        syncs: AtomicU32,
    }

    impl Backend for FlakySync {
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
            Ok(0)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            if self.syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    /// Reads at most `chunk` bytes per call from `bytes`; fails reads at `bad`.
    struct Dribble {
        bytes: Vec<u8>,
        chunk: usize,
        bad: u64,
    }

    impl Backend for Dribble {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            if offset == self.bad {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let start = (offset as usize).min(self.bytes.len());
            let n = buf.len().min(self.chunk).min(self.bytes.len() - start);
            buf[..n].copy_from_slice(&self.bytes[start..start + n]);
            Ok(n)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }
        fn set_len(&self, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn zero_padded_reads_gather_short_reads_and_pad_past_the_end_of_the_file() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let dribble = |chunk, bad| Dribble {
            bytes: bytes.clone(),
            chunk,
            bad,
        };
        let f = HostFile::new(Arc::new(dribble(7, u64::MAX)), "dribble");
        let mut buf = [0xffu8; 40];
        f.read_zero_padded(&mut buf, HostOffset::new(80), "t")
            .expect("read");
        assert_eq!(&buf[..20], &bytes[80..], "gathered from short reads");
        assert_eq!(buf[20..], [0u8; 20], "zeros past the end");
        let mut buf = [0xffu8; 8];
        f.read_zero_padded(&mut buf, HostOffset::new(1 << 40), "t")
            .expect("read");
        assert_eq!(buf, [0u8; 8], "wholly past the end");
        f.read_zero_padded(&mut buf, HostOffset::new(u64::MAX - 3), "t")
            .expect("read");
        assert_eq!(buf, [0u8; 8], "past the largest file offset");
        // An error on the first call or on a later one is reported, with its offset.
        for (chunk, bad) in [(64, 10), (4, 14)] {
            let f = HostFile::new(Arc::new(dribble(chunk, bad)), "dribble");
            let e = f
                .read_zero_padded(&mut [0u8; 16], HostOffset::new(10), "t")
                .expect_err("EIO");
            assert!(e.to_string().contains(&format!("{bad:#x}")), "{e}");
        }
    }

    #[test]
    fn only_ranges_past_everything_written_read_as_zeros() {
        let sim = Arc::new(super::sim::SimFile::new(vec![1u8; 4096]));
        let f = HostFile::new(sim.clone(), "sim");
        let at = |o: u64| f.reads_as_zeros_from(HostOffset::new(o));
        assert!(
            !at(4095) && at(4096),
            "the length at open is the first bound"
        );
        f.write(&[2u8; 512], HostOffset::new(65536), WriteKind::Data)
            .expect("write");
        assert!(!at(4096) && !at(66047) && at(66048), "a write raises it");
        f.set_len(8192).expect("truncate");
        assert!(!at(8191) && at(8192), "a truncation drops what lay past it");
        assert!(f.zero_range(HostOffset::new(0), 4096).expect("zero"));
        assert_eq!(sim.contents()[..4096], [0u8; 4096], "zeroed in place");
        assert_eq!(sim.contents().len(), 8192, "zeroing keeps the size");
        sim.refuse_fallocate();
        assert!(!f.zero_range(HostOffset::new(0), 4096).expect("zero"));
        assert!(
            !f.punch_hole(HostOffset::new(0), 4096).expect("punch"),
            "an unsupported punch says so"
        );
    }

    #[test]
    fn after_a_failed_sync_every_later_sync_fails_too() {
        let f = HostFile::new(
            Arc::new(FlakySync {
                syncs: AtomicU32::new(0),
            }),
            "flaky",
        );
        assert!(f.sync().is_err());
        let e = f
            .sync()
            .expect_err("a later sync must not pretend durability");
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("earlier sync failed"), "{e}");
    }

    /// A simulated file that asks to be grown ahead, as an O_DIRECT regular file does.
    struct Growing(sim::SimFile);

    impl Backend for Growing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            self.0.sync()
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn grows_ahead(&self) -> bool {
            true
        }
    }

    #[test]
    fn growing_ahead_keeps_the_tail_zero_uncounted_and_cut_off_at_drop() {
        let sim = Arc::new(Growing(sim::SimFile::new(vec![1u8; 65536])));
        let f = HostFile::new(sim.clone() as Arc<dyn Backend>, "grow");
        f.grow_ahead(HostOffset::new(131072));
        let grown = sim.len().unwrap();
        assert!(grown >= 131072 + GROW_ALIGN, "grown to {grown}");
        // Nothing was written there: it still reads as zeros and is not counted.
        assert!(f.reads_as_zeros_from(HostOffset::new(65536)));
        assert_eq!(f.len().unwrap(), 65536);
        // A write inside the grown range moves the counted end, nothing else.
        f.write(&[2u8; 4096], HostOffset::new(65536), WriteKind::Data)
            .unwrap();
        assert_eq!(f.len().unwrap(), 69632);
        assert_eq!(sim.len().unwrap(), grown);
        // Clusters inside the grown length ask for nothing more.
        f.grow_ahead(HostOffset::new(131072 + 65536));
        assert_eq!(sim.len().unwrap(), grown);
        drop(f);
        assert_eq!(
            sim.len().unwrap(),
            69632,
            "the unwritten tail outlived the handle"
        );
    }

    #[test]
    fn a_cluster_counted_as_written_stops_reading_as_zeros_but_not_the_files_length() {
        let sim = Arc::new(Growing(sim::SimFile::new(vec![1u8; 65536])));
        let f = HostFile::new(sim.clone() as Arc<dyn Backend>, "grow");
        f.grow_ahead(HostOffset::new(131072));
        // A data cluster at 64 KiB handed out, then its first 4 KiB written.
        assert!(f.reads_as_zeros_from(HostOffset::new(65536)));
        f.count_as_written(HostOffset::new(131072));
        assert!(!f.reads_as_zeros_from(HostOffset::new(65536 + 4096)));
        assert!(
            f.reads_as_zeros_from(HostOffset::new(131072)),
            "the next cluster"
        );
        f.write(&[2u8; 4096], HostOffset::new(65536), WriteKind::Data)
            .unwrap();
        assert_eq!(f.len().unwrap(), 69632);
        drop(f);
        assert_eq!(
            sim.len().unwrap(),
            69632,
            "cut where the bytes written end, as without growing"
        );
    }

    #[test]
    fn set_len_ends_the_growth_where_the_caller_says() {
        let sim = Arc::new(Growing(sim::SimFile::new(vec![1u8; 65536])));
        let f = HostFile::new(sim.clone() as Arc<dyn Backend>, "grow");
        f.grow_ahead(HostOffset::new(131072));
        f.set_len(32768).unwrap();
        assert_eq!(sim.len().unwrap(), 32768);
        assert_eq!(f.len().unwrap(), 32768);
        // Growth starts over from the new end.
        f.grow_ahead(HostOffset::new(98304));
        assert!(sim.len().unwrap() > 98304);
        drop(f);
        assert_eq!(sim.len().unwrap(), 32768);
    }

    #[test]
    fn a_cluster_far_past_the_end_is_not_grown_to() {
        let sim = Arc::new(Growing(sim::SimFile::new(vec![1u8; 65536])));
        let f = HostFile::new(sim.clone() as Arc<dyn Backend>, "grow");
        f.grow_ahead(HostOffset::new(1 << 30));
        assert_eq!(sim.len().unwrap(), 65536);
    }
}
