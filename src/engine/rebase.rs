//! Rebase on a live read-write handle, with `qemu-img rebase` (QEMU 10) as the oracle.
//!
//! Safe mode keeps the guest-visible content: wherever this image is unallocated, the old
//! chain's bytes are compared with the new chain's, granule by granule (the subcluster, as
//! QEMU's write alignment), and where they differ the old bytes are written into this image.
//! Like QEMU, a granule wholly past the end of the old backing file is written as a zero
//! write (a zero cluster on version 3), any other as data, zeros included. Data is written
//! under the quiesced gate, one extent at a time, so guest writers are held only briefly;
//! readers are never blocked, and read the same bytes from the old chain or from the copy.
//!
//! The switch is last: everything written is flushed and synced, then cluster 0 is rewritten
//! in one write with the new backing name and format (extensions laid out again, so a longer
//! name fits wherever QEMU's does), synced, and the open backing file is replaced with
//! writers quiesced. A crash before the header write leaves the old chain and copies that
//! read the same as what they cover; after it, the new chain. Unsafe mode only switches.
//!
//! Where oxcow departs from QEMU 10: a version-2 image without a backing file gets its
//! zeros as data where the new chain has data (QEMU's zero write is a no-op there, so the
//! new data shows through); a missing backing format is refused before anything is copied
//! (QEMU copies, then refuses). Resizes and other rebases are serialised with a rebase; an
//! internal snapshot applied on the same handle while a safe rebase copies is not detected.

use super::backing::Backing;
use super::{read, write, zero, Image};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{Header, MAX_BACKING_NAME};
use crate::format::{GuestOffset, HostOffset};
use crate::options::{BackingFormat, OpenOptions, EXTENT_ALLOCATED};
use crate::storage::{HostFile, Pinned, WriteKind};

/// Guest bytes examined per step of the copy: bounds the buffers (two of this size) and
/// how long guest writers wait at the gate.
const STEP: u64 = 1 << 20;

/// Format names QEMU knows for a backing file; an unsafe rebase may record any of them
/// (QEMU refuses others with "Invalid format name"). Only qcow2 and raw can be opened.
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

impl Image {
    /// Changes the backing file to `backing` (name as stored in the header, relative names
    /// being relative to this image's directory, and format), or removes it (`None`), like
    /// `qemu-img rebase` (QEMU 10).
    ///
    /// * Safe mode (`unsafe_mode` false): guest-visible content is unchanged. The new backing
    ///   file is opened first; where this image is unallocated and the old and new chains
    ///   differ, the old bytes are copied into this image (see the module documentation).
    ///   Removing the backing file copies every non-zero byte of the old chain.
    /// * Unsafe mode: only the header changes. The new backing file is opened for this handle
    ///   unless the handle was opened without its chain (`no_backing`), in which case it is
    ///   not needed and may be missing.
    ///
    /// Errors: -EINVAL for an unknown format name, a name longer than 1023 bytes or an empty
    /// name; -ENOTSUP for a format oxcow cannot read in safe mode, or a safe rebase of a
    /// handle opened without its chain; -ENOSPC when the name and header extensions do not
    /// fit in cluster 0 (nothing changed); errors opening the new backing file (nothing
    /// changed); -EROFS read-only; -ENOMEDIUM fenced; -EIO/-ENOSPC from the host file (the
    /// image keeps its old chain; copied clusters read as what they covered).
    pub fn rebase(&self, backing: Option<(&str, &str)>, unsafe_mode: bool) -> Result<()> {
        self.check_writable()?;
        // Serialised with resizes and other rebases: the copy walks the current size.
        let _serial = self.view.resizing();
        let r = self.rebase_serialised(backing, unsafe_mode);
        self.finish(r)
    }

    fn rebase_serialised(&self, backing: Option<(&str, &str)>, unsafe_mode: bool) -> Result<()> {
        if let Some((name, fmt)) = backing {
            check_target(name, fmt, unsafe_mode)?;
        }
        let target = backing.map(|(n, f)| (n.as_bytes(), f));
        // Refuse before copying anything what the header cannot hold.
        planned_header(&self.file, target)?;
        if !unsafe_mode && self.mode.no_backing && self.lock_meta().header.backing_file.is_some() {
            return Err(Error::unsupported(
                "a safe rebase needs the old backing file, and this image was opened without its backing chain",
            ));
        }
        let new = self.open_new_backing(backing, unsafe_mode)?;
        if !unsafe_mode {
            let old = self.backing();
            self.copy_differences(old.as_deref(), new.as_ref())?;
        }
        self.switch_backing(target, new)
    }

    /// Opens the new backing file for this handle (`None` when there is none, or when an
    /// unsafe rebase on a handle without its chain does not need it).
    fn open_new_backing(
        &self,
        backing: Option<(&str, &str)>,
        unsafe_mode: bool,
    ) -> Result<Option<Backing>> {
        let Some((name, fmt)) = backing else {
            return Ok(None);
        };
        if unsafe_mode && self.mode.no_backing {
            return Ok(None);
        }
        let opts = OpenOptions {
            no_probe: true,
            ..OpenOptions::default()
        };
        Backing::open(&self.path, name.as_bytes(), Some(fmt), 0, &opts)
            .map(Some)
            .map_err(|e| {
                let msg = format!("Could not open new backing file '{name}': {e}");
                e.with_message(msg)
            })
    }

    /// Copies into this image, wherever it is unallocated, the old chain's bytes that the
    /// new chain would show differently.
    fn copy_differences(&self, old: Option<&Backing>, new: Option<&Backing>) -> Result<()> {
        let size = self.virtual_size();
        let mut off = 0u64;
        // Bound: every step advances by the extent's length (at least one byte).
        while off < size {
            let pin = self.file.grace().pin();
            let _gate = self.quiesce();
            self.wait_rebase_claims();
            let ext = read::block_status(
                self,
                &pin.pinned(),
                GuestOffset::new(off),
                (size - off).min(STEP),
            )?;
            if ext.flags & EXTENT_ALLOCATED == 0 {
                self.copy_run(&pin.pinned(), off, ext.length, old, new)?;
            }
            off += ext.length.max(1);
        }
        Ok(())
    }

    /// Compares `[start, start+len)` (unallocated here) granule by granule and writes the
    /// differing granules, merged into runs of the same kind.
    fn copy_run(
        &self,
        pinned: &Pinned<'_>,
        start: u64,
        len: u64,
        old: Option<&Backing>,
        new: Option<&Backing>,
    ) -> Result<()> {
        let gran = self.geo.subcluster_size();
        let old_size = old.map_or(0, Backing::size);
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        if let Some(o) = old {
            o.read(&mut a, start)?;
        }
        if let Some(n) = new {
            n.read(&mut b, start)?;
        }
        let mut pending: Option<(u64, u64, bool)> = None; // (start, end, as zeros)
        let mut pos = start;
        while pos < start + len {
            let end = GuestOffset::new(pos + 1)
                .align_up(gran)
                .get()
                .min(start + len);
            let (i, j) = ((pos - start) as usize, (end - start) as usize);
            if a[i..j] != b[i..j] {
                let zeros = pos >= old_size;
                pending = match pending {
                    Some((s, e, z)) if e == pos && z == zeros => Some((s, end, z)),
                    Some(p) => {
                        self.write_copy(pinned, p, start, &a)?;
                        Some((pos, end, zeros))
                    }
                    None => Some((pos, end, zeros)),
                };
            }
            pos = end;
        }
        if let Some(p) = pending {
            self.write_copy(pinned, p, start, &a)?;
        }
        Ok(())
    }

    /// Writes one run found by [`Self::copy_run`]: zeros past the old backing's end, the old
    /// bytes (`old` holds them from `base` on) elsewhere.
    fn write_copy(
        &self,
        pinned: &Pinned<'_>,
        (s, e, zeros): (u64, u64, bool),
        base: u64,
        old: &[u8],
    ) -> Result<()> {
        if zeros {
            // Zero clusters even when no backing file is open yet: one is about to be.
            zero::write_zeroes_as(self, GuestOffset::new(s), e - s, false, true)
        } else {
            let bytes = &old[(s - base) as usize..(e - base) as usize];
            write::write(self, pinned, bytes, GuestOffset::new(s))
        }
    }

    /// Waits until no allocation is between plan and link (the gate is held: none starts).
    fn wait_rebase_claims(&self) {
        while self.inflight.claims() > 0 {
            self.inflight.wait_idle();
        }
    }

    /// Makes everything written durable, rewrites cluster 0 with the new backing fields
    /// and switches the handle's backing file, with writers quiesced throughout.
    fn switch_backing(&self, target: Option<(&[u8], &str)>, new: Option<Backing>) -> Result<()> {
        let _gate = self.quiesce();
        self.wait_rebase_claims();
        let mut m = self.lock_meta();
        m.writeback(&self.file)?;
        self.file.sync()?;
        let h = write_backing_header(&self.file, target)?;
        m.header.backing_file = h.backing_file;
        m.header.backing_format = h.backing_format;
        m.header.backing_file_offset = h.backing_file_offset;
        m.header.backing_file_size = h.backing_file_size;
        m.header.header_length = h.header_length;
        drop(m);
        self.replace_backing(new);
        Ok(())
    }
}

/// Whether QEMU knows `fmt` as a format name (what `qemu-img rebase -F` accepts; only
/// qcow2 and raw can be read by oxcow).
pub fn is_known_backing_format(fmt: &str) -> bool {
    QEMU_FORMATS.contains(&fmt)
}

/// Validates a new backing name and format as QEMU does before anything changes.
fn check_target(name: &str, fmt: &str, unsafe_mode: bool) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(
            "an empty backing file name removes the backing file: pass no backing instead",
        ));
    }
    if name.len() > MAX_BACKING_NAME as usize {
        return Err(Error::invalid(format!(
            "Invalid argument: the backing file name has {} bytes (at most {MAX_BACKING_NAME})",
            name.len()
        )));
    }
    if !is_known_backing_format(fmt) {
        return Err(Error::invalid(format!("Invalid format name: '{fmt}'")));
    }
    if !unsafe_mode && BackingFormat::from_name(fmt).is_none() {
        return Err(Error::unsupported(format!(
            "backing file format '{fmt}' is not supported (a safe rebase reads the new backing file: qcow2 or raw)"
        )));
    }
    Ok(())
}

/// Cluster 0 as it is on disk now, with the backing fields replaced by `target` (`None`
/// removes both), laid out again; the header and its bytes. Fails with -ENOSPC when the
/// name and the header extensions do not fit in the cluster.
fn planned_header(file: &HostFile, target: Option<(&[u8], &str)>) -> Result<(Header, Vec<u8>)> {
    let mut h = super::parse_header_cluster(file)?;
    h.backing_file = target.map(|(n, _)| n.to_vec());
    h.backing_format = target.map(|(_, f)| f.to_string());
    let bytes = h.to_cluster0().map_err(|e| {
        Error::new(
            ErrorKind::NoSpace,
            format!("No space left in the file header ({})", e.message()),
        )
    })?;
    Ok((h, bytes))
}

/// Rewrites cluster 0 with the backing fields replaced by `target`, in one write, and syncs;
/// returns the header now on disk. The rest of cluster 0 is taken from disk, so that bits
/// the engine changed there in place (the dirty bit) are kept. Also used by amend.
pub(super) fn write_backing_header(
    file: &HostFile,
    target: Option<(&[u8], &str)>,
) -> Result<Header> {
    let (h, bytes) = planned_header(file, target)?;
    file.write(&bytes, HostOffset::ZERO, WriteKind::Header)?;
    file.sync()?;
    Ok(h)
}
