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
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::RwLock;

/// Alignment used for O_DIRECT transfers (memory address, offset and length).
pub const DIRECT_ALIGN: u64 = 4096;

/// A file opened for positioned I/O, with the image locks held on its descriptor.
pub struct PosixFile {
    /// Declared before `file` so that the locks are released explicitly while the descriptor
    /// is still open: a forked child that briefly shares the descriptor must not keep them, and
    /// a closed descriptor number may already belong to another file.
    lock: Option<ImageLock>,
    file: File,
    /// Present when the file was opened with O_DIRECT.
    direct: Option<DirectState>,
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
        Ok(PosixFile {
            lock: None,
            file,
            direct: direct.then(|| DirectState {
                rmw: RwLock::new(()),
            }),
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
        Ok(PosixFile {
            lock: None,
            file,
            direct: None,
        })
    }

    /// Takes QEMU-compatible locks for `mode` on this file's descriptor (see
    /// [`ImageLock::acquire`]); they are held until the file is dropped.
    pub fn lock(&mut self, name: &str, mode: LockMode) -> Result<()> {
        self.lock = None;
        self.lock = Some(ImageLock::acquire(&self.file, name, mode)?);
        Ok(())
    }
}

impl PosixFile {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
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
        self.file.write_all_at(bounce.as_slice(), start)
    }
}

impl Backend for PosixFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.direct {
            Some(_) => self.direct_read(buf, offset),
            None => self.pread(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => self.direct_write(d, buf, offset),
            None => self.file.write_all_at(buf, offset),
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
}
