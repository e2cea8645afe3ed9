//! The interop suite through the asynchronous queue: images written by qemu-io (data, zero
//! clusters, discards, subclusters, compressed clusters, backing chains, an external data
//! file) read back through the queue exactly as `qemu-img convert -O raw` sees them; and
//! images written through the queue (writes, vectored writes, write_zeroes, discards and
//! flushes, with reads in flight beside them) pass `qemu-img check` and `qemu-img compare`
//! against a raw file holding the model's bytes. Every case runs on both backends (io_uring,
//! where the kernel allows it, and the worker pool), buffered and with O_DIRECT.

mod common;

use common::aio::{aio_read_all, Buf};
use common::*;
use oxcow::ZeroFlags;
use oxcow::{AioBackend, AioBuf, AioOp, AioOptions, AioQueue, ErrorKind, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

type Queue = AioQueue<Arc<Image>, Buf, u64>;

/// The four ways a queue can reach the disk.
const MODES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn mode_name(threads: bool, direct: bool) -> String {
    format!(
        "{}, {}",
        if threads {
            "worker pool"
        } else {
            "default backend"
        },
        if direct { "O_DIRECT" } else { "buffered" }
    )
}

/// Opens `path` and a queue on it (None where the file system refuses O_DIRECT).
fn open_queue(
    path: &Path,
    writable: bool,
    threads: bool,
    direct: bool,
) -> Option<(Arc<Image>, Queue)> {
    let opts = OpenOptions {
        writable,
        direct,
        ..OpenOptions::default()
    };
    let img = match Image::open(path, &opts) {
        Ok(img) => Arc::new(img),
        Err(e) if direct && e.kind() == ErrorKind::Unsupported => {
            eprintln!("{}: no O_DIRECT here, skipped ({e})", path.display());
            return None;
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    };
    let q = AioQueue::new(
        Arc::clone(&img),
        &AioOptions {
            depth: 64,
            workers: 2,
            force_threads: threads,
        },
    )
    .expect("queue");
    if threads {
        assert_eq!(q.backend(), AioBackend::Threads);
    } else if q.backend() == AioBackend::Threads {
        eprintln!("io_uring refused by the kernel: the default backend is the worker pool");
    }
    Some((img, q))
}

/// Reads `path` through the queue in every mode and compares every byte with qemu's view.
fn assert_aio_reads_like_qemu(dir: &TempDir, path: &Path, what: &str) {
    let want = qemu_to_raw(path, "qcow2", dir);
    for (threads, direct) in MODES {
        let Some((_img, q)) = open_queue(path, false, threads, direct) else {
            continue;
        };
        // The first pass finds the L2 slices uncached (the pool looks them up and
        // publishes them); the second finds them cached (io_uring, where available).
        for pass in ["cold", "warm"] {
            let got = aio_read_all(&q);
            let mode = mode_name(threads, direct);
            let what = format!("{what} read through the queue ({mode}, {pass} cache)");
            assert_same_bytes(&got, &want, &what);
        }
    }
}

/// A file of random bytes for `qemu-io write -s` (each write copies it from its start), so
/// that no two 4 KiB blocks of a write hold the same bytes and a read from the wrong host
/// block shows.
fn random_source(dir: &TempDir, seed: u64) -> String {
    let p = dir.join("source.bin");
    std::fs::write(&p, Rng::new(seed).bytes((3 * MIB + 123) as usize)).expect("write source");
    path_str(&p).to_string()
}

#[test]
fn qemu_written_data_zero_clusters_and_discards_read_identically_through_the_queue() {
    let dir = TempDir::new("aio-read-plain");
    let p = dir.join("img.qcow2");
    let cs = 64 * KIB;
    qemu_create(&p, 8 * MIB, "cluster_size=65536");
    let src = random_source(&dir, 1);
    let mut cmds = vec![
        format!("write -s {src} 0 {}", 2 * MIB),
        format!("write -P 0x12 {} {}", 3 * MIB + 100, 3 * cs + 7),
        format!("write -z {} {}", cs, 2 * cs),
        format!("write -z -u {} {}", 5 * cs, cs),
        format!("write -z {} {}", 4 * MIB, 3 * cs),
        format!("discard {} {}", 8 * cs, 4 * cs),
        format!("write -s {src} {} 4096", 9 * cs + 4096),
        format!("write -P 0x14 {} 1", 8 * MIB - 1),
    ];
    let mut rng = Rng::new(1);
    for i in 0..40 {
        let off = rng.below(8 * MIB - 200_000);
        cmds.push(format!(
            "write -P {:#x} {off} {}",
            0x20 + i,
            rng.range(1, 3 * cs)
        ));
    }
    qemu_io(&p, &cmds);
    assert_aio_reads_like_qemu(&dir, &p, "64 KiB clusters");
}

#[test]
fn qemu_written_extended_l2_subclusters_read_identically_through_the_queue() {
    let dir = TempDir::new("aio-read-extl2");
    let p = dir.join("img.qcow2");
    let cs = 64 * KIB;
    let sc = cs / 32;
    qemu_create(&p, 4 * MIB, "cluster_size=65536,extended_l2=on");
    let src = random_source(&dir, 2);
    qemu_io(
        &p,
        &[
            format!("write -s {src} {} {}", 16 * cs, 8 * cs),
            format!("write -P 0x21 0 {sc}"),
            format!("write -P 0x22 {} {sc}", cs + 3 * sc),
            format!("write -P 0x23 {} 10", 2 * cs + 5),
            format!("write -P 0x24 {} {sc}", 3 * cs - sc / 2),
            format!("write -s {src} {} {cs}", 4 * cs),
            format!("write -z {} {}", 4 * cs + 2 * sc, 3 * sc),
            format!("write -z {} {}", 6 * cs + sc, 2 * sc),
            format!("write -z -u {} {sc}", 4 * cs + 10 * sc),
            format!("write -P 0x26 {} 100", 4 * cs + 11 * sc + 7),
            format!("write -z {} {cs}", 7 * cs),
            format!("write -z {} {}", 17 * cs + 4 * sc, 8 * sc),
            format!("write -P 0x27 {} {sc}", 7 * cs + 31 * sc),
        ],
    );
    assert_aio_reads_like_qemu(&dir, &p, "extended L2");
}

#[test]
fn qemu_compressed_clusters_read_identically_through_the_queue() {
    let dir = TempDir::new("aio-read-compressed");
    let raw = dir.join("src.raw");
    let cs = 64 * KIB;
    let mut rng = Rng::new(3);
    let mut bytes = vec![0u8; (4 * MIB) as usize];
    for (i, c) in bytes.chunks_mut(cs as usize).enumerate() {
        match i % 4 {
            0 => rng.fill(c),                           // incompressible
            1 => c.fill(0x5a),                          // compresses well
            2 => rng.fill(&mut c[..(cs / 3) as usize]), // partly random
            _ => {}                                     // zeros
        }
    }
    std::fs::write(&raw, &bytes).expect("write raw");
    for ctype in ["zlib", "zstd"] {
        let p = dir.join(&format!("{ctype}.qcow2"));
        qemu_convert_raw_to_qcow2(&raw, &p, &format!("compression_type={ctype}"), true);
        // Some clusters overwritten uncompressed after the conversion.
        qemu_io(&p, &[format!("write -P 0x31 {} {}", cs + 4096, 8192)]);
        assert_aio_reads_like_qemu(&dir, &p, &format!("{ctype} compressed"));
    }
}

/// A qcow2 base with data everywhere, and an overlay over it with some writes, zero
/// clusters and discards.
fn backing_chain(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let cs = 64 * KIB;
    let base = dir.join("base.qcow2");
    qemu_create(&base, 4 * MIB, "cluster_size=65536");
    let src = random_source(dir, 4);
    qemu_io(
        &base,
        &[
            format!("write -s {src} 0 {}", 3 * MIB),
            format!("write -P 0x41 {} {}", 3 * MIB, MIB),
            format!("write -z {} {cs}", 2 * MIB),
        ],
    );
    let top = dir.join("top.qcow2");
    qemu_create_overlay(&top, None, "cluster_size=65536", path_str(&base), "qcow2");
    qemu_io(
        &top,
        &[
            format!("write -P 0x42 {} {}", cs / 2, cs),
            format!("write -z {} {}", 4 * cs, 2 * cs),
            format!("discard {} {}", 8 * cs, cs),
            format!("write -P 0x43 {} 4096", 3 * MIB + 4096),
            format!("write -s {src} {} {}", MIB, 5 * cs),
        ],
    );
    (base, top)
}

#[test]
fn qemu_written_backing_chain_reads_identically_through_the_queue() {
    let dir = TempDir::new("aio-read-backing");
    let (_, top) = backing_chain(&dir);
    assert_aio_reads_like_qemu(&dir, &top, "overlay over a qcow2 base");
}

#[test]
fn qemu_written_external_data_file_reads_identically_through_the_queue() {
    let dir = TempDir::new("aio-read-datafile");
    let src = random_source(&dir, 5);
    for raw in [false, true] {
        let p = dir.join(&format!("img-{raw}.qcow2"));
        let data = dir.join(&format!("data-{raw}.img"));
        let opts = format!("data_file={},data_file_raw={raw}", path_str(&data));
        qemu_create(&p, 4 * MIB, &opts);
        qemu_io(
            &p,
            &[
                format!("write -s {src} 0 {}", MIB),
                format!("write -P 0x52 {} 4096", 2 * MIB + 8192),
                format!("write -z {} {}", 128 * KIB, 64 * KIB),
            ],
        );
        assert_aio_reads_like_qemu(&dir, &p, &format!("external data file (raw {raw})"));
    }
}

/// One round of disjoint requests, all in flight together: writes (some vectored, some whole
/// 4 KiB blocks that the io_uring path overwrites in place once their cluster is owned),
/// write_zeroes, discards, reads checked against the model as it was before the round, and
/// a flush; then every completion is polled. The model follows each change.
fn aio_round(q: &Queue, model: &mut RawModel, rng: &mut Rng, round: u64) {
    let size = model.data.len() as u64;
    let before = model.data.clone();
    let mut pos = rng.below(16 * KIB);
    let mut i = 0u64;
    while pos < size {
        let len = if rng.chance(40) {
            4096 * rng.range(1, 2)
        } else {
            rng.range(1, 150 * KIB)
        };
        let off = if rng.chance(40) {
            pos.div_ceil(4096) * 4096
        } else {
            pos
        };
        if off >= size {
            break;
        }
        let len = len.min(size - off);
        let tag = (round * 31 + i) as u8 | 1;
        let op = match rng.below(10) {
            0..=3 => {
                let data = tagged_data(tag, off, len as usize);
                model.write(off, &data);
                AioOp::Write {
                    bufs: vec![Buf::from(&data)],
                    offset: off,
                }
            }
            4 if len > 3 => {
                let data = tagged_data(tag, off, len as usize);
                model.write(off, &data);
                let (a, rest) = data.split_at(len as usize / 3);
                let (b, c) = rest.split_at(1);
                AioOp::Write {
                    bufs: vec![Buf::from(a), Buf::from(b), Buf::from(c)],
                    offset: off,
                }
            }
            5 => {
                model.zero(off, len);
                AioOp::WriteZeroes {
                    offset: off,
                    count: len,
                    flags: ZeroFlags {
                        may_unmap: rng.chance(50),
                    },
                }
            }
            6 => {
                model.discard(off, len);
                AioOp::Discard {
                    offset: off,
                    count: len,
                }
            }
            7 => AioOp::Flush,
            _ => AioOp::Read {
                bufs: vec![Buf::new(len as usize, 0xee)],
                offset: off,
            },
        };
        if let Err((e, ..)) = q.submit(op, off) {
            panic!("round {round}: submitting at {off:#x}+{len}: {e}");
        }
        pos = off + len + rng.below(8 * KIB);
        i += 1;
        if q.in_flight() == q.depth() {
            reap(q, &before, round, 1);
        }
    }
    reap(q, &before, round, q.in_flight());
    q.submit(AioOp::Flush, 0)
        .map_err(|(e, ..)| e)
        .expect("flush");
    reap(q, &before, round, 1);
}

/// Polls until `n` more requests completed; each must have succeeded, reads must hold the
/// bytes of `before` (nothing else touched their range in the round).
fn reap(q: &Queue, before: &[u8], round: u64, n: usize) {
    let mut got = 0;
    while got < n {
        for c in q.poll(n - got, None) {
            got += 1;
            if let Err(e) = &c.result {
                panic!("round {round}: request at {:#x}: {e}", c.user);
            }
            if let AioOp::Read { bufs, offset } = &c.op {
                let want = &before[*offset as usize..*offset as usize + bufs[0].bytes().len()];
                assert_same_bytes(bufs[0].bytes(), want, &format!("round {round}: read"));
            }
        }
    }
}

/// Writes `path` through the queue in one mode (several rounds, reads in flight), closes
/// it, and has qemu-img check it and compare it with the model.
fn write_through_queue_and_compare(
    dir: &TempDir,
    path: &Path,
    model: &mut RawModel,
    threads: bool,
    direct: bool,
    seed: u64,
) {
    let what = format!("{} ({})", path.display(), mode_name(threads, direct));
    let Some((img, q)) = open_queue(path, true, threads, direct) else {
        return;
    };
    let mut rng = Rng::new(seed);
    for round in 0..6 {
        aio_round(&q, model, &mut rng, round);
    }
    let got = aio_read_all(&q);
    assert_same_bytes(
        &got,
        &model.data,
        &format!("{what}: read back through the queue"),
    );
    drop(q);
    Arc::try_unwrap(img)
        .unwrap_or_else(|_| panic!("{what}: image still shared"))
        .close()
        .unwrap_or_else(|e| panic!("{what}: close: {e}"));
    assert_check_clean(path);
    assert_compare_model(path, model, dir);
}

#[test]
fn images_written_through_the_queue_pass_qemu_check_and_compare_in_every_mode() {
    for (k, (threads, direct)) in MODES.into_iter().enumerate() {
        let dir = TempDir::new("aio-write-plain");
        let p = dir.join("img.qcow2");
        qemu_create(&p, 6 * MIB, "cluster_size=65536");
        let mut model = RawModel::new(6 * MIB, 64 * KIB);
        write_through_queue_and_compare(&dir, &p, &mut model, threads, direct, 100 + k as u64);
    }
}

#[test]
fn extended_l2_and_4k_cluster_images_written_through_the_queue_pass_qemu_check_and_compare() {
    for (k, (opts, cs)) in [
        ("cluster_size=65536,extended_l2=on", 64 * KIB),
        ("cluster_size=4096", 4 * KIB),
    ]
    .into_iter()
    .enumerate()
    {
        for (threads, direct) in [(false, false), (true, true)] {
            let dir = TempDir::new("aio-write-geo");
            let p = dir.join("img.qcow2");
            qemu_create(&p, 4 * MIB, opts);
            let mut model = RawModel::new(4 * MIB, cs);
            write_through_queue_and_compare(&dir, &p, &mut model, threads, direct, 200 + k as u64);
        }
    }
}

#[test]
fn qemu_written_compressed_and_zero_clusters_overwritten_through_the_queue_pass_check_and_compare()
{
    for (threads, direct) in [(false, true), (true, false)] {
        let dir = TempDir::new("aio-write-compressed");
        let raw = dir.join("src.raw");
        let mut rng = Rng::new(5);
        let mut bytes = vec![0u8; (4 * MIB) as usize];
        for (i, c) in bytes.chunks_mut(64 * 1024).enumerate() {
            if i % 3 != 2 {
                rng.fill(&mut c[..20_000]);
            }
        }
        std::fs::write(&raw, &bytes).expect("write raw");
        let p = dir.join("img.qcow2");
        qemu_convert_raw_to_qcow2(&raw, &p, "", true);
        qemu_io(&p, &[format!("write -z {} {}", 2 * MIB, 256 * KIB)]);
        let mut model = RawModel::new(4 * MIB, 64 * KIB);
        model.data = qemu_to_raw(&p, "qcow2", &dir);
        write_through_queue_and_compare(&dir, &p, &mut model, threads, direct, 300);
    }
}

#[test]
fn overlays_written_through_the_queue_pass_qemu_check_and_compare() {
    for (threads, direct) in [(false, false), (true, true)] {
        let dir = TempDir::new("aio-write-backing");
        let (base, top) = backing_chain(&dir);
        let backing = qemu_to_raw(&base, "qcow2", &dir);
        let mut model = RawModel::with_backing(4 * MIB, 64 * KIB, &backing, 3);
        model.data = qemu_to_raw(&top, "qcow2", &dir);
        write_through_queue_and_compare(&dir, &top, &mut model, threads, direct, 400);
    }
}

#[test]
fn external_data_file_images_written_through_the_queue_pass_qemu_check_and_compare() {
    for raw in [false, true] {
        for (threads, direct) in [(false, true), (true, false)] {
            let dir = TempDir::new("aio-write-datafile");
            let p = dir.join("img.qcow2");
            let data = dir.join("data.img");
            let opts = format!("data_file={},data_file_raw={raw}", path_str(&data));
            qemu_create(&p, 4 * MIB, &opts);
            let mut model = RawModel::new(4 * MIB, 64 * KIB);
            write_through_queue_and_compare(&dir, &p, &mut model, threads, direct, 500);
        }
    }
}
