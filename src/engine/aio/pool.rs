//! The worker pool and the two lists it shares with the queue's owner: requests waiting for
//! a worker and completions waiting for a poll.

use super::{AioBuf, AioCompletion, AioOp};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::notify::EventFd;
use crate::Image;
use std::collections::VecDeque;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request waiting for a worker.
struct Job<B, T> {
    cookie: u64,
    op: AioOp<B>,
    user: T,
}

/// Requests waiting, and whether the queue is closing.
struct Jobs<B, T> {
    list: VecDeque<Job<B, T>>,
    closing: bool,
}

/// What the queue's owner and its workers share.
pub(super) struct Shared<I, B, T> {
    pub(super) image: I,
    jobs: Mutex<Jobs<B, T>>,
    job_ready: Condvar,
    done: Mutex<VecDeque<AioCompletion<B, T>>>,
    done_ready: Condvar,
    /// Readable while `done` is not empty; written and cleared under the `done` lock so the
    /// two never disagree for an observer that polls after reading it.
    pub(super) efd: EventFd,
    /// Requests handed to the workers and not yet completed.
    pool_pending: AtomicUsize,
}

/// Locks a mutex, ignoring poison (a worker panics only inside catch_unwind, and the lists
/// stay consistent across any panic since they are changed by single push/pop calls).
fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<I, B, T> Shared<I, B, T>
where
    I: Deref<Target = Image> + Send + Sync + 'static,
    B: AioBuf,
    T: Send + 'static,
{
    pub(super) fn new(image: I, efd: EventFd) -> Self {
        Shared {
            image,
            jobs: Mutex::new(Jobs {
                list: VecDeque::new(),
                closing: false,
            }),
            job_ready: Condvar::new(),
            done: Mutex::new(VecDeque::new()),
            done_ready: Condvar::new(),
            efd,
            pool_pending: AtomicUsize::new(0),
        }
    }

    pub(super) fn push_job(&self, cookie: u64, op: AioOp<B>, user: T) {
        self.pool_pending.fetch_add(1, Ordering::AcqRel);
        lock(&self.jobs).list.push_back(Job { cookie, op, user });
        self.job_ready.notify_one();
    }

    /// Tells the workers to exit once the list is empty.
    pub(super) fn shut_down(&self) {
        lock(&self.jobs).closing = true;
        self.job_ready.notify_all();
    }

    /// The next job, waiting for one; `None` when closing and nothing is left.
    fn next_job(&self) -> Option<Job<B, T>> {
        let mut jobs = lock(&self.jobs);
        loop {
            if let Some(j) = jobs.list.pop_front() {
                return Some(j);
            }
            if jobs.closing {
                return None;
            }
            jobs = self.job_ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether no request waits for or runs on a worker (so only the ring can complete one).
    pub(super) fn pool_idle(&self) -> bool {
        self.pool_pending.load(Ordering::Acquire) == 0
    }

    /// Queues completions of ring requests reaped by the owner's poll, without signalling:
    /// the kernel signalled the eventfd for each of them when it posted its completion (the
    /// poll clears it only once the list is empty), and nobody waits on the condition
    /// variable (a queue with a ring polls its list without waiting on it).
    pub(super) fn complete_reaped(&self, cs: impl Iterator<Item = AioCompletion<B, T>>) {
        lock(&self.done).extend(cs);
    }

    /// Queues a completion and signals the owner.
    pub(super) fn complete(&self, c: AioCompletion<B, T>) {
        let mut done = lock(&self.done);
        if done.is_empty() {
            self.efd.signal();
        }
        done.push_back(c);
        drop(done);
        self.done_ready.notify_one();
    }

    /// Up to `max` completions, waiting up to `wait` (None: forever) for the first.
    pub(super) fn take_done(&self, max: usize, wait: Option<Duration>) -> Vec<AioCompletion<B, T>> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut done = lock(&self.done);
        while done.is_empty() {
            done = match deadline {
                None => self
                    .done_ready
                    .wait(done)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    self.done_ready
                        .wait_timeout(done, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        let n = max.min(done.len());
        let out: Vec<_> = done.drain(..n).collect();
        if done.is_empty() {
            self.efd.clear();
        }
        out
    }

    /// Runs one request on the synchronous engine; a panic fences the image and fails the
    /// request with EIO, as the C boundary does for synchronous calls.
    fn run(&self, job: Job<B, T>) {
        let Job {
            cookie,
            mut op,
            user,
        } = job;
        let image: &Image = &self.image;
        let result: Result<()> = match catch_unwind(AssertUnwindSafe(|| op.run_sync(image))) {
            Ok(r) => r,
            Err(_) => {
                image.fence();
                Err(Error::new(
                    ErrorKind::CorruptionPrevented,
                    "internal error: oxcow panicked running an asynchronous request; \
                     the image was fenced",
                ))
            }
        };
        self.complete(AioCompletion {
            cookie,
            result,
            op,
            user,
        });
        self.pool_pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The worker threads.
pub(super) struct Pool {
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers serving `shared`'s job list.
    pub(super) fn start<I, B, T>(shared: &Arc<Shared<I, B, T>>, n: usize) -> Result<Pool>
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
        B: AioBuf,
        T: Send + 'static,
    {
        let mut pool = Pool {
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let s = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name(format!("oxcow-aio-{i}"))
                .spawn(move || {
                    while let Some(job) = s.next_job() {
                        s.run(job);
                    }
                });
            match spawned {
                Ok(h) => pool.threads.push(h),
                Err(e) => {
                    shared.shut_down();
                    pool.join();
                    return Err(Error::io("starting an asynchronous I/O worker", e));
                }
            }
        }
        Ok(pool)
    }

    /// Waits for every worker to exit.
    pub(super) fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
