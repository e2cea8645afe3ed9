//! Asynchronous completion queue: many requests in flight from one thread, completions
//! collected by the caller when it polls, readiness signalled through an eventfd.
//!
//! The owner of an [`AioQueue`] submits requests ([`AioQueue::submit`]), which return at once
//! with a cookie; it learns that completions wait from the queue's descriptor
//! ([`AioQueue::fd`], readable while there are any) or by blocking in [`AioQueue::poll`],
//! which hands them back in completion order. No library thread ever runs caller code: the
//! C layer runs its callbacks inside `poll`, on the caller's thread.
//!
//! Backends: a small worker pool runs each request on the synchronous engine
//! ([`AioBackend::Threads`]); every ordering rule of the synchronous path holds because it is
//! the synchronous path. With [`AioBackend::IoUring`], reads inside one cluster whose mapping
//! is cached go to an io_uring instead (or are zero-filled at once), holding the same grace
//! pin as a synchronous read until their completion, and so do in-place overwrites of data
//! the image owns (one cluster, every touched subcluster allocated, not writethrough,
//! O_DIRECT-aligned), which also hold a registration in the data file's ring writes until
//! their completion: control operations that quiesce writers and O_DIRECT read-modify-write
//! cycles wait for those as they wait for synchronous writers (see `storage::ringwrites`).
//! An allocating write inside one cluster whose plan needs no disk I/O and no waiting
//! (metadata mutex free, L2 slice owned and cached, cluster not being allocated by another
//! writer, nothing to copy or zero-fill) is planned on the submitting thread with the
//! synchronous engine's own plan step, its data write goes to the ring under the same pin
//! and registration, and the thread that reaps its completion links it (or gives the
//! cluster back on an error; a short write is redone on the pool). Everything else (L2
//! misses, copy-on-write, several clusters, metadata write-back) still runs on the pool. Ring requests start at once, or, inside a
//! plugged section ([`AioQueue::plug`]), together when it ends (one system call for all).
//! io_uring is used where the kernel allows it (not: ENOSYS, EPERM from seccomp or
//! kernel.io_uring_disabled), unless [`AioOptions::force_threads`] or
//! `OXCOW_AIO_BACKEND=threads` asks for the pool. Requests in flight are not ordered
//! against each other (as in io_uring and NBD): a flush covers the writes that completed
//! before it runs.

mod hot;
mod op;
mod pool;
mod ring;

pub use op::{AioBuf, AioOp};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::notify::EventFd;
use crate::Image;
use pool::{Pool, Shared};
use ring::{RingDrain, RingPath};
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default most requests in flight (submitted and not yet returned by poll).
pub const DEFAULT_DEPTH: u32 = 128;
/// Largest accepted depth.
pub const MAX_DEPTH: u32 = 65536;
/// Default worker threads of the pool.
pub const DEFAULT_WORKERS: u32 = 4;
/// Most worker threads.
pub const MAX_WORKERS: u32 = 64;

/// How a queue executes its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioBackend {
    /// A worker pool running the synchronous engine.
    Threads,
    /// io_uring for the hot path, the worker pool for the rest.
    IoUring,
}

/// Parameters of [`AioQueue::new`]; zero fields take the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct AioOptions {
    /// Most requests in flight; 0: [`DEFAULT_DEPTH`]; at most [`MAX_DEPTH`].
    pub depth: u32,
    /// Worker threads; 0: [`DEFAULT_WORKERS`] (never more than the depth); at most
    /// [`MAX_WORKERS`].
    pub workers: u32,
    /// Use the worker pool even where a faster backend is available (tests, diagnosis).
    /// The environment variable `OXCOW_AIO_BACKEND=threads` does the same.
    pub force_threads: bool,
}

/// A finished request: its cookie, its outcome, the request itself (with the caller's
/// buffers, read data in place) and the caller's value given at submission.
pub struct AioCompletion<B, T> {
    /// The cookie [`AioQueue::submit`] returned.
    pub cookie: u64,
    /// Ok, or the engine's error, exactly as the synchronous call would have returned it.
    pub result: Result<()>,
    /// The request, buffers included.
    pub op: AioOp<B>,
    /// The caller's value.
    pub user: T,
}

/// A queue of asynchronous requests on one image. `I` reaches the image (an `Arc<Image>`,
/// or the C layer's handle reference), `B` is the buffer type, `T` the caller's per-request
/// value. Dropping the queue waits for the requests in flight and drops their completions.
pub struct AioQueue<I, B, T>
where
    I: Deref<Target = Image> + Send + Sync + 'static,
    B: AioBuf,
    T: Send + 'static,
{
    shared: Arc<Shared<I, B, T>>,
    pool: Pool,
    ring: Option<Arc<RingPath<B, T>>>,
    /// The ring's drain hook, registered (weakly) with the data file's ring writes.
    _drain: Option<Arc<dyn crate::storage::Drain>>,
    depth: usize,
    next_cookie: AtomicU64,
    /// Submitted and not yet returned by poll.
    outstanding: AtomicUsize,
}

impl<I, B, T> AioQueue<I, B, T>
where
    I: Deref<Target = Image> + Send + Sync + 'static,
    B: AioBuf,
    T: Send + 'static,
{
    /// Creates a queue on `image` (its worker threads start now).
    /// Errors: `InvalidArgument` for a depth or worker count out of range, `Io` when the
    /// eventfd or a thread cannot be created.
    pub fn new(image: I, opts: &AioOptions) -> Result<Self> {
        let depth = match opts.depth {
            0 => DEFAULT_DEPTH,
            d if d <= MAX_DEPTH => d,
            d => return crate::error::invalid!("queue depth {d} is above {MAX_DEPTH}"),
        };
        let workers = match opts.workers {
            0 => DEFAULT_WORKERS.min(depth),
            w if w <= MAX_WORKERS => w,
            w => return crate::error::invalid!("{w} workers is above {MAX_WORKERS}"),
        };
        let efd = EventFd::new().map_err(|e| Error::io("creating the queue's eventfd", e))?;
        let shared = Arc::new(Shared::new(image, efd));
        let pool = Pool::start(&shared, workers as usize)?;
        let threads_only = opts.force_threads
            || std::env::var_os("OXCOW_AIO_BACKEND").is_some_and(|v| v == "threads");
        // Where io_uring is unavailable the pool serves everything: same API, same results.
        let ring = (!threads_only)
            .then(|| RingPath::new(shared.efd.as_raw_fd(), depth).ok())
            .flatten()
            .map(Arc::new);
        let drain = ring.as_ref().map(|ring| {
            let d: Arc<dyn crate::storage::Drain> = Arc::new(RingDrain {
                shared: Arc::clone(&shared),
                ring: Arc::clone(ring),
            });
            shared.image.data_file().ring_writes().register(&d);
            d
        });
        Ok(AioQueue {
            shared,
            pool,
            ring,
            _drain: drain,
            depth: depth as usize,
            next_cookie: AtomicU64::new(1),
            outstanding: AtomicUsize::new(0),
        })
    }

    /// The image the queue works on.
    pub fn image(&self) -> &Image {
        &self.shared.image
    }

    /// The backend executing the requests.
    pub fn backend(&self) -> AioBackend {
        match self.ring {
            Some(_) => AioBackend::IoUring,
            None => AioBackend::Threads,
        }
    }

    /// The queue's depth (most requests in flight).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// A descriptor that is readable while completions wait to be polled, or while requests
    /// queued for io_uring wait for a poll to submit them as one batch (a poll may then
    /// return nothing yet). Level-triggered: poll drains it. Valid as long as the queue.
    pub fn fd(&self) -> RawFd {
        self.shared.efd.as_raw_fd()
    }

    /// Requests submitted and not yet returned by [`Self::poll`].
    pub fn in_flight(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Submits a request; returns its cookie (unique per queue, never 0) at once. On an
    /// error nothing was queued and `op` and `user` are handed back with it:
    /// `InvalidArgument` (range beyond the virtual size), `ReadOnly` (a write on a read-only
    /// handle), `Busy` (the queue holds `depth` requests: poll first).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, op: AioOp<B>, user: T) -> std::result::Result<u64, (Error, AioOp<B>, T)> {
        if let Err(e) = op.check(&self.shared.image) {
            return Err((e, op, user));
        }
        if self.outstanding.fetch_add(1, Ordering::AcqRel) >= self.depth {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            let e = Error::new(
                ErrorKind::Busy,
                format!(
                    "the queue already holds {} requests (its depth): poll completions first",
                    self.depth
                ),
            );
            return Err((e, op, user));
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let slow = match &self.ring {
            Some(r) => r.try_submit(&self.shared, cookie, op, user),
            None => Some((op, user)),
        };
        if let Some((op, user)) = slow {
            self.shared.push_job(cookie, op, user);
        }
        Ok(cookie)
    }

    /// Opens a plugged section, which ends when the guard is dropped: requests for io_uring
    /// submitted meanwhile are queued and handed to the kernel together, with one system
    /// call, when the last open section ends (or earlier: by a poll, or when the submission
    /// queue is full). Do not wait on [`Self::fd`] inside a section: its requests may not
    /// have started. Without io_uring it changes nothing.
    pub fn plug(&self) -> AioPlug<'_, B, T> {
        if let Some(r) = &self.ring {
            r.plug();
        }
        AioPlug {
            ring: self.ring.as_deref(),
        }
    }

    /// Returns up to `max` finished requests, in completion order. Waits for the first one
    /// up to `timeout` (`None`: as long as requests are in flight; zero: not at all); returns
    /// an empty list at once when nothing is in flight.
    pub fn poll(&self, max: usize, timeout: Option<Duration>) -> Vec<AioCompletion<B, T>> {
        let wait = if self.in_flight() == 0 {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        let done = match &self.ring {
            Some(ring) => self.poll_ring(ring, max, wait),
            None => self.shared.take_done(max, wait),
        };
        self.outstanding.fetch_sub(done.len(), Ordering::AcqRel);
        done
    }

    /// [`Self::poll`] with a ring: both the ring and the pool signal the eventfd; a
    /// completion the kernel posts while the list is being emptied re-signals it, so it
    /// never reads as quiet with completions pending. While no request is on the pool, only
    /// the ring can complete one: the wait is then in the kernel on the ring itself (one
    /// io_uring_enter instead of a poll(2) on the eventfd and a submit).
    fn poll_ring(
        &self,
        ring: &RingPath<B, T>,
        max: usize,
        wait: Option<Duration>,
    ) -> Vec<AioCompletion<B, T>> {
        let deadline = wait.map(|w| std::time::Instant::now() + w);
        loop {
            ring.reap(&self.shared);
            let done = self.shared.take_done(max, Some(Duration::ZERO));
            if ring.has_completions() {
                self.shared.efd.signal();
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if !done.is_empty() || left == Some(Duration::ZERO) {
                return done;
            }
            if !(self.shared.pool_idle() && ring.wait(left)) {
                self.shared.efd.wait(left);
            }
        }
    }
}

/// An open plugged section of a queue (see [`AioQueue::plug`]).
#[must_use = "the section ends (and its requests are submitted) when the guard is dropped"]
pub struct AioPlug<'a, B: AioBuf, T: Send + 'static> {
    ring: Option<&'a RingPath<B, T>>,
}

impl<B: AioBuf, T: Send + 'static> Drop for AioPlug<'_, B, T> {
    fn drop(&mut self) {
        if let Some(r) = self.ring {
            r.unplug();
        }
    }
}

impl<I, B, T> Drop for AioQueue<I, B, T>
where
    I: Deref<Target = Image> + Send + Sync + 'static,
    B: AioBuf,
    T: Send + 'static,
{
    /// Waits for the requests on the ring, lets the workers finish every queued request,
    /// then joins them; completions not yet polled are dropped.
    fn drop(&mut self) {
        if let Some(ring) = &self.ring {
            ring.drain(&self.shared);
        }
        self.shared.shut_down();
        self.pool.join();
    }
}

#[cfg(test)]
mod tests;
