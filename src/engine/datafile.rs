//! External data files (incompatible feature bit 2).
//!
//! The image file holds only metadata; guest data lives in another file, where a data
//! cluster's host offset is its guest offset (QEMU maps 1:1) and data clusters have no
//! refcounts. With autoclear bit 1 (`data_file_raw`) the data file is also a valid raw image
//! of the guest disk, and oxcow keeps it one: every guest write lands at its guest offset, and
//! zeroing or discarding writes zeros there too.
//!
//! QEMU 10 resolves a relative data-file name against the current directory, not against the
//! image's directory as it does for backing files (observed: an image whose data file is
//! `d.raw` opens from the directory holding `d.raw` and fails elsewhere); oxcow does the same.

use super::Image;
use crate::error::{corrupt, invalid, Error, Result};
use crate::format::entry::Mapping;
use crate::format::header::Header;
use crate::format::{Geometry, GuestOffset, HostOffset};
use crate::options::OpenOptions;
use crate::storage::{Absent, Backend, HostFile, LockMode, PosixFile, WriteKind};
use std::path::PathBuf;
use std::sync::Arc;

/// The data file's name as the header records it: the extension's bytes up to the first NUL
/// (QEMU reads it as a C string). `None` without the extension or with an empty name.
pub fn recorded_name(header: &Header) -> Option<String> {
    let raw = header.data_file.as_deref()?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    (end > 0).then(|| String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// The lock an open with `opts` takes on the data file: QEMU's data child uses what the
/// image does but shares write (see [`LockMode::DataReadWrite`]).
pub(super) fn lock_mode(opts: &OpenOptions) -> LockMode {
    if opts.writable {
        LockMode::DataReadWrite
    } else if opts.force_share {
        LockMode::ForceShare
    } else {
        LockMode::DataReadOnly
    }
}

/// Opens and locks the data file of an image whose header sets the data-file bit (`None`
/// for other images), with the image's access mode. Errors use QEMU's words.
pub(super) fn open(header: &Header, image: &str, opts: &OpenOptions) -> Result<Option<HostFile>> {
    if !header.has_data_file() {
        return Ok(None);
    }
    let Some(name) = recorded_name(header) else {
        return invalid!("{image}: 'data-file' is required for this image");
    };
    if opts.no_data_file {
        let why = format!("the data file '{name}' is not open (metadata-only open)");
        return Ok(Some(HostFile::new(Arc::new(Absent::new(why)), name)));
    }
    let path = PathBuf::from(&name);
    refuse_self_reference(image, &path)?;
    let mut posix = PosixFile::open(&path, opts.writable, opts.direct)
        .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?;
    posix.lock(&name, lock_mode(opts))?;
    Ok(Some(HostFile::new(Arc::new(posix), name)))
}

/// Refuses a data file that is the image file itself (a hostile header can name it): guest
/// writes would land on the metadata, where the overlap guard of the data file cannot see
/// them. QEMU refuses it through its own locks; this check does not depend on them.
fn refuse_self_reference(image: &str, data: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (std::fs::metadata(image), std::fs::metadata(data)) else {
        return Ok(()); // a missing data file fails its own open with QEMU's message
    };
    if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
        return invalid!(
            "{image}: the data file '{}' is the image itself",
            data.display()
        );
    }
    Ok(())
}

/// QEMU's rule for images with a data file: a data cluster lives at its guest offset in the
/// data file; an entry pointing anywhere else is a corruption (reported with QEMU's words).
pub(super) fn check_mapping(geo: &Geometry, guest: GuestOffset, m: &Mapping) -> Result<()> {
    let expected = data_cluster(geo, guest);
    match *m {
        Mapping::Data { host, .. } if geo.external_data && host != expected => corrupt!(
            "External data file host cluster offset {host:#x} does not match guest cluster offset: {expected:#x}"
        ),
        _ => Ok(()),
    }
}

/// The mapping QEMU gives each cluster of a raw data file at creation and growth: the
/// cluster at its guest offset, with (extended L2) no subcluster marked allocated yet, so
/// that they read as zeros like the fresh data file does.
pub(super) fn raw_mapping(geo: &Geometry, guest: GuestOffset) -> Mapping {
    Mapping::Data {
        host: data_cluster(geo, guest),
        copied: true,
        alloc: if geo.extended_l2 { 0 } else { u32::MAX },
        zero: 0,
    }
}

/// Creates (or truncates) the data file `name` of a new image and gives it the disk's size,
/// as `qemu-img create -o data_file=` does: an existing file loses its contents.
pub(super) fn create_data_file(name: &str, size: u64) -> Result<()> {
    let file = PosixFile::create(std::path::Path::new(name))
        .map_err(|e| Error::io(format!("Could not create '{name}'"), e))?;
    file.set_len(size)
        .and_then(|()| file.sync())
        .map_err(|e| Error::io(format!("Could not resize '{name}'"), e))
}

/// Where a new data cluster for guest offset `guest` goes: the same offset in the data file.
pub(super) fn data_cluster(geo: &Geometry, guest: GuestOffset) -> HostOffset {
    HostOffset::new(guest.cluster_start(geo).get())
}

impl Image {
    /// The host file guest data is read from and written to: the external data file when
    /// the image has one, the image file otherwise.
    pub(crate) fn data_file(&self) -> &HostFile {
        self.data.as_deref().unwrap_or(&self.file)
    }

    /// The external data file, when the image has one (shared with the metadata write-back,
    /// which syncs it before the tables that point into it).
    pub(crate) fn external_data(&self) -> Option<&Arc<HostFile>> {
        self.data.as_ref()
    }

    /// Reopens the data file (if any) in place for a reopen of the image to `writable` with
    /// the image lock `image_mode`; the data file takes the matching data-child lock.
    pub(super) fn reopen_data_file(&self, writable: bool, image_mode: LockMode) -> Result<()> {
        let Some(d) = &self.data else {
            return Ok(());
        };
        let mode = match image_mode {
            LockMode::ReadWrite | LockMode::DataReadWrite => LockMode::DataReadWrite,
            LockMode::ForceShare => LockMode::ForceShare,
            LockMode::ReadOnly | LockMode::DataReadOnly => LockMode::DataReadOnly,
        };
        d.reopen(writable, mode)
    }

    /// Makes the data file (if any) follow a resize from `old` to `new` bytes, as QEMU does:
    /// its length becomes the new virtual size, and a raw data file's new clusters are
    /// mapped 1:1 like the ones made at creation. Called once the new size is in force; a
    /// crash before it leaves a shorter data file (reads past its end are zeros) or unmapped
    /// clusters (zeros too: a raw image has no backing file), so the guest sees the same.
    pub(super) fn resize_data_file(&self, old: u64, new: u64) -> Result<()> {
        let Some(d) = &self.data else {
            return Ok(());
        };
        d.set_len(new)?;
        d.sync()?;
        if new > old && self.data_file_raw() {
            self.map_raw_clusters(old, new)?;
        }
        Ok(())
    }

    /// Maps the unallocated clusters of `[old, new)` (rounded out to clusters) at their guest
    /// offsets, writers quiesced, and writes the tables back.
    fn map_raw_clusters(&self, old: u64, new: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let _gate = self.quiesce();
        let mut m = self.lock_meta();
        let mut pos = GuestOffset::new(old).cluster_start(&geo);
        // Bound: one step per cluster of the grown area.
        while pos.get() < new {
            if let Mapping::Unallocated { zero: 0 } = m.lookup(&self.file, pos)? {
                let table = m.l2_for_write(&self.file, pos.l1_index(&geo))?;
                m.set_mapping(
                    &self.file,
                    table,
                    pos.l2_index(&geo),
                    raw_mapping(&geo, pos),
                )?;
            }
            pos += cs;
        }
        m.writeback(&self.file)
    }

    /// Whether the data file is kept a valid raw image of the guest disk (autoclear bit 1).
    pub(crate) fn data_file_raw(&self) -> bool {
        self.data.is_some() && self.lock_meta().header.data_file_raw()
    }

    /// Makes `[offset, offset+len)` of a raw data file read as zeros, so that it stays equal
    /// to the guest disk when the metadata says these bytes read as zeros. A no-op for other
    /// images.
    pub(super) fn zero_raw_data(&self, offset: GuestOffset, len: u64) -> Result<()> {
        if !self.data_file_raw() {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let file = self.data_file();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = HostOffset::new((offset + done).get());
            file.write(&zeros[..n as usize], at, WriteKind::Data)?;
            done += n;
        }
        Ok(())
    }

    /// discard=unmap on an image with an external data file: gives the host blocks of
    /// `[offset, offset+len)` of the data file back to the file system, as QEMU passes a
    /// guest discard through to its data file (data-file clusters have no refcounts, so the
    /// punch of freed clusters never sees them). Done before the metadata changes, like
    /// [`Self::zero_raw_data`]: a concurrent write to these clusters is ordered by the
    /// in-flight claims the metadata update waits for. True when the range was punched (it
    /// then reads as zeros); false without a data file, without discard=unmap, or where
    /// the file system cannot punch.
    pub(super) fn unmap_data(&self, offset: GuestOffset, len: u64) -> Result<bool> {
        let Some(d) = &self.data else {
            return Ok(false);
        };
        if !self.lock_meta().rc.punches_freed() {
            return Ok(false);
        }
        d.punch_hole(HostOffset::new(offset.get()), len)
    }

    /// Refuses what QEMU refuses on images with an external data file (compressed clusters,
    /// internal snapshots): `-ENOTSUP` naming `what`.
    pub(super) fn refuse_with_data_file(&self, what: &str) -> Result<()> {
        if self.data.is_some() {
            return Err(Error::unsupported(format!(
                "{}: {what} is not supported with an external data file",
                self.path.display()
            )));
        }
        Ok(())
    }
}
