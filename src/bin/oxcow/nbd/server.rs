//! Listening, accepting, one thread per connection, and the graceful stop: on SIGTERM,
//! SIGINT or SIGHUP the server stops accepting, shuts the read side of every connection (a
//! request already read is still executed and answered), waits for them (closing sockets
//! whose client stopped reading after [`DRAIN_LIMIT`]), and leaves the image to the caller
//! to close (which flushes it and stores its bitmaps).

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::exec::Export;
use super::negotiate::{self, End};
use super::stream::Stream;
use super::{sys, transmit};

/// A bound listening socket.
pub enum Listener {
    /// A Unix socket and its path (removed when the server stops).
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `-k PATH` (replacing a stale socket file, as qemu-nbd does).
    pub fn unix(path: PathBuf) -> io::Result<Listener> {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Listener::Unix(UnixListener::bind(&path)?, path))
    }

    /// Binds `-b ADDR -p PORT`.
    pub fn tcp(addr: &str, port: u16) -> io::Result<Listener> {
        let host = addr.trim_start_matches('[').trim_end_matches(']');
        Ok(Listener::Tcp(TcpListener::bind((host, port))?))
    }

    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How connections are admitted.
pub struct Policy {
    /// At most this many clients at once (`-e`); more wait in the listen backlog.
    pub shared: usize,
    /// Keep serving after the last client leaves (`-t`).
    pub persistent: bool,
    /// Time a client has to finish the handshake (`--handshake-limit`).
    pub handshake_limit: Duration,
}

type Registry = Arc<Mutex<Vec<(u64, Stream)>>>;

/// Serves `ex` on `l` until a stop signal, or (without `-t`) until the last client left.
///
/// A connection that ends removes itself from the registry and then writes a byte to a wake
/// socket the accept loop polls beside the listener, so a client waiting for a free place
/// (`-e`) is admitted, and the server without `-t` exits, as soon as one leaves.
pub fn serve(l: &Listener, ex: &Arc<Export>, p: &Policy) -> io::Result<()> {
    let live: Registry = Arc::default();
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    // A full wake socket already wakes the loop: the byte that did not fit is not needed.
    wake_tx.set_nonblocking(true)?;
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut served = false;
    let mut next_id = 0u64;
    while !sys::stop_requested() {
        conns.retain(|h| !h.is_finished());
        let active = lock(&live).len();
        if !p.persistent && served && active == 0 {
            break;
        }
        // poll(2) skips a negative descriptor: at the limit only the wake socket is watched.
        let listen = if active >= p.shared.max(1) {
            -1
        } else {
            l.fd()
        };
        let [pending, woken] = sys::wait_readable([listen, wake_rx.as_raw_fd()], 100)?;
        if woken {
            drain_wakes(&wake_rx);
        }
        if !pending {
            continue;
        }
        let s = match l.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        served = true;
        next_id += 1;
        let wake = wake_tx.try_clone()?;
        conns.push(spawn_connection(
            s,
            next_id,
            ex.clone(),
            (&live, wake),
            p.handshake_limit,
        )?);
    }
    wind_down(&live, conns);
    Ok(())
}

/// Empties the wake socket (non-blocking; its bytes carry no data).
fn drain_wakes(mut s: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Time connections get to answer what they already read before their sockets are closed
/// under them (a client that stops reading replies would otherwise hold the stop forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Ends every connection: no more requests are read; the ones already read run to the end.
fn wind_down(live: &Registry, conns: Vec<JoinHandle<()>>) {
    for (_, s) in lock(live).iter() {
        s.shutdown(Shutdown::Read);
    }
    let t = Instant::now();
    while conns.iter().any(|h| !h.is_finished()) && t.elapsed() < DRAIN_LIMIT {
        thread::sleep(Duration::from_millis(10));
    }
    for (_, s) in lock(live).iter() {
        s.shutdown(Shutdown::Both);
    }
    for h in conns {
        let _ = h.join();
    }
}

fn lock(r: &Registry) -> std::sync::MutexGuard<'_, Vec<(u64, Stream)>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_connection(
    s: Stream,
    id: u64,
    ex: Arc<Export>,
    (live, mut wake): (&Registry, UnixStream),
    limit: Duration,
) -> io::Result<JoinHandle<()>> {
    lock(live).push((id, s.try_clone()?));
    let live = live.clone();
    Ok(thread::spawn(move || {
        // A stop that arrived while this connection was being registered must still reach it.
        if sys::stop_requested() {
            s.shutdown(Shutdown::Read);
        }
        let _ = connection(s, &ex, limit);
        lock(&live).retain(|(i, _)| *i != id);
        // After leaving the registry, which is what the accept loop counts.
        let _ = wake.write(&[1]);
    }))
}

fn connection(s: Stream, ex: &Arc<Export>, limit: Duration) -> io::Result<()> {
    s.set_nodelay();
    s.set_read_timeout(Some(limit))?;
    let mut w = s.try_clone()?;
    let watchdog = Watchdog::start(s.try_clone()?, limit);
    let mut r = BufReader::with_capacity(256 << 10, s);
    let deadline = Instant::now() + limit;
    let end = negotiate::negotiate(&mut r, &mut w, ex, deadline);
    watchdog.disarm();
    match end? {
        End::Close => {
            w.shutdown(Shutdown::Both);
            Ok(())
        }
        End::Transmit(f) => {
            r.get_ref().set_read_timeout(None)?;
            transmit::serve(r, w, ex.clone(), f);
            Ok(())
        }
    }
}

/// Closes a connection whose handshake outlives the limit, however slowly its bytes trickle
/// in (the per-read timeout alone would let a client send one byte every few seconds).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(s: Stream, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        thread::spawn(move || {
            let t = Instant::now();
            while !d.load(Ordering::Acquire) && !sys::stop_requested() {
                if t.elapsed() > limit {
                    s.shutdown(Shutdown::Both);
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Watchdog(done)
    }

    fn disarm(self) {
        self.0.store(true, Ordering::Release);
    }
}
