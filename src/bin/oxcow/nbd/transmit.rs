//! The transmission phase of one connection. A reader thread takes requests off the socket
//! and validates them. Small READs and WRITEs on an export served through the page cache
//! ([`Export::cached_io`]) it runs itself, event-loop style: each reply is appended to a
//! [`Batch`], which goes out in one write once no further complete request is buffered (or
//! the batch is full), so a pipeline of requests costs one read and one write system call
//! and no thread hand-off. Everything else (FLUSH, FUA, large transfers, zeroing, trims
//! that free clusters, block status, any request on an O_DIRECT or write-through export)
//! goes to a small pool of workers, which run requests concurrently on the shared image
//! (through [`exec::execute`]) and write each complete reply under the writer lock, in
//! whatever order they finish.
//!
//! A request that misses the page cache would hold up the whole pipeline on the reader while
//! the workers could read in parallel: when the reader's thread read blocks from storage
//! since it last waited for the socket ([`sys::thread_disk_blocks`]), the next
//! [`COLD_OFFLOAD`] requests go to the workers, then the reader tries again.
//!
//! Ordering: NBD lets replies come in any order and only asks a FLUSH to cover the writes
//! whose replies were sent before it. Here a FLUSH covers every write sent before it: a
//! request run on the reader is complete before the reader reads on, and a FLUSH waits
//! until the requests already on the workers are done before it starts.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] requests and [`MAX_BYTES_IN_FLIGHT`] payload bytes are
//! queued or running on the workers per connection; when either is reached the reader stops
//! reading the socket until a reply has gone out. The reader's own batch holds at most
//! [`MAX_BATCH`] bytes plus one reply of at most [`MAX_INLINE`] bytes: when it is full the
//! reader writes it out (blocking while the client does not read) before it reads on. So a
//! client cannot make the server buffer more.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::exec::{self, Export, Framing, MAX_PAYLOAD};
use super::proto::*;
use super::stream::{drop_bytes, Stream};
use super::sys;

/// Requests queued or running per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// READ/WRITE bytes queued or running per connection (one request is always admitted).
pub const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Worker threads per connection.
pub const WORKERS: usize = 16;
/// Largest READ/WRITE the reader runs itself; larger ones go to the workers.
pub const MAX_INLINE: u32 = 64 << 10;
/// Reply bytes the reader collects before it writes them out even with requests pending.
pub const MAX_BATCH: usize = 256 << 10;
/// Requests the reader hands to the workers after its own ones read from the disk.
pub const COLD_OFFLOAD: u32 = 1024;

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

    /// Waits until nothing is queued or running on the workers.
    fn wait_idle(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 > 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
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
    let mut batch = Batch::new(&writer);
    let _ = read_loop(&mut r, &tx, &mut batch, &window, &ex, f);
    batch.send();
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

/// Replies of the requests the reader ran itself, written out together.
struct Batch<'a> {
    out: Vec<u8>,
    writer: &'a Mutex<Stream>,
}

impl<'a> Batch<'a> {
    fn new(writer: &'a Mutex<Stream>) -> Batch<'a> {
        Batch {
            out: Vec::new(),
            writer,
        }
    }

    /// Writes out the collected replies (the reader is about to wait or to stop).
    fn send(&mut self) {
        if !self.out.is_empty() {
            send(self.writer, &self.out);
            self.out.clear();
        }
    }

    /// Writes out the collected replies unless `n` more bytes are already buffered to read
    /// (the reader would then not wait on the socket).
    fn send_unless_buffered(&mut self, r: &BufReader<Stream>, n: usize) {
        if r.buffer().len() < n {
            self.send();
        }
    }

    /// Writes out the collected replies once they fill the batch.
    fn send_if_full(&mut self) {
        if self.out.len() >= MAX_BATCH {
            self.send();
        }
    }
}

fn read_loop(
    r: &mut BufReader<Stream>,
    tx: &mpsc::Sender<Job>,
    batch: &mut Batch,
    window: &Window,
    ex: &Export,
    f: Framing,
) -> io::Result<()> {
    let mut scratch = Vec::new();
    let mut cold = ColdCache::new();
    loop {
        if r.buffer().len() < REQUEST_LEN {
            batch.send();
            cold.check();
        }
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
                batch.send_unless_buffered(r, req.length as usize);
                drop_bytes(r, u64::from(req.length))?;
            }
            batch
                .out
                .extend_from_slice(&exec::error_reply(f, req.cookie, err, msg));
            batch.send_if_full();
            continue;
        }
        if runs_inline(ex, &req) && !cold.offload() {
            run_inline(r, batch, &mut scratch, ex, f, &req)?;
            batch.send_if_full();
            continue;
        }
        batch.send();
        if req.command == CMD_FLUSH {
            window.wait_idle(); // the FLUSH covers every write sent before it
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

/// Whether the reader's own requests went to the disk lately.
struct ColdCache {
    blocks: u64,
    offload_left: u32,
}

impl ColdCache {
    /// Starts from what the thread has read so far (the handshake is not a request).
    fn new() -> ColdCache {
        ColdCache {
            blocks: sys::thread_disk_blocks(),
            offload_left: 0,
        }
    }

    /// Called when the reader is about to wait for the socket: if it read from storage
    /// since the last call, the next [`COLD_OFFLOAD`] requests go to the workers.
    fn check(&mut self) {
        let now = sys::thread_disk_blocks();
        if now > self.blocks {
            self.offload_left = COLD_OFFLOAD;
        }
        self.blocks = now;
    }

    /// Whether to hand a request the reader could run to the workers instead.
    fn offload(&mut self) -> bool {
        if self.offload_left == 0 {
            return false;
        }
        self.offload_left -= 1;
        true
    }
}

/// Whether the reader runs `req` itself: it does not wait for the disk (page-cache I/O, no
/// FUA) and is small, so it holds up the requests behind it less than a hand-off would cost.
fn runs_inline(ex: &Export, req: &Request) -> bool {
    if !ex.cached_io {
        return false;
    }
    match req.command {
        CMD_READ | CMD_WRITE => req.length <= MAX_INLINE && req.flags & CMD_FLAG_FUA == 0,
        CMD_CACHE => true,
        CMD_TRIM => !ex.discard, // accepted and ignored
        _ => false,
    }
}

/// Runs a validated request on the reader thread and appends its reply to the batch. A
/// WRITE's payload is used where it lies in the read buffer when it is all there.
fn run_inline(
    r: &mut BufReader<Stream>,
    batch: &mut Batch,
    scratch: &mut Vec<u8>,
    ex: &Export,
    f: Framing,
    req: &Request,
) -> io::Result<()> {
    if req.command != CMD_WRITE {
        exec::execute_into(ex, f, req, &[], &mut batch.out);
        return Ok(());
    }
    let len = req.length as usize;
    if r.buffer().len() >= len {
        exec::execute_into(ex, f, req, &r.buffer()[..len], &mut batch.out);
        r.consume(len);
    } else {
        batch.send();
        scratch.resize(len, 0);
        r.read_exact(scratch)?;
        exec::execute_into(ex, f, req, scratch, &mut batch.out);
    }
    Ok(())
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
