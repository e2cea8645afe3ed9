//! QEMU-compatible image locking: advisory OFD byte-range locks on the image file.
//!
//! QEMU (block/file-posix.c) announces what an opener of an image file does and refuses to let
//! others do by holding shared read locks (`F_RDLCK`) on single bytes of the file through
//! open-file-description (OFD) locks:
//!
//! * byte `100 + i` means "I use permission bit i";
//! * byte `200 + i` means "I do not share permission bit i".
//!
//! The bits are `CONSISTENT_READ` (0), `WRITE` (1), `WRITE_UNCHANGED` (2) and `RESIZE` (3). A
//! qcow2 format node always uses `CONSISTENT_READ`, also uses `WRITE | RESIZE` when writable,
//! and never shares `WRITE | RESIZE` (unless opened with `force-share`). Conflicts are found by
//! *testing* with `F_OFD_GETLK` for an `F_WRLCK` on one byte: any other open file description
//! holding a read lock there is reported, while the caller's own locks never are. An opener
//! that wants permission P tests byte `200 + P`; one that does not share P tests byte `100 + P`.
//!
//! [`ImageLock`] follows QEMU's sequence exactly: apply our own locks first (PREPARE, the union
//! of the old and the new byte set), then test for conflicts, then either drop the bytes that
//! are no longer needed (COMMIT) or go back to the old set (ABORT). Only read locks are ever
//! taken; write locks are only used as the probe of `F_OFD_GETLK`, so QEMU's `-U` readers and
//! QEMU's own lock attempts keep working next to us.
//!
//! Like QEMU's default `locking=auto`, locking silently turns itself off when the kernel does
//! not provide OFD locks (the `F_OFD_*` commands fail with `EINVAL`, or the target OS has no
//! such commands); see [`ImageLock::is_active`].

use crate::error::ErrorKind;
use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

/// Byte offset of the "I use permission P" lock bytes.
const PERM_BASE: u32 = 100;
/// Byte offset of the "I do not share permission P" lock bytes.
const SHARED_BASE: u32 = 200;
/// Number of permission bits QEMU maps to lock bytes.
const PERM_BITS: u32 = 5;

/// `BLK_PERM_CONSISTENT_READ`.
const PERM_CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`.
const PERM_WRITE: u8 = 0x02;
/// `BLK_PERM_RESIZE`.
const PERM_RESIZE: u8 = 0x08;

/// What an opener of an image file uses and refuses to share, as QEMU's permission bits.
///
/// | Mode | Uses | Does not share | Bytes held (`F_RDLCK`) |
/// |---|---|---|---|
/// | [`ReadWrite`](Self::ReadWrite) | consistent read, write, resize | write, resize | 100, 101, 103, 201, 203 |
/// | [`ReadOnly`](Self::ReadOnly) | consistent read | write, resize | 100, 201, 203 |
/// | [`ForceShare`](Self::ForceShare) | consistent read | nothing | 100 |
///
/// These are the bytes a QEMU qcow2 opener holds in the same situation (`qemu-io`,
/// `qemu-img info`, `qemu-img info -U`), so QEMU and oxcow see each other's openers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// A writable open: excludes every other writer and every reader that does not force-share
    /// (because it forbids writers), and is excluded by any reader that forbids writers.
    ReadWrite,
    /// A read-only open that forbids writers (QEMU's default for read-only openers): coexists
    /// with other readers, excludes and is excluded by writers.
    ReadOnly,
    /// A read-only open that shares everything (QEMU's `force-share=on` / `-U`): coexists with
    /// every other opener, including a writer, and guarantees nothing about consistency.
    ForceShare,
    /// The external data file of a read-write qcow2 open: uses consistent read, write and
    /// resize and refuses to share resize, but shares write (QEMU's data child: 100, 101,
    /// 103, 203).
    DataReadWrite,
    /// The external data file of a read-only qcow2 open: consistent read, refuses resize,
    /// shares write (100, 203).
    DataReadOnly,
}

impl LockMode {
    /// The permission bits this mode uses.
    fn perm(self) -> u8 {
        match self {
            LockMode::ReadWrite => PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            LockMode::ReadOnly | LockMode::ForceShare | LockMode::DataReadOnly => {
                PERM_CONSISTENT_READ
            }
            LockMode::DataReadWrite => PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        }
    }

    /// The permission bits this mode refuses to share with other openers.
    fn unshared(self) -> u8 {
        match self {
            LockMode::ReadWrite | LockMode::ReadOnly => PERM_WRITE | PERM_RESIZE,
            LockMode::ForceShare => 0,
            LockMode::DataReadWrite | LockMode::DataReadOnly => PERM_RESIZE,
        }
    }

    /// The lock bytes this mode holds.
    fn bytes(self) -> ByteSet {
        ByteSet::from_perms(self.perm(), self.unshared())
    }
}

/// A set of lock bytes: bit i stands for byte `100 + i`, bit `8 + i` for byte `200 + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ByteSet(u16);

impl ByteSet {
    fn from_perms(perm: u8, unshared: u8) -> ByteSet {
        ByteSet(u16::from(perm) | (u16::from(unshared) << 8))
    }

    fn union(self, other: ByteSet) -> ByteSet {
        ByteSet(self.0 | other.0)
    }

    fn minus(self, other: ByteSet) -> ByteSet {
        ByteSet(self.0 & !other.0)
    }

    fn contains(self, byte: u32) -> bool {
        match Self::bit(byte) {
            Some(bit) => self.0 & (1 << bit) != 0,
            None => false,
        }
    }

    fn insert(&mut self, byte: u32) {
        if let Some(bit) = Self::bit(byte) {
            self.0 |= 1 << bit;
        }
    }

    fn remove(&mut self, byte: u32) {
        if let Some(bit) = Self::bit(byte) {
            self.0 &= !(1 << bit);
        }
    }

    fn bit(byte: u32) -> Option<u32> {
        if (PERM_BASE..PERM_BASE + PERM_BITS).contains(&byte) {
            Some(byte - PERM_BASE)
        } else if (SHARED_BASE..SHARED_BASE + PERM_BITS).contains(&byte) {
            Some(8 + byte - SHARED_BASE)
        } else {
            None
        }
    }

    /// The byte offsets in the set, ascending.
    fn iter(self) -> impl Iterator<Item = u32> {
        (PERM_BASE..PERM_BASE + PERM_BITS)
            .chain(SHARED_BASE..SHARED_BASE + PERM_BITS)
            .filter(move |&b| self.contains(b))
    }
}

/// QEMU's name of one permission bit, as used in its lock error messages.
fn perm_name(bit: u8) -> &'static str {
    match bit {
        0x01 => "consistent read",
        0x02 => "write",
        0x04 => "write unchanged",
        0x08 => "resize",
        _ => "graph modification",
    }
}

/// The QEMU-style hint appended to every lock conflict message.
fn conflict(path: &str, what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!("{what}\nIs another process using the image [{path}]?"),
    )
}

/// The held OFD locks of one open image file, in one [`LockMode`].
///
/// The lock does not own the file descriptor: it stores the raw fd of the [`File`] passed to
/// [`ImageLock::acquire`], and **that `File` must stay open for as long as the `ImageLock`
/// exists** (drop the lock first, or together with the file). The `File` must be the one the
/// image's I/O goes through, opened for reading (read locks need a readable fd), and there must
/// be at most one `ImageLock` per open file description: OFD locks belong to the open file
/// description, so two `ImageLock`s on one `File` (or on `try_clone`s of it) would share and
/// undo each other's bytes.
///
/// Dropping the lock releases every byte it holds. Closing the file would also release them
/// (OFD locks die with the last fd of their open file description), but the drop is explicit.
#[derive(Debug)]
pub struct ImageLock {
    /// Borrowed fd of the image's `File`; see the type's contract.
    fd: RawFd,
    /// The image path, for messages.
    path: String,
    /// The mode the held bytes implement.
    mode: LockMode,
    /// The bytes currently locked by this open file description.
    held: ByteSet,
    /// False when the OS has no OFD locks and locking is off (QEMU's `locking=auto`).
    active: bool,
}

impl ImageLock {
    /// Takes the locks for `mode` on `file` (the same fd used for I/O).
    ///
    /// First applies our own `F_RDLCK` OFD locks on the mode's bytes, then tests for conflicts
    /// with `F_OFD_GETLK` for `F_WRLCK` on byte `200 + P` for each permission P the mode uses
    /// and on byte `100 + P` for each P it does not share. On a conflict every byte added here
    /// is released again and [`Error::Locked`] (EAGAIN) is returned, with QEMU's wording:
    /// `Failed to get "write" lock` when another opener forbids writers and we want to write,
    /// `Failed to get shared "write" lock` when another opener writes and we forbid writers,
    /// each followed by `Is another process using the image [PATH]?`. Other `fcntl` failures
    /// are returned as [`Error::Io`].
    ///
    /// If the OS does not support OFD locks, this succeeds without locking anything (see
    /// [`Self::is_active`]). `path` is used only in messages. `file` must outlive the returned
    /// lock (see the type's documentation).
    pub fn acquire(file: &File, path: &str, mode: LockMode) -> Result<ImageLock> {
        let fd = file.as_raw_fd();
        let mut lock = ImageLock {
            fd,
            path: path.to_owned(),
            mode,
            held: ByteSet::default(),
            active: true,
        };
        // Probe like QEMU's qemu_has_ofd_lock(): an F_OFD_GETLK that fails with EINVAL means
        // the kernel does not know the command, and locking=auto then runs without locks.
        match ofd_test_wrlck(fd, PERM_BASE) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                lock.active = false;
                return Ok(lock);
            }
            Err(e) => {
                return Err(Error::io(
                    format!("testing lock byte {PERM_BASE} of {path}"),
                    e,
                ))
            }
        }
        let target = mode.bytes();
        let result = lock.apply(target, false).and_then(|()| lock.check(mode));
        if let Err(e) = result {
            // ABORT: back to the empty set. Unlocking cannot conflict; if it fails anyway the
            // fd is unusable and closing it drops whatever is left.
            let _ = lock.apply(ByteSet::default(), true);
            return Err(e);
        }
        Ok(lock)
    }

    /// Takes the read locks of `mode` on `file` **without** the conflict tests, for a second
    /// open file description of a file on which the caller already holds `mode` through
    /// another description (the tests would find the caller's own bytes and fail). Setting
    /// shared read locks cannot conflict with QEMU, which only ever takes read locks. Used by
    /// reopen to move the locks to a new description without a window where none are held.
    pub fn adopt(file: &File, path: &str, mode: LockMode, active: bool) -> Result<ImageLock> {
        let mut lock = ImageLock {
            fd: file.as_raw_fd(),
            path: path.to_owned(),
            mode,
            held: ByteSet::default(),
            active,
        };
        if active {
            if let Err(e) = lock.apply(mode.bytes(), false) {
                let _ = lock.apply(ByteSet::default(), true);
                return Err(e);
            }
        }
        Ok(lock)
    }

    /// Points the lock at `file`, whose descriptor now refers to the open file description
    /// the locks were taken on (after `dup3` moved that description onto it).
    pub fn rebind(&mut self, file: &File) {
        self.fd = file.as_raw_fd();
    }

    /// Moves the locks to `mode` transactionally.
    ///
    /// PREPARE locks the union of the old and the new bytes, then the new mode's conflict tests
    /// run; on success COMMIT drops the bytes the new mode no longer needs and the lock is in
    /// `mode`. On failure (a conflict gives [`Error::Locked`] with the same messages as
    /// [`Self::acquire`]) the bytes added by PREPARE are released, and the lock stays in its
    /// old mode with exactly its old byte set. Only if releasing a byte in COMMIT itself fails
    /// (which `fcntl` does not do on a valid fd) is an error returned after the switch; the lock
    /// is then in `mode` but may still hold some of the old mode's bytes.
    ///
    /// Without OFD support ([`Self::is_active`] is false) this only records the new mode.
    pub fn change_mode(&mut self, mode: LockMode) -> Result<()> {
        if !self.active {
            self.mode = mode;
            return Ok(());
        }
        let old = self.held;
        let new = mode.bytes();
        let prepared = self
            .apply(old.union(new), false)
            .and_then(|()| self.check(mode));
        if let Err(e) = prepared {
            // ABORT: release what PREPARE added, keeping every byte of the old set.
            let _ = self.apply(old, true);
            return Err(e);
        }
        self.mode = mode;
        // COMMIT.
        self.apply(new, true)
    }

    /// The mode the held locks implement.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Whether locks are actually held: false when the OS has no OFD locks and locking fell
    /// back to off, like QEMU's `locking=auto`.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Makes the held set equal to `target` (or a superset of it when `unlock` is false):
    /// locks the missing bytes and, if `unlock`, unlocks the extra ones. `self.held` tracks
    /// every single successful step, so it is exact even after an error.
    fn apply(&mut self, target: ByteSet, unlock: bool) -> Result<()> {
        for byte in target.minus(self.held).iter() {
            match ofd_setlk(self.fd, byte, libc::F_RDLCK as libc::c_short) {
                Ok(()) => self.held.insert(byte),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                    // Someone holds a write lock on the byte (never QEMU).
                    return Err(conflict(&self.path, format!("Failed to lock byte {byte}")));
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("locking byte {byte} of {}", self.path),
                        e,
                    ))
                }
            }
        }
        if unlock {
            for byte in self.held.minus(target).iter() {
                ofd_setlk(self.fd, byte, libc::F_UNLCK as libc::c_short)
                    .map_err(|e| Error::io(format!("unlocking byte {byte} of {}", self.path), e))?;
                self.held.remove(byte);
            }
        }
        Ok(())
    }

    /// QEMU's `raw_check_lock_bytes`: tests, in QEMU's order, byte `200 + P` for every
    /// permission `mode` uses, then byte `100 + P` for every permission it does not share.
    fn check(&self, mode: LockMode) -> Result<()> {
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            if mode.perm() & bit != 0 {
                let byte = SHARED_BASE + i;
                if self.test(byte)? {
                    let what = format!("Failed to get \"{}\" lock", perm_name(bit));
                    return Err(conflict(&self.path, what));
                }
            }
        }
        for i in 0..PERM_BITS {
            let bit = 1u8 << i;
            if mode.unshared() & bit != 0 {
                let byte = PERM_BASE + i;
                if self.test(byte)? {
                    let what = format!("Failed to get shared \"{}\" lock", perm_name(bit));
                    return Err(conflict(&self.path, what));
                }
            }
        }
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte`.
    fn test(&self, byte: u32) -> Result<bool> {
        ofd_test_wrlck(self.fd, byte)
            .map_err(|e| Error::io(format!("testing lock byte {byte} of {}", self.path), e))
    }
}

impl Drop for ImageLock {
    /// Releases every held byte. Errors are ignored: the bytes go away with the file anyway.
    fn drop(&mut self) {
        if self.active {
            let _ = self.apply(ByteSet::default(), true);
        }
    }
}

/// A one-byte `struct flock` at `byte` of type `l_type`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn one_byte(byte: u32, l_type: libc::c_short) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct of integers (plus padding on some targets) for
    // which all-zero bytes are a valid value; zero is also what OFD locks require of `l_pid`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    fl
}

/// `fcntl(fd, F_OFD_SETLK, {l_type, byte, 1})`: non-blocking lock or unlock of one byte.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn ofd_setlk(fd: RawFd, byte: u32, l_type: libc::c_short) -> io::Result<()> {
    let fl = one_byte(byte, l_type);
    // SAFETY: F_OFD_SETLK reads the `struct flock` behind the pointer, which is a valid,
    // initialized local that outlives the call. An invalid `fd` only makes fcntl fail (EBADF);
    // the caller's contract keeps the fd open while the ImageLock exists.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl as *const libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fcntl(fd, F_OFD_GETLK, {F_WRLCK, byte, 1})`: whether another open file description holds
/// a lock on `byte` (our own locks never count).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn ofd_test_wrlck(fd: RawFd, byte: u32) -> io::Result<bool> {
    let mut fl = one_byte(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and overwrites the `struct flock` behind the pointer, which is
    // a valid, initialized, exclusively borrowed local that outlives the call.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

/// No OFD locks on this OS: report EINVAL, which turns locking off like QEMU's `locking=auto`.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn ofd_setlk(_fd: RawFd, _byte: u32, _l_type: libc::c_short) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// No OFD locks on this OS: report EINVAL, which turns locking off like QEMU's `locking=auto`.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn ofd_test_wrlck(_fd: RawFd, _byte: u32) -> io::Result<bool> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A uniquely named file under the temp dir, removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> TempPath {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("oxcow-lock-{}-{tag}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            let _ = std::fs::remove_file(&path);
            TempPath(path)
        }

        /// A fresh 1 MiB plain file.
        fn plain(tag: &str) -> TempPath {
            let p = TempPath::new(tag);
            File::create(&p.0).unwrap().set_len(1 << 20).unwrap();
            p
        }

        fn open(&self) -> File {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.0)
                .unwrap()
        }

        fn str(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn lock(file: &File, p: &TempPath, mode: LockMode) -> Result<ImageLock> {
        ImageLock::acquire(file, p.str(), mode)
    }

    #[track_caller]
    fn assert_locked(r: Result<ImageLock>, expect: &str) {
        match r {
            Err(e) if e.kind() == ErrorKind::Locked => {
                assert_eq!(e.errno(), libc::EAGAIN);
                let msg = e.to_string();
                assert!(
                    msg.starts_with(expect),
                    "{msg:?} should start with {expect:?}"
                );
                assert!(
                    msg.contains("Is another process using the image ["),
                    "{msg}"
                );
            }
            Err(e) => panic!("expected Locked, got {e:?}"),
            Ok(_) => panic!("expected Locked, got a lock"),
        }
    }

    /// Byte ranges of the OFD locks on `path` in /proc/locks, as sorted single bytes.
    /// The bytes locked on `path`, from /proc/locks. The kernel generates that file in
    /// chunks while other threads (parallel tests) change their locks, so one read can skip
    /// or repeat lines: read until two consecutive reads agree.
    fn proc_locked_bytes(path: &Path) -> Vec<u64> {
        let mut last = proc_locked_bytes_once(path);
        for _ in 0..100 {
            let now = proc_locked_bytes_once(path);
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn proc_locked_bytes_once(path: &Path) -> Vec<u64> {
        let meta = std::fs::metadata(path).unwrap();
        let (dev, ino) = (meta.dev(), meta.ino());
        // /proc/locks names files as MAJOR:MINOR:INODE (hex device numbers): match the device
        // too, or a file with the same inode on another file system (another test's, another
        // process's) would count.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let suffix = format!("{major:02x}:{minor:02x}:{ino}");
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        let mut bytes = Vec::new();
        for line in text.lines().filter(|l| !l.contains("->")) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(i) = fields.iter().position(|f| *f == suffix) else {
                continue;
            };
            assert_eq!(fields[1], "OFDLCK", "{line}");
            assert_eq!(fields[3], "READ", "only read locks are taken: {line}");
            let start: u64 = fields[i + 1].parse().unwrap();
            let end: u64 = fields[i + 2].parse().unwrap();
            bytes.extend(start..=end);
        }
        bytes.sort_unstable();
        bytes
    }

    #[test]
    fn modes_hold_qemus_bytes() {
        let p = TempPath::plain("bytes");
        let f = p.open();
        let mut l = lock(&f, &p, LockMode::ReadWrite).unwrap();
        assert!(l.is_active());
        assert_eq!(proc_locked_bytes(&p.0), [100, 101, 103, 201, 203]);
        l.change_mode(LockMode::ReadOnly).unwrap();
        assert_eq!(l.mode(), LockMode::ReadOnly);
        assert_eq!(proc_locked_bytes(&p.0), [100, 201, 203]);
        l.change_mode(LockMode::ForceShare).unwrap();
        assert_eq!(proc_locked_bytes(&p.0), [100]);
        l.change_mode(LockMode::ReadWrite).unwrap();
        assert_eq!(proc_locked_bytes(&p.0), [100, 101, 103, 201, 203]);
        drop(l);
        assert_eq!(proc_locked_bytes(&p.0), Vec::<u64>::new());
        // The fd is borrowed, not closed.
        assert!(f.metadata().is_ok());
    }

    #[test]
    fn rw_excludes_rw() {
        let p = TempPath::plain("rwrw");
        let (a, b) = (p.open(), p.open());
        let la = lock(&a, &p, LockMode::ReadWrite).unwrap();
        assert_locked(
            lock(&b, &p, LockMode::ReadWrite),
            "Failed to get \"write\" lock",
        );
        drop(la);
        let _lb = lock(&b, &p, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn rw_and_ro_exclude_each_other() {
        let p = TempPath::plain("rwro");
        let (a, b) = (p.open(), p.open());
        let la = lock(&a, &p, LockMode::ReadWrite).unwrap();
        assert_locked(
            lock(&b, &p, LockMode::ReadOnly),
            "Failed to get shared \"write\" lock",
        );
        drop(la);

        let lb = lock(&b, &p, LockMode::ReadOnly).unwrap();
        assert_locked(
            lock(&a, &p, LockMode::ReadWrite),
            "Failed to get \"write\" lock",
        );
        // The failed attempt left nothing behind on `a`: only b's bytes are held.
        assert_eq!(proc_locked_bytes(&p.0), [100, 201, 203]);
        drop(lb);
        assert_eq!(proc_locked_bytes(&p.0), Vec::<u64>::new());
        // `a` is still open; a third opener gets RW, so `a` holds nothing.
        let c = p.open();
        let _lc = lock(&c, &p, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn readers_coexist() {
        let p = TempPath::plain("roro");
        let (a, b, c) = (p.open(), p.open(), p.open());
        let _la = lock(&a, &p, LockMode::ReadOnly).unwrap();
        let _lb = lock(&b, &p, LockMode::ReadOnly).unwrap();
        let _lc = lock(&c, &p, LockMode::ForceShare).unwrap();
    }

    #[test]
    fn force_share_coexists_with_a_writer() {
        let p = TempPath::plain("fs");
        let (a, b) = (p.open(), p.open());
        let la = lock(&a, &p, LockMode::ReadWrite).unwrap();
        let lb = lock(&b, &p, LockMode::ForceShare).unwrap();
        drop(la);
        // And the other order: a force-share reader does not keep a writer out.
        let _la = lock(&a, &p, LockMode::ReadWrite).unwrap();
        drop(lb);
    }

    #[test]
    fn rw_to_ro_lets_a_reader_in() {
        let p = TempPath::plain("rw2ro");
        let (a, b) = (p.open(), p.open());
        let mut la = lock(&a, &p, LockMode::ReadWrite).unwrap();
        assert_locked(
            lock(&b, &p, LockMode::ReadOnly),
            "Failed to get shared \"write\" lock",
        );
        la.change_mode(LockMode::ReadOnly).unwrap();
        let _lb = lock(&b, &p, LockMode::ReadOnly).unwrap();
    }

    #[test]
    fn ro_to_rw_fails_next_to_a_reader_and_keeps_the_old_locks() {
        let p = TempPath::plain("ro2rw");
        let (a, b, c) = (p.open(), p.open(), p.open());
        let mut la = lock(&a, &p, LockMode::ReadOnly).unwrap();
        let lb = lock(&b, &p, LockMode::ReadOnly).unwrap();
        let err = la.change_mode(LockMode::ReadWrite).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Locked, "{err:?}");
        assert!(err
            .to_string()
            .starts_with("Failed to get \"write\" lock\n"));
        assert_eq!(la.mode(), LockMode::ReadOnly);
        // Neither reader holds 101/103: a third reader is still welcome.
        assert_eq!(proc_locked_bytes(&p.0), [100, 100, 201, 201, 203, 203]);
        let lc = lock(&c, &p, LockMode::ReadOnly).unwrap();
        drop(lc);
        drop(lb);
        // `a` still forbids writers (it kept 201), so a writer on `b` fails...
        assert_locked(
            lock(&b, &p, LockMode::ReadWrite),
            "Failed to get \"write\" lock",
        );
        // ...and once alone, `a` can become the writer; then readers are refused.
        la.change_mode(LockMode::ReadWrite).unwrap();
        assert_locked(
            lock(&b, &p, LockMode::ReadOnly),
            "Failed to get shared \"write\" lock",
        );
    }

    // ---- interop with QEMU ----

    fn have(tool: &str) -> bool {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!("skipping: {tool} is not installed");
        }
        found
    }

    fn qcow2_image(tag: &str) -> TempPath {
        let p = TempPath::new(tag);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", p.str(), "1M"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        p
    }

    /// Kills the child on drop so a failing assertion does not leave it running.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn qemu_io_writer_keeps_us_out() {
        if !have("qemu-io") || !have("qemu-img") {
            return;
        }
        let p = qcow2_image("qemuio");
        let mut child = KillOnDrop(
            Command::new("qemu-io")
                .args(["-f", "qcow2", p.str()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // qemu-io opens the image (taking its locks) before it reads commands: once it has
        // answered "length", its locks are in place. Keep stdin open so it stays alive.
        let mut stdin = child.0.stdin.take().unwrap();
        stdin.write_all(b"length\n").unwrap();
        stdin.flush().unwrap();
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("1 MiB") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("qemu-io did not open the image");

        let f = p.open();
        assert_locked(
            lock(&f, &p, LockMode::ReadWrite),
            "Failed to get \"write\" lock",
        );
        assert_locked(
            lock(&f, &p, LockMode::ReadOnly),
            "Failed to get shared \"write\" lock",
        );
        // QEMU's own locks are untouched by our failed attempts, and ours are gone.
        assert_eq!(proc_locked_bytes(&p.0), [100, 101, 103, 201, 203]);
        let fs = lock(&f, &p, LockMode::ForceShare).unwrap();
        drop(fs);

        drop(stdin);
        drop(child);
        let _l = lock(&f, &p, LockMode::ReadWrite).unwrap();
    }

    #[test]
    fn our_writer_keeps_qemu_img_out_unless_forced() {
        if !have("qemu-img") {
            return;
        }
        let p = qcow2_image("qemuimg");
        let f = p.open();
        let l = lock(&f, &p, LockMode::ReadWrite).unwrap();

        let out = Command::new("qemu-img")
            .args(["info", p.str()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "qemu-img info succeeded");
        assert!(
            stderr.contains("Failed to get shared \"write\" lock"),
            "{stderr}"
        );

        let out = Command::new("qemu-img")
            .args(["info", "-U", p.str()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");

        // As a reader we let qemu-img info in, but not a qemu-img writer.
        drop(l);
        let _l = lock(&f, &p, LockMode::ReadOnly).unwrap();
        let out = Command::new("qemu-img")
            .args(["info", p.str()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = Command::new("qemu-img")
            .args(["resize", p.str(), "2M"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "qemu-img resize succeeded");
        assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    }
}
