//! The io_uring backend of the queue: hot-path reads (see `hot`) go to a ring whose
//! completions signal the queue's eventfd; their completions join the worker pool's in the
//! queue's completion list when the owner polls.

use super::hot::{plan_read, ReadPlan};
use super::pool::Shared;
use super::{AioBuf, AioCompletion, AioOp};
use crate::error::Error;
use crate::storage::uring::Ring;
use crate::storage::PinToken;
use crate::Image;
use std::io;
use std::ops::Deref;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

/// A request on the ring, with the grace pin it holds until its completion.
struct HotReq<B, T> {
    cookie: u64,
    op: AioOp<B>,
    user: T,
    pin: PinToken,
    len: usize,
}

/// The ring and what runs on it.
pub(super) struct RingPath<B, T> {
    ring: Mutex<Ring<HotReq<B, T>>>,
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
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring<HotReq<B, T>>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
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
            _ => return Some((op, user)),
        };
        let img: &Image = &shared.image;
        let grace = img.file.grace();
        let pin = grace.pin_detached();
        let buf = read_buf(&mut op);
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        match plan_read(img, offset, addr, len) {
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
                };
                let mut ring = self.lock();
                match ring.read(fd, host, req, |r| read_buf(&mut r.op)) {
                    Ok(()) => {
                        // A failed submit leaves the entry queued; the next poll retries.
                        let _ = ring.submit();
                        None
                    }
                    Err(refused) => {
                        let r = refused.req;
                        grace.unpin(r.pin);
                        Some((r.op, r.user))
                    }
                }
            }
        }
    }

    /// Moves the ring's completions to the queue's list; a short read (end of the host
    /// file) or a transient error goes to the worker pool, whose synchronous engine pads
    /// and retries exactly as a synchronous read does.
    pub(super) fn reap<I>(&self, shared: &Shared<I, B, T>)
    where
        I: Deref<Target = Image> + Send + Sync + 'static,
    {
        let mut out = Vec::new();
        {
            let mut ring = self.lock();
            if ring.in_flight() == 0 {
                return;
            }
            let _ = ring.submit();
            ring.reap(&mut out);
        }
        let img: &Image = &shared.image;
        for (req, r) in out {
            let HotReq {
                cookie,
                op,
                user,
                pin,
                len,
            } = req;
            img.file.grace().unpin(pin);
            let result = match r {
                Ok(n) if n == len => Ok(()),
                Ok(_) => {
                    shared.push_job(cookie, op, user);
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                    shared.push_job(cookie, op, user);
                    continue;
                }
                Err(e) => img.finish(Err(Error::io(
                    format!("{}: reading guest data", img.data_file().name()),
                    e,
                ))),
            };
            shared.complete(AioCompletion {
                cookie,
                result,
                op,
                user,
            });
        }
    }

    /// Whether the kernel has posted completions not reaped yet.
    pub(super) fn has_completions(&self) -> bool {
        self.lock().has_completions()
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
