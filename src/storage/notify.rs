//! An eventfd: the readiness signal an asynchronous queue gives an event loop (readable while
//! completions wait to be polled). The only unsafe code is the three libc calls.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd in counter mode.
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates one with a zero counter (not readable).
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the flags are valid constants.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the descriptor readable (adds one to the counter). Errors are ignored: the only
    /// possible one, a counter at its maximum, already leaves the descriptor readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
    }

    /// Resets the counter so the descriptor is no longer readable (non-blocking; a zero
    /// counter is left as it is).
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own descriptor.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast::<libc::c_void>(),
                8,
            )
        };
    }
}

impl EventFd {
    /// Waits until the descriptor is readable or `timeout` passes (`None`: no limit).
    /// Returns whether it is readable.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> bool {
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, ms) > 0 }
    }
}

/// Whether `fd` is readable at this moment (a zero-timeout poll; tests of the queues'
/// readiness contract).
#[cfg(test)]
pub fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(e: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn signal_makes_readable_and_clear_resets() {
        let e = EventFd::new().unwrap();
        assert!(!readable(&e));
        e.signal();
        e.signal();
        assert!(readable(&e));
        e.clear();
        assert!(!readable(&e));
        e.clear();
        assert!(!readable(&e));
    }
}
