//! Backing files: a read-only qcow2 image (with its own chain) or a raw file.

use super::{Image, MAX_BACKING_DEPTH};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::MAGIC;
use crate::format::HostOffset;
use crate::options::{BackingFormat, OpenOptions};
use crate::storage::{HostFile, LockMode, PosixFile, WriteKind};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An open backing file, always read-only.
pub enum Backing {
    /// A qcow2 image.
    Qcow2(Box<Image>),
    /// A raw file and its size.
    Raw {
        /// The file (holding its read-only lock).
        file: HostFile,
        /// Its size in bytes (grown by a commit into it).
        size: AtomicU64,
    },
}

/// Resolves a backing name stored in `overlay`'s header: relative names are relative to the
/// overlay's directory.
pub fn resolve(overlay: &Path, name: &[u8]) -> PathBuf {
    let p = Path::new(OsStr::from_bytes(name));
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

impl Backing {
    /// Opens the backing file of `overlay` (at chain depth `depth` of the overlay).
    pub fn open(
        overlay: &Path,
        name: &[u8],
        format: Option<&str>,
        depth: u32,
        parent: &OpenOptions,
    ) -> Result<Backing> {
        if depth + 1 >= MAX_BACKING_DEPTH {
            return Err(Error::unsupported(format!(
                "{}: backing chain deeper than {MAX_BACKING_DEPTH} images",
                overlay.display()
            )));
        }
        let path = resolve(overlay, name);
        let fmt = match format {
            Some(f) => BackingFormat::from_name(f).ok_or_else(|| {
                Error::unsupported(format!(
                    "{}: backing file format '{f}' is not supported",
                    overlay.display()
                ))
            })?,
            None if parent.no_probe => {
                return Err(Error::unsupported(format!(
                    "{}: the format of backing file {} is not recorded in the image and probing is disabled (record it with 'qemu-img rebase -u -F FORMAT')",
                    overlay.display(),
                    path.display()
                )))
            }
            // Like QEMU, guess only what the image does not record.
            None => probe(&path)?,
        };
        let force_share = parent.force_share;
        match fmt {
            BackingFormat::Qcow2 => {
                let opts = OpenOptions {
                    force_share,
                    no_probe: parent.no_probe,
                    ..OpenOptions::default()
                };
                let img = Image::open_at_depth(&path, &opts, depth + 1)
                    .map_err(|e| chain_error(e, &path))?;
                Ok(Backing::Qcow2(Box::new(img)))
            }
            BackingFormat::Raw => {
                let name = path.display().to_string();
                let mut f = PosixFile::open(&path, false, false)
                    .map_err(|e| Error::io(format!("opening backing file {name}"), e))?;
                let mode = if force_share {
                    LockMode::ForceShare
                } else {
                    LockMode::ReadOnly
                };
                f.lock(&name, mode)?;
                let file = HostFile::new(Arc::new(f), name);
                let size = AtomicU64::new(file.len()?);
                Ok(Backing::Raw { file, size })
            }
        }
    }

    /// Guest-visible size of the backing image in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.virtual_size(),
            Backing::Raw { size, .. } => size.load(Ordering::Acquire),
        }
    }

    /// Reads guest bytes of the backing image; bytes past its end read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        if offset >= size {
            buf.fill(0);
            return Ok(());
        }
        let have = ((size - offset).min(buf.len() as u64)) as usize;
        let (inside, past) = buf.split_at_mut(have);
        past.fill(0);
        match self {
            Backing::Qcow2(img) => img.read_at(inside, offset),
            Backing::Raw { file, .. } => {
                file.read_zero_padded(inside, HostOffset::new(offset), "backing data")
            }
        }
    }
}

/// Writing into a backing file (commit): the file is reopened read-write for the operation
/// and read-only again afterwards, through the same transactional reopen as
/// [`Image::reopen`] (identity check by device and inode, locks moved without a gap).
impl Backing {
    /// The file name the backing file was opened from.
    pub fn path(&self) -> PathBuf {
        match self {
            Backing::Qcow2(img) => img.path().to_path_buf(),
            Backing::Raw { file, .. } => PathBuf::from(file.name()),
        }
    }

    /// The backing qcow2 image, `None` for a raw file.
    pub fn image(&self) -> Option<&Image> {
        match self {
            Backing::Qcow2(img) => Some(img),
            Backing::Raw { .. } => None,
        }
    }

    /// Reopens the file read-write (`writable`) or read-only again. -EAGAIN while another
    /// process uses it, -ESTALE when its path names another file now; on error nothing
    /// changed. Going read-only makes everything written durable first.
    pub fn set_writable(&self, writable: bool) -> Result<()> {
        match self {
            Backing::Qcow2(img) => img.reopen(&OpenOptions {
                writable,
                direct: img.mode.direct,
                no_backing: img.mode.no_backing,
                overlap_check: img.overlap_check(),
                ..OpenOptions::default()
            }),
            Backing::Raw { file, .. } if writable => file.reopen(true, LockMode::ReadWrite),
            Backing::Raw { file, .. } => {
                file.sync()?;
                file.reopen(false, LockMode::ReadOnly)
            }
        }
    }

    /// Grows the guest-visible size to `size` bytes when it is smaller (a qcow2 image by
    /// its resize, a raw file by extending it); the new area reads as zeros.
    pub fn grow_to(&self, size: u64) -> Result<()> {
        if self.size() >= size {
            return Ok(());
        }
        match self {
            Backing::Qcow2(img) => img.resize(size, false),
            Backing::Raw { file, size: s } => {
                file.set_len(size)?;
                s.store(size, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Writes guest data (the file is open read-write, see [`Self::set_writable`]).
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Backing::Qcow2(img) => img.write_at(buf, offset),
            Backing::Raw { file, .. } => file.write(buf, HostOffset::new(offset), WriteKind::Data),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros without writing zeros where the range
    /// already reads as zeros: a qcow2 image deallocates or sets zero flags; a raw file gets
    /// a hole punched (as qemu-img commit does), or, where the file system cannot punch, is
    /// written only where it holds nonzero bytes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Backing::Qcow2(img) => {
                img.write_zeroes(offset, len, crate::ZeroFlags { may_unmap: true })
            }
            Backing::Raw { file, .. } if file.punch_hole(HostOffset::new(offset), len)? => Ok(()),
            Backing::Raw { .. } => {
                const STEP: u64 = 1 << 20;
                let mut buf = vec![0u8; STEP.min(len) as usize];
                let mut pos = offset;
                while pos < offset + len {
                    let n = STEP.min(offset + len - pos) as usize;
                    self.read(&mut buf[..n], pos)?;
                    if buf[..n].iter().any(|&b| b != 0) {
                        buf[..n].fill(0);
                        self.write(&buf[..n], pos)?;
                    }
                    pos += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Makes everything written durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Backing::Qcow2(img) => img.flush(),
            Backing::Raw { file, .. } => file.sync(),
        }
    }
}

fn probe(path: &Path) -> Result<BackingFormat> {
    let f = PosixFile::open(path, false, false)
        .map_err(|e| Error::io(format!("opening backing file {}", path.display()), e))?;
    let file = HostFile::new(Arc::new(f), path.display().to_string());
    let mut m = [0u8; 4];
    let n = file.read_some(&mut m, HostOffset::new(0), "backing file magic")?;
    Ok(if n == 4 && u32::from_be_bytes(m) == MAGIC {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}

/// An OS error while opening a backing image is wrapped so that the message says which link
/// of the chain failed; other errors already name the backing file they concern.
fn chain_error(e: Error, path: &Path) -> Error {
    if e.kind() != ErrorKind::Io {
        return e;
    }
    Error::new(
        ErrorKind::Io,
        format!("opening backing file {}", path.display()),
    )
    .with_source(e)
}
