//! `oxcow nbd` with a client that pipelines many requests on one connection (what qemu's
//! client does at depth > 1): small requests run on the connection's reader thread, large,
//! FUA and FLUSH requests on its workers, and every reply still arrives exactly once, under
//! its cookie, with the bytes a model of the disk predicts. The writes sent before a FLUSH
//! are on disk when the FLUSH is answered, wherever they ran.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::nbd::{NbdServer, Server};
use common::nbd_wire::{request, transmission, SIMPLE_MAGIC};
use common::*;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const FLAG_FUA: u16 = 1;
const SIZE: u64 = 8 * MIB;

/// One request as the client sends it.
struct Req {
    cmd: u16,
    flags: u16,
    off: u64,
    len: u32,
    /// WRITE: the byte every payload byte holds.
    fill: u8,
}

impl Req {
    fn encode(&self, cookie: u64, out: &mut Vec<u8>) {
        out.extend(request(self.cmd, self.flags, cookie, self.off, self.len));
        if self.cmd == CMD_WRITE {
            out.resize(out.len() + self.len as usize, self.fill);
        }
    }
}

/// Sends all of `reqs` (cookie = index) from another thread, so the server can answer while
/// the client is still sending, and reads every reply: the READ data by cookie. Each cookie
/// must be answered exactly once, without error. `on_reply` sees the cookies in reply order.
fn pipeline(
    s: &mut UnixStream,
    reqs: &[Req],
    mut on_reply: impl FnMut(u64),
) -> HashMap<u64, Vec<u8>> {
    let mut wire = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        r.encode(i as u64, &mut wire);
    }
    let mut w = s.try_clone().unwrap();
    let sender = thread::spawn(move || w.write_all(&wire).expect("send requests"));
    let mut data = HashMap::new();
    for _ in 0..reqs.len() {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("reply header");
        assert_eq!(&h[..4], &SIMPLE_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let r = reqs
            .get(cookie as usize)
            .expect("reply to an unknown cookie");
        assert_eq!(err, 0, "error {err} for cookie {cookie}");
        let mut d = Vec::new();
        if r.cmd == CMD_READ {
            d = vec![0u8; r.len as usize];
            s.read_exact(&mut d).expect("read data");
        }
        assert!(data.insert(cookie, d).is_none(), "cookie {cookie} twice");
        on_reply(cookie);
    }
    sender.join().unwrap();
    data
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Lengths from sector-sized to past the reader's inline limit (64 KiB).
const LENGTHS: [u32; 9] = [
    512,
    4096,
    4096,
    4096,
    8192,
    65536,
    65536 + 512,
    256 << 10,
    1 << 20,
];

/// Non-overlapping writes (FUA on some) covering a random stretch of the disk, then a FLUSH,
/// then more small writes the FLUSH does not have to cover.
fn write_round(rng: &mut Rng, round: u8) -> Vec<Req> {
    let mut reqs = Vec::new();
    let mut off = rng.next() % (SIZE / 2) / 512 * 512;
    let mut flushed = false;
    while let Some(len) = Some(rng.pick(&LENGTHS)).filter(|l| off + u64::from(*l) <= SIZE) {
        if !flushed && off > SIZE * 3 / 4 {
            reqs.push(Req {
                cmd: CMD_FLUSH,
                flags: 0,
                off: 0,
                len: 0,
                fill: 0,
            });
            flushed = true;
        }
        let flags = if rng.next() % 8 == 0 { FLAG_FUA } else { 0 };
        let fill = (reqs.len() as u8).wrapping_mul(7).wrapping_add(round) | 1;
        reqs.push(Req {
            cmd: CMD_WRITE,
            flags,
            off,
            len,
            fill,
        });
        off += u64::from(len);
    }
    reqs
}

fn apply(model: &mut [u8], reqs: &[Req]) {
    for r in reqs.iter().filter(|r| r.cmd == CMD_WRITE) {
        let o = r.off as usize;
        model[o..o + r.len as usize].fill(r.fill);
    }
}

/// Reads at random offsets (overlapping each other), of every length.
fn read_round(rng: &mut Rng, n: usize) -> Vec<Req> {
    (0..n)
        .map(|_| {
            let len = rng.pick(&LENGTHS);
            let off = rng.next() % (SIZE - u64::from(len)) / 512 * 512;
            Req {
                cmd: CMD_READ,
                flags: 0,
                off,
                len,
                fill: 0,
            }
        })
        .collect()
}

/// The writes sent before the first FLUSH of `reqs`.
fn writes_before_flush(reqs: &[Req]) -> Vec<&Req> {
    reqs.iter()
        .take_while(|r| r.cmd != CMD_FLUSH)
        .filter(|r| r.cmd == CMD_WRITE)
        .collect()
}

/// Writes the file's dirty pages back and drops its pages from the page cache (GNU dd).
fn evict_from_page_cache(file: &Path) {
    let of = format!("of={}", file.display());
    let sync = [
        "if=/dev/null",
        "oflag=nocache",
        "conv=notrunc,fdatasync",
        "count=0",
        "status=none",
    ];
    run_ok("dd", &[&[of.as_str()][..], &sync[..]].concat());
}

/// The image file as another process sees it now (read-only, sharing the lock).
fn on_disk(img: &Path, r: &Req) -> Vec<u8> {
    let opts = oxcow::OpenOptions {
        force_share: true,
        ..oxcow::OpenOptions::default()
    };
    let image = oxcow::Image::open(img, &opts).expect("open the served image read-only");
    let mut buf = vec![0u8; r.len as usize];
    image
        .read_at(&mut buf, r.off)
        .expect("read the served image");
    buf
}

#[test]
fn pipelined_writes_flushes_and_reads_are_answered_once_each_with_the_modelled_bytes() {
    pipelined_rounds(&["-t"]);
}

#[test]
fn pipelined_requests_on_a_write_through_export_all_run_on_the_workers_correctly() {
    pipelined_rounds(&["-t", "--cache", "writethrough"]);
}

/// Four rounds of pipelined writes with a FLUSH, each followed by pipelined reads checked
/// against the model; the writes sent before the FLUSH must be on disk when it is answered.
fn pipelined_rounds(args: &[&str]) {
    let dir = TempDir::new("nbd-pipeline");
    let img = dir.join("a.qcow2");
    qemu_create(&img, SIZE, "");
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, args);
    let mut s = transmission(srv.socket.as_ref().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..4u8 {
        let writes = write_round(&mut rng, round);
        assert!(writes.iter().any(|r| r.cmd == CMD_FLUSH), "round {round}");
        let flush = writes.iter().position(|r| r.cmd == CMD_FLUSH).unwrap() as u64;
        let covered = writes_before_flush(&writes);
        let mut on_flush = Vec::new();
        pipeline(&mut s, &writes, |cookie| {
            if cookie == flush {
                on_flush = covered.iter().map(|r| on_disk(&img, r)).collect();
            }
        });
        for (r, disk) in covered.iter().zip(&on_flush) {
            let fill = r.fill;
            assert!(
                disk.iter().all(|b| *b == fill),
                "round {round}: write at {} of {} not on disk at the FLUSH reply",
                r.off,
                r.len
            );
        }
        apply(&mut model, &writes);
        if round % 2 == 1 {
            // Reads that miss the page cache send the reader's next requests to the workers.
            evict_from_page_cache(&img);
        }
        // Every write was answered: reads sent now must see all of them.
        let reads = read_round(&mut rng, 300);
        let data = pipeline(&mut s, &reads, |_| {});
        for (i, r) in reads.iter().enumerate() {
            let o = r.off as usize;
            assert!(
                data[&(i as u64)] == model[o..o + r.len as usize],
                "round {round}: read at {} of {} differs from the model",
                r.off,
                r.len
            );
        }
    }
    drop(s);
    srv.stop();
    assert_check_clean(&img);
}

#[test]
fn a_pipeline_of_tiny_interleaved_writes_and_reads_of_one_sector_keeps_reply_data_intact() {
    // Many 512-byte requests in one pipeline: replies of reads pack back to back in one
    // batch, and a read's data must never be mixed with a neighbouring reply's.
    let dir = TempDir::new("nbd-pipeline-tiny");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, SIZE, "", 0x11, SIZE);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t"]);
    let mut s = transmission(srv.socket.as_ref().unwrap());
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let writes: Vec<Req> = (0..2000u64)
        .map(|i| Req {
            cmd: CMD_WRITE,
            flags: 0,
            off: i * 4096,
            len: 512,
            fill: (i % 251) as u8 | 0x80,
        })
        .collect();
    pipeline(&mut s, &writes, |_| {});
    let reads: Vec<Req> = (0..4000u64)
        .map(|i| Req {
            cmd: CMD_READ,
            flags: 0,
            off: (i % 2000) * 4096 + (i / 2000) * 512,
            len: 512,
            fill: 0,
        })
        .collect();
    let data = pipeline(&mut s, &reads, |_| {});
    for (i, r) in reads.iter().enumerate() {
        let want = if r.off % 4096 == 0 {
            ((r.off / 4096) % 251) as u8 | 0x80
        } else {
            0x11
        };
        assert!(
            data[&(i as u64)].iter().all(|b| *b == want),
            "read at {}",
            r.off
        );
    }
    drop(s);
    srv.stop();
    assert_check_clean(&img);
}
