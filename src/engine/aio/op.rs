//! One asynchronous request: what it does, which caller buffers it owns until it completes,
//! and how the synchronous engine runs it.

use crate::error::{invalid, Error, ErrorKind, Result};
use crate::{Image, ZeroFlags};

/// A buffer handed to an asynchronous request. The queue owns it from submission until the
/// request's completion is returned by [`super::AioQueue::poll`]; then it goes back to the
/// caller inside the completion. Implemented for `Vec<u8>`; the C layer implements it for
/// caller memory it is promised not to touch until the callback ran.
pub trait AioBuf: Send + 'static {
    /// The bytes, for writes.
    fn bytes(&self) -> &[u8];
    /// The bytes, for reads.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl AioBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// An asynchronous request. Vectored reads and writes fill or take their buffers in order.
pub enum AioOp<B> {
    /// Reads guest data at `offset` into `bufs`.
    Read {
        /// Filled in order.
        bufs: Vec<B>,
        /// Guest offset of the first byte.
        offset: u64,
    },
    /// Writes `bufs` at guest `offset`.
    Write {
        /// Written in order.
        bufs: Vec<B>,
        /// Guest offset of the first byte.
        offset: u64,
    },
    /// [`Image::write_zeroes`].
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        count: u64,
        /// May the clusters be deallocated.
        flags: ZeroFlags,
    },
    /// [`Image::discard`].
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        count: u64,
    },
    /// [`Image::flush`]: durable are the writes that completed before it runs (requests in
    /// flight are not ordered against each other, as in io_uring: wait for a write's
    /// completion before submitting the flush that must cover it).
    Flush,
}

impl<B: AioBuf> AioOp<B> {
    /// The guest range the request touches (`None` for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            AioOp::Read { bufs, offset } | AioOp::Write { bufs, offset } => {
                let len = bufs.iter().map(|b| b.bytes().len() as u64).sum();
                Some((*offset, len))
            }
            AioOp::WriteZeroes { offset, count, .. } | AioOp::Discard { offset, count } => {
                Some((*offset, *count))
            }
            AioOp::Flush => None,
        }
    }

    /// Whether the request changes the image (flush does not need a writable handle: it is
    /// a no-op on a read-only one, as in the synchronous API).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            AioOp::Write { .. } | AioOp::WriteZeroes { .. } | AioOp::Discard { .. }
        )
    }

    /// The checks a submission can make at once, without I/O: a writable handle for writes,
    /// a range inside the virtual size. The engine repeats them when it runs the request
    /// (a resize may come in between).
    pub fn check(&self, img: &Image) -> Result<()> {
        if self.is_write() && img.is_read_only() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{}: image is open read-only", img.path().display()),
            ));
        }
        if let Some((offset, count)) = self.range() {
            let size = img.virtual_size();
            if offset.checked_add(count).is_none_or(|end| end > size) {
                return invalid!(
                    "request [{offset:#x}, +{count:#x}) is beyond the virtual size {size:#x}"
                );
            }
        }
        Ok(())
    }

    /// Runs the request on the synchronous engine (the worker pool's path, correct for every
    /// request on every kind of image).
    pub fn run_sync(&mut self, img: &Image) -> Result<()> {
        match self {
            AioOp::Read { bufs, offset } if bufs.len() == 1 => {
                img.read_at(bufs[0].bytes_mut(), *offset)
            }
            AioOp::Read { bufs, offset } => {
                let mut v: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.bytes_mut()).collect();
                img.read_vectored_at(&mut v, *offset)
            }
            AioOp::Write { bufs, offset } if bufs.len() == 1 => {
                img.write_at(bufs[0].bytes(), *offset)
            }
            AioOp::Write { bufs, offset } => {
                let v: Vec<&[u8]> = bufs.iter().map(|b| b.bytes()).collect();
                img.write_vectored_at(&v, *offset)
            }
            AioOp::WriteZeroes {
                offset,
                count,
                flags,
            } => img.write_zeroes(*offset, *count, *flags),
            AioOp::Discard { offset, count } => img.discard(*offset, *count),
            AioOp::Flush => img.flush(),
        }
    }
}
