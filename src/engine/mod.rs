//! The live image: open, the read and write paths, zeroing and discard, flush, backing chain.

pub mod aio;
#[cfg(test)]
mod aio_crash_tests;
pub mod amend;
#[cfg(test)]
mod amend_crash_tests;
mod amend_refcount;
mod amend_zero;
mod backing;
pub mod bitmap;
mod cache;
#[cfg(all(test, not(loom)))]
mod cache_tests;
pub mod check;
pub mod commit;
#[cfg(test)]
mod commit_crash_tests;
pub mod compress;
#[cfg(test)]
mod crash_tests;
pub mod create;
mod datafile;
#[cfg(test)]
mod datafile_crash_tests;
pub mod events;
mod fence;
#[cfg(test)]
mod host_space_crash_tests;
mod inflight;
mod mapview;
mod meta;
#[cfg(all(test, not(loom)))]
mod meta_lock_tests;
mod mode;
mod read;
pub mod rebase;
mod refcount;
mod reopen;
mod resize;
mod slicedir;
mod snapshot;
mod write;
mod write_compressed;
mod zero;

use crate::error::ErrorKind;
use crate::error::{corrupt, invalid, Error, Result};
use crate::format::header::{self, layout, Header, Purpose};
use crate::format::snapshot::Snapshot;
use crate::format::{Geometry, GuestOffset, HostOffset};
use crate::options::{CompressionType, Extent, ImageInfo, OpenOptions};
use crate::storage::{HostFile, LockMode, PosixFile};
use backing::Backing;
use meta::Meta;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
pub use write_compressed::CompressedCluster;

/// Deepest backing chain oxcow opens.
pub const MAX_BACKING_DEPTH: u32 = 64;

/// An open qcow2 image. All methods take `&self` and may be called from many threads at once.
pub struct Image {
    path: PathBuf,
    file: HostFile,
    /// The external data file holding guest data, when the header says so (see `datafile`).
    data: Option<Arc<HostFile>>,
    geo: Geometry,
    version: u32,
    /// Guest-visible size; changed only by a resize (see `resize`).
    virtual_size: std::sync::atomic::AtomicU64,
    compression: CompressionType,
    /// How the handle is open (read-only, writethrough, ...).
    mode: mode::OpenMode,
    /// Whether the handle still accepts I/O (the write gate is in the host file's grace
    /// counters: see `fence`).
    fence: fence::Fence,
    /// The backing file, replaceable while the image is open (rebase, commit): readers take
    /// a reference under the read lock only when a read falls through to it.
    backing: std::sync::RwLock<Option<Arc<Backing>>>,
    /// The snapshot table (changed by snapshot operations, under the quiesced gate and the
    /// metadata mutex).
    snapshots: std::sync::RwLock<snapshot::Snapshots>,
    meta: Mutex<Meta>,
    /// The mapping as lock-free readers see it (shared with `meta`).
    view: Arc<mapview::MapView>,
    /// Guest clusters with an allocation between plan and link (lock-free).
    inflight: inflight::Inflight,
    /// Corruption handling and event delivery.
    events: events::Events,
    /// Persistent dirty bitmaps: control state and the write path's tracking.
    bitmaps: bitmap::set::Bitmaps,
}

impl Image {
    /// Opens an image file. A read-only open never writes to any file.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Self::open_at_depth(path.as_ref(), opts, 0)
    }

    fn open_at_depth(path: &Path, opts: &OpenOptions, depth: u32) -> Result<Image> {
        if opts.force_share && opts.writable {
            return invalid!("force-share can only be used with read-only images");
        }
        if opts.snapshot.is_some() && opts.writable {
            return invalid!("a snapshot can only be opened read-only");
        }
        if opts.no_data_file && opts.writable {
            return invalid!("a metadata-only open (no data file) must be read-only");
        }
        let name = path.display().to_string();
        let mut posix = PosixFile::open(path, opts.writable, opts.direct).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::unsupported(format!(
                    "opening {name}: the file system does not support O_DIRECT"
                ))
            } else {
                Error::io(format!("opening {name}"), e)
            }
        })?;
        posix.lock(&name, lock_mode(opts))?;
        let file = HostFile::new(Arc::new(posix), name.clone());
        Self::open_file(file, path, opts, depth)
    }

    /// Opens the image held by `file` (already opened and locked; `path` names it and
    /// anchors relative backing names). Tests use it with simulated backends.
    fn open_file(file: HostFile, path: &Path, opts: &OpenOptions, depth: u32) -> Result<Image> {
        Self::open_file_with(file, None, path, opts, depth)
    }

    /// [`Self::open_file`] with the data file given (tests use simulated ones); `None` opens
    /// the one the header names, if it names one.
    fn open_file_with(
        file: HostFile,
        data: Option<HostFile>,
        path: &Path,
        opts: &OpenOptions,
        depth: u32,
    ) -> Result<Image> {
        let name = file.name().to_string();
        let mut header = read_header(&file, &name)?;
        let geo = header.geometry();
        if opts.writable {
            repair_if_dirty(&file, &mut header, &name)?;
            refuse_unwritable(&header, &name)?;
        }
        // Tables that lie (partly) past the end of a truncated file read as zeros, as in
        // QEMU: the L1 entries that survive still map their data, the rest reads as
        // unallocated, and a refcount table past the end refuses every allocation as a
        // corruption. `check` reports the damage.
        validate_bitmaps(&file, &header).map_err(|e| e.with_file(&name))?;
        let data = match data {
            Some(d) if header.has_data_file() => Some(Arc::new(d)),
            _ => datafile::open(&header, &name, opts)?.map(Arc::new),
        };
        let (snapshots, snapshot_table_len) =
            snapshot::read_table(&file, &header).map_err(|e| e.with_file(&name))?;
        let backing = match (&header.backing_file, opts.no_backing) {
            (Some(b), false) => Some(Backing::open(
                path,
                b,
                header.backing_format.as_deref(),
                depth,
                opts,
            )?),
            _ => None,
        };
        if opts.writable {
            clear_autoclear(&file, &mut header)?;
        }
        file.guard().set_mode(opts.overlap_check);
        if let Some(key) = &opts.snapshot {
            snapshot::view_header(&mut header, &snapshots, key, opts.writable)
                .map_err(|e| e.with_file(&name))?;
        }
        let cache = cache::CacheConfig::resolve(
            &geo,
            header.size,
            opts.l2_cache_size,
            opts.refcount_cache_size,
            opts.l2_slice_size,
            Some(
                opts.cache_clean_interval
                    .unwrap_or(cache::DEFAULT_CLEAN_INTERVAL),
            ),
        )
        .map_err(|e| e.with_file(&name))?;
        let view = Arc::new(mapview::MapView::new(
            header.l1_size as usize,
            cache,
            &geo,
            file.shared_grace(),
        ));
        let mut meta = Meta::load(
            &file,
            header.clone(),
            &snapshots,
            snapshot_table_len,
            Arc::clone(&view),
        )
        .map_err(|e| e.with_file(&name))?;
        if opts.writable {
            meta.enable_lazy_refcounts();
        }
        meta.rc.set_punch_freed(opts.writable && opts.discard_unmap);
        meta.data = data.clone();
        let (bitmap_state, hint) = bitmap::lifecycle::open(&file, &mut meta, opts.writable)
            .map_err(|e| e.with_file(&name))?;
        let img = Image {
            path: path.to_path_buf(),
            file,
            data,
            geo,
            version: header.version,
            virtual_size: header.size.into(),
            compression: if header.compression_type == 1 {
                CompressionType::Zstd
            } else {
                CompressionType::Deflate
            },
            // A snapshot view never becomes writable.
            mode: mode::OpenMode::new(&OpenOptions {
                keep_read_only: opts.keep_read_only || opts.snapshot.is_some(),
                ..opts.clone()
            }),
            fence: fence::Fence::default(),
            backing: std::sync::RwLock::new(backing.map(Arc::new)),
            snapshots: std::sync::RwLock::new(snapshot::Snapshots {
                list: snapshots,
                table_len: snapshot_table_len,
            }),
            meta: Mutex::new(meta),
            view,
            inflight: inflight::Inflight::for_geometry(&geo),
            events: events::Events::default(),
            bitmaps: bitmap::set::Bitmaps::default(),
        };
        img.bitmaps.install(bitmap_state);
        if let Some(h) = hint {
            img.events.notice(format!("{name}: {h}"));
        }
        Ok(img)
    }

    /// The backing file, if the image has one open.
    pub(crate) fn backing(&self) -> Option<Arc<Backing>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a backing file is open.
    pub(crate) fn has_backing(&self) -> bool {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Replaces the open backing file (rebase, commit); returns the old one. Callers
    /// quiesce writers first: a write decides copy-on-write sources by the backing it sees.
    #[allow(dead_code)]
    pub(crate) fn replace_backing(&self, new: Option<Backing>) -> Option<Arc<Backing>> {
        let mut b = self.backing.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *b, new.map(Arc::new))
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Static facts about the image.
    pub fn info(&self) -> Result<ImageInfo> {
        let m = self.lock_meta();
        let h = &m.header;
        Ok(ImageInfo {
            virtual_size: self.virtual_size(),
            cluster_size: self.geo.cluster_size() as u32,
            version: self.version,
            refcount_bits: self.geo.refcount_bits(),
            extended_l2: self.geo.extended_l2,
            compression: self.compression,
            lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
            dirty: m.dirty_on_disk(),
            corrupt: h.incompatible_features & header::INCOMPAT_CORRUPT != 0
                || self.events.marked_corrupt(),
            read_only: self.is_read_only(),
            snapshot_count: self.snapshots().len() as u32,
            backing_file: h
                .backing_file
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            backing_format: h.backing_format.clone(),
            file_size: self.file.len()?,
            data_file: h
                .has_data_file()
                .then(|| datafile::recorded_name(h))
                .flatten(),
            data_file_raw: h.data_file_raw(),
        })
    }

    /// The internal snapshots as they are now (validated at open, then changed by
    /// snapshot operations), in table order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let s = self.snapshots.read().unwrap_or_else(|p| p.into_inner());
        s.list.clone()
    }

    /// The persistent bitmaps' directory entries, as `qemu-img info` lists them (read-only
    /// inspection). Empty when the image has no bitmaps extension or a stale one (autoclear
    /// bit 0 clear: QEMU ignores it too).
    pub fn bitmap_directory(&self) -> Result<Vec<crate::format::bitmap::BitmapEntry>> {
        let header = self.lock_meta().header.clone();
        let Some(ext) = header.bitmaps_in_use() else {
            return Ok(Vec::new());
        };
        // Validated at open: directory_size is at most 64 MiB.
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file.read_zero_padded(
            &mut dir,
            HostOffset::new(ext.directory_offset),
            "bitmap directory",
        )?;
        crate::format::bitmap::parse_directory(&dir, ext.nb_bitmaps, &self.geo, header.size)
    }

    /// Makes every write that completed before this call durable, writing cached metadata
    /// back in crash-safe order.
    pub fn flush(&self) -> Result<()> {
        self.check_usable()?;
        let r = {
            // A flush maps no cluster: it holds the gate unpinned, or its own pin would keep
            // back the grace periods (and the discard=unmap punches) its write-back ends.
            let _gate = self.file.grace().enter_writer_unpinned();
            if self.is_read_only() {
                return Ok(());
            }
            let mut m = self.lock_meta();
            m.writeback(&self.file)
        };
        self.finish(r)
    }

    /// Flushes and closes the image. Resources are released even when the flush fails.
    pub fn close(self) -> Result<()> {
        if self.is_read_only() || self.fence.is_fenced() {
            return Ok(());
        }
        let _gate = self.quiesce();
        let mut m = self.lock_meta();
        self.store_bitmaps(&mut m)?;
        m.writeback_and_mark_clean(&self.file)
    }

    /// Whether the image is currently open read-only.
    pub fn is_read_only(&self) -> bool {
        self.mode.read_only()
    }

    /// Waits for every writer in flight, synchronous ones (the gate) and asynchronous ones
    /// on an io_uring (the data file's ring writes), and keeps new ones out until the guard
    /// is dropped.
    fn quiesce(&self) -> Quiesced<'_> {
        let gate = self.file.grace().exclude_writers();
        let ring = self.data_file().ring_writes().exclude();
        Quiesced {
            _gate: gate,
            _ring: ring,
        }
    }

    /// Waits until no writer holds guest cluster `gidx` in flight; called without the
    /// metadata mutex. The claim may be a ring allocating write's (see `aio::ring`), released
    /// only when its completion is reaped: by its queue's owner polling, which may be this
    /// very thread (a synchronous call between a submit and its poll), so the wait drives
    /// the queues itself between short sleeps, as a thread excluding ring writes does.
    fn wait_claim_released(&self, gidx: crate::format::GuestCluster) {
        let writes = self.data_file().ring_writes();
        while !self
            .inflight
            .wait_released_for(gidx, std::time::Duration::from_micros(200))
        {
            writes.drive();
        }
    }

    /// Enters the write gate (`Grace::pin_writer`) with a grace pin: until the pin is dropped, host
    /// clusters the request maps stay reserved for it and no control operation runs.
    #[inline]
    fn enter_write_gate(&self) -> crate::storage::Pin<'_> {
        self.file.grace().pin_writer()
    }

    /// Allocation status of the guest range starting at `offset`: the returned extent starts
    /// at `offset` and extends as far as the status stays the same, at most `count` bytes.
    pub fn block_status(&self, offset: u64, count: u64) -> Result<Extent> {
        self.check_usable()?;
        let offset = self.check_range(offset, count)?;
        if count == 0 {
            return invalid!("block_status of 0 bytes");
        }
        let r = {
            // The lock-free view's slices stay valid for the lookup.
            let pin = self.file.grace().pin();
            read::block_status(self, &pin.pinned(), offset, count)
        };
        self.finish(r)
    }

    #[inline]
    fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        self.try_lock_meta()
            .unwrap_or_else(|| self.lock_meta_contended())
    }

    /// The metadata mutex if it is free now. A panic while holding the lock fences the image
    /// (see capi), so a poisoned lock only guards state nobody will write again; reading it
    /// is still sound.
    #[inline]
    fn try_lock_meta(&self) -> Option<MutexGuard<'_, Meta>> {
        match self.meta.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// [`Self::lock_meta`] when another thread holds the mutex: most sections under it (a
    /// cache miss's install, an allocation) last well under a microsecond, so the waiter
    /// spins a few microseconds before it sleeps. A sleep costs both threads a system call
    /// (the holder's unlock wakes the sleeper): measured as most of the context switches
    /// of two threads reading a 1 TiB image at random (BENCHMARKS.md, session 18).
    #[cold]
    #[inline(never)]
    fn lock_meta_contended(&self) -> MutexGuard<'_, Meta> {
        /// How long a waiter spins before it sleeps.
        const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(4);
        let start = std::time::Instant::now();
        let mut round = 0u32;
        // Bound: the clock; the lock below is the fallback.
        while start.elapsed() < SPIN_FOR {
            // Back off (1, 2, 4 ... 32 pauses between tries) so that the tries do not
            // steal the mutex's cache line from the holder.
            for _ in 0..1u32 << round.min(5) {
                std::hint::spin_loop();
            }
            round += 1;
            if let Some(g) = self.try_lock_meta() {
                return g;
            }
        }
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request of the calling thread; every 256th runs the idle clean. Request
    /// entry points call it before taking their grace pin: a slice the clean withdraws is
    /// freed once no request pinned at that moment is left, which a clean inside a pinned
    /// request would itself hold back until later ticks.
    #[inline]
    fn count_request(&self) {
        if cache::tick() {
            self.idle_tick();
        }
    }

    /// [`Self::count_request`], then [`Self::check_not_fenced`].
    #[inline]
    fn check_usable(&self) -> Result<()> {
        self.count_request();
        self.check_not_fenced()
    }

    /// Fails on a fenced handle.
    #[inline]
    fn check_not_fenced(&self) -> Result<()> {
        if self.fence.is_fenced() {
            return Err(self.fenced_error());
        }
        Ok(())
    }

    /// The error of every request on a fenced handle (out of line: the per-request check
    /// stays small enough to inline).
    #[cold]
    #[inline(never)]
    fn fenced_error(&self) -> Error {
        Error::new(
            ErrorKind::Fenced,
            format!(
                "{}: image was fenced after a fatal error; no further I/O is accepted",
                self.path.display()
            ),
        )
    }

    /// Every few hundred requests of a thread ([`cache::tick`]): drops the cache entries (and
    /// the in-flight tracker's pages) nobody used for the clean interval, if it has passed, so
    /// an idle handle gives its memory back at its next requests without a timer thread.
    /// Never waits for the metadata mutex (a busy one is tried again later).
    #[cold]
    #[inline(never)]
    fn idle_tick(&self) {
        let Ok(mut m) = self.meta.try_lock() else {
            return;
        };
        let cleaned = m.clean_if_due() | m.take_tracker_idle();
        drop(m);
        // Slices the clean (or a miss) withdrew are dropped once no request pinned when they
        // were withdrawn is left: request entry points tick before pinning, so the clean's
        // own are usually freed here.
        self.view.collect();
        if cleaned {
            self.inflight.release_idle_pages();
        }
    }

    #[inline]
    fn check_writable(&self) -> Result<()> {
        self.count_request();
        self.check_open_for_writes()
    }

    /// [`Self::check_writable`] for a request counted already (before entering the gate).
    #[inline]
    fn check_open_for_writes(&self) -> Result<()> {
        self.check_not_fenced()?;
        if self.is_read_only() {
            return Err(self.read_only_error());
        }
        Ok(())
    }

    /// The error of a write request on a read-only handle (out of line, as `fenced_error`).
    #[cold]
    #[inline(never)]
    fn read_only_error(&self) -> Error {
        Error::new(
            ErrorKind::ReadOnly,
            format!("{}: image is open read-only", self.path.display()),
        )
    }

    /// Checks a caller's guest range against the virtual size and returns its start as a
    /// guest offset: where the caller's number enters the guest address space.
    /// Writers hold the write gate across the check and their I/O, so a resize (which
    /// quiesces them) cannot change the size in between.
    fn check_range(&self, offset: u64, count: u64) -> Result<GuestOffset> {
        let size = self.virtual_size();
        match offset.checked_add(count) {
            Some(end) if end <= size => Ok(GuestOffset::new(offset)),
            _ => Err(range_error(offset, count, size)),
        }
    }

    /// Selects which metadata structures the overlap guard protects (takes effect for the
    /// next write).
    pub fn set_overlap_check(&self, mode: crate::storage::OverlapCheck) {
        self.file.guard().set_mode(mode);
    }

    /// Loads the L2 slice that maps `guest` into the cache without holding the metadata
    /// mutex during the disk read, so that a cache miss does not stall other requests.
    /// Returns whether the slice is cached now (false: the caller takes the slow path).
    /// `check_first`: see first whether it is published already (the caller's lock-free
    /// lookup failed for another reason than a miss, or long enough ago for a race).
    fn prefetch_l2(&self, guest: GuestOffset, check_first: bool) -> Result<bool> {
        let l1_index = guest.l1_index(&self.geo);
        let Some(e) = self.view.l1_entry(l1_index) else {
            return Ok(false);
        };
        let off = crate::format::entry::l1_l2_offset(e);
        if off == HostOffset::ZERO || !off.is_cluster_aligned(&self.geo) {
            return Ok(false); // nothing to load, or the slow path reports the corruption
        }
        let s = self.view.slice_index(guest.l2_index(&self.geo));
        if check_first && self.view.published(l1_index, off, s) {
            return Ok(true);
        }
        let generation = self.view.generation();
        let (slice, _) = self.view.slice_of(off, guest.l2_index(&self.geo));
        /// Largest slice read without the mutex and kept as a thread's spare: larger ones
        /// (whole tables of large clusters) are not pinned to every reading thread.
        const KEEP_SPARE: u64 = 16 << 10;
        thread_local! {
            /// A slice this thread's last miss evicted: the next miss reads into it (no
            /// allocation, no copy) before taking the mutex. At most one slice per thread.
            static SPARE: std::cell::RefCell<Option<Arc<mapview::L2Table>>> =
                const { std::cell::RefCell::new(None) };
        }
        let bytes = self.view.cache().slice_bytes;
        let keep = bytes <= KEEP_SPARE;
        let spare = keep
            .then(|| SPARE.with(|sp| sp.borrow_mut().take()))
            .flatten();
        let t = mapview::L2Table::read_from(&self.file, slice, self.view.slab(), spare)?;
        let (cached, spare) = self.install_l2_slice(t, (l1_index, e, s), generation)?;
        if keep {
            SPARE.with(|sp| *sp.borrow_mut() = spare);
        }
        Ok(cached)
    }

    /// Installs `t` (a slice read without the mutex; None: nothing to install) as slice `s`
    /// of the table under L1 entry `l1` (whose value was `e` when the read started), unless
    /// the entry or the on-disk tables changed meanwhile. Returns whether the slice is cached
    /// now and a slice the caller may refill at its next miss.
    fn install_l2_slice(
        &self,
        t: Option<Arc<mapview::L2Table>>,
        (l1, e, s): (usize, u64, usize),
        generation: u64,
    ) -> Result<(bool, Option<Arc<mapview::L2Table>>)> {
        let Some(t) = t else {
            return Ok((false, None)); // wholly past the end of the file: the slow path
        };
        let mut m = self.lock_meta();
        // The L1 entry may have moved on (copy-on-write of a shared table) meanwhile.
        if self.view.l1_entry(l1) != Some(e) {
            return Ok((false, Some(t)));
        }
        let key = t.key();
        m.install_l2(&self.file, (l1, s), key, t, generation)
    }

    /// The current overlap-check mode.
    pub fn overlap_check(&self) -> crate::storage::OverlapCheck {
        self.file.guard().mode()
    }

    /// Marks the handle unusable; used by the C ABI when a panic was caught.
    pub fn fence(&self) {
        self.fence.fence();
    }

    /// Reads exactly `buf.len()` bytes of guest data at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = {
            // Mapped host clusters stay reserved for this request until its I/O is done
            // (not while `finish` runs the event callbacks, which may wait for grace periods).
            self.count_request();
            let pin = self.file.grace().pin();
            self.check_not_fenced()?;
            let offset = self.check_range(offset, buf.len() as u64)?;
            read::read(self, &pin.pinned(), buf, offset)
        };
        self.finish(r)
    }

    /// Reads guest data into several buffers, filled in order starting at `offset`.
    pub fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        let r = {
            // As in `read_at`.
            self.count_request();
            let pin = self.file.grace().pin();
            self.check_not_fenced()?;
            let mut off = self.check_range(offset, total)?;
            bufs.iter_mut().try_for_each(|b| {
                read::read(self, &pin.pinned(), b, off)?;
                off += b.len() as u64;
                Ok(())
            })
        };
        self.finish(r)
    }

    /// Writes all of `buf` at guest `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = {
            // Mapped host clusters stay reserved for this request until its I/O is done.
            self.count_request();
            let writer = self.enter_write_gate();
            self.check_open_for_writes()?;
            let offset = self.check_range(offset, buf.len() as u64)?;
            self.bitmaps.mark(offset.get(), buf.len() as u64);
            write::write(self, &writer.pinned(), buf, offset).and_then(|()| self.after_write())
        };
        self.finish(r)
    }

    /// Writes several buffers, in order, starting at guest `offset`.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        let r = {
            // Mapped host clusters stay reserved for this request until its I/O is done.
            self.count_request();
            let writer = self.enter_write_gate();
            self.check_open_for_writes()?;
            let mut off = self.check_range(offset, total)?;
            self.bitmaps.mark(offset, total);
            bufs.iter()
                .try_for_each(|b| {
                    write::write(self, &writer.pinned(), b, off)?;
                    off += b.len() as u64;
                    Ok(())
                })
                .and_then(|()| self.after_write())
        };
        self.finish(r)
    }

    /// Makes `[offset, offset+count)` read as zeros. With `may_unmap` the clusters may be
    /// deallocated; otherwise fully covered allocated clusters stay allocated.
    pub fn write_zeroes(&self, offset: u64, count: u64, flags: crate::ZeroFlags) -> Result<()> {
        let r = {
            // Mapped host clusters stay reserved for this request until its I/O is done.
            self.count_request();
            let _writer = self.enter_write_gate();
            self.check_open_for_writes()?;
            let offset = self.check_range(offset, count)?;
            self.bitmaps.mark(offset.get(), count);
            zero::write_zeroes(self, offset, count, flags.may_unmap)
                .and_then(|()| self.after_write())
        };
        self.finish(r)
    }

    /// Releases the clusters fully inside `[offset, offset+count)`. Discarded clusters read as
    /// zeros, except in v2 images with a backing file, where they read the backing data.
    /// Partial clusters at the edges are left unchanged.
    pub fn discard(&self, offset: u64, count: u64) -> Result<()> {
        let r = {
            // Mapped host clusters stay reserved for this request until its I/O is done.
            self.count_request();
            let _writer = self.enter_write_gate();
            self.check_open_for_writes()?;
            let offset = self.check_range(offset, count)?;
            self.bitmaps.mark(offset.get(), count);
            zero::discard(self, offset, count).and_then(|()| self.after_write())
        };
        self.finish(r)
    }

    /// Writethrough: makes the write just done durable before it returns. Called with the
    /// gate held, so it flushes directly rather than through [`Self::flush`].
    #[inline]
    fn after_write(&self) -> Result<()> {
        if self.mode.writethrough() {
            self.write_metadata_through()
        } else {
            Ok(())
        }
    }

    /// Writethrough mode's step after every write: the metadata it changed goes to disk
    /// (out of line: the writeback handles' check stays inlined).
    #[inline(never)]
    fn write_metadata_through(&self) -> Result<()> {
        let mut m = self.lock_meta();
        m.writeback(&self.file)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.is_read_only() && !self.fence.is_fenced() {
            let mut m = self.lock_meta();
            // A failed store leaves the bitmaps in use on disk: inconsistent, never wrong.
            let _ = self.store_bitmaps(&mut m);
            if m.is_dirty() {
                let _ = m.writeback_and_mark_clean(&self.file);
            }
        }
    }
}

/// Writers kept out (see [`Image::quiesce`]); fields drop in order: the ring writes are
/// let in again no earlier than the synchronous writers.
struct Quiesced<'a> {
    _gate: crate::storage::WritersExcluded<'a>,
    _ring: crate::storage::Excluded<'a>,
}

/// The error of a request past the virtual size (out of line: the check inlines into every
/// request without the formatting).
#[cold]
#[inline(never)]
fn range_error(offset: u64, count: u64, size: u64) -> Error {
    Error::invalid(format!(
        "request [{offset:#x}, +{count:#x}) is beyond the virtual size {size:#x}"
    ))
}

/// The lock mode an open with `opts` takes.
fn lock_mode(opts: &OpenOptions) -> LockMode {
    if opts.writable {
        LockMode::ReadWrite
    } else if opts.force_share {
        LockMode::ForceShare
    } else {
        LockMode::ReadOnly
    }
}

/// Reads and validates the header in cluster 0 as QEMU's open does; errors name the file as
/// `name`.
fn read_header(file: &HostFile, name: &str) -> Result<Header> {
    parse_header_for(file, Purpose::Open).map_err(|e| e.with_file(name))
}

/// Reads cluster 0 (its size probed from the header itself) and parses it as a check does.
fn parse_header_cluster(file: &HostFile) -> Result<Header> {
    parse_header_for(file, Purpose::Check)
}

/// Reads cluster 0 (its size probed from the header itself) and parses it for `purpose`.
fn parse_header_for(file: &HostFile, purpose: Purpose) -> Result<Header> {
    let mut probe = [0u8; Header::PROBE_LEN];
    let n = file.read_some(&mut probe, HostOffset::ZERO, "image header")?;
    let cluster_size = Header::probe_cluster_size(&probe[..n]).unwrap_or(n as u64);
    let mut c0 = vec![0u8; cluster_size as usize];
    let n = file.read_some(&mut c0, HostOffset::ZERO, "image header")?;
    c0.truncate(n);
    Header::parse_for(&c0, purpose)
}

/// A read-write open of a dirty image (lazy refcounts not written back before a crash)
/// repairs the refcounts first, like QEMU; `header` is re-read afterwards. A corrupt image is
/// left alone (see [`refuse_unwritable`]).
fn repair_if_dirty(file: &HostFile, header: &mut Header, name: &str) -> Result<()> {
    let dirty = header.incompatible_features & header::INCOMPAT_DIRTY != 0;
    let corrupt = header.incompatible_features & header::INCOMPAT_CORRUPT != 0;
    if !dirty || corrupt {
        return Ok(());
    }
    let report = check::check_file(file, header.clone(), check::CheckFix::All, None).0;
    match report {
        Ok(r) if r.corruptions == 0 && r.check_errors == 0 => {}
        Ok(r) => {
            return corrupt!(
                "{name}: Could not repair dirty image: {} corruptions and {} check errors remain",
                r.corruptions,
                r.check_errors
            )
        }
        Err(e) => return corrupt!("{name}: Could not repair dirty image: {e}"),
    }
    *header = read_header(file, name)?;
    Ok(())
}

/// Refuses write access to an image marked corrupt or dirty.
fn refuse_unwritable(header: &Header, name: &str) -> Result<()> {
    if header.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
        return corrupt!(
            "{name}: image is corrupt; cannot be opened read/write (repair it with 'oxcow check -r all' or 'qemu-img check -r all')"
        );
    }
    if header.incompatible_features & header::INCOMPAT_DIRTY != 0 {
        return corrupt!(
            "{name}: image is dirty (lazy refcounts were not written back); repair it with 'qemu-img check -r all' before opening read/write"
        );
    }
    Ok(())
}

/// Clears the autoclear bits oxcow does not maintain before the first write, telling their
/// owners not to trust what we will not keep in sync. Bit 0 (bitmaps) stays while it vouches
/// for a bitmaps extension: oxcow keeps those bitmaps (in use while open, stored at close).
fn clear_autoclear(file: &HostFile, header: &mut Header) -> Result<()> {
    let mut keep = if header.bitmaps.is_some() {
        header.autoclear_features & header::AUTOCLEAR_BITMAPS
    } else {
        0
    };
    // oxcow keeps a raw data file raw (see `datafile`), so the promise stays.
    if header.data_file_raw() {
        keep |= header::AUTOCLEAR_DATA_FILE_RAW;
    }
    if header.autoclear_features != keep {
        file.write_header_fields(&layout::AUTOCLEAR_FEATURES.update(header.version, keep)?)?;
        file.sync()?;
        header.autoclear_features = keep;
    }
    Ok(())
}

/// Validates the bitmap directory the way QEMU does on every open (read-only included): an
/// image QEMU refuses to open is refused here too. Without autoclear bit 0 the extension is
/// stale (a program without bitmap support wrote the image) and, like QEMU, ignored.
fn validate_bitmaps(file: &HostFile, header: &Header) -> Result<()> {
    let Some(ext) = header.bitmaps_in_use() else {
        return Ok(());
    };
    // The header parser bounds directory_size (at most 64 MiB), so this allocation is bounded.
    let mut dir = vec![0u8; ext.directory_size as usize];
    let dir_offset = HostOffset::new(ext.directory_offset);
    let got = file.read_some(&mut dir, dir_offset, "bitmap directory")?;
    if got < dir.len() {
        return corrupt!(
            "bitmap directory at {:#x} extends beyond the end of the file",
            ext.directory_offset
        );
    }
    crate::format::bitmap::parse_directory(&dir, ext.nb_bitmaps, &header.geometry(), header.size)?;
    Ok(())
}
