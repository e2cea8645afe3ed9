//! io_uring for the asynchronous queue: positioned reads and writes whose buffers belong to
//! a request object the ring keeps until the kernel has finished with them.
//!
//! Soundness rests on one rule, kept here and nowhere else: a request handed to
//! [`Ring::read`] or [`Ring::write`] is leaked into a raw pointer before its buffer's address
//! goes to the kernel, and is turned back into a `Box` only when its completion has been
//! reaped (or never, when the ring cannot wait for it: a leak, not a use after free).

use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;

/// Why a request could not be queued; the request comes back with it.
pub struct Refused<T> {
    /// The request, untouched.
    pub req: T,
    /// Submission queue full even after submitting (the caller runs the request elsewhere).
    pub full: bool,
}

/// A ring and the requests in flight on it.
pub struct Ring<T> {
    ring: IoUring,
    /// Requests in flight by slot (the SQE's user data), leaked until their completion.
    slots: Vec<*mut T>,
    free: Vec<usize>,
    in_flight: usize,
}

// SAFETY: the raw pointers are owned boxes of T (moved in by read/write, moved out by reap);
// sending the ring sends them, which is sound when T is Send.
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Ring<T> {
    /// A ring with `entries` submission slots (a power of two is used). Fails where io_uring
    /// is unavailable: ENOSYS (old kernel), EPERM (seccomp, kernel.io_uring_disabled).
    pub fn new(entries: u32) -> io::Result<Ring<T>> {
        let ring = IoUring::new(entries.clamp(1, 4096))?;
        Ok(Ring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Makes the ring signal `efd` (an eventfd) for every completion.
    pub fn register_eventfd(&self, efd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(efd)
    }

    /// Requests whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a read into the buffer `buf` picks out of `req` (the request keeps it alive:
    /// the ring owns the request until its completion is reaped). Call [`Self::submit`] to
    /// start the queued requests.
    pub fn read(
        &mut self,
        fd: RawFd,
        offset: u64,
        req: T,
        buf: impl for<'a> FnOnce(&'a mut T) -> &'a mut [u8],
    ) -> Result<(), Refused<T>> {
        let req = Box::into_raw(Box::new(req));
        // SAFETY: `req` is a fresh, unique box; the slice borrows memory it owns (or that
        // outlives it), which stays put until reap() rebuilds the box after the completion.
        let (ptr, len) = {
            let s = buf(unsafe { &mut *req });
            (s.as_mut_ptr(), s.len())
        };
        self.push(req, |ud| {
            opcode::Read::new(types::Fd(fd), ptr, len as u32)
                .offset(offset)
                .build()
                .user_data(ud)
        })
    }

    /// Queues a write of the buffer `buf` picks out of `req`; as [`Self::read`].
    pub fn write(
        &mut self,
        fd: RawFd,
        offset: u64,
        req: T,
        buf: impl for<'a> FnOnce(&'a T) -> &'a [u8],
    ) -> Result<(), Refused<T>> {
        let req = Box::into_raw(Box::new(req));
        // SAFETY: as in read(); the kernel only reads the buffer.
        let (ptr, len) = {
            let s = buf(unsafe { &*req });
            (s.as_ptr(), s.len())
        };
        self.push(req, |ud| {
            opcode::Write::new(types::Fd(fd), ptr, len as u32)
                .offset(offset)
                .build()
                .user_data(ud)
        })
    }

    /// Puts `req` in a slot and its SQE on the submission queue; on failure the request is
    /// rebuilt and handed back (nothing reached the kernel).
    fn push(
        &mut self,
        req: *mut T,
        sqe: impl FnOnce(u64) -> io_uring::squeue::Entry,
    ) -> Result<(), Refused<T>> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(std::ptr::null_mut());
                self.slots.len() - 1
            }
        };
        let entry = sqe(slot as u64);
        if self.ring.submission().is_full() {
            let _ = self.ring.submit();
        }
        // SAFETY: the SQE's buffer lives in `req`, which the slot owns until the completion
        // is reaped; the descriptor is the caller's open file.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            self.free.push(slot);
            // SAFETY: from Box::into_raw above; the kernel never saw it.
            let req = unsafe { Box::from_raw(req) };
            return Err(Refused {
                req: *req,
                full: true,
            });
        }
        self.slots[slot] = req;
        self.in_flight += 1;
        Ok(())
    }

    /// Starts every queued request.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    /// Starts queued requests and waits until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.ring.submit_and_wait(want)
    }

    /// Starts queued requests and waits until a completion is ready or `timeout` passes
    /// (`None`: no limit), in one io_uring_enter. Err on kernels without timed waits
    /// (before 5.11: EINVAL) or an interrupted wait (EINTR): the caller waits another way.
    pub fn wait(&mut self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let r = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Entries queued and not yet submitted to the kernel.
    pub fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Whether [`Self::submit`] has anything to do: entries to submit, or completions the
    /// kernel holds back because the completion queue overflowed (an enter flushes them).
    pub fn needs_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.cq_overflow()
    }

    /// Whether completions are ready to reap.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Moves every ready completion to `out`: the request and the byte count or the error.
    pub fn reap(&mut self, out: &mut Vec<(T, io::Result<usize>)>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let slot = cqe.user_data() as usize;
            let Some(p) = self.slots.get_mut(slot) else {
                continue;
            };
            let req = std::mem::replace(p, std::ptr::null_mut());
            if req.is_null() {
                continue;
            }
            // SAFETY: from Box::into_raw in read()/write(); the kernel is done with it.
            let req = unsafe { Box::from_raw(req) };
            let res = cqe.result();
            let r = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            out.push((*req, r));
            self.free.push(slot);
            self.in_flight -= 1;
        }
    }
}

impl<T> Drop for Ring<T> {
    /// Waits for the requests in flight so their buffers outlive the kernel's use; when
    /// waiting fails, the requests are leaked rather than freed under the kernel.
    fn drop(&mut self) {
        let mut out = Vec::new();
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return,
            }
            self.reap(&mut out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_and_writes_keep_their_buffers_until_reaped() {
        let Ok(mut ring) = Ring::<(u32, Vec<u8>)>::new(8) else {
            eprintln!("io_uring unavailable here: skipped");
            return;
        };
        let mut f = tempfile();
        f.write_all(&[7u8; 8192]).unwrap();
        let fd = f.as_raw_fd();
        for i in 0..4u32 {
            let r = ring.read(fd, u64::from(i) * 1024, (i, vec![0u8; 1024]), |r| &mut r.1);
            assert!(r.is_ok());
        }
        assert!(ring.write(fd, 8192, (9, vec![3u8; 512]), |r| &r.1).is_ok());
        ring.submit_and_wait(5).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 5);
        for ((i, buf), r) in out {
            if i == 9 {
                assert_eq!(r.unwrap(), 512);
            } else {
                assert_eq!(r.unwrap(), 1024);
                assert!(buf.iter().all(|&b| b == 7));
            }
        }
        assert_eq!(ring.in_flight(), 0);
    }

    fn tempfile() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("oxcow-uring-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
