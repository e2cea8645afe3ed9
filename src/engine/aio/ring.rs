//! The io_uring backend of the queue: hot-path reads, in-place overwrites and the data
//! writes of simple allocating writes (see `hot`) go to a ring whose completions signal the
//! queue's eventfd; their completions join the worker pool's in the queue's completion list
//! when the owner polls (or when a thread that excludes ring writes, or waits for a claim
//! a ring allocation holds, drains the ring: see `storage::ringwrites`).
//!
//! An allocating write is planned on the submitting thread (cluster allocated, guest
//! cluster claimed in flight) and linked when its completion is reaped, by whichever
//! thread reaps it: the order of the synchronous path holds (data written before the L2
//! entry that points at it; the claim held until linked; the grace pin and the ring-write
//! registration, which stands for the write gate, held until after the link, so a
//! quiesce finds it linked or given back). Reaping threads hold neither the metadata mutex
//! nor anything a link waits for: the owner reaps after dropping the ring's lock, drain
//! hooks run in threads that take the metadata mutex only after excluding ring writes
//! (quiesce) or not at all (claim waiters drop it first).

use super::super::write::{abandon_single_alloc, finish_single_alloc, SingleAlloc};
use super::hot::{plan_alloc, plan_overwrite, plan_read, ReadPlan};
use super::pool::Shared;
use super::{AioBuf, AioCompletion, AioOp};
use crate::error::Error;
use crate::storage::uring::{Refused, Ring};
use crate::storage::{Drain, PinToken};
use crate::Image;
use std::io;
use std::ops::Deref;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A request on the ring, with the grace pin it holds until its completion (and, for a
/// write, its registration in the data file's ring writes; for an allocating write, its
/// planned allocation, linked or given back when reaped).
struct HotReq<B, T> {
    cookie: u64,
    op: AioOp<B>,
    user: T,
    pin: PinToken,
    len: usize,
    /// Boxed: most requests have none, and the ring's slots hold the request.
    alloc: Option<Box<SingleAlloc>>,
}

/// What a ring request's completion means for it.
enum Outcome {
    /// Done in full.
    Done,
    /// Short, or a transient error: the synchronous engine redoes the whole request.
    Redo,
    /// Failed.
    Failed(io::Error),
}

impl Outcome {
    fn of(r: io::Result<usize>, len: usize) -> Outcome {
        match r {
            Ok(n) if n == len => Outcome::Done,
            Ok(_) => Outcome::Redo,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => Outcome::Redo,
            Err(e) => Outcome::Failed(e),
        }
    }
}

impl<B: AioBuf, T> HotReq<B, T> {
    fn is_write(&self) -> bool {
        matches!(self.op, AioOp::Write { .. })
    }
}

/// The ring and what runs on it.
pub(super) struct RingPath<B, T> {
    ring: Mutex<Ring<HotReq<B, T>>>,
    /// Open plugged sections (entries queued meanwhile are submitted when the last ends).
    plugs: AtomicUsize,
    /// Allocating writes whose data went on the ring (linked or not), for tests and
    /// diagnosis.
    allocs: AtomicU64,
    /// Test seam: completions of this many next ring allocating writes are replaced by
    /// this outcome (error or short write), to drive the reap path's abandon.
    #[cfg(test)]
    pub(super) inject: Mutex<(usize, Option<i32>)>,
}

/// The first buffer of a write request (empty for anything else).
fn write_buf<B: AioBuf>(op: &AioOp<B>) -> &[u8] {
    match op {
        AioOp::Write { bufs, .. } => bufs.first().map_or(&[], |b| b.bytes()),
        _ => &[],
    }
}

/// The first buffer of a read request (empty for anything else).
fn read_buf<B: AioBuf>(op: &mut AioOp<B>) -> &mut [u8] {
    match op {
        AioOp::Read { bufs, .. } => bufs.first_mut().map_or(&mut [], |b| b.bytes_mut()),
        _ => &mut [],
    }
}

impl<B: AioBuf, T: Send + 'static> RingPath<B, T> {
    /// A ring of `depth` entries signalling `efd`; fails where io_uring is unavailable.
    pub(super) fn new(efd: RawFd, depth: u32) -> io::Result<Self> {
        let ring = Ring::new(depth.next_power_of_two().min(4096))?;
        ring.register_eventfd(efd)?;
        Ok(RingPath {
            ring: Mutex::new(ring),
            plugs: AtomicUsize::new(0),
            allocs: AtomicU64::new(0),
            #[cfg(test)]
            inject: Mutex::new((0, None)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring<HotReq<B, T>>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `req` on the ring with `push` and submits it unless a plugged section is open;
    /// a request the ring refuses comes back untouched (its pin and registration still held).
    fn queue(
        &self,
        req: HotReq<B, T>,
        push: impl FnOnce(&mut Ring<HotReq<B, T>>, HotReq<B, T>) -> Result<(), Refused<HotReq<B, T>>>,
    ) -> Result<(), HotReq<B, T>> {
        let mut ring = self.lock();
        match push(&mut ring, req) {
            Ok(()) => {
                self.submit_unless_plugged(&mut ring);
                Ok(())
            }
            Err(refused) => Err(refused.req),
        }
    }

    /// Runs `op` on the hot path when it can (zero fill at once, or a read on the ring);
    /// otherwise hands it back for the worker pool.
    pub(super) fn try_submit<I>(
        &self,
        shared: &Shared<I, B, T>,
        cookie: u64,
        mut op: AioOp<B>,
        user: T,
    ) -> Option<(AioOp<B>, T)>
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        let offset = match &op {
            AioOp::Read { bufs, offset } if bufs.len() == 1 => *offset,
            AioOp::Write { bufs, offset } if bufs.len() == 1 => {
                let offset = *offset;
                return self.try_write(shared, cookie, op, user, offset);
            }
            _ => return Some((op, user)),
        };
        let img: &Image = &shared.image;
        // Counted before pinning, as the synchronous requests are (`Image::count_request`).
        img.count_request();
        let grace = img.file.grace();
        let pin = grace.pin_detached();
        let buf = read_buf(&mut op);
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        let plan = match grace.pinned_by(&pin) {
            Some(pinned) => plan_read(img, &pinned, offset, addr, len),
            None => ReadPlan::Slow,
        };
        match plan {
            ReadPlan::Slow => {
                grace.unpin(pin);
                Some((op, user))
            }
            ReadPlan::Zeros => {
                buf.fill(0);
                grace.unpin(pin);
                shared.complete(AioCompletion {
                    cookie,
                    result: Ok(()),
                    op,
                    user,
                });
                None
            }
            ReadPlan::Host(fd, host) => {
                let req = HotReq {
                    cookie,
                    op,
                    user,
                    pin,
                    len,
                    alloc: None,
                };
                match self.queue(req, |ring, r| {
                    ring.read(fd, host, r, |r| read_buf(&mut r.op))
                }) {
                    Ok(()) => None,
                    Err(r) => {
                        grace.unpin(r.pin);
                        Some((r.op, r.user))
                    }
                }
            }
        }
    }

    /// An overwrite in place on the ring when `hot::plan_overwrite` finds one, else an
    /// allocating write with its data on the ring when `hot::plan_alloc` can plan it;
    /// otherwise the request comes back for the worker pool. The pin and the ring-write
    /// registration are taken before the mapping is looked up, so neither a free and reuse
    /// of the cluster nor a snapshot, resize or reopen can come between the lookup and the
    /// write (and, for an allocation, its link).
    fn try_write<I>(
        &self,
        shared: &Shared<I, B, T>,
        cookie: u64,
        op: AioOp<B>,
        user: T,
        offset: u64,
    ) -> Option<(AioOp<B>, T)>
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        let img: &Image = &shared.image;
        img.count_request();
        let writes = img.data_file().ring_writes();
        if !writes.try_enter() {
            return Some((op, user));
        }
        let grace = img.file.grace();
        let pin = grace.pin_detached();
        let buf = write_buf(&op);
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        let overwrite = grace
            .pinned_by(&pin)
            .and_then(|pinned| plan_overwrite(img, &pinned, offset, addr, len));
        let planned = match overwrite {
            Some((fd, host)) => Some((fd, host, None)),
            None => plan_alloc(img, offset, addr, len)
                .map(|(fd, host, a)| (fd, host, Some(Box::new(a)))),
        };
        let Some((fd, host, alloc)) = planned else {
            grace.unpin(pin);
            writes.leave();
            return Some((op, user));
        };
        img.bitmaps.mark(offset, len as u64);
        let is_alloc = alloc.is_some();
        let req = HotReq {
            cookie,
            op,
            user,
            pin,
            len,
            alloc,
        };
        match self.queue(req, |ring, r| ring.write(fd, host, r, |r| write_buf(&r.op))) {
            Ok(()) => {
                if is_alloc {
                    self.allocs.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Err(r) => {
                // Given back before the registration ends, as after a failed write.
                if let Some(a) = r.alloc {
                    abandon_single_alloc(img, *a);
                }
                grace.unpin(r.pin);
                writes.leave();
                Some((r.op, r.user))
            }
        }
    }

    /// Allocating writes whose data went on the ring so far.
    #[cfg(test)]
    pub(super) fn allocs(&self) -> u64 {
        self.allocs.load(Ordering::Relaxed)
    }

    /// The completion `r` of a ring allocating write, or the one a test injects.
    #[cfg(test)]
    fn injected(&self, r: io::Result<usize>) -> io::Result<usize> {
        let mut inj = self.inject.lock().unwrap_or_else(|p| p.into_inner());
        if inj.0 == 0 {
            return r;
        }
        inj.0 -= 1;
        match inj.1 {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(0),
        }
    }

    /// Moves the ring's completions to the queue's list; a short read (end of the host
    /// file), a short write or a transient error goes to the worker pool, whose synchronous
    /// engine pads, retries and reports exactly as a synchronous request does. An
    /// allocating write is linked here (or, when its write failed or must be redone, its
    /// cluster given back) before its registration and pin end.
    ///
    /// The link takes the metadata mutex, waiting if a worker holds it: handing the link to
    /// the pool instead would hold the claim, registration and pin longer and cost a
    /// wake-up per allocation, while a worker holds the mutex only for bounded work (no
    /// holder of it waits for a poll: claim waiters and excluders drop it first). Measured
    /// (`scripts/bench-aio.sh` alloc workload, O_DIRECT): at most 36 of about 8100 links
    /// found it held (depths 1, 4, 16).
    pub(super) fn reap<I>(&self, shared: &Shared<I, B, T>)
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        self.reap_from(shared, self.lock(), true);
    }

    /// [`Self::reap`] from a thread that must not wait for the ring's lock (a thread
    /// excluding ring writes while the owner may be reaping: the owner then finishes them).
    fn reap_if_free<I>(&self, shared: &Shared<I, B, T>)
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        if let Ok(ring) = self.ring.try_lock() {
            self.reap_from(shared, ring, false);
        }
    }

    /// `owner`: called by the queue's owner, which takes the completions right after (see
    /// [`Shared::complete_reaped`]); other threads signal the eventfd for them.
    fn reap_from<I>(
        &self,
        shared: &Shared<I, B, T>,
        mut ring: MutexGuard<'_, Ring<HotReq<B, T>>>,
        owner: bool,
    ) where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        let mut out = Vec::new();
        if ring.in_flight() == 0 {
            return;
        }
        // Entering with nothing to submit would cost a system call per poll for nothing.
        if ring.needs_enter() {
            let _ = ring.submit();
        }
        ring.reap(&mut out);
        drop(ring);
        let img: &Image = &shared.image;
        let mut finished = Vec::with_capacity(if owner { out.len() } else { 0 });
        for (req, r) in out {
            let write = req.is_write();
            let HotReq {
                cookie,
                op,
                user,
                pin,
                len,
                alloc,
            } = req;
            #[cfg(test)]
            let r = if alloc.is_some() { self.injected(r) } else { r };
            let what = if write { "writing" } else { "reading" };
            // None: redone from scratch on the pool.
            let result = match Outcome::of(r, len) {
                Outcome::Done => Some(Ok(())),
                Outcome::Redo => None,
                Outcome::Failed(e) => Some(Err(Error::io(
                    format!("{}: {what} guest data", img.data_file().name()),
                    e,
                ))),
            };
            // The allocation is linked (or given back: before any re-run, which plans
            // afresh) while its registration still keeps quiesce out and its pin keeps
            // the cluster from reuse.
            let result = match (alloc, result) {
                (Some(a), Some(r)) => Some(finish_single_alloc(img, *a, r)),
                (Some(a), None) => {
                    abandon_single_alloc(img, *a);
                    None
                }
                (None, r) => r,
            };
            if write {
                // Before any re-run on the pool: its synchronous write takes the gate, which
                // a control operation waiting for this registration may hold.
                img.data_file().ring_writes().leave();
            }
            // Last, as a synchronous writer's pin outlives its gate.
            img.file.grace().unpin(pin);
            let result = match result {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => img.finish(Err(e)),
                None => {
                    shared.push_job(cookie, op, user);
                    continue;
                }
            };
            let c = AioCompletion {
                cookie,
                result,
                op,
                user,
            };
            if owner {
                finished.push(c);
            } else {
                shared.complete(c);
            }
        }
        shared.complete_reaped(finished.into_iter());
    }

    /// Waits in the kernel (one io_uring_enter, which also submits what is queued) until
    /// a ring request completes or `timeout` passes. Returns false without waiting when
    /// nothing is in flight on the ring or the kernel cannot wait so: the caller then waits
    /// on the eventfd. Only the owner calls it, holding the ring while it waits, so no
    /// other thread reaps the completion it waits for (drain hooks only try the lock).
    pub(super) fn wait(&self, timeout: Option<std::time::Duration>) -> bool {
        let mut ring = self.lock();
        if ring.in_flight() == 0 {
            return false;
        }
        if ring.has_completions() {
            return true;
        }
        ring.wait(timeout).is_ok()
    }

    /// Entries queued and not yet handed to the kernel.
    #[cfg(test)]
    pub(super) fn unsubmitted(&self) -> usize {
        self.lock().unsubmitted()
    }

    /// Whether the kernel has posted completions not reaped yet.
    pub(super) fn has_completions(&self) -> bool {
        self.lock().has_completions()
    }

    /// Starts a plugged section (see [`super::AioQueue::plug`]).
    pub(super) fn plug(&self) {
        self.plugs.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends a plugged section; the last one submits what was queued meanwhile.
    pub(super) fn unplug(&self) {
        if self.plugs.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut ring = self.lock();
            if ring.unsubmitted() > 0 {
                // A failed submit leaves the entries queued; the next poll retries.
                let _ = ring.submit();
            }
        }
    }

    /// Starts a queued entry now, unless a plugged section is open: then it waits for the
    /// end of the section (or a poll, or a full submission queue) to go in one
    /// io_uring_enter with the others.
    fn submit_unless_plugged(&self, ring: &mut Ring<HotReq<B, T>>) {
        if self.plugs.load(Ordering::Acquire) == 0 {
            // A failed submit leaves the entry queued; the next poll retries.
            let _ = ring.submit();
        }
    }

    /// Waits for every request on the ring (queue shutdown), releasing their pins.
    pub(super) fn drain<I>(&self, shared: &Shared<I, B, T>)
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        loop {
            {
                let mut ring = self.lock();
                if ring.in_flight() == 0 {
                    return;
                }
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    // The ring's Drop leaks what is left rather than freeing it early.
                    Err(_) => return,
                }
            }
            self.reap(shared);
        }
    }
}

/// A queue's ring as a drain hook of the data file's ring writes (see
/// `storage::ringwrites`): a thread excluding ring writes reaps their completions through
/// it when the queue's owner is not polling.
pub(super) struct RingDrain<S, B, T> {
    pub(super) shared: Arc<S>,
    pub(super) ring: Arc<RingPath<B, T>>,
}

impl<I, B, T> Drain for RingDrain<Shared<I, B, T>, B, T>
where
    I: Deref<Target = Image> + Send + Sync + 'static,
    B: AioBuf,
    T: Send + 'static,
{
    fn drain_ready(&self) {
        self.ring.reap_if_free(&self.shared);
    }
}
