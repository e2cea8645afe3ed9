//! The hot path of asynchronous requests: a request inside one cluster is mapped here, with
//! the same grace pin as a synchronous request. A read whose L2 entry the lock-free view
//! holds is filled with zeros at once or handed to io_uring; an overwrite of data the image
//! owns, every touched subcluster allocated, goes to io_uring in place; an allocating write
//! whose plan is cheap and simple (metadata mutex free, L2 slice cached and owned, cluster
//! not in flight, no copy-on-write or zero fill: `write::plan_single_alloc`) gets its
//! cluster allocated and claimed here, on the submitting thread, and its data write goes to
//! io_uring (linked when reaped, see `ring`). Everything else (L2 miss, copy-on-write,
//! compressed cluster, backing data, several clusters, unaligned O_DIRECT buffer,
//! writethrough or fenced handle, a busy metadata mutex) goes to the worker pool, which
//! runs the synchronous engine (and publishes the L2 slice it looked up, so the next
//! request of that slice finds it here).

use super::super::write::{abandon_single_alloc, plan_single_alloc, SingleAlloc};
use super::super::Image;
use crate::format::entry::SubclusterState;
use crate::format::GuestOffset;
use crate::storage::Pinned;
use std::os::fd::RawFd;

/// What a read needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadPlan {
    /// The range reads as zeros (zero subclusters, or unallocated without a backing file).
    Zeros,
    /// One host read: descriptor and host offset.
    Host(RawFd, u64),
    /// The synchronous engine must do it.
    Slow,
}

/// Plans a read of `len` bytes into memory at `addr` from guest `offset`. The caller holds
/// a grace pin taken before this call until the I/O has completed (as `Image::read_at`
/// holds one), so the host cluster cannot be reused under the read.
pub(super) fn plan_read(
    img: &Image,
    pinned: &Pinned<'_>,
    offset: u64,
    addr: usize,
    len: usize,
) -> ReadPlan {
    if len == 0 || img.check_not_fenced().is_err() {
        return ReadPlan::Slow;
    }
    let geo = &img.geo;
    let Some(end) = offset.checked_add(len as u64) else {
        return ReadPlan::Slow;
    };
    if end > img.virtual_size() || geo.cluster_start(offset) != geo.cluster_start(end - 1) {
        return ReadPlan::Slow;
    }
    let pos = GuestOffset::new(offset);
    let Some(mapping) = img.view.lookup(pinned, geo, img.version, pos) else {
        return ReadPlan::Slow;
    };
    if super::super::datafile::check_mapping(geo, pos, &mapping).is_err() {
        return ReadPlan::Slow;
    }
    let sub = geo.subcluster_size();
    let sc = pos.subcluster(geo);
    let run_end = geo.cluster_start(offset) + u64::from(sc + mapping.run_from(geo, sc)) * sub;
    if run_end < end {
        return ReadPlan::Slow;
    }
    match mapping.subcluster(geo, sc) {
        SubclusterState::Zero => ReadPlan::Zeros,
        SubclusterState::Unallocated if !img.has_backing() => ReadPlan::Zeros,
        SubclusterState::Data(h) => {
            let host = h.get() + pos.in_cluster(geo) % sub;
            match img.data_file().uring_target() {
                Some((fd, 0)) => ReadPlan::Host(fd, host),
                Some((fd, a)) if (addr | len | host as usize) % a == 0 => ReadPlan::Host(fd, host),
                _ => ReadPlan::Slow,
            }
        }
        _ => ReadPlan::Slow,
    }
}

/// Plans an in-place overwrite of `len` bytes from memory at `addr` at guest `offset`:
/// the descriptor and host offset for io_uring, or `None` for the worker pool. Exactly the
/// synchronous engine's in-place rule (`write::in_place_target`) plus what only a request
/// outliving its call needs: no writethrough (the pool makes those durable before they
/// complete), O_DIRECT alignment, and the overlap guard's check and written-end mark done
/// here (`HostFile::prepare_ring_write`) since the bytes bypass `HostFile::write`.
///
/// The caller holds, from before this call until the write has completed, a grace pin and
/// a registration in the data file's ring writes (which stands for the write gate: control
/// operations exclude it), and marks the dirty bitmaps when this returns a target.
pub(super) fn plan_overwrite(
    img: &Image,
    pinned: &Pinned<'_>,
    offset: u64,
    addr: usize,
    len: usize,
) -> Option<(RawFd, u64)> {
    if len == 0 || img.check_open_for_writes().is_err() || img.mode.writethrough() {
        return None;
    }
    let geo = &img.geo;
    let end = offset.checked_add(len as u64)?;
    if end > img.virtual_size() || geo.cluster_start(offset) != geo.cluster_start(end - 1) {
        return None;
    }
    let pos = GuestOffset::new(offset);
    let host =
        super::super::write::in_place_target(img, pinned, pos, pos.in_cluster(geo), len as u64)?;
    let file = img.data_file();
    let fd = match file.uring_target() {
        Some((fd, 0)) => fd,
        Some((fd, a)) if (addr | len | host.get() as usize) % a == 0 => fd,
        _ => return None,
    };
    // A refusal is reported by the synchronous engine, which runs the same check.
    file.prepare_ring_write(host, len as u64).ok()?;
    Some((fd, host.get()))
}

/// Plans an allocating write of `len` bytes from memory at `addr` at guest `offset` (one
/// cluster, refused by [`plan_overwrite`]) whose data write can go to io_uring: the
/// descriptor, the host offset and the planned allocation (cluster allocated and claimed in
/// flight, see `write::plan_single_alloc`), or `None` for the worker pool with nothing
/// allocated. The overlap guard's check and written-end mark are done here, as for an
/// overwrite.
///
/// The caller holds, from before this call until the allocation is finished (linked or
/// abandoned), a grace pin and a ring-write registration, and marks the dirty bitmaps.
pub(super) fn plan_alloc(
    img: &Image,
    offset: u64,
    addr: usize,
    len: usize,
) -> Option<(RawFd, u64, SingleAlloc)> {
    let file = img.data_file();
    let (fd, align) = file.uring_target()?;
    if align != 0 && (addr | len) % align != 0 {
        return None;
    }
    let planned = plan_single_alloc(img, GuestOffset::new(offset), len as u64, align)?;
    let host = planned.host();
    // The plan refused metadata clusters already: a refusal here is not expected, and the
    // synchronous engine reports it.
    if file.prepare_ring_write(host, len as u64).is_err() {
        abandon_single_alloc(img, planned);
        return None;
    }
    Some((fd, host.get(), planned))
}
