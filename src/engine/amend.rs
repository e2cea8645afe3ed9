//! Offline amend of a qcow2 image's format options, with `qemu-img amend` (QEMU 10) as the
//! oracle: compat 0.10 <-> 1.1, lazy_refcounts and refcount_bits.
//!
//! The image is opened read-write and locked like any writer (a dirty lazy-refcounts image
//! is repaired first, as QEMU's open does), then the changes run in QEMU's order: the
//! upgrade first, the refcount width, lazy refcounts, the downgrade last. Each step is
//! crash-safe on its own: new structures are written and synced before the header points
//! at them, and each header change is one write followed by a sync, so a crash leaves the
//! state before or after the step, at worst with leaked clusters.

use super::amend_refcount::change_refcount_order;
use super::amend_zero::expand_zero_clusters;
use crate::error::{invalid, unsupported, Error, Result};
use crate::format::header::{self, layout, Header, Purpose};
use crate::format::HostOffset;
use crate::storage::{HostFile, LockMode, PosixFile, WriteKind};
use std::path::Path;
use std::sync::Arc;

/// What [`amend`] changes; `None` keeps the current value. `Default` changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// qcow2 version: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    /// The lazy-refcounts compatible feature (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount entry width in bits: a power of two up to 64 (not 16: version 3 only).
    pub refcount_bits: Option<u32>,
    /// New virtual size in bytes (a multiple of 512; smaller sizes shrink, as QEMU's
    /// amend does), applied through [`crate::Image::resize`] after the other changes.
    pub size: Option<u64>,
}

/// Changes the format options of the qcow2 image at `path` like `qemu-img amend -o` (QEMU
/// 10). The image must not be open elsewhere (-EAGAIN otherwise, as every writer).
///
/// Refusals, with QEMU's messages (nothing changed): -EINVAL for an unknown version, a
/// refcount width that is not a power of two up to 64, lazy refcounts or a width other than
/// 16 on version 2, a downgrade with a width other than 16, a narrower width than a cluster's
/// refcount needs; -ENOTSUP for a downgrade of an image with incompatible features other
/// than zstd compression without compressed clusters, with persistent bitmaps or with
/// shared zero-allocated clusters (QEMU 10 leaks, or breaks a snapshot, there; oxcow
/// refuses), or whose refcounts would need more than 2^25 clusters in memory. A downgrade
/// gives zero clusters over a backing file new clusters of zeros, as QEMU does.
/// -EUCLEAN for a corrupt image; -EIO/-ENOSPC from the host file.
pub fn amend(path: &Path, opts: &AmendOptions) -> Result<()> {
    let name = path.display().to_string();
    let mut posix =
        PosixFile::open(path, true, false).map_err(|e| Error::io(format!("opening {name}"), e))?;
    posix.lock(&name, LockMode::ReadWrite)?;
    let file = HostFile::new(Arc::new(posix), name.clone());
    amend_file(&file, opts).map_err(|e| e.with_file(&name))?;
    drop(file); // releases the lock for the resizing open
    if let Some(size) = opts.size {
        let rw = crate::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let img = super::Image::open(path, &rw)?;
        img.resize(size, true)?;
        img.close()?;
    }
    Ok(())
}

/// [`amend`] on an opened and locked host file (tests use simulated files).
pub(super) fn amend_file(file: &HostFile, opts: &AmendOptions) -> Result<()> {
    let name = file.name().to_string();
    let mut h = super::read_header(file, &name)?;
    super::repair_if_dirty(file, &mut h, &name)?;
    super::refuse_unwritable(&h, &name)?;
    let target = opts.version.unwrap_or(h.version);
    let bits = opts.refcount_bits.unwrap_or(h.geometry().refcount_bits());
    validate(&h, opts, target, bits)?;
    if opts.size.is_some_and(|s| s % 512 != 0) {
        return invalid!("The new size must be a multiple of 512");
    }
    if target > h.version {
        h = rewrite_header(file, upgrade)?;
    }
    if bits != h.geometry().refcount_bits() {
        change_refcount_order(file, &h, bits.trailing_zeros())?;
        h = super::read_header(file, &name)?;
    }
    if let Some(lazy) = opts.lazy_refcounts {
        set_lazy_refcounts(file, &mut h, lazy)?;
    }
    if target < h.version {
        expand_zero_clusters(file, &h)?;
        rewrite_header(file, |h| {
            h.version = 2;
            Ok(())
        })?;
    }
    Ok(())
}

/// The checks QEMU makes before changing anything, with its messages.
fn validate(h: &Header, opts: &AmendOptions, target: u32, bits: u32) -> Result<()> {
    if target != 2 && target != 3 {
        return invalid!("Unknown compatibility level {target}");
    }
    if !bits.is_power_of_two() || bits > 64 {
        return invalid!("Refcount width must be a power of two and may not exceed 64 bits");
    }
    // Like QEMU, only a change is checked: keeping lazy refcounts on through a downgrade
    // drops them with the version-3 fields.
    let lazy_now = h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0;
    if opts.lazy_refcounts == Some(true) && !lazy_now && target < 3 {
        return invalid!(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
        );
    }
    if target < h.version {
        return check_downgrade(h, bits);
    }
    if bits != 16 && target < 3 {
        return invalid!(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
        );
    }
    Ok(())
}

/// What a downgrade to version 2 cannot carry.
fn check_downgrade(h: &Header, bits: u32) -> Result<()> {
    if bits != 16 {
        return invalid!("compat=0.10 requires refcount_bits=16");
    }
    let carried = header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT | header::INCOMPAT_COMPRESSION;
    let other = h.incompatible_features & !carried;
    if other != 0 {
        return unsupported!("Cannot downgrade an image with incompatible features {other:#x} set");
    }
    if h.bitmaps.is_some() {
        return unsupported!(
            "Cannot downgrade an image with persistent bitmaps (remove them first: QEMU 10 keeps them on version 2 only as inconsistent, leaking clusters)"
        );
    }
    Ok(())
}

/// Version 3's fields with the values QEMU gives an upgraded image.
fn upgrade(h: &mut Header) -> Result<()> {
    h.version = 3;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.refcount_order = 4;
    h.compression_type = 0;
    h.extra_header_bytes.clear();
    if h.cluster_size() > 4096 {
        h.feature_names = Header::qemu_feature_table();
    }
    Ok(())
}

/// Rewrites cluster 0 from its on-disk state changed by `change`, in one write, and syncs;
/// returns the header now on disk.
pub(super) fn rewrite_header(
    file: &HostFile,
    change: impl FnOnce(&mut Header) -> Result<()>,
) -> Result<Header> {
    let mut h = super::parse_header_cluster(file)?;
    change(&mut h)?;
    let bytes = h.to_cluster0()?;
    // What is written must open again (a version-2 header has no room for the v3 fields).
    Header::parse_for(&bytes, Purpose::Open)?;
    file.write(&bytes, HostOffset::ZERO, WriteKind::Header)?;
    file.sync()?;
    Ok(h)
}

/// Sets or clears the lazy-refcounts bit (version 3 only: validated before).
fn set_lazy_refcounts(file: &HostFile, h: &mut Header, on: bool) -> Result<()> {
    let bits = if on {
        h.compatible_features | header::COMPAT_LAZY_REFCOUNTS
    } else {
        h.compatible_features & !header::COMPAT_LAZY_REFCOUNTS
    };
    if bits == h.compatible_features {
        return Ok(());
    }
    file.write_header_fields(&layout::COMPATIBLE_FEATURES.update(h.version, bits)?)?;
    file.sync()?;
    h.compatible_features = bits;
    Ok(())
}
