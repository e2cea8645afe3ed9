//! `oxcow bench --aio`: the request stream of `bench` kept `-d` deep from one thread through
//! the asynchronous API, as `qemu-img bench -i io_uring` does.

use super::{offset_of, AlignedBuf, Params, Target};
use crate::args::{CliError, CliResult};
use oxcow::{AioBuf, AioOp, AioOptions, AioQueue, Image};
use std::sync::Arc;
use std::time::Instant;

impl AioBuf for AlignedBuf {
    fn bytes(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.get()
    }
}

/// What a completion was: a data request or a flush.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Io,
    Flush,
}

type Queue = AioQueue<Arc<Image>, AlignedBuf, Kind>;

/// Runs the stream; returns the timed seconds. The handle is closed outside the timed region.
pub(super) fn run(p: &Params, target: Target, slots: u64) -> CliResult<f64> {
    let img: Arc<Image> = match target {
        Target::Qcow2(img) => Arc::from(img),
        Target::Raw(f) => return run_raw(p, &f, slots),
    };
    let opts = AioOptions {
        // One slot more than the data requests, for a flush.
        depth: p.depth as u32 + 1,
        workers: p.depth.min(16) as u32,
        force_threads: false,
    };
    let q: Queue =
        AioQueue::new(Arc::clone(&img), &opts).map_err(|e| CliError::op(e.to_string()))?;
    let start = Instant::now();
    let r = drive(p, &q, slots);
    let secs = start.elapsed().as_secs_f64();
    drop(q);
    r.map_err(|e| CliError::op(format!("bench on '{}': {e}", p.file)))?;
    let img = Arc::try_unwrap(img)
        .map_err(|_| CliError::op("internal error: the image is still shared after the run"))?;
    img.close()
        .map_err(|e| CliError::op(format!("closing '{}': {e}", p.file)))?;
    Ok(secs)
}

/// Keeps `depth` requests in flight until `count` completed; flushes every
/// `flush_interval` requests (after draining, unless --no-drain).
fn drive(p: &Params, q: &Queue, slots: u64) -> Result<(), String> {
    let mut free: Vec<AlignedBuf> = (0..p.depth)
        .map(|_| AlignedBuf::new(p.bufsize as usize, p.pattern))
        .collect();
    let (mut next, mut done) = (0u64, 0u64);
    while done < p.count {
        // The requests of one refill go to the kernel together (as qemu-img bench's do).
        let plug = q.plug();
        while next < p.count && !free.is_empty() {
            let Some(buf) = free.pop() else { break };
            let offset = offset_of(p, slots, next);
            let op = if p.write {
                AioOp::Write {
                    bufs: vec![buf],
                    offset,
                }
            } else {
                AioOp::Read {
                    bufs: vec![buf],
                    offset,
                }
            };
            q.submit(op, Kind::Io).map_err(|(e, _, _)| e.to_string())?;
            next += 1;
            if p.flush_interval > 0 && next % p.flush_interval == 0 && !p.flush_noop {
                if p.drain {
                    done += reap(q, &mut free, q.in_flight())?;
                }
                q.submit(AioOp::Flush, Kind::Flush)
                    .map_err(|(e, _, _)| e.to_string())?;
                if p.drain {
                    done += reap(q, &mut free, 1)?;
                }
            }
        }
        drop(plug);
        done += reap(q, &mut free, 1)?;
    }
    Ok(())
}

/// Waits for at least `want` completions (returns at once for 0), takes all that are ready,
/// returns the buffers to `free` and the number of data requests completed.
fn reap(q: &Queue, free: &mut Vec<AlignedBuf>, want: usize) -> Result<u64, String> {
    let mut got = 0usize;
    let mut data = 0u64;
    while got < want && q.in_flight() > 0 {
        for c in q.poll(usize::MAX, None) {
            got += 1;
            match (c.user, c.result) {
                (_, Err(e)) if c.user == Kind::Flush => return Err(format!("flush: {e}")),
                (_, Err(e)) => return Err(e.to_string()),
                (Kind::Flush, Ok(())) => {}
                (Kind::Io, Ok(())) => data += 1,
            }
            if let AioOp::Read { bufs, .. } | AioOp::Write { bufs, .. } = c.op {
                free.extend(bufs);
            }
        }
    }
    Ok(data)
}

/// `-f raw --aio`: the same stream as plain io_uring reads or writes on the raw file, the
/// physical limit of the one-thread model.
fn run_raw(p: &Params, f: &std::fs::File, slots: u64) -> CliResult<f64> {
    use std::os::fd::AsRawFd;
    let mut ring = oxcow::storage::uring::Ring::<AlignedBuf>::new(p.depth as u32)
        .map_err(|e| CliError::op(format!("io_uring is unavailable here: {e}")))?;
    let fd = f.as_raw_fd();
    let mut free: Vec<AlignedBuf> = (0..p.depth)
        .map(|_| AlignedBuf::new(p.bufsize as usize, p.pattern))
        .collect();
    let fail = |e: String| CliError::op(format!("bench on '{}': {e}", p.file));
    let (mut next, mut done) = (0u64, 0u64);
    let mut out = Vec::new();
    let start = Instant::now();
    while done < p.count {
        while next < p.count && !free.is_empty() {
            let Some(buf) = free.pop() else { break };
            let off = offset_of(p, slots, next);
            let r = if p.write {
                ring.write(fd, off, buf, |b| b.bytes())
            } else {
                ring.read(fd, off, buf, |b| b.get())
            };
            if let Err(r) = r {
                free.push(r.req);
                break;
            }
            next += 1;
        }
        ring.submit_and_wait(1).map_err(|e| fail(e.to_string()))?;
        out.clear();
        ring.reap(&mut out);
        for (buf, r) in out.drain(..) {
            match r {
                Ok(n) if n == p.bufsize as usize => {}
                Ok(n) => return Err(fail(format!("short transfer of {n} bytes"))),
                Err(e) => return Err(fail(e.to_string())),
            }
            free.push(buf);
            done += 1;
            if p.flush_interval > 0 && done % p.flush_interval == 0 && !p.flush_noop {
                f.sync_data().map_err(|e| fail(format!("fdatasync: {e}")))?;
            }
        }
    }
    Ok(start.elapsed().as_secs_f64())
}
