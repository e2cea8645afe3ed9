//! POSIX file backend: pread/pwrite/fdatasync on a regular file or block device, optionally
//! with O_DIRECT.
//!
//! O_DIRECT needs the memory address, the file offset and the length of every transfer
//! aligned to the device's logical block size. The engine issues byte-granular I/O (header
//! fields, compressed data, partial L1 slices, guest requests of any shape), so in direct mode
//! this layer bounces through aligned buffers and turns unaligned writes into
//! read-modify-write of whole blocks. [`DIRECT_ALIGN`] (4 KiB) satisfies every common device.

use super::aligned::AlignedBuf;
use super::{Backend, ImageLock, LockMode};
use crate::error::Result;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// Alignment used for O_DIRECT transfers (memory address, offset and length).
pub const DIRECT_ALIGN: u64 = 4096;

/// A file opened for positioned I/O, with the image locks held on its descriptor.
pub struct PosixFile {
    /// Declared before `file` so that the locks are released explicitly while the descriptor
    /// is still open: a forked child that briefly shares the descriptor must not keep them, and
    /// a closed descriptor number may already belong to another file.
    lock: Mutex<Option<ImageLock>>,
    file: File,
    /// Present when the file was opened with O_DIRECT.
    direct: Option<DirectState>,
    /// A regular file on a disk-backed file system (not a block device, whose length is
    /// fixed, nor tmpfs, whose reserved blocks would be memory): see `grows_ahead`. Decided
    /// once at open, so the allocating write path never asks the kernel again.
    on_disk: bool,
    /// The path opened, for reopening the same file.
    path: PathBuf,
}

/// Serialises read-modify-write cycles against every other write in direct mode: two
/// writers touching different bytes of one block must not both read the old block and each
/// write back their own copy. Aligned writes share the lock, so they still run in parallel.
struct DirectState {
    rmw: RwLock<()>,
}

impl PosixFile {
    /// Opens an existing file, read-only or read-write, with O_DIRECT when `direct`.
    pub fn open(path: &Path, writable: bool, direct: bool) -> io::Result<PosixFile> {
        let flags = libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(flags)
            .open(path)?;
        let on_disk = on_disk(&file);
        Ok(PosixFile {
            lock: Mutex::new(None),
            file,
            direct: direct.then_some(DirectState {
                rmw: RwLock::new(()),
            }),
            on_disk,
            path: path.to_path_buf(),
        })
    }

    /// Creates (or truncates) a file for writing a new image.
    pub fn create(path: &Path) -> io::Result<PosixFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let on_disk = on_disk(&file);
        Ok(PosixFile {
            lock: Mutex::new(None),
            file,
            direct: None,
            on_disk,
            path: path.to_path_buf(),
        })
    }

    /// Takes QEMU-compatible locks for `mode` on this file's descriptor (see
    /// [`ImageLock::acquire`]); they are held until the file is dropped.
    pub fn lock(&mut self, name: &str, mode: LockMode) -> Result<()> {
        let slot = self.lock.get_mut().unwrap_or_else(|p| p.into_inner());
        *slot = None;
        *slot = Some(ImageLock::acquire(&self.file, name, mode)?);
        if mode == LockMode::ReadWrite {
            self.forget_cached_pages();
        }
        Ok(())
    }

    /// Drops the clean page-cache pages of an O_DIRECT file on disk that this handle now
    /// writes alone (after the write lock is held, so no other writer's cache is touched).
    ///
    /// Why: pages left by whoever wrote the file through the cache (`qemu-img create` leaves
    /// the header, L1 and refcount clusters) make the kernel invalidate the written range
    /// before every O_DIRECT write and complete every such write on a workqueue instead of
    /// inline: measured on ext4, 16 cached pages of a 128 MiB image cost 35 % more CPU per
    /// io_uring overwrite at depth 16. Our own O_DIRECT I/O never brings pages back. Dirty
    /// pages (a file created a moment ago) are written out first, without a device flush,
    /// since the advice drops only clean ones; the kernel would write them before the first
    /// O_DIRECT request touching them anyway. Advice only: an error leaves the cache as it was
    /// and costs nothing but that time.
    fn forget_cached_pages(&self) {
        if self.direct.is_none() || !self.on_disk {
            return;
        }
        let fd = self.file.as_raw_fd();
        let wait_and_write = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range and posix_fadvise only read their integer arguments; the
        // descriptor is owned by `self.file` and open for the whole call.
        unsafe {
            libc::sync_file_range(fd, 0, 0, wait_and_write);
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Reopens the same file in place with new access (`writable`) and lock `mode`; the
    /// descriptor number stays the same, so concurrent readers never see a closed fd.
    ///
    /// Transactional: the locks move to `mode` on the current description first (with the
    /// conflict tests; -EAGAIN leaves everything as it was), a new description is opened and
    /// must be the same file (same device and inode; a renamed or replaced path fails with
    /// ESTALE), it takes the same locks, the old description's locks are released, and the
    /// new description is moved onto the descriptor with `dup3`, which closes the old one. Any failure before the `dup2` restores the
    /// old lock mode and leaves the old descriptor in use.
    pub fn reopen_in_place(&self, name: &str, writable: bool, mode: LockMode) -> Result<()> {
        let mut slot = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let old_mode = slot.as_ref().map(|l| l.mode());
        let active = slot.as_ref().is_some_and(|l| l.is_active());
        if let Some(l) = slot.as_mut() {
            l.change_mode(mode)?;
        }
        let restore = |slot: &mut Option<ImageLock>| {
            if let (Some(l), Some(m)) = (slot.as_mut(), old_mode) {
                let _ = l.change_mode(m);
            }
        };
        let new = match self.open_same_file(name, writable) {
            Ok(f) => f,
            Err(e) => {
                restore(&mut slot);
                return Err(e);
            }
        };
        let new_lock = match slot.as_ref() {
            Some(_) => match ImageLock::adopt(&new, name, mode, active) {
                Ok(l) => Some(l),
                Err(e) => {
                    restore(&mut slot);
                    return Err(e);
                }
            },
            None => None,
        };
        // The new description holds the locks now: release the old one's explicitly rather
        // than rely on closing it, because a child forked meanwhile may still share the old
        // description (until its exec) and would keep its locks alive.
        drop(slot.take());
        // SAFETY: both descriptors are open and owned by `File`s alive across the call; dup3
        // atomically makes `self.file`'s fd number refer to the new description (closing the
        // old one) and keeps it close-on-exec, so `self.file` still owns exactly one valid
        // descriptor that no exec'd child inherits.
        let rc = unsafe { libc::dup3(new.as_raw_fd(), self.file.as_raw_fd(), libc::O_CLOEXEC) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            drop(new_lock);
            // Put the old mode's locks back on the old description (no conflict test: we held
            // them a moment ago and QEMU only takes read locks).
            if let Some(m) = old_mode {
                *slot = ImageLock::adopt(&self.file, name, m, active).ok();
            }
            return Err(crate::Error::io(format!("reopening {name}"), e));
        }
        *slot = new_lock.map(|mut l| {
            l.rebind(&self.file);
            l
        });
        drop(new); // closes only the temporary fd; the description lives on in self.file
        if mode == LockMode::ReadWrite {
            self.forget_cached_pages();
        }
        Ok(())
    }

    fn open_same_file(&self, name: &str, writable: bool) -> Result<File> {
        let flags = libc::O_CLOEXEC
            | if self.direct.is_some() {
                libc::O_DIRECT
            } else {
                0
            };
        let new = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(flags)
            .open(&self.path)
            .map_err(|e| crate::Error::io(format!("reopening {name}"), e))?;
        let stat = |f: &File| {
            f.metadata()
                .map(|m| (m.dev(), m.ino()))
                .map_err(|e| crate::Error::io(format!("reopening {name}"), e))
        };
        if stat(&new)? != stat(&self.file)? {
            return Err(crate::Error::io(
                format!(
                    "reopening {name}: the path now names a different file (renamed or replaced since the open)"
                ),
                io::Error::from_raw_os_error(libc::ESTALE),
            ));
        }
        Ok(new)
    }
}

impl PosixFile {
    /// A buffered read whose first pread failed with `e`: retried if it was interrupted.
    #[cold]
    #[inline(never)]
    fn pread_after(&self, e: io::Error, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if e.kind() == io::ErrorKind::Interrupted {
            self.pread(buf, offset)
        } else {
            Err(e)
        }
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match sys_pread(&self.file, buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Reads as much of the aligned range into `bounce` as the file has; the rest stays
    /// zero. Returns the count read.
    fn pread_aligned_full(&self, bounce: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < bounce.len() {
            let n = self.pread(&mut bounce[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
            if done as u64 % DIRECT_ALIGN != 0 {
                // A short read not on a block boundary is the end of the file.
                break;
            }
        }
        Ok(done)
    }

    /// Out of line: buffered reads, the common case, then need no stack frame of their own.
    #[inline(never)]
    fn direct_read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = offset & !(DIRECT_ALIGN - 1);
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, DIRECT_ALIGN as usize)?;
        let got = self.pread_aligned_full(bounce.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        let n = got.saturating_sub(skip).min(buf.len());
        buf[..n].copy_from_slice(&bounce.as_slice()[skip..skip + n]);
        Ok(n)
    }

    fn direct_write(&self, d: &DirectState, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = offset & !(DIRECT_ALIGN - 1);
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, DIRECT_ALIGN as usize)?;
        let aligned = start == offset && end == offset + buf.len() as u64;
        // Poisoning only means another writer panicked; the lock guards no data.
        let (_shared, _exclusive);
        if aligned {
            _shared = d.rmw.read().unwrap_or_else(|p| p.into_inner());
        } else {
            _exclusive = d.rmw.write().unwrap_or_else(|p| p.into_inner());
            // Only the first and last blocks are partly overwritten: read just those.
            let b = bounce.as_mut_slice();
            let last = b.len() - DIRECT_ALIGN as usize;
            self.pread_aligned_full(&mut b[..DIRECT_ALIGN as usize], start)?;
            if last > 0 {
                self.pread_aligned_full(&mut b[last..], end - DIRECT_ALIGN)?;
            }
        }
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        sys_pwrite_all(&self.file, bounce.as_slice(), start)
    }
}

impl PosixFile {
    /// `fallocate(mode)` over `[offset, offset+len)`. `Ok(false)` when the file system or
    /// device does not support `mode` (EOPNOTSUPP, ENOSYS; EINVAL for modes some file
    /// systems reject outright), so callers can fall back.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate takes a descriptor and three integers and touches no memory of
            // ours; the descriptor is owned by `self.file`, open for the whole call.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if rc == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => return Ok(false),
                _ => return Err(e),
            }
        }
    }
}

/// Whether `file` is a regular file on a disk-backed file system (see `PosixFile::on_disk`).
fn on_disk(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.is_file()) && !memory_backed(file)
}

/// Whether `file` lives on tmpfs or ramfs: their writes past the end never wait for a
/// device, and a reservation there would hold memory until the file is closed.
fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one statfs into `st`, which is valid for writes and outlives the
    // call; the descriptor is owned by `file`, open for the whole call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it initialised `st`.
    let f_type = unsafe { st.assume_init() }.f_type;
    // f_type is i64 on x86_64 and narrower on some other targets.
    #[allow(clippy::useless_conversion)]
    let magic = i64::from(f_type);
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// One `pread(2)` as a plain system call. glibc's wrapper is a thread cancellation point:
/// a `pthread_cancel` of the caller's thread would end it inside the library, holding the
/// metadata mutex, a claim or a grace pin; and its cancellation bookkeeping was ~30 of the
/// ~480 instructions of a cached 4 KiB read (callgrind). 64-bit Linux only, where the offset
/// is one register.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn sys_pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let len = buf.len().min(isize::MAX as usize);
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is valid for writes of `len` bytes for the whole call and the kernel
    // writes at most `len`; the descriptor is owned by `file`, open for the whole call.
    let n = unsafe {
        libc::syscall(
            libc::SYS_pread64,
            file.as_raw_fd(),
            buf.as_mut_ptr(),
            len,
            off,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `pwrite(2)` as a plain system call (not a cancellation point, as [`sys_pread`]).
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn sys_pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    let len = buf.len().min(isize::MAX as usize);
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is valid for reads of `len` bytes for the whole call; the descriptor is
    // owned by `file`, open for the whole call.
    let n = unsafe { libc::syscall(libc::SYS_pwrite64, file.as_raw_fd(), buf.as_ptr(), len, off) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Elsewhere: std's positioned read (glibc's wrapper).
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn sys_pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

/// Elsewhere: std's positioned write (glibc's wrapper).
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn sys_pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::write_at(file, buf, offset)
}

/// Writes all of `buf` at `offset` ([`sys_pwrite`] until done; interrupted calls are retried, a
/// write of 0 bytes is an error), as `FileExt::write_all_at` does.
fn sys_pwrite_all(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    // Bound: every iteration writes at least one byte or fails (0 bytes is an error); an
    // interrupted call retries, as write_all_at does.
    while !buf.is_empty() {
        match sys_pwrite(file, buf, offset) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A buffered write whose first `pwrite` had outcome `first` (short, interrupted, empty or
/// failed): what it wrote is kept and [`sys_pwrite_all`] does the rest, with its rules for
/// retries and for a write of 0 bytes.
#[cold]
#[inline(never)]
fn pwrite_rest(file: &File, buf: &[u8], offset: u64, first: io::Result<usize>) -> io::Result<()> {
    match first {
        Ok(n) => sys_pwrite_all(file, &buf[n..], offset + n as u64),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => sys_pwrite_all(file, buf, offset),
        Err(e) => Err(e),
    }
}

impl Backend for PosixFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.direct.is_some() {
            return self.direct_read(buf, offset);
        }
        // One pread is the rule; an interrupted one is retried out of line.
        match sys_pread(&self.file, buf, offset) {
            Err(e) => self.pread_after(e, buf, offset),
            r => r,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => self.direct_write(d, buf, offset),
            // One pwrite is the rule; a short or interrupted one continues out of line.
            None => match sys_pwrite(&self.file, buf, offset) {
                Ok(n) if n == buf.len() => Ok(()),
                first => pwrite_rest(&self.file, buf, offset, first),
            },
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        // Seeking works for block devices too, whose metadata length is 0; positioned I/O
        // never uses the file position, so moving it is harmless.
        use std::io::{Seek, SeekFrom};
        (&self.file).seek(SeekFrom::End(0))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn uring_target(&self) -> Option<(std::os::fd::RawFd, usize)> {
        use std::os::fd::AsRawFd;
        // reopen_in_place keeps the descriptor number (dup3 onto it), so the number stays
        // valid for the file's life.
        let align = if self.direct.is_some() {
            DIRECT_ALIGN as usize
        } else {
            0
        };
        Some((self.file.as_raw_fd(), align))
    }

    fn grows_ahead(&self) -> bool {
        // Block devices have a fixed length; on tmpfs the reserved blocks would be memory
        // (and zeroing them costs more than the writes save). Buffered or O_DIRECT alike:
        // measured on ext4, sequential 4 KiB buffered allocating writes into reserved blocks
        // ran 3-9 % faster than into a hole (BENCHMARKS.md, Session 19).
        self.on_disk
    }

    fn grow(&self, len: u64, target: u64) -> io::Result<()> {
        // Mode 0 reserves unwritten extents and moves the end of the file without touching
        // what a concurrent write put past `len`. Where it cannot (no support, no space to
        // reserve) nothing is grown: a truncate would turn the writes into hole fills, which
        // wait under the same exclusive lock, and could cut off a write that just landed.
        if target > len && matches!(self.fallocate(0, len, target - len), Ok(true)) {
            return Ok(());
        }
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn rewrites_around(&self, offset: u64, len: u64) -> bool {
        self.direct.is_some() && (offset | len) % DIRECT_ALIGN != 0
    }

    fn reopen(&self, name: &str, writable: bool, mode: LockMode) -> Result<()> {
        self.reopen_in_place(name, writable, mode)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        // ZERO_RANGE keeps the blocks allocated (as unwritten extents), so the data write
        // that follows does not fragment the cluster; file systems without it can still punch.
        if self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )? {
            return Ok(true);
        }
        self.punch_hole(offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("posix-{tag}-{}", std::process::id()));
        std::fs::write(&p, b"").expect("create scratch file");
        p
    }

    fn open_flags(f: &PosixFile) -> u32 {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.file.as_raw_fd()))
            .expect("fdinfo");
        let line = info
            .lines()
            .find(|l| l.starts_with("flags:"))
            .expect("flags line");
        u32::from_str_radix(line["flags:".len()..].trim(), 8).expect("octal flags")
    }

    #[test]
    fn files_on_tmpfs_do_not_grow_ahead() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("skipped: no /dev/shm");
            return;
        }
        let p = shm.join(format!("posix-shm-{}", std::process::id()));
        std::fs::write(&p, b"").expect("create file on tmpfs");
        let direct = PosixFile::open(&p, true, true);
        let buffered = PosixFile::open(&p, true, false).expect("open on tmpfs");
        assert!(memory_backed(&buffered.file), "/dev/shm is tmpfs");
        assert!(
            !buffered.grows_ahead(),
            "a buffered tmpfs file reserved memory ahead"
        );
        if let Ok(f) = direct {
            assert!(
                !f.grows_ahead(),
                "an O_DIRECT tmpfs file reserved memory ahead"
            );
        }
        let _ = std::fs::remove_file(&p);
    }

    /// Whether the page at `offset` of `path` is in the page cache: a buffered read with
    /// RWF_NOWAIT fails with EAGAIN instead of going to the disk.
    fn page_is_cached(path: &std::path::Path, offset: u64) -> bool {
        let f = File::open(path).expect("open buffered");
        let mut buf = [0u8; 4096];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, valid for writes for the whole call; the descriptor
        // is owned by `f`, open for the whole call.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) };
        n > 0
    }

    #[test]
    fn a_direct_writer_drops_the_page_cache_that_would_slow_its_writes_and_readers_keep_it() {
        let p = scratch("cached");
        std::fs::write(&p, vec![7u8; 64 << 10]).expect("buffered write");
        std::fs::read(&p).expect("buffered read");
        assert!(
            page_is_cached(&p, 0),
            "the scratch file's pages were never cached"
        );
        let mut reader = PosixFile::open(&p, false, true).expect("open O_DIRECT read-only");
        reader.lock("r", LockMode::ReadOnly).expect("read lock");
        assert!(
            page_is_cached(&p, 0),
            "a read-only handle dropped the cache"
        );
        drop(reader);
        let mut writer = PosixFile::open(&p, true, true).expect("open O_DIRECT");
        if !writer.on_disk {
            eprintln!("skipped: the temporary directory is not on a disk file system");
            std::fs::remove_file(&p).ok();
            return;
        }
        writer.lock("w", LockMode::ReadWrite).expect("write lock");
        assert!(
            !page_is_cached(&p, 0),
            "the writer left the first page cached"
        );
        assert!(
            !page_is_cached(&p, 60 << 10),
            "the writer left the last page cached"
        );
        drop(writer);
        let back = std::fs::read(&p).expect("read back");
        assert_eq!(
            back,
            vec![7u8; 64 << 10],
            "dirty pages were dropped unwritten"
        );
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn direct_open_really_uses_o_direct_and_round_trips_unaligned_io() {
        let p = scratch("rt");
        let f = PosixFile::open(&p, true, true).expect("open O_DIRECT");
        assert_ne!(
            open_flags(&f) & libc::O_DIRECT as u32,
            0,
            "O_DIRECT not set"
        );
        let mut model = vec![0u8; 0];
        for (i, (off, len)) in [
            (0u64, 8usize),
            (4090, 13),
            (5000, 9000),
            (1, 4096),
            (20000, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8 | 1).collect();
            f.write_at(&data, off).expect("direct write");
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        }
        let mut got = vec![0u8; model.len()];
        let mut done = 0;
        while done < got.len() {
            let n = f.read_at(&mut got[done..], done as u64).expect("read");
            assert!(n > 0, "unexpected EOF at {done}");
            done += n;
        }
        assert_eq!(got, model);
        let mut odd = [0u8; 7];
        assert_eq!(f.read_at(&mut odd, 4093).expect("read"), 7);
        assert_eq!(&odd[..], &model[4093..4100]);
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn concurrent_unaligned_direct_writes_to_one_block_all_survive() {
        // Without the RMW lock two writers read the same old block and the second write-back
        // erases the first writer's bytes.
        let p = scratch("rmw");
        let f = Arc::new(PosixFile::open(&p, true, true).expect("open O_DIRECT"));
        f.write_at(&[0u8; 4096], 0).expect("init");
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || {
                    for k in 0..64u64 {
                        let off = (t as u64 * 64 + k) * 8;
                        f.write_at(&[t + 1; 8], off).expect("write");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        let mut got = vec![0u8; 4096];
        assert_eq!(f.read_at(&mut got, 0).expect("read"), 4096);
        for (i, chunk) in got.chunks(8).enumerate() {
            let want = (i / 64) as u8 + 1;
            assert!(chunk.iter().all(|&b| b == want), "bytes of slot {i} lost");
        }
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn zero_range_and_punch_hole_read_as_zeros_keep_the_size_and_punch_frees_blocks() {
        use std::os::unix::fs::MetadataExt;
        let p = scratch("punch");
        let f = PosixFile::open(&p, true, false).expect("open");
        f.write_at(&vec![0xa5u8; 1 << 20], 0).expect("fill");
        f.sync().expect("sync");
        let blocks = || std::fs::metadata(&p).expect("stat").blocks();
        let before = blocks();
        assert!(
            f.zero_range(4096, 65536).expect("zero_range"),
            "ext4 zeroes ranges"
        );
        assert!(
            f.punch_hole(512 << 10, 256 << 10).expect("punch"),
            "ext4 punches"
        );
        assert_eq!(f.len().expect("len"), 1 << 20, "the size is kept");
        let mut got = vec![0u8; 1 << 20];
        assert_eq!(f.read_at(&mut got, 0).expect("read"), 1 << 20);
        for (i, &b) in got.iter().enumerate() {
            let zero = (4096..4096 + 65536).contains(&i) || ((512 << 10)..(768 << 10)).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xa5 }, "byte {i:#x}");
        }
        assert!(
            blocks() + (256 << 10) / 512 <= before,
            "the punched range still holds blocks ({} -> {})",
            before,
            blocks()
        );
        std::fs::remove_file(&p).ok();
    }
}
