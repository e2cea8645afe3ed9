//! Driving the asynchronous queue from a test: 4 KiB-aligned request buffers (O_DIRECT and
//! the io_uring path need them) and a whole-disk read through the queue.

use oxcow::{AioBuf, AioOp, AioQueue, Image};
use std::sync::Arc;

/// A request buffer aligned to 4 KiB (as O_DIRECT needs for the io_uring path).
pub struct Buf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    pub fn new(len: usize, fill: u8) -> Buf {
        let mut v = vec![fill; len + 4096];
        let start = (4096 - v.as_mut_ptr() as usize % 4096) % 4096;
        Buf { v, start, len }
    }
    pub fn from(data: &[u8]) -> Buf {
        let mut b = Buf::new(data.len(), 0);
        b.bytes_mut().copy_from_slice(data);
        b
    }
}

impl AioBuf for Buf {
    fn bytes(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// Reads the whole guest disk through `q`, keeping the queue full: request sizes cycle
/// through whole 4 KiB blocks (the io_uring path's reads), odd sizes crossing clusters, and
/// vectored reads in three pieces; every buffer starts filled with 0xee.
pub fn aio_read_all<T: Send + Default + 'static>(q: &AioQueue<Arc<Image>, Buf, T>) -> Vec<u8> {
    let size = q.image().virtual_size();
    let mut out = vec![0u8; size as usize];
    let sizes = [4096u64, 3 * 4096 + 1, 65536, 511, 123_457, 8192, 4096];
    let (mut off, mut i) = (0u64, 0usize);
    loop {
        while off < size && q.in_flight() < q.depth() {
            let n = (size - off).min(sizes[i % sizes.len()]) as usize;
            let bufs = if i % 5 == 3 && n > 10 {
                let a = n / 3;
                vec![
                    Buf::new(a, 0xee),
                    Buf::new(7, 0xee),
                    Buf::new(n - a - 7, 0xee),
                ]
            } else {
                vec![Buf::new(n, 0xee)]
            };
            let op = AioOp::Read { bufs, offset: off };
            if let Err((e, ..)) = q.submit(op, T::default()) {
                panic!("submitting a read at {off:#x}+{n}: {e}");
            }
            off += n as u64;
            i += 1;
        }
        if q.in_flight() == 0 {
            return out;
        }
        for c in q.poll(usize::MAX, None) {
            let AioOp::Read { bufs, offset } = c.op else {
                panic!("a read came back as another request")
            };
            if let Err(e) = c.result {
                panic!("asynchronous read at {offset:#x}: {e}");
            }
            let mut at = offset as usize;
            for b in &bufs {
                out[at..at + b.bytes().len()].copy_from_slice(b.bytes());
                at += b.bytes().len();
            }
        }
    }
}
