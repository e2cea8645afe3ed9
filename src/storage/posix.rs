//! POSIX file backend: pread/pwrite/fdatasync on a regular file or block device.

use super::{Backend, ImageLock, LockMode};
use crate::error::Result;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A file opened for positioned I/O, with the image locks held on its descriptor.
pub struct PosixFile {
    /// Declared before `file` so that the locks are released explicitly while the descriptor
    /// is still open: a forked child that briefly shares the descriptor must not keep them, and
    /// a closed descriptor number may already belong to another file.
    lock: Option<ImageLock>,
    file: File,
}

impl PosixFile {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<PosixFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(PosixFile { lock: None, file })
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
        Ok(PosixFile { lock: None, file })
    }

    /// Takes QEMU-compatible locks for `mode` on this file's descriptor (see
    /// [`ImageLock::acquire`]); they are held until the file is dropped.
    pub fn lock(&mut self, name: &str, mode: LockMode) -> Result<()> {
        self.lock = None;
        self.lock = Some(ImageLock::acquire(&self.file, name, mode)?);
        Ok(())
    }
}

impl Backend for PosixFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
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
}
