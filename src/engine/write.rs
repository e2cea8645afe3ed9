//! The write path.
//!
//! A write is cut into batches that stay within one L2 table. For each batch:
//! 1. plan (metadata lock held): look up every cluster; overwrites of clusters the image owns
//!    go in place; everything else gets a target cluster (newly allocated, or the existing one
//!    for preallocated zero clusters and partially allocated extended-L2 clusters) and is
//!    registered in flight so that no other writer touches that guest cluster meanwhile;
//! 2. I/O (no lock): copy-on-write fill from the old contents, data writes;
//! 3. link (lock held): point the L2 entries at the new clusters and queue the old clusters
//!    for release once that change is durable.
//!
//! On an I/O error before linking, newly allocated clusters are given back.

use super::inflight::Claim;
use super::mapview::DataProbe;
use super::{read, Image};
use crate::error::Result;
use crate::format::entry::{Mapping, SubclusterState};
use crate::format::geometry::SUBCLUSTERS;
use crate::format::{Geometry, GuestOffset, HostOffset};
use crate::storage::{Pinned, WriteKind};

/// What to do for one guest cluster of a batch.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Overwrite data the image owns: write the request bytes at `host + start`.
    InPlace { host: HostOffset },
    /// Write into `host` and link `new` when done.
    Link {
        /// Target host cluster.
        host: HostOffset,
        /// Allocated by this batch (give back on error).
        fresh: bool,
        /// The host cluster is known to read as zeros (it lies past everything ever written
        /// to the file): bytes that are to be zero need no write.
        zeroed: bool,
        /// Mapping before the write (fill source, references to drop).
        old: Mapping,
        /// Subclusters written in full, filled from `old` where the request does not cover.
        fill_mask: u32,
        /// Mapping after the write.
        new: Mapping,
    },
}

#[derive(Debug, Clone, Copy)]
struct Op {
    /// Guest offset of the cluster.
    guest: GuestOffset,
    /// First byte of the request inside the cluster.
    start: u64,
    /// Request bytes inside the cluster.
    len: u64,
    /// Offset of those bytes in the caller's buffer.
    buf_off: usize,
    action: Action,
}

/// Writes `buf` at guest `offset` (range already checked), for a request inside the write
/// gate and pinned in the image file's grace periods (`pinned`) until its writes are done.
// Inlined into the request entry points: only the common case is here.
#[inline(always)]
pub fn write(img: &Image, pinned: &Pinned<'_>, buf: &[u8], offset: GuestOffset) -> Result<()> {
    // The common request: within one cluster the image owns, mapped by a cached slice. One
    // host write, without the batch machinery (a sixth of a 4 KiB overwrite's instructions).
    let start = offset.in_cluster(&img.geo);
    let single = start + buf.len() as u64 <= img.geo.cluster_size();
    if single && !buf.is_empty() {
        if let Some(host) = in_place_target(img, pinned, offset, start, buf.len() as u64) {
            return img.data_file().write(buf, host, WriteKind::Data);
        }
    }
    // The probe above just failed for the first cluster: its batch goes straight to step 1.
    write_batches(img, pinned, buf, offset, !single)
}

/// [`write`] past its fast path: batch after batch, the first one probing the in-place
/// path only if `probe`.
#[inline(never)]
fn write_batches(
    img: &Image,
    pinned: &Pinned<'_>,
    buf: &[u8],
    offset: GuestOffset,
    mut probe: bool,
) -> Result<()> {
    let mut done = 0usize;
    // Bound: every batch writes at least one byte (one cluster's share, or what the in-place
    // path managed), so this runs at most once per cluster of the request. The check turns
    // a batch that made no progress into an error instead of a spin.
    while done < buf.len() {
        let n = write_batch(img, pinned, &buf[done..], offset + done as u64, probe)?;
        probe = true;
        if n == 0 {
            return Err(crate::error::Error::corrupt(format!(
                "write at {:#x} made no progress",
                offset + done as u64
            )));
        }
        done += n;
    }
    Ok(())
}

fn all_subclusters(geo: &Geometry) -> u32 {
    if geo.extended_l2 {
        u32::MAX
    } else {
        1
    }
}

/// Subclusters touched by `[start, start+len)` inside a cluster.
fn touched_mask(geo: &Geometry, start: u64, len: u64) -> u32 {
    if !geo.extended_l2 {
        return 1;
    }
    let sub = geo.subcluster_size();
    let first = (start / sub) as u32;
    let last = ((start + len - 1) / sub) as u32;
    Geometry::subcluster_mask(first, last)
}

/// Decides the action for one cluster given its current mapping. `alloc` is called when a
/// fresh cluster is needed.
fn decide(
    geo: &Geometry,
    old: Mapping,
    start: u64,
    len: u64,
    alloc: &mut dyn FnMut() -> Result<HostOffset>,
) -> Result<Action> {
    let touched = touched_mask(geo, start, len);
    let all = all_subclusters(geo);
    Ok(match old {
        Mapping::Data {
            host,
            copied: true,
            alloc: a,
            zero: z,
        } => {
            if touched & !a == 0 {
                Action::InPlace { host }
            } else {
                Action::Link {
                    host,
                    fresh: false,
                    zeroed: false,
                    old,
                    fill_mask: touched & !a,
                    new: Mapping::Data {
                        host,
                        copied: true,
                        alloc: a | touched,
                        zero: z & !touched,
                    },
                }
            }
        }
        Mapping::Zero { host, copied: true } if host != HostOffset::ZERO => Action::Link {
            host,
            fresh: false,
            zeroed: false,
            old,
            fill_mask: all,
            new: Mapping::Data {
                host,
                copied: true,
                alloc: all,
                zero: 0,
            },
        },
        _ => {
            let host = alloc()?;
            let (fill_mask, new_alloc, new_zero) = match old {
                Mapping::Unallocated { zero } => (touched, touched, zero & !touched),
                Mapping::Data {
                    alloc: a, zero: z, ..
                } => (touched | a, a | touched, z & !touched),
                _ => (all, all, 0),
            };
            let (fill_mask, new_alloc) = if geo.extended_l2 {
                (fill_mask, new_alloc)
            } else {
                (1, u32::MAX)
            };
            Action::Link {
                host,
                fresh: true,
                zeroed: false,
                old,
                fill_mask,
                new: Mapping::Data {
                    host,
                    copied: true,
                    alloc: new_alloc,
                    zero: new_zero,
                },
            }
        }
    })
}

/// Where `len` bytes at guest `pos` (byte `start` of its cluster; the range within the
/// cluster) can be overwritten in place, from the lock-free view alone: the host offset
/// when the cluster is data this image owns (COPIED) with every touched subcluster
/// allocated; `None` when the full write path must
/// decide (L2 not cached, shared, compressed, zero or unallocated subclusters). The caller
/// holds the write gate (or a ring-write registration) and a grace pin from before the
/// lookup until its write has completed.
// Inlined: it is the synchronous overwrite's per-cluster step.
#[inline(always)]
pub(super) fn in_place_target(
    img: &Image,
    pinned: &Pinned<'_>,
    pos: GuestOffset,
    start: u64,
    len: u64,
) -> Option<HostOffset> {
    let geo = img.geo;
    if !geo.extended_l2 && !geo.external_data {
        // The common geometry: the raw entry answers (no decoding, nothing to check).
        return match img.view.probe_owned_data(pinned, &geo, pos) {
            DataProbe::Data(host) => Some(host + start),
            DataProbe::Uncached | DataProbe::Other => None,
        };
    }
    match img.view.lookup(pinned, &geo, img.version, pos) {
        Some(Mapping::Data {
            host,
            copied: true,
            alloc,
            ..
        }) if touched_mask(&geo, start, len) & !alloc == 0
            && super::datafile::check_mapping(
                &geo,
                pos,
                &Mapping::Data {
                    host,
                    copied: true,
                    alloc,
                    zero: 0,
                },
            )
            .is_ok() =>
        {
            Some(host + start)
        }
        _ => None,
    }
}

/// The lock-free fast path: while the clusters from `offset` on are data this image owns
/// (COPIED) with every touched subcluster allocated, the bytes go in place with no metadata
/// mutex and nothing to link; host-contiguous clusters are written with one call. Returns how
/// many bytes it wrote (0 when the first cluster needs the full path); the caller handles the
/// rest, so stopping early is fine.
fn write_in_place(
    img: &Image,
    pinned: &Pinned<'_>,
    buf: &[u8],
    offset: GuestOffset,
    end: GuestOffset,
) -> Result<usize> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut out = HostWrites::new(img, buf);
    let mut pos = offset;
    while pos < end {
        let start = pos.in_cluster(&geo);
        let len = (cs - start).min(end.since(pos));
        let Some(host) = in_place_target(img, pinned, pos, start, len) else {
            break;
        };
        // Within the request, so it fits the buffer.
        let b = pos.since(offset) as usize;
        out.range(host, b, len as usize)?;
        pos += len;
    }
    out.flush()?;
    Ok(pos.since(offset) as usize)
}

/// One batch of [`write`] from `offset`: the in-place path first (unless `probe` is false:
/// the caller just found the first cluster needs step 1), then steps 1-3; back to the
/// in-place path when step 1 waited out another writer's allocation of the first cluster.
fn write_batch(
    img: &Image,
    pinned: &Pinned<'_>,
    buf: &[u8],
    offset: GuestOffset,
    mut probe: bool,
) -> Result<usize> {
    let end = offset.l2_range_end(&img.geo).min(offset + buf.len() as u64);
    // Bound: planning comes back empty only after waiting out another writer's allocation
    // of the first cluster, which the probe then finds mapped, unless that writer failed:
    // this one then claims the cluster and plans it.
    loop {
        if probe {
            let n = write_in_place(img, pinned, buf, offset, end)?;
            if n > 0 {
                return Ok(n);
            }
        }
        let mut ops = SPARE_OPS.take();
        let done = plan(img, offset, end, &mut ops).and_then(|()| {
            if ops.is_empty() {
                return Ok(0);
            }
            let io = do_io(img, buf, &ops);
            complete(img, &ops, io)?;
            // The batch lies within the request, so its length fits the buffer.
            Ok(ops.iter().map(|o| o.len).sum::<u64>() as usize)
        });
        if ops.capacity() <= KEEP_OPS {
            ops.clear();
            SPARE_OPS.set(ops);
        }
        match done {
            Ok(0) => probe = true,
            done => return done,
        }
    }
}

/// Most ops a thread keeps room for between batches (larger lists are freed).
const KEEP_OPS: usize = 16;

thread_local! {
    /// The op list of this thread's last batch, empty, for its next one: a new list per
    /// batch was an allocation and a free per allocating write (a tenth of its
    /// instructions, callgrind).
    static SPARE_OPS: std::cell::Cell<Vec<Op>> = const { std::cell::Cell::new(Vec::new()) };
}

/// After a planned batch's I/O (`io`, its outcome): on success step 3, then the claims
/// are released; on an I/O or link error the batch is abandoned (fresh clusters given
/// back, claims released) and the error returned. Shared by the synchronous path and the
/// asynchronous queue's ring path ([`finish_single_alloc`]), which do the I/O in between
/// differently.
fn complete(img: &Image, ops: &[Op], io: Result<()>) -> Result<()> {
    if let Err(e) = io {
        let mut m = img.lock_meta();
        abandon(img, &mut m, ops);
        return Err(e);
    }
    if ops.iter().any(|o| matches!(o.action, Action::Link { .. })) {
        let mut m = img.lock_meta();
        if let Err(e) = link(img, &mut m, ops) {
            abandon(img, &mut m, ops);
            return Err(img.on_error(e));
        }
        drop(m);
        release_claims(img, ops);
    }
    Ok(())
}

/// An allocating write of one cluster planned so that its only host write is the caller's
/// bytes, at [`SingleAlloc::host`] (see [`plan_single_alloc`]). Its target cluster is
/// allocated (or, for a subcluster allocation, owned) and the guest cluster claimed in
/// flight until it is passed to [`finish_single_alloc`] or [`abandon_single_alloc`].
#[must_use = "a planned allocation holds a cluster and a claim until finished or abandoned"]
pub(super) struct SingleAlloc {
    ops: [Op; 1],
}

impl SingleAlloc {
    /// Where the caller's bytes go on the host.
    pub(super) fn host(&self) -> HostOffset {
        let op = &self.ops[0];
        match op.action {
            Action::InPlace { host } | Action::Link { host, .. } => host + op.start,
        }
    }
}

/// Plans an allocating write of `len` bytes at guest `offset`, all inside one cluster, for
/// a thread that must neither wait for the disk nor for another writer (the asynchronous
/// queue's owner submitting to io_uring): `None` (nothing allocated, nothing claimed) unless
/// every step is cheap and the result simple. The handle is writable, not writethrough,
/// not fenced; the metadata mutex is free (`try_lock`); no other writer has the cluster in
/// flight; its L2 table is owned and its slice cached ([`super::meta::Meta::maps_from_cache`]);
/// the plan is exactly step 1 of the synchronous path (the same `plan_cluster`: allocation,
/// `reads_as_zeros_from`, metadata refusal; but a target past the file's grown length is
/// left to the pool, which grows the file) and yields one Link whose host
/// write is only the request's bytes (no copy-on-write read, no backing data, no explicit
/// zero fill: [`writes_only_request`]), at a host offset that is a multiple of `align`
/// (O_DIRECT; 0: any).
///
/// The caller holds, from before this call until [`finish_single_alloc`] returns, what a
/// synchronous writer holds for its call: a grace pin and (standing for the write gate) a
/// registration in the data file's ring writes; it marks the dirty bitmaps.
pub(super) fn plan_single_alloc(
    img: &Image,
    offset: GuestOffset,
    len: u64,
    align: usize,
) -> Option<SingleAlloc> {
    if len == 0 || img.check_open_for_writes().is_err() || img.mode.writethrough() {
        return None;
    }
    let geo = img.geo;
    let start = offset.in_cluster(&geo);
    if start + len > geo.cluster_size() {
        return None;
    }
    let gidx = offset.cluster(&geo);
    let mut m = img.meta.try_lock().ok()?;
    if img.inflight.is_claimed(gidx) || !m.maps_from_cache(offset) {
        return None;
    }
    // An error is left for the synchronous engine to meet again and report.
    let action = plan_cluster(img, &mut m, offset, start, len, Grow::Never).ok()?;
    let ops = [Op {
        guest: offset.cluster_start(&geo),
        start,
        len,
        buf_off: 0,
        action,
    }];
    if matches!(action, Action::InPlace { .. }) {
        return None;
    }
    let planned = SingleAlloc { ops };
    let aligned = align == 0 || planned.host().get() % align as u64 == 0;
    let cluster_end = HostOffset::new(planned.host().get() - start) + geo.cluster_size();
    let must_grow = img.data_file().grow_ahead_pending(cluster_end);
    if !aligned || must_grow || !writes_only_request(img, &planned.ops[0]) {
        // Not claimed yet: this gives the fresh cluster back.
        abandon(img, &mut m, &planned.ops);
        return None;
    }
    // Claimed under the metadata mutex after the check above: cannot find it busy.
    let _ = img.inflight.try_claim(gidx);
    Some(planned)
}

/// Finishes an allocation from [`plan_single_alloc`] whose host write had outcome `io`:
/// links it (metadata mutex) and releases its claim, or, on an error, gives its cluster
/// back and releases the claim; returns the error as the synchronous write would (before
/// `Image::finish`).
pub(super) fn finish_single_alloc(img: &Image, planned: SingleAlloc, io: Result<()>) -> Result<()> {
    complete(img, &planned.ops, io)
}

/// Gives back an allocation from [`plan_single_alloc`] whose write did not happen or must
/// be redone from scratch (a short write re-run on the synchronous engine, which plans
/// again): cluster given back, claim released.
pub(super) fn abandon_single_alloc(img: &Image, planned: SingleAlloc) {
    let mut m = img.lock_meta();
    abandon(img, &mut m, &planned.ops);
}

/// The last subcluster of the run of subclusters of `fill_mask` that starts at `first`
/// (of `n` subclusters).
fn run_end(fill_mask: u32, n: u32, first: u32) -> u32 {
    let mut last = first;
    while last + 1 < n && fill_mask & (1u32 << (last + 1)) != 0 {
        last += 1;
    }
    last
}

/// Whether the host writes [`cluster_pieces`] produces for `op` are exactly the request's
/// bytes at their place in the target cluster, decided without I/O: every run of
/// subclusters written in full is covered by the request, or needs a fill of zeros where
/// the host already reads as zeros (`zeroed`), so `cluster_pieces` would neither read,
/// nor zero, nor write anything but the request.
fn writes_only_request(img: &Image, op: &Op) -> bool {
    let Action::Link {
        zeroed,
        old,
        fill_mask,
        ..
    } = op.action
    else {
        return false;
    };
    let geo = img.geo;
    let sub = geo.subcluster_size();
    let n = if geo.extended_l2 { SUBCLUSTERS } else { 1 };
    let (rs, re) = (op.start, op.start + op.len);
    let mut sc = 0;
    while sc < n {
        if fill_mask & (1u32 << sc) == 0 {
            sc += 1;
            continue;
        }
        let last = run_end(fill_mask, n, sc);
        let (a, b) = (u64::from(sc) * sub, u64::from(last + 1) * sub);
        let covered = rs <= a && b <= re;
        if !(covered || zeroed && fill_is_zero(img, old, sc, last)) {
            return false;
        }
        sc = last + 1;
    }
    true
}

/// Step 1, under the metadata mutex: an action per cluster of `[offset, end)` into `ops`
/// (empty; stopping early at a cluster another writer is allocating, once there is
/// something to do), with fresh clusters allocated and claimed in flight. Leaves `ops`
/// empty when the first cluster was being allocated by another writer: it has waited for
/// that writer to link it, and the caller's lock-free probe now finds it in place without
/// planning again under the mutex (every sixteenth write of two sequential writers).
fn plan(img: &Image, offset: GuestOffset, end: GuestOffset, ops: &mut Vec<Op>) -> Result<()> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut m = img.lock_meta();
    let mut pos = offset;
    while pos < end {
        let cluster = pos.cluster_start(&geo);
        let gidx = pos.cluster(&geo);
        // Claimed before it is planned (claims are made under the metadata mutex, so a busy
        // cluster is one an earlier batch is still writing); given back below if it turns
        // out to be an overwrite in place, which needs no claim.
        if img.inflight.try_claim(gidx) == Claim::Busy {
            if !ops.is_empty() {
                break;
            }
            // Another writer is allocating this cluster: wait (without the mutex) until it is
            // linked; the caller then finds it allocated.
            drop(m);
            img.wait_claim_released(gidx);
            return Ok(());
        }
        let start = pos.since(cluster);
        let len = (cs - start).min(end.since(pos));
        let action = match plan_cluster(img, &mut m, pos, start, len, Grow::Now) {
            Ok(a) => a,
            Err(e) => {
                img.inflight.release(gidx);
                abandon(img, &mut m, ops);
                return Err(img.on_error(e));
            }
        };
        if let Action::InPlace { .. } = action {
            img.inflight.release(gidx);
        }
        ops.push(Op {
            guest: cluster,
            start,
            len,
            // Within the request, so it fits the buffer.
            buf_off: pos.since(offset) as usize,
            action,
        });
        pos += len;
    }
    Ok(())
}

/// Whether planning a cluster may grow the host file ahead of the allocator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grow {
    /// Yes (`HostFile::grow_ahead`).
    Now,
    /// No: the caller must not wait for the device, and refuses a target that needs it.
    Never,
}

/// The action for the cluster holding `pos`, request bytes `[start, start+len)` of it.
fn plan_cluster(
    img: &Image,
    m: &mut super::meta::Meta,
    pos: GuestOffset,
    start: u64,
    len: u64,
    grow: Grow,
) -> Result<Action> {
    let old = m.lookup(&img.file, pos)?;
    super::datafile::check_mapping(&img.geo, pos, &old)?;
    let file = &img.file;
    let external = img.geo.external_data;
    let mut alloc = || {
        if external {
            Ok(super::datafile::data_cluster(&img.geo, pos))
        } else {
            m.rc.alloc(file, 1)
        }
    };
    let mut action = decide(&img.geo, old, start, len, &mut alloc)?;
    if let Action::Link { host, zeroed, .. } = &mut action {
        // Decided under the metadata lock for a cluster only this batch may write (freshly
        // allocated, or owned and claimed in flight): it stays true until the batch writes it.
        let data = img.data_file();
        *zeroed = data.reads_as_zeros_from(*host);
        data.count_as_written(*host + img.geo.cluster_size());
        // The data write then fills a hole inside the file's length (no extending write).
        if grow == Grow::Now {
            data.grow_ahead(*host + img.geo.cluster_size());
        }
    }
    not_metadata(img, &img.geo, action)
}

/// Refuses, before any I/O, a write whose target cluster holds metadata (the host file's
/// guard would stop the write itself; failing at plan time keeps the batch clean).
fn not_metadata(img: &Image, geo: &Geometry, a: Action) -> Result<Action> {
    let host = match a {
        Action::InPlace { host } | Action::Link { host, .. } => host,
    };
    img.data_file()
        .guard()
        .check_write(host.get(), geo.cluster_size(), None)
        .map(|()| a)
}

fn link(img: &Image, m: &mut super::meta::Meta, ops: &[Op]) -> Result<()> {
    let geo = img.geo;
    let Some(first) = ops.first() else {
        return Ok(());
    };
    let table = m.l2_for_write(&img.file, first.guest.l1_index(&geo))?;
    for op in ops {
        if let Action::Link {
            fresh, old, new, ..
        } = op.action
        {
            m.set_mapping(&img.file, table, op.guest.l2_index(&geo), new)?;
            if fresh {
                m.release(old);
            }
        }
    }
    Ok(())
}

/// Releases the in-flight claims of a batch: only its Link operations hold one (an in-place
/// operation on a cluster may coexist with another writer's claim of that cluster).
fn release_claims(img: &Image, ops: &[Op]) {
    for op in ops {
        if let Action::Link { .. } = op.action {
            img.inflight.release(op.guest.cluster(&img.geo));
        }
    }
}

/// Gives back the fresh clusters of a failed batch and clears its in-flight claims. Clusters
/// that were already linked are not given back (their L2 entries may be written).
fn abandon(img: &Image, m: &mut super::meta::Meta, ops: &[Op]) {
    for op in ops {
        if let Action::Link {
            host, fresh: true, ..
        } = op.action
        {
            let still_unlinked = match m.lookup(&img.file, op.guest) {
                Ok(cur) => cur.host_cluster() != Some(host),
                Err(_) => false,
            };
            // Clusters of an external data file have no refcount to give back.
            if still_unlinked && !img.geo.external_data {
                let _ = m.rc.update(&img.file, host.cluster(&img.geo), -1);
            }
        }
    }
    release_claims(img, ops);
}

/// The host writes of a batch or of the in-place path, issued in order as they are
/// produced: consecutive pieces of the caller's buffer that are contiguous on the host too
/// go out as one write (a request spanning clusters allocated back to back is one write),
/// without collecting them first.
struct HostWrites<'a> {
    img: &'a Image,
    buf: &'a [u8],
    /// A run of `buf` not written yet: host offset, first byte in `buf`, length.
    run: Option<(HostOffset, usize, usize)>,
}

impl<'a> HostWrites<'a> {
    /// Nothing written yet of `buf`, the caller's buffer.
    fn new(img: &'a Image, buf: &'a [u8]) -> Self {
        HostWrites {
            img,
            buf,
            run: None,
        }
    }

    /// Bytes `piece` (a sub-slice of the caller's buffer) go to `host`.
    fn borrowed(&mut self, host: HostOffset, piece: &'a [u8]) -> Result<()> {
        let at = piece.as_ptr() as usize - self.buf.as_ptr() as usize;
        self.range(host, at, piece.len())
    }

    /// Bytes `[at, at+len)` of the caller's buffer go to `host`.
    #[inline]
    fn range(&mut self, host: HostOffset, at: usize, len: usize) -> Result<()> {
        if let Some((h, s, n)) = self.run {
            if h + n as u64 == host && s + n == at {
                self.run = Some((h, s, n + len));
                return Ok(());
            }
            self.flush()?;
        }
        self.run = Some((host, at, len));
        Ok(())
    }

    /// `bytes` (a bounce buffer) go to `host`, after the run before them.
    fn owned(&mut self, host: HostOffset, bytes: &[u8]) -> Result<()> {
        self.flush()?;
        self.img.data_file().write(bytes, host, WriteKind::Data)
    }

    /// Writes the pending run.
    fn flush(&mut self) -> Result<()> {
        match self.run.take() {
            Some((host, at, len)) => {
                self.img
                    .data_file()
                    .write(&self.buf[at..at + len], host, WriteKind::Data)
            }
            None => Ok(()),
        }
    }
}

fn do_io(img: &Image, buf: &[u8], ops: &[Op]) -> Result<()> {
    let mut out = HostWrites::new(img, buf);
    for op in ops {
        let req = &buf[op.buf_off..op.buf_off + op.len as usize];
        match op.action {
            Action::InPlace { host } => out.borrowed(host + op.start, req)?,
            Action::Link {
                host,
                zeroed,
                old,
                fill_mask,
                ..
            } => {
                let target = Target { host, zeroed };
                cluster_pieces(img, op, req, target, old, fill_mask, &mut out)?
            }
        }
    }
    out.flush()
}

/// The host cluster a linking write goes to.
#[derive(Clone, Copy)]
struct Target {
    host: HostOffset,
    /// Known to read as zeros already (see [`Action::Link`]).
    zeroed: bool,
}

/// Whether the fill of subclusters `first..=last` from `old` is zeros without reading
/// anything: zero subclusters, or unallocated ones with no backing file behind them.
fn fill_is_zero(img: &Image, old: Mapping, first: u32, last: u32) -> bool {
    let backing = img.has_backing();
    (first..=last).all(|s| match old.subcluster(&img.geo, s) {
        SubclusterState::Zero => true,
        SubclusterState::Unallocated => !backing,
        _ => false,
    })
}

/// Whether host bytes `[a, b)` of the target cluster read as zeros, or were just made to
/// (`fallocate`), so a fill of zeros there needs no write. Where neither holds, the caller
/// writes the zeros. Ordered like a data write: before the link, made durable by the sync
/// that precedes the L2 update, so a crash never exposes stale bytes of a reused cluster.
fn zeros_in_place(img: &Image, t: Target, a: u64, b: u64) -> Result<bool> {
    Ok(t.zeroed || img.data_file().zero_range(t.host + a, b - a)?)
}

/// Produces the host writes of one cluster being written into `t.host`: runs of subclusters in
/// `fill_mask` are written in full (request bytes plus fill from `old`; a fill of zeros is
/// left to the host range where it reads as zeros), and request bytes in subclusters outside
/// it (already allocated in place) are written as they are.
fn cluster_pieces<'a>(
    img: &Image,
    op: &Op,
    req: &'a [u8],
    t: Target,
    old: Mapping,
    fill_mask: u32,
    out: &mut HostWrites<'a>,
) -> Result<()> {
    let host = t.host;
    let geo = img.geo;
    let sub = geo.subcluster_size();
    let n = if geo.extended_l2 { SUBCLUSTERS } else { 1 };
    let touched = touched_mask(&geo, op.start, op.len);
    let (rs, re) = (op.start, op.start + op.len);
    let mut decompressed: Option<Vec<u8>> = None;
    let mut sc = 0;
    while sc < n {
        let bit = 1u32 << sc;
        if fill_mask & bit == 0 {
            if touched & bit != 0 {
                // Allocated in place: only the request bytes of this subcluster.
                let a = (u64::from(sc) * sub).max(rs);
                let b = (u64::from(sc + 1) * sub).min(re);
                out.borrowed(host + a, &req[(a - rs) as usize..(b - rs) as usize])?;
            }
            sc += 1;
            continue;
        }
        // A run of subclusters written in full.
        let last = run_end(fill_mask, n, sc);
        let a = u64::from(sc) * sub;
        let b = u64::from(last + 1) * sub;
        if rs <= a && b <= re {
            out.borrowed(host + a, &req[(a - rs) as usize..(b - rs) as usize])?;
        } else if fill_is_zero(img, old, sc, last) && zeros_in_place(img, t, a, b)? {
            // Only the request's bytes: the rest of the run reads as zeros on the host.
            let (ca, cb) = (rs.max(a), re.min(b));
            if ca < cb {
                out.borrowed(host + ca, &req[(ca - rs) as usize..(cb - rs) as usize])?;
            }
        } else {
            let mut bounce = vec![0u8; (b - a) as usize];
            for s in sc..=last {
                let sa = u64::from(s) * sub;
                let sb = sa + sub;
                // Fill the parts of this subcluster outside the request.
                for (fa, fb) in [(sa, sb.min(rs).max(sa)), (sa.max(re).min(sb), sb)] {
                    if fa < fb {
                        fill(
                            img,
                            op.guest,
                            old,
                            s,
                            fa,
                            &mut bounce[(fa - a) as usize..(fb - a) as usize],
                            &mut decompressed,
                        )?;
                    }
                }
            }
            let ca = rs.max(a);
            let cb = re.min(b);
            if ca < cb {
                bounce[(ca - a) as usize..(cb - a) as usize]
                    .copy_from_slice(&req[(ca - rs) as usize..(cb - rs) as usize]);
            }
            out.owned(host + a, &bounce)?;
        }
        sc = last + 1;
    }
    Ok(())
}

/// Fills `out` with the old contents of bytes `[at, at+out.len())` of the cluster at guest
/// offset `guest`, all within subcluster `sc`.
fn fill(
    img: &Image,
    guest: GuestOffset,
    old: Mapping,
    sc: u32,
    at: u64,
    out: &mut [u8],
    decompressed: &mut Option<Vec<u8>>,
) -> Result<()> {
    let geo = img.geo;
    match old.subcluster(&geo, sc) {
        SubclusterState::Zero => {
            out.fill(0);
            Ok(())
        }
        SubclusterState::Unallocated => match img.backing() {
            Some(b) => b.read(out, (guest + at).get()),
            None => {
                out.fill(0);
                Ok(())
            }
        },
        SubclusterState::Data(_) => {
            let Some(h) = old.host_cluster() else {
                out.fill(0);
                return Ok(());
            };
            img.data_file()
                .read_zero_padded(out, h + at, "copy-on-write source")
        }
        SubclusterState::Compressed => {
            if decompressed.is_none() {
                if let Mapping::Compressed { host, csize } = old {
                    *decompressed = Some(read::read_compressed(img, host, csize)?);
                }
            }
            match decompressed {
                Some(c) => out.copy_from_slice(&c[at as usize..at as usize + out.len()]),
                None => out.fill(0),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, OpenOptions};

    fn host_of(img: &Image, guest: u64) -> Option<HostOffset> {
        let mut m = img.lock_meta();
        m.lookup(&img.file, GuestOffset::new(guest))
            .ok()
            .and_then(|m| m.host_cluster())
    }

    #[test]
    fn a_freed_cluster_is_not_reused_while_a_request_that_mapped_it_runs() {
        let dir = std::env::temp_dir().join(format!("oxcow-grace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("g.qcow2");
        crate::create(&path, 1 << 20, &CreateOptions::default()).expect("create");
        let img = Image::open(
            &path,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .expect("open");
        let cs = 65536u64;
        img.write_at(&[1u8; 65536], 0).expect("write");
        let victim = host_of(&img, 0).expect("allocated");
        // A request that mapped guest cluster 0 and is still doing its I/O...
        let reader = img.file.grace().pin();
        // ...while another thread discards the cluster and the free becomes durable.
        img.discard(0, cs).expect("discard");
        img.flush().expect("flush");
        img.write_at(&[2u8; 65536], 5 * cs)
            .expect("allocating write");
        assert_ne!(
            host_of(&img, 5 * cs),
            Some(victim),
            "the cluster was handed out while a request that mapped it was running"
        );
        drop(reader);
        img.write_at(&[3u8; 65536], 9 * cs)
            .expect("allocating write");
        assert_eq!(
            host_of(&img, 9 * cs),
            Some(victim),
            "after the grace period the freed cluster is reused"
        );
        drop(img);
        std::fs::remove_dir_all(&dir).ok();
    }
}
