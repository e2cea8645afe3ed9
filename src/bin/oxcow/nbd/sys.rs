//! The few operating-system calls the NBD server needs that std does not offer: signal
//! handlers for a graceful stop, `fork` for `--fork`, `poll` to wait for a connection while
//! watching for a stop request, `dup2` to detach a daemon from the caller's terminal, and
//! `getrusage` to see whether the reader thread's requests wait for the disk.
//!
//! They need `unsafe` libc calls, so they live together in this one small module, each
//! with its safety argument, and the rest of the server stays safe code.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGTERM/SIGINT/SIGHUP: the server stops accepting and winds down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop signal arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Installs the stop handler for SIGTERM, SIGINT and SIGHUP.
pub fn install_stop_handlers() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `sa` is fully initialised (zeroed, then handler and an empty mask set);
        // the handler only performs an atomic store, which is async-signal-safe.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits up to `timeout_ms` for any of `fds` to become readable; returns which are (all
/// false on timeout or on a signal, whose stop request the caller then sees).
pub fn wait_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `p` is an array of N valid pollfds that outlives the call; nfds is N.
    let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok([false; N])
        } else {
            Err(e)
        };
    }
    Ok(p.map(|p| p.revents != 0))
}

/// The child's end of the `--fork` handshake: it tells the waiting parent whether the server
/// came up.
pub struct Ready(File);

impl Ready {
    /// The server listens: the parent exits 0; this process drops the caller's stdout and
    /// stderr so a caller waiting for them to close is not held by the daemon.
    pub fn ok(mut self) {
        let _ = self.0.write_all(&[0]);
        drop(self);
        if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
            for target in [0, 1, 2] {
                // SAFETY: both descriptors are open; dup2 atomically replaces `target`.
                unsafe { libc::dup2(null.as_raw_fd(), target) };
            }
        }
    }

    /// Startup failed: the parent prints `msg` and exits 1.
    pub fn fail(mut self, msg: &str) {
        let _ = self.0.write_all(&[1]);
        let _ = self.0.write_all(msg.as_bytes());
    }
}

/// `--fork`: forks; the parent waits for the child's [`Ready`] report and exits with 0 or 1
/// (never returning); the child gets the report end. Must run before any thread exists.
pub fn fork_daemon() -> io::Result<Ready> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptors were just created by pipe2 and are owned by nothing else.
    let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (the caller's contract), so the child
    // inherits a consistent address space and may keep running Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(rd);
            Ok(Ready(wr))
        }
        _ => {
            drop(wr);
            parent_wait(rd)
        }
    }
}

fn parent_wait(mut rd: File) -> ! {
    let mut report = Vec::new();
    let _ = rd.read_to_end(&mut report);
    match report.split_first() {
        Some((0, _)) => std::process::exit(0),
        Some((_, msg)) => eprintln!("oxcow: {}", String::from_utf8_lossy(msg)),
        None => eprintln!("oxcow: the server process exited during startup"),
    }
    std::process::exit(1)
}

/// Blocks (512 bytes each) the calling thread has read from storage so far: it grows when a
/// read missed the page cache. 0 where the kernel does not account it.
pub fn thread_disk_blocks() -> u64 {
    // SAFETY: `ru` is a plain C struct that getrusage fills in completely on success; it is
    // only read when the call succeeded.
    let (r, ru) = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        let r = libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        (r, ru)
    };
    if r == 0 {
        ru.ru_inblock as u64
    } else {
        0
    }
}
