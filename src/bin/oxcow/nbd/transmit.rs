//! The transmission phase of one connection: a reader thread takes requests off the socket,
//! validates them and hands them to a small pool of workers, which run them concurrently on
//! the shared image (through [`exec::execute`]) and write each complete reply under one lock,
//! in whatever order they finish.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] requests and [`MAX_BYTES_IN_FLIGHT`] payload bytes are
//! queued or running per connection; when either is reached the reader stops reading the
//! socket until a reply has gone out, so a client cannot make the server buffer more.

use std::io::{self, BufReader, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::exec::{self, Export, Framing, MAX_PAYLOAD};
use super::proto::*;
use super::stream::{drop_bytes, Stream};

/// Requests queued or running per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// READ/WRITE bytes queued or running per connection (one request is always admitted).
pub const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Worker threads per connection.
pub const WORKERS: usize = 16;

/// A request the reader accepted, with its WRITE payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u64,
}

/// Counts what is in flight and makes the reader wait when a bound is reached.
#[derive(Default)]
struct Window {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Window {
    fn acquire(&self, cost: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 >= MAX_IN_FLIGHT || (s.0 > 0 && s.1 + cost > MAX_BYTES_IN_FLIGHT) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0 += 1;
        s.1 += cost;
    }

    fn release(&self, cost: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        s.1 -= cost;
        self.cv.notify_all();
    }
}

/// Serves requests until the client disconnects, sends NBD_CMD_DISC, breaks the protocol
/// or the socket is shut down; returns once every accepted request has been answered.
pub fn serve(mut r: BufReader<Stream>, w: Stream, ex: Arc<Export>, f: Framing) {
    let writer = Arc::new(Mutex::new(w));
    let window = Arc::new(Window::default());
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (rx, writer, window, ex) = (rx.clone(), writer.clone(), window.clone(), ex.clone());
            thread::spawn(move || worker(&rx, &writer, &window, &ex, f))
        })
        .collect();
    let _ = read_loop(&mut r, &tx, &writer, &window, &ex, f);
    drop(tx);
    for t in workers {
        let _ = t.join();
    }
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    w.shutdown(std::net::Shutdown::Both);
}

fn worker(
    rx: &Mutex<mpsc::Receiver<Job>>,
    writer: &Mutex<Stream>,
    window: &Window,
    ex: &Export,
    f: Framing,
) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let reply = exec::execute(ex, f, &job.req, &job.payload);
        drop(job.payload);
        send(writer, &reply);
        window.release(job.cost);
    }
}

/// Writes one complete reply; a failed write shuts the socket so the reader stops too.
fn send(writer: &Mutex<Stream>, reply: &[u8]) {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    if w.write_all(reply).is_err() {
        w.shutdown(std::net::Shutdown::Both);
    }
}

fn read_loop(
    r: &mut BufReader<Stream>,
    tx: &mpsc::Sender<Job>,
    writer: &Mutex<Stream>,
    window: &Window,
    ex: &Export,
    f: Framing,
) -> io::Result<()> {
    loop {
        let mut h = [0u8; REQUEST_LEN];
        r.read_exact(&mut h)?;
        let Some(req) = Request::parse(&h) else {
            return Ok(()); // bad magic: the stream cannot be trusted any more
        };
        if req.command == CMD_DISC {
            return Ok(());
        }
        let has_payload = req.command == CMD_WRITE;
        if let Err((err, msg)) = validate(ex, f, &req) {
            if has_payload {
                drop_bytes(r, u64::from(req.length))?;
            }
            send(writer, &exec::error_reply(f, req.cookie, err, msg));
            continue;
        }
        let cost = match req.command {
            CMD_READ | CMD_WRITE => u64::from(req.length),
            _ => 0,
        };
        window.acquire(cost);
        let mut payload = Vec::new();
        if has_payload {
            payload = vec![0u8; req.length as usize];
            if let Err(e) = r.read_exact(&mut payload) {
                window.release(cost);
                return Err(e);
            }
        }
        if tx.send(Job { req, payload, cost }).is_err() {
            window.release(cost);
            return Ok(());
        }
    }
}

/// Checks a request before any work or allocation: the error to reply otherwise.
pub fn validate(ex: &Export, f: Framing, req: &Request) -> Result<(), (u32, &'static str)> {
    let allowed = match req.command {
        CMD_READ if f.structured => CMD_FLAG_DF,
        CMD_READ | CMD_FLUSH | CMD_CACHE => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err((EINVAL, "unsupported command")),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "unsupported flags for this command"));
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && ex.read_only {
        return Err((EPERM, "export is read-only"));
    }
    // qemu-nbd answers EINVAL here, structured replies or not (EOVERFLOW is allowed too).
    if matches!(req.command, CMD_READ | CMD_WRITE) && req.length > MAX_PAYLOAD {
        return Err((EINVAL, "request larger than the maximum block size"));
    }
    if req.command == CMD_BLOCK_STATUS {
        if !f.structured || !f.contexts.any() {
            return Err((EINVAL, "no metadata context negotiated"));
        }
        if req.length == 0 {
            return Err((EINVAL, "block status of 0 bytes"));
        }
    }
    let end = req.offset.checked_add(u64::from(req.length));
    if req.command != CMD_FLUSH && end.is_none_or(|e| e > ex.size()) {
        return Err((EINVAL, "request past the end of the export"));
    }
    Ok(())
}
