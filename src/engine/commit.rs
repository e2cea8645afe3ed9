//! Commit: write what the top image (and, with a deeper base, the images between) holds into
//! a backing file, like `qemu-img commit` (QEMU 10), on a live read-write handle.
//!
//! The base is reopened read-write (the transactional reopen: same file by device and inode,
//! locks moved without a gap, -EAGAIN while another process uses it), grown to the top's size
//! when it is shorter, and filled range by range with what the chain above it holds: data is
//! copied (as zeros when it is all zeros), zero clusters become zeros, unallocated ranges are
//! left alone. The base is flushed and reopened read-only. Only then, and only when the commit
//! goes into the direct backing file without `keep_top` (qemu-img's default; a named base
//! implies `-d`, as in qemu-img), the top is emptied: every mapping is dropped so it reads
//! through to the base, which now holds the same bytes. Where qemu-img rewrites the emptied
//! top to its bare structures (version 3, no snapshots, no bitmaps), the file is cut after its
//! last allocated cluster, so it ends up as long as qemu-img leaves it.
//!
//! Guest writes continue during the copy and go to the top. When the top is emptied, the
//! ranges written meanwhile are recorded and copied again with writers quiesced just before
//! the top's mappings are dropped, so no write is lost. A failure at any step leaves the top
//! untouched (its mappings are dropped only after the base is durable), the base consistent
//! (its own crash-safe write path, made durable by the read-only reopen) and the handle on the
//! old chain; the caller gets the first error and may retry.

use super::backing::{resolve, Backing};
use super::bitmap::bits::DirtyBits;
use super::check::{self, CheckFix};
use super::{Image, MAX_BACKING_DEPTH};
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::options::{EXTENT_ALLOCATED, EXTENT_ZERO};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes looked at (and copied) per step.
const STEP: u64 = 1 << 20;

/// Parameters of [`Image::commit`].
#[derive(Default)]
pub struct CommitOptions<'a> {
    /// The backing file to commit into, by file name (as the chain names it, or any path
    /// to the same file); `None`: the direct backing file. Naming a base keeps the top
    /// (qemu-img's `-b` implies `-d`).
    pub base: Option<PathBuf>,
    /// Keep the top's data after the commit (`-d`); otherwise the top is emptied.
    pub keep_top: bool,
    /// Called with (bytes done, bytes total) as the copy advances.
    pub progress: Option<&'a dyn Fn(u64, u64)>,
}

/// What the chain above the base holds for a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Data (possibly compressed) to copy.
    Data,
    /// Reads as zeros (zero clusters, or past the end of an image in between).
    Zero,
    /// Nothing: the range reads from the base already.
    Unallocated,
}

/// The images between the top and the base, and the base.
struct Chain {
    /// The images strictly between the top and the base (qcow2, top-most first).
    between: Vec<Arc<Backing>>,
    base: Arc<Backing>,
}

impl Image {
    /// Commits the top image into a backing file, like `qemu-img commit` (see the module
    /// documentation for the steps). Works on a live read-write handle: guest writes during
    /// the commit go to the top and stay visible.
    ///
    /// Errors: -EINVAL when the image has no backing file or `base` is not in its chain;
    /// -EROFS read-only handle; -EAGAIN when another process uses the base; -ESTALE when the
    /// base's path names another file now; -EIO/-ENOSPC from either file. On error both files
    /// are consistent, the top reads as before and the handle keeps its chain; a retry
    /// resumes from scratch.
    pub fn commit(&self, opts: &CommitOptions) -> Result<()> {
        self.check_writable()?;
        // The top's size is the range to copy: no resize of the top while it runs.
        let _serial = self.view.resizing();
        let chain = self.commit_chain(opts.base.as_deref())?;
        let empty_top = opts.base.is_none() && !opts.keep_top;
        chain.base.set_writable(true)?;
        let r = self.commit_into(&chain, empty_top, opts.progress);
        // Read-only again in every case: this also makes what was written durable.
        let back = chain.base.set_writable(false);
        let r = r.and(back);
        let r = if empty_top {
            r.and_then(|()| self.trim_top())
        } else {
            r
        };
        self.finish(r)
    }

    /// The copy with the base open read-write; the top emptied last when `empty_top`.
    fn commit_into(
        &self,
        chain: &Chain,
        empty_top: bool,
        progress: Option<&dyn Fn(u64, u64)>,
    ) -> Result<()> {
        let size = self.virtual_size();
        chain.base.grow_to(size)?;
        if !empty_top {
            self.copy_above(chain, 0, size, progress)?;
            return chain.base.flush();
        }
        let written = Arc::new(DirtyBits::new(
            size,
            self.geo.cluster_bits as u8,
            self.geo.cluster_bits,
        ));
        {
            let _gate = self.quiesce();
            self.bitmaps.track(Arc::clone(&written));
        }
        let r = self.copy_above(chain, 0, size, progress);
        let _gate = self.quiesce();
        self.bitmaps.untrack(&written);
        r?;
        // Writers are drained: what they wrote during the copy goes to the base as well.
        let mut again = Vec::new();
        written.for_each_dirty(|off, len| again.push((off, len)));
        for (off, len) in again {
            self.copy_above(chain, off, len, None)?;
        }
        chain.base.flush()?;
        // A reopen to read-only may have happened meanwhile: then the top stays as it is.
        self.check_writable()?;
        self.empty_top()
    }

    /// Finds the base (and the images in between) in the backing chain.
    fn commit_chain(&self, base: Option<&Path>) -> Result<Chain> {
        let Some(mut cur) = self.backing() else {
            return invalid!("Image does not have a backing file");
        };
        let Some(wanted) = base else {
            return Ok(Chain {
                between: Vec::new(),
                base: cur,
            });
        };
        let mut between = Vec::new();
        for _ in 0..MAX_BACKING_DEPTH {
            if same_file(&self.path, wanted, &cur.path()) {
                return Ok(Chain { between, base: cur });
            }
            let next = cur.image().and_then(|img| img.backing());
            let Some(next) = next else { break };
            between.push(std::mem::replace(&mut cur, next));
        }
        invalid!(
            "Did not find '{}' in the backing chain of '{}'",
            wanted.display(),
            self.path.display()
        )
    }

    /// Writes into the base what the chain above it holds for `[offset, offset + len)`.
    fn copy_above(
        &self,
        chain: &Chain,
        offset: u64,
        len: u64,
        progress: Option<&dyn Fn(u64, u64)>,
    ) -> Result<()> {
        let end = offset + len;
        let mut buf = vec![0u8; STEP.min(len) as usize];
        let mut pos = offset;
        while pos < end {
            let (held, n) = self.held_above(chain, pos, STEP.min(end - pos))?;
            match held {
                Held::Unallocated => {}
                Held::Zero => chain.base.write_zeroes(pos, n)?,
                Held::Data => {
                    // n <= STEP, the buffer's size.
                    let data = &mut buf[..n as usize];
                    self.read_at(data, pos)?;
                    if data.iter().all(|&b| b == 0) {
                        chain.base.write_zeroes(pos, n)?;
                    } else {
                        chain.base.write(data, pos)?;
                    }
                }
            }
            pos += n;
            if let Some(p) = progress {
                p(pos - offset, len);
            }
        }
        Ok(())
    }

    /// What the top and the images between hold from `offset` (at most `len` bytes, at least
    /// one byte): the first image that allocates the range decides.
    fn held_above(&self, chain: &Chain, offset: u64, len: u64) -> Result<(Held, u64)> {
        let mut len = len;
        let layers = std::iter::once(self).chain(chain.between.iter().filter_map(|b| b.image()));
        for img in layers {
            let size = img.virtual_size();
            if offset >= size {
                // The image above reads zeros past this image's end.
                return Ok((Held::Zero, len));
            }
            len = len.min(size - offset);
            let ext = img.block_status(offset, len)?;
            if ext.length == 0 || ext.length > len {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("block status of {} made no progress", img.path.display()),
                ));
            }
            if ext.flags & EXTENT_ALLOCATED != 0 {
                let held = if ext.flags & EXTENT_ZERO != 0 {
                    Held::Zero
                } else {
                    Held::Data
                };
                return Ok((held, ext.length));
            }
            len = ext.length;
        }
        Ok((Held::Unallocated, len))
    }

    /// Drops every mapping of the top (writers quiesced by the caller), so that it reads
    /// through to its backing file, and makes that durable. Clusters shared with internal
    /// snapshots stay theirs.
    fn empty_top(&self) -> Result<()> {
        while self.inflight.claims() > 0 {
            self.inflight.wait_idle();
        }
        let mut m = self.lock_meta();
        for i in 0..self.view.l1_len() {
            m.drop_l2_table(&self.file, i)?;
        }
        m.writeback(&self.file)
    }
}

impl Image {
    /// Gives the emptied top's free tail back to the host, as qemu-img does for a version-3
    /// image without snapshots or bitmaps (it rewrites such an image to its bare structures):
    /// the file then ends after its last allocated cluster. Only for an image that checks
    /// clean (a lazy-refcounts image still dirty keeps its length), and only once no request
    /// can still read a dropped cluster. Called with writers free to run (a writer waiting
    /// for the gate holds its request open), then quiesces them for the cut.
    fn trim_top(&self) -> Result<()> {
        if self.version < 3 || !self.snapshots().is_empty() || !self.bitmap_directory()?.is_empty()
        {
            return Ok(());
        }
        if !self.wait_readers_of_freed() {
            return Ok(());
        }
        let _gate = self.quiesce();
        while self.inflight.claims() > 0 {
            self.inflight.wait_idle();
        }
        let mut m = self.lock_meta();
        // The check reads the file: everything allocated since the emptying is on disk first.
        m.writeback(&self.file)?;
        let report = check::check_file(&self.file, m.header.clone(), CheckFix::None, None).0?;
        if report.corruptions + report.leaks + report.check_errors != 0 {
            return Ok(());
        }
        if report.image_end_offset < self.file.len()? {
            self.file.set_len(report.image_end_offset)?;
            self.file.sync()?;
        }
        Ok(())
    }

    /// Waits (at most about ten seconds) until every request that started before now has
    /// finished, so that clusters freed so far are read by nobody; false on timeout.
    fn wait_readers_of_freed(&self) -> bool {
        let grace = self.file.grace();
        let tag = grace.current();
        for _ in 0..10_000 {
            if grace.drained(tag) {
                return true;
            }
            {
                // Advances are serialised under the metadata lock.
                let _m = self.lock_meta();
                grace.try_advance();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }
}

/// Whether `wanted` (a name as the user gave it: relative to the working directory, or to
/// the top's directory as backing names are) names the file at `layer`.
fn same_file(top: &Path, wanted: &Path, layer: &Path) -> bool {
    let Ok(layer) = layer.canonicalize() else {
        return wanted == layer;
    };
    let candidates = [
        wanted.to_path_buf(),
        resolve(top, wanted.as_os_str().as_bytes()),
    ];
    candidates
        .iter()
        .any(|c| c.canonicalize().is_ok_and(|c| c == layer))
}
