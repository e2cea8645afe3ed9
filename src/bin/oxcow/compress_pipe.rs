//! The parallel writer behind `oxcow convert -c`: the caller reads clusters in guest order,
//! N compressor threads compress them (no lock is held while compressing), and one writer
//! thread stores them back in guest order, so compressed clusters are packed one after
//! another on the host exactly as a single thread would pack them: the output file is the
//! same whatever the thread count. Clusters that do not compress are written in batches
//! after the compressed ones around them, so they do not cut the packed stream into pieces
//! with holes between them.

use crate::args::{CliError, CliResult};
use oxcow::{CompressedCluster, Image};
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Most threads `-m` accepts (qemu-img's limit for its parallel requests).
pub const MAX_THREADS: usize = 16;

/// Clusters queued per compressor thread, on each side of it: bounds memory (a few MiB at
/// 64 KiB clusters) while keeping every thread busy.
const QUEUE_PER_THREAD: usize = 4;

/// One cluster to compress: its place in guest order, guest offset and bytes.
struct Job {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

type Done = (u64, oxcow::Result<CompressedCluster>);

/// The default number of compressor threads: one per core, at most [`MAX_THREADS`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS)
}

/// Runs `feed` with a sink that takes whole clusters in guest order; the clusters are
/// compressed on `threads` threads and written to `img` in that order. Returns the first
/// error: the writer's, a compressor's, or `feed`'s own.
pub fn run<F>(img: &Image, threads: usize, dst: &str, feed: F) -> CliResult<()>
where
    F: FnOnce(&mut Sink) -> CliResult<()>,
{
    let threads = threads.clamp(1, MAX_THREADS);
    let cap = threads * QUEUE_PER_THREAD;
    let (job_tx, job_rx) = sync_channel::<Job>(cap);
    let (done_tx, done_rx) = sync_channel::<Done>(cap);
    let job_rx = Arc::new(Mutex::new(job_rx));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (rx, tx) = (Arc::clone(&job_rx), done_tx.clone());
            s.spawn(move || compressor(img, &rx, &tx));
        }
        // Only the compressors hold the queue's ends now: when they all stop, the reader's
        // next push fails instead of blocking, and the writer sees the end of its input.
        drop(job_rx);
        drop(done_tx);
        let writer = s.spawn(move || writer(img, done_rx, dst));
        let mut sink = Sink {
            tx: Some(job_tx),
            next: 0,
        };
        let fed = feed(&mut sink);
        // Closing the queue lets the compressors, then the writer, finish.
        sink.tx = None;
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(CliError::op("compressed writer thread panicked")));
        // A writer error explains a feed that stopped because the queue closed.
        written.and(fed)
    })
}

/// Where the reader puts clusters, in guest order.
pub struct Sink {
    tx: Option<SyncSender<Job>>,
    next: u64,
}

impl Sink {
    /// Queues one whole cluster (or the short last cluster of the disk) at guest `offset`.
    /// Blocks while the queue is full. Fails when the writer stopped (its error is returned
    /// by [`run`]).
    pub fn push(&mut self, offset: u64, data: &[u8]) -> CliResult<()> {
        let job = Job {
            seq: self.next,
            offset,
            data: data.to_vec(),
        };
        self.next += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(CliError::op("compressed copy stopped")),
        }
    }
}

/// A compressor thread: takes jobs until the queue closes or the writer goes away.
fn compressor(img: &Image, jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Done>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let result = img.compress_cluster(&job.data, job.offset);
        if done.send((job.seq, result)).is_err() {
            return;
        }
    }
}

/// Bytes of clusters that did not compress held back by the writer (bounds its memory).
const DEFER_BYTES: usize = 16 << 20;

/// The writer thread: stores clusters strictly in sequence order, holding the ones that
/// arrive early (at most the number in flight, bounded by the queues). Clusters that did not
/// compress are held back and written in batches: each one written between two compressed
/// clusters would end the packing cluster early and leave the rest of it as a hole.
fn writer(img: &Image, done: Receiver<Done>, dst: &str) -> CliResult<()> {
    // With 1-bit refcounts nothing is packed (a host cluster holds one compressed cluster),
    // so holding back gains nothing and would only end the file on a whole cluster.
    let defer = img.info().map_or(true, |i| i.refcount_bits > 1);
    let mut early: BTreeMap<u64, oxcow::Result<CompressedCluster>> = BTreeMap::new();
    let mut deferred: Vec<CompressedCluster> = Vec::new();
    let mut deferred_bytes = 0usize;
    let mut next = 0u64;
    for (seq, result) in done {
        early.insert(seq, result);
        while let Some(result) = early.remove(&next) {
            let c = result.map_err(|e| CliError::op(format!("compressing for '{dst}': {e}")))?;
            next += 1;
            if c.is_compressed() || !defer {
                store(img, &c, dst)?;
                continue;
            }
            deferred_bytes += c.stored_len();
            deferred.push(c);
            if deferred_bytes >= DEFER_BYTES {
                deferred.drain(..).try_for_each(|c| store(img, &c, dst))?;
                deferred_bytes = 0;
            }
        }
    }
    deferred.iter().try_for_each(|c| store(img, c, dst))
}

fn store(img: &Image, c: &CompressedCluster, dst: &str) -> CliResult<()> {
    img.write_compressed_cluster(c).map_err(|e| {
        CliError::op(format!(
            "compressed write to '{dst}' at {:#x}: {e}",
            c.offset()
        ))
    })
}
