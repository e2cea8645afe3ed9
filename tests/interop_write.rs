//! oxcow writes, QEMU checks: seeded random workloads are applied to an oxcow image and to a raw
//! reference model; then `qemu-img check` must be clean, `qemu-img compare` must report the
//! image identical to the reference, oxcow must read the reference back, and after qemu-io
//! writes more data oxcow (re-opened) must read everything correctly.

mod common;

use common::*;
use oxcow::{
    BackingFormat, CompressionType, CreateOptions, Image, OpenOptions, Preallocation, ZeroFlags,
};
use std::path::{Path, PathBuf};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        tag: u8,
        random: bool,
    },
    WriteV {
        off: u64,
        lens: Vec<u64>,
        tag: u8,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
}

struct Geometry {
    vsize: u64,
    cs: u64,
    l2cov: u64,
}

fn gen_offset(rng: &mut Rng, g: &Geometry) -> u64 {
    let v = match rng.below(7) {
        0 | 1 => rng.below(g.vsize),
        2 => {
            // Near a cluster boundary.
            let c = rng.below(g.vsize / g.cs + 1) * g.cs;
            (c + rng.below(64)).saturating_sub(32)
        }
        3 => {
            // Near an L2-table boundary.
            let n = (g.vsize / g.l2cov).max(1);
            let b = rng.range(1, n) * g.l2cov;
            (b + rng.below(2 * g.cs)).saturating_sub(g.cs)
        }
        4 => rng.below(g.vsize / g.cs) * g.cs,
        _ => rng.below((16 * g.cs).min(g.vsize)), // a hot area: many overwrites
    };
    v.min(g.vsize - 1)
}

fn gen_len(rng: &mut Rng, g: &Geometry) -> u64 {
    match rng.below(7) {
        0 => rng.range(1, 16),
        1 => rng.range(1, g.cs),
        2 => g.cs,
        3 => rng.range(1, 4 * g.cs),
        4 => rng.range(1, 4) * g.cs,
        5 => rng.range(1, (64 * g.cs).min(512 * KIB)),
        _ => rng.range(g.cs / 2, 2 * g.cs + 1),
    }
}

fn clamp(off: u64, len: u64, g: &Geometry) -> u64 {
    len.min(g.vsize - off).max(1)
}

fn gen_ops(seed: u64, n: usize, g: &Geometry, allow_reopen: bool) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut ops = Vec::with_capacity(n);
    for i in 0..n {
        let tag = (i % 250 + 1) as u8;
        let r = rng.below(100);
        let off = gen_offset(&mut rng, g);
        let len = clamp(off, gen_len(&mut rng, g), g);
        let op = match r {
            0..=49 => Op::Write {
                off,
                len,
                tag,
                random: rng.chance(30),
            },
            50..=59 => {
                let mut lens = Vec::new();
                let mut left = len;
                while left > 0 {
                    let l = rng.range(1, left.min(g.cs + 7));
                    lens.push(l);
                    left -= l;
                }
                Op::WriteV { off, lens, tag }
            }
            60..=74 => {
                // Zeroes: sometimes cluster-aligned so whole clusters can be unmapped.
                let (off, len) = if rng.chance(50) {
                    let o = off / g.cs * g.cs;
                    (o, clamp(o, len.div_ceil(g.cs) * g.cs, g))
                } else {
                    (off, len)
                };
                Op::Zero {
                    off,
                    len,
                    unmap: rng.chance(50),
                }
            }
            75..=88 => {
                let (off, len) = if rng.chance(50) {
                    let o = off / g.cs * g.cs;
                    (o, clamp(o, len.div_ceil(g.cs) * g.cs, g))
                } else {
                    (off, len)
                };
                // How a discard treats a partial cluster at the end of an image whose size is
                // not cluster-aligned is not specified: keep discards away from it.
                let tail = g.vsize / g.cs * g.cs;
                if g.vsize % g.cs != 0 && off + len > tail {
                    if off >= tail {
                        Op::Flush
                    } else {
                        Op::Discard {
                            off,
                            len: tail - off,
                        }
                    }
                } else {
                    Op::Discard { off, len }
                }
            }
            89..=93 => Op::Flush,
            94 | 95 => {
                // Rare huge requests: a large part of (or the whole) disk at once.
                let off = if rng.chance(50) { 0 } else { off / g.cs * g.cs };
                let len = if rng.chance(50) {
                    g.vsize - off
                } else {
                    clamp(off, g.vsize / 2, g)
                };
                match rng.below(3) {
                    0 => Op::Zero {
                        off,
                        len,
                        unmap: rng.chance(50),
                    },
                    1 => {
                        let tail = g.vsize / g.cs * g.cs;
                        if off >= tail {
                            Op::Flush
                        } else {
                            Op::Discard {
                                off,
                                len: len.min(tail - off),
                            }
                        }
                    }
                    _ => Op::Write {
                        off,
                        len: len.min(3 * MIB),
                        tag,
                        random: false,
                    },
                }
            }
            _ => {
                if allow_reopen {
                    Op::Reopen
                } else {
                    Op::Flush
                }
            }
        };
        ops.push(op);
    }
    ops
}

fn op_data(op_off: u64, len: u64, tag: u8, random: bool) -> Vec<u8> {
    if random {
        Rng::new(op_off ^ ((tag as u64) << 40) ^ len).bytes(len as usize)
    } else {
        tagged_data(tag, op_off, len as usize)
    }
}

/// Applies `ops` to the image at `path` (opened read-write, re-opened on `Reopen`) and to
/// `model`, spot-checking reads after each reopen.
fn apply_ops(path: &Path, model: &mut RawModel, ops: &[Op], seed: u64, open: &OpenOptions) {
    let mut img =
        Image::open(path, open).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut rng = Rng::new(seed ^ 0xabcdef);
    for (i, op) in ops.iter().enumerate() {
        let ctx = || format!("op #{i} {op:?} on {}", path.display());
        match op {
            Op::Write {
                off,
                len,
                tag,
                random,
            } => {
                let d = op_data(*off, *len, *tag, *random);
                img.write_at(&d, *off)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx()));
                model.write(*off, &d);
            }
            Op::WriteV { off, lens, tag } => {
                let total: u64 = lens.iter().sum();
                let d = op_data(*off, total, *tag, false);
                let mut bufs: Vec<&[u8]> = Vec::new();
                let mut p = 0usize;
                for l in lens {
                    bufs.push(&d[p..p + *l as usize]);
                    p += *l as usize;
                }
                img.write_vectored_at(&bufs, *off)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx()));
                model.write(*off, &d);
            }
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(*off, *len, ZeroFlags { may_unmap: *unmap })
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx()));
                model.zero(*off, *len);
            }
            Op::Discard { off, len } => {
                img.discard(*off, *len)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx()));
                model.discard(*off, *len);
            }
            Op::Flush => img.flush().unwrap_or_else(|e| panic!("{}: {e}", ctx())),
            Op::Reopen => {
                img.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", ctx()));
                img = Image::open(path, open).unwrap_or_else(|e| panic!("{}: reopen: {e}", ctx()));
                spot_check_reads(&img, &model.data, &mut rng, 8);
            }
        }
        // Occasionally read back the range just touched.
        if i % 7 == 3 {
            if let Op::Write { off, len, .. }
            | Op::Zero { off, len, .. }
            | Op::Discard { off, len } = op
            {
                let a = off.saturating_sub(100);
                let b = (off + len + 100).min(model.data.len() as u64);
                let mut buf = vec![0xeeu8; (b - a) as usize];
                img.read_at(&mut buf, a)
                    .unwrap_or_else(|e| panic!("{}: read back: {e}", ctx()));
                assert_same_bytes(
                    &buf,
                    &model.data[a as usize..b as usize],
                    &format!("read back after {}", ctx()),
                );
            }
        }
    }
    img.close()
        .unwrap_or_else(|e| panic!("final close of {}: {e}", path.display()));
}

/// The checks every workload ends with: qemu-img check, qemu-img compare against the raw
/// model, and oxcow's own full read.
fn verify_all(dir: &TempDir, path: &Path, model: &RawModel, what: &str) {
    let (code, out) = qemu_img_check(path);
    if code != 0 {
        panic!(
            "{what}: qemu-img check {} exited {code}:\n{out}",
            path.display()
        );
    }
    let raw = dir.join("reference.raw");
    model.save(&raw);
    let (code, out) = qemu_compare(path, &raw);
    assert_eq!(
        code, 0,
        "{what}: qemu-img compare against the reference: exit {code}\n{out}"
    );
    let img = open_ro(path);
    let got = oxcow_read_all(&img);
    assert_same_bytes(&got, &model.data, &format!("{what}: oxcow read-back"));
}

/// qemu-io writes more data (data, zeroes, unmapped zeroes, discards of whole clusters), then
/// oxcow re-opens and must read everything; then a second oxcow round on top.
fn qemu_then_oxcow_round(
    dir: &TempDir,
    path: &Path,
    model: &mut RawModel,
    g: &Geometry,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ 0x5151);
    let mut cmds = Vec::new();
    for i in 0..24 {
        let off = gen_offset(&mut rng, g);
        let len = clamp(off, gen_len(&mut rng, g), g);
        let p = ((i * 41 + 7) % 254 + 1) as u8;
        match rng.below(5) {
            0 => {
                cmds.push(format!("write -z {off} {len}"));
                model.zero(off, len);
            }
            1 => {
                cmds.push(format!("write -z -u {off} {len}"));
                model.zero(off, len);
            }
            _ => {
                cmds.push(format!("write -P {p:#x} {off} {len}"));
                model.data[off as usize..(off + len) as usize].fill(p);
            }
        }
    }
    qemu_io(path, &cmds);
    {
        let img = open_ro(path);
        let got = oxcow_read_all(&img);
        assert_same_bytes(&got, &model.data, "oxcow read after qemu-io writes");
    }
    let ops = gen_ops(seed ^ 0x7777, 60, g, true);
    apply_ops(path, model, &ops, seed, &rw());
    verify_all(dir, path, model, "second oxcow round after qemu-io");
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Variants
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Variant {
    cs: u64,
    vsize: u64,
    version: u32,
    refcount_bits: u32,
    extended_l2: bool,
    lazy: bool,
    by_qemu: bool,
    backing: Option<BackingFormat>,
    /// Backing file shorter than the overlay.
    short_backing: bool,
    prealloc: bool,
    writethrough: bool,
    /// Open with O_DIRECT.
    direct: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            lazy: false,
            by_qemu: false,
            backing: None,
            short_backing: false,
            prealloc: false,
            writethrough: false,
            direct: false,
        }
    }
}

impl Variant {
    fn geometry(&self) -> Geometry {
        let per = if self.extended_l2 { 16 } else { 8 };
        Geometry {
            vsize: self.vsize,
            cs: self.cs,
            l2cov: self.cs * (self.cs / per),
        }
    }
    fn name(&self) -> String {
        format!(
            "cs{}-v{}-rb{}{}{}{}{}{}",
            self.cs,
            self.version,
            self.refcount_bits,
            if self.extended_l2 { "-extl2" } else { "" },
            if self.by_qemu { "-qemu" } else { "-oxcow" },
            match self.backing {
                Some(BackingFormat::Raw) => "-rawbacking",
                Some(BackingFormat::Qcow2) => "-qcow2backing",
                None => "",
            },
            if self.prealloc { "-prealloc" } else { "" },
            if self.lazy { "-lazy" } else { "" },
        )
    }
}

/// Creates the image (and its backing file) for a variant and the matching model.
fn setup(dir: &TempDir, v: &Variant) -> (PathBuf, RawModel) {
    let p = dir.join("img.qcow2");
    let mut backing_name = None;
    let mut model = RawModel::new(v.vsize, v.cs);
    if let Some(fmt) = v.backing {
        let blen = if v.short_backing {
            v.vsize / 2 + 777
        } else {
            v.vsize
        };
        let content = tagged_data(0xb5, 0, blen as usize);
        let name = match fmt {
            BackingFormat::Raw => {
                std::fs::write(dir.join("base.raw"), &content).unwrap();
                "base.raw"
            }
            BackingFormat::Qcow2 => {
                let raw = dir.join("base-src.raw");
                std::fs::write(&raw, &content).unwrap();
                qemu_img(&[
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    path_str(&raw),
                    path_str(&dir.join("base.qcow2")),
                ]);
                std::fs::remove_file(&raw).unwrap();
                "base.qcow2"
            }
        };
        backing_name = Some(name);
        model = RawModel::with_backing(v.vsize, v.cs, &content, v.version);
    }
    if v.by_qemu {
        let mut o = format!(
            "cluster_size={},compat={},refcount_bits={}",
            v.cs,
            if v.version == 2 { "0.10" } else { "1.1" },
            v.refcount_bits
        );
        if v.extended_l2 {
            o.push_str(",extended_l2=on");
        }
        if v.lazy {
            o.push_str(",lazy_refcounts=on");
        }
        if v.prealloc {
            o.push_str(",preallocation=metadata");
        }
        let size = v.vsize.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
        let fmt_name;
        if let (Some(b), Some(f)) = (backing_name, v.backing) {
            fmt_name = f.name();
            args.extend(["-b", b, "-F", fmt_name]);
        }
        args.push(path_str(&p));
        args.push(&size);
        qemu_img(&args);
    } else {
        let o = CreateOptions {
            cluster_size: v.cs as u32,
            version: v.version,
            refcount_bits: v.refcount_bits,
            lazy_refcounts: v.lazy,
            extended_l2: v.extended_l2,
            compression: CompressionType::Deflate,
            backing_file: backing_name.map(String::from),
            backing_format: v.backing,
            preallocation: if v.prealloc {
                Preallocation::Metadata
            } else {
                Preallocation::Off
            },
        };
        oxcow::create(&p, v.vsize, &o)
            .unwrap_or_else(|e| panic!("oxcow::create {}: {e}", v.name()));
        // The fresh image is already valid for QEMU.
        assert_check_clean(&p);
    }
    (p, model)
}

fn run_variant(v: Variant, seed: u64, nops: usize) {
    let name = v.name();
    let dir = TempDir::new(&name);
    let (p, mut model) = setup(&dir, &v);
    let g = v.geometry();
    let open = OpenOptions {
        writable: true,
        writethrough: v.writethrough,
        direct: v.direct,
        ..Default::default()
    };
    let ops = gen_ops(seed, nops, &g, true);
    apply_ops(&p, &mut model, &ops, seed, &open);
    verify_all(&dir, &p, &model, &name);
    check_block_status(&p, v.backing.is_some());
    let info = open_ro(&p).info().unwrap();
    assert!(
        !info.dirty,
        "{name}: dirty bit left set after a clean close"
    );
    qemu_then_oxcow_round(&dir, &p, &mut model, &g, seed);
}

// --- images created by oxcow::create -----------------------------------------------------------

#[test]
fn oxcow_created_512_byte_clusters_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 512,
            vsize: 2 * MIB,
            ..Default::default()
        },
        101,
        250,
    );
}

#[test]
fn oxcow_created_4k_clusters_refcount_bits_1_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 6 * MIB,
            refcount_bits: 1,
            ..Default::default()
        },
        102,
        250,
    );
}

#[test]
fn oxcow_created_4k_clusters_refcount_bits_64_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 6 * MIB,
            refcount_bits: 64,
            ..Default::default()
        },
        103,
        200,
    );
}

#[test]
fn oxcow_created_64k_clusters_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            ..Default::default()
        },
        104,
        200,
    );
}

#[test]
fn oxcow_created_v2_images_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            version: 2,
            ..Default::default()
        },
        105,
        200,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            version: 2,
            ..Default::default()
        },
        106,
        150,
    );
}

#[test]
fn oxcow_created_extended_l2_random_workload_passes_qemu_check_and_compare() {
    // 16 KiB clusters with extended L2: one L2 table covers 16 MiB, so 20 MiB crosses it.
    run_variant(
        Variant {
            cs: 16 * KIB,
            vsize: 20 * MIB,
            extended_l2: true,
            ..Default::default()
        },
        107,
        200,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            extended_l2: true,
            ..Default::default()
        },
        108,
        150,
    );
}

#[test]
fn oxcow_created_other_refcount_widths_and_2m_clusters_random_workload_passes_qemu_check() {
    for (rb, seed) in [(2u32, 121u64), (4, 122), (8, 123), (32, 124)] {
        run_variant(
            Variant {
                cs: 512,
                vsize: MIB,
                refcount_bits: rb,
                ..Default::default()
            },
            seed,
            100,
        );
    }
    run_variant(
        Variant {
            cs: 2 * MIB,
            vsize: 16 * MIB,
            ..Default::default()
        },
        125,
        80,
    );
    run_variant(
        Variant {
            cs: 2 * MIB,
            vsize: 16 * MIB,
            extended_l2: true,
            ..Default::default()
        },
        126,
        80,
    );
}

#[test]
fn oxcow_created_lazy_refcounts_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            lazy: true,
            ..Default::default()
        },
        109,
        150,
    );
}

#[test]
fn oxcow_created_preallocated_metadata_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            prealloc: true,
            ..Default::default()
        },
        110,
        150,
    );
}

#[test]
fn oxcow_writethrough_open_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 3 * MIB,
            writethrough: true,
            ..Default::default()
        },
        111,
        120,
    );
}

#[test]
fn oxcow_direct_io_random_unaligned_workload_passes_qemu_check_and_compare() {
    // O_DIRECT with byte-granular requests, 512-byte clusters (metadata writes smaller than a
    // block) and a qcow2 backing file: every transfer is bounced and unaligned writes are
    // read-modify-written by the storage layer.
    for (cs, backing) in [(512, None), (64 * KIB, Some(BackingFormat::Qcow2))] {
        run_variant(
            Variant {
                cs,
                vsize: 3 * MIB,
                direct: true,
                backing,
                ..Default::default()
            },
            112,
            150,
        );
    }
}

// --- images created by qemu-img ----------------------------------------------------------------

#[test]
fn qemu_created_images_random_workload_passes_qemu_check_and_compare() {
    let base = Variant {
        by_qemu: true,
        ..Default::default()
    };
    run_variant(
        Variant {
            cs: 512,
            vsize: 2 * MIB,
            ..base.clone()
        },
        201,
        200,
    );
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 6 * MIB,
            refcount_bits: 1,
            ..base.clone()
        },
        202,
        150,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            refcount_bits: 64,
            ..base.clone()
        },
        203,
        150,
    );
}

#[test]
fn qemu_created_v2_and_extended_l2_images_random_workload_passes_qemu_check_and_compare() {
    let base = Variant {
        by_qemu: true,
        ..Default::default()
    };
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            version: 2,
            ..base.clone()
        },
        204,
        150,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            extended_l2: true,
            ..base.clone()
        },
        205,
        150,
    );
}

#[test]
fn qemu_created_preallocated_metadata_random_workload_passes_qemu_check_and_compare() {
    let base = Variant {
        by_qemu: true,
        prealloc: true,
        ..Default::default()
    };
    run_variant(
        Variant {
            cs: 512,
            vsize: MIB,
            ..base.clone()
        },
        206,
        150,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            ..base.clone()
        },
        207,
        100,
    );
}

// --- with a backing file -----------------------------------------------------------------------

#[test]
fn v3_overlay_over_raw_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            backing: Some(BackingFormat::Raw),
            short_backing: true,
            ..Default::default()
        },
        301,
        200,
    );
    run_variant(
        Variant {
            cs: 512,
            vsize: MIB,
            backing: Some(BackingFormat::Raw),
            by_qemu: true,
            ..Default::default()
        },
        302,
        150,
    );
}

#[test]
fn v2_overlay_discard_reveals_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 4 * MIB,
            version: 2,
            backing: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
        303,
        200,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 4 * MIB,
            version: 2,
            backing: Some(BackingFormat::Raw),
            short_backing: true,
            by_qemu: true,
            ..Default::default()
        },
        304,
        120,
    );
}

#[test]
fn extended_l2_overlay_over_qcow2_backing_random_workload_passes_qemu_check_and_compare() {
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 8 * MIB,
            extended_l2: true,
            backing: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
        305,
        200,
    );
}

// --- COW of shared and compressed clusters -----------------------------------------------------

fn compressed_base_case(cs: u64, vsize: u64, ctype: &str, seed: u64) {
    let dir = TempDir::new(&format!("compressed-{ctype}-{cs}"));
    // Mixed content: random, patterned, zero, half-zero clusters.
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; vsize as usize];
    for (i, c) in data.chunks_mut(cs as usize).enumerate() {
        match rng.below(4) {
            0 => rng.fill(c),
            1 => c.copy_from_slice(&tagged_data(0x21, i as u64 * cs, c.len())),
            2 => {}
            _ => {
                let h = c.len() / 2;
                c[h..].fill(0x5e)
            }
        }
    }
    let src = dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    let p = dir.join("img.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("cluster_size={cs},compression_type={ctype}"),
        path_str(&src),
        path_str(&p),
    ]);
    assert!(
        qemu_map(&p).iter().any(|e| e.compressed),
        "setup: no compressed clusters"
    );
    let mut model = RawModel::new(vsize, cs);
    model.data = data;
    let g = Geometry {
        vsize,
        cs,
        l2cov: cs * cs / 8,
    };
    let ops = gen_ops(seed, 200, &g, true);
    apply_ops(&p, &mut model, &ops, seed, &rw());
    verify_all(
        &dir,
        &p,
        &model,
        &format!("writes over {ctype} compressed clusters"),
    );
    qemu_then_oxcow_round(&dir, &p, &mut model, &g, seed);
}

#[test]
fn writes_over_zlib_compressed_clusters_pass_qemu_check_and_compare() {
    compressed_base_case(4 * KIB, 4 * MIB, "zlib", 401);
    compressed_base_case(512, MIB, "zlib", 402);
}

#[test]
fn writes_over_zstd_compressed_clusters_pass_qemu_check_and_compare() {
    compressed_base_case(64 * KIB, 8 * MIB, "zstd", 403);
}

#[test]
fn writes_over_clusters_shared_with_internal_snapshot_pass_qemu_check_and_keep_snapshot_intact() {
    for (cs, vsize, rb, seed) in [
        (4 * KIB, 4 * MIB, 16, 501u64),
        (512, MIB, 64, 502),
        (64 * KIB, 8 * MIB, 2, 503),
    ] {
        let dir = TempDir::new("snapshot-cow");
        let p = dir.join("img.qcow2");
        qemu_create(&p, vsize, &format!("cluster_size={cs},refcount_bits={rb}"));
        let g = Geometry {
            vsize,
            cs,
            l2cov: cs * cs / 8,
        };
        // Fill with qemu-io so that many clusters are allocated, then snapshot.
        let mut model = RawModel::new(vsize, cs);
        let mut cmds = Vec::new();
        let mut rng = Rng::new(seed);
        for i in 0..40 {
            let off = gen_offset(&mut rng, &g);
            let len = clamp(off, gen_len(&mut rng, &g), &g);
            let pt = (i * 13 % 250 + 3) as u8;
            cmds.push(format!("write -P {pt:#x} {off} {len}"));
            model.data[off as usize..(off + len) as usize].fill(pt);
        }
        qemu_io(&p, &cmds);
        qemu_img(&["snapshot", "-c", "snap1", path_str(&p)]);
        let snap_data = model.data.clone();
        let ops = gen_ops(seed, 200, &g, true);
        apply_ops(&p, &mut model, &ops, seed, &rw());
        verify_all(
            &dir,
            &p,
            &model,
            &format!("writes over snapshot-shared clusters cs={cs}"),
        );
        // The snapshot still holds the old data.
        let snap_raw = dir.join("snap.raw");
        std::fs::write(&snap_raw, &snap_data).unwrap();
        let copy = dir.join("copy.qcow2");
        std::fs::copy(&p, &copy).unwrap();
        qemu_img(&["snapshot", "-a", "snap1", path_str(&copy)]);
        assert_check_clean(&copy);
        assert_compare_identical(&copy, &snap_raw);
        let img = open_ro(&copy);
        assert_same_bytes(
            &oxcow_read_all(&img),
            &snap_data,
            "oxcow read of reverted snapshot",
        );
        drop(img);
        // Deleting the snapshot after oxcow's writes leaves a clean image.
        qemu_img(&["snapshot", "-d", "snap1", path_str(&p)]);
        verify_all(&dir, &p, &model, "after deleting the snapshot");
    }
}

// --- refcount-table growth ---------------------------------------------------------------------

fn refcount_growth_case(by_qemu: bool, seed: u64) {
    let v = Variant {
        cs: 512,
        vsize: 6 * MIB,
        refcount_bits: 64,
        by_qemu,
        ..Default::default()
    };
    let dir = TempDir::new("reftable-growth");
    let (p, mut model) = setup(&dir, &v);
    let g = v.geometry();
    // Sequential writes of odd sizes covering > 4 MiB, then random ones.
    let mut ops = Vec::new();
    let mut off = 0u64;
    let mut rng = Rng::new(seed);
    let mut i = 0u64;
    while off < 5 * MIB {
        let len = rng.range(1, 200 * KIB);
        ops.push(Op::Write {
            off,
            len,
            tag: (i % 250 + 1) as u8,
            random: i % 3 == 0,
        });
        off += len;
        i += 1;
        if i % 10 == 0 {
            ops.push(Op::Flush);
        }
        if i % 25 == 0 {
            ops.push(Op::Reopen);
        }
    }
    ops.extend(gen_ops(seed, 100, &g, true));
    apply_ops(&p, &mut model, &ops, seed, &rw());
    let reftable_clusters = be32(&p, 56);
    assert!(
        reftable_clusters >= 3,
        "refcount table did not grow: {reftable_clusters} clusters"
    );
    verify_all(&dir, &p, &model, "refcount-table growth");
    qemu_then_oxcow_round(&dir, &p, &mut model, &g, seed);
}

#[test]
fn refcount_table_growth_with_512_byte_clusters_and_64_bit_refcounts_passes_qemu_check() {
    refcount_growth_case(false, 601);
}

#[test]
fn refcount_table_growth_on_qemu_created_image_passes_qemu_check() {
    refcount_growth_case(true, 602);
}

// --- concurrency -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum TOp {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
}

#[derive(Clone, Copy, PartialEq)]
enum ConcBase {
    Plain,
    Backing,
    /// Every cluster shared with an internal snapshot: concurrent writes to different parts
    /// of one cluster all need COW of the same shared cluster.
    Snapshot,
    /// Every cluster compressed: concurrent partial writes all need the same decompress+COW.
    Compressed,
}

fn concurrent_case(cs: u64, seed: u64, base: ConcBase) {
    let dir = TempDir::new("concurrent");
    const T: u64 = 4;
    let vsize = 8 * MIB;
    let (p, mut model) = match base {
        ConcBase::Plain | ConcBase::Backing => {
            let v = Variant {
                cs,
                vsize,
                backing: if base == ConcBase::Backing {
                    Some(BackingFormat::Raw)
                } else {
                    None
                },
                ..Default::default()
            };
            setup(&dir, &v)
        }
        ConcBase::Snapshot | ConcBase::Compressed => {
            let data = tagged_data(0x3e, 0, vsize as usize);
            let src = dir.join("src.raw");
            std::fs::write(&src, &data).unwrap();
            let p = dir.join("img.qcow2");
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
            if base == ConcBase::Compressed {
                args.push("-c");
            }
            let o = format!("cluster_size={cs}");
            args.extend(["-o", &o, path_str(&src), path_str(&p)]);
            qemu_img(&args);
            if base == ConcBase::Snapshot {
                qemu_img(&["snapshot", "-c", "s1", path_str(&p)]);
            }
            let mut m = RawModel::new(vsize, cs);
            m.data = data;
            (p, m)
        }
    };
    let initial = model.data.clone();
    // Zones: [0, shared) is written by every thread (disjoint bytes within the same clusters);
    // the rest is split into one private zone per thread.
    let shared = 2 * MIB;
    let zone = (vsize - shared) / T;
    let backing0 = model.backing.clone();
    let backing0 = &backing0;
    let initial = &initial;
    let img = open_rw(&p);
    let logs: Vec<Vec<TOp>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..T)
            .map(|t| {
                let img = &img;
                s.spawn(move || {
                    let mut rng = Rng::new(seed * 100 + t);
                    let mut log = Vec::new();
                    // This thread's view of the bytes only it touches.
                    let mut own = RawModel {
                        data: initial.clone(),
                        cluster_size: cs,
                        discard_reveals_backing: false,
                        backing: backing0.clone(),
                    };
                    let quarter = cs / T;
                    for i in 0..250u64 {
                        match rng.below(10) {
                            0..=3 => {
                                // Shared zone: this thread's quarter of a few consecutive clusters.
                                let c = rng.below(shared / cs - 4);
                                for k in 0..rng.range(1, 4) {
                                    let off = (c + k) * cs + t * quarter;
                                    let d = tagged_data(
                                        (t * 50 + i % 50 + 1) as u8,
                                        off,
                                        quarter as usize,
                                    );
                                    img.write_at(&d, off).expect("shared write");
                                    own.write(off, &d);
                                    log.push(TOp::Write(off, d));
                                }
                            }
                            4..=6 => {
                                let base = shared + t * zone;
                                let off = base + rng.below(zone - 1);
                                let len = rng.range(1, 3 * cs).min(base + zone - off);
                                let d = if rng.chance(50) {
                                    rng.bytes(len as usize)
                                } else {
                                    tagged_data((t * 50 + i % 50 + 1) as u8, off, len as usize)
                                };
                                img.write_at(&d, off).expect("private write");
                                own.write(off, &d);
                                log.push(TOp::Write(off, d));
                            }
                            7 => {
                                let base = shared + t * zone;
                                let off = base + rng.below(zone - 1);
                                let len = rng.range(1, 4 * cs).min(base + zone - off);
                                let unmap = rng.chance(50);
                                img.write_zeroes(off, len, ZeroFlags { may_unmap: unmap })
                                    .expect("zeroes");
                                own.zero(off, len);
                                log.push(TOp::Zero(off, len));
                            }
                            8 => {
                                let base = shared + t * zone;
                                let off = base + rng.below(zone - 1);
                                let len = rng.range(1, 4 * cs).min(base + zone - off);
                                img.discard(off, len).expect("discard");
                                own.discard(off, len);
                                log.push(TOp::Discard(off, len));
                            }
                            _ => {
                                if rng.chance(50) {
                                    img.flush().expect("flush");
                                } else if rng.chance(50) {
                                    // Read back this thread's own quarter of a shared cluster
                                    // while other threads allocate and write the same cluster.
                                    let off = rng.below(shared / cs) * cs + t * quarter;
                                    let mut b = vec![0u8; quarter as usize];
                                    img.read_at(&mut b, off).expect("read");
                                    assert_same_bytes(
                                        &b,
                                        &own.data[off as usize..(off + quarter) as usize],
                                        &format!("thread {t} reading its quarter at {off:#x}"),
                                    );
                                } else {
                                    let base = shared + t * zone;
                                    let off = base + rng.below(zone - 1);
                                    let len = rng.range(1, 3 * cs).min(base + zone - off);
                                    let mut b = vec![0u8; len as usize];
                                    img.read_at(&mut b, off).expect("read");
                                    assert_same_bytes(
                                        &b,
                                        &own.data[off as usize..(off + len) as usize],
                                        &format!("thread {t} reading its zone at {off:#x}+{len}"),
                                    );
                                }
                            }
                        }
                    }
                    log
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    img.close().expect("close after concurrent writes");
    for log in &logs {
        for op in log {
            match op {
                TOp::Write(off, d) => model.write(*off, d),
                TOp::Zero(off, len) => model.zero(*off, *len),
                TOp::Discard(off, len) => model.discard(*off, *len),
            }
        }
    }
    verify_all(&dir, &p, &model, &format!("concurrent writers cs={cs}"));
}

#[test]
fn concurrent_threads_writing_disjoint_and_shared_clusters_pass_qemu_check_and_compare() {
    concurrent_case(64 * KIB, 701, ConcBase::Plain);
    concurrent_case(4 * KIB, 702, ConcBase::Plain);
    // 512-byte clusters: an L2 table covers 32 KiB and a refblock 64 clusters (16-bit: 256),
    // so threads race on L2-table and refblock allocation too.
    concurrent_case(512, 704, ConcBase::Plain);
}

#[test]
fn concurrent_threads_over_backing_file_pass_qemu_check_and_compare() {
    concurrent_case(64 * KIB, 703, ConcBase::Backing);
}

#[test]
fn concurrent_threads_writing_parts_of_snapshot_shared_clusters_keep_every_write() {
    concurrent_case(64 * KIB, 705, ConcBase::Snapshot);
    concurrent_case(4 * KIB, 706, ConcBase::Snapshot);
}

#[test]
fn concurrent_threads_writing_parts_of_compressed_clusters_keep_every_write() {
    concurrent_case(64 * KIB, 707, ConcBase::Compressed);
}

// --- odd sizes, allocation semantics, create options -------------------------------------------

#[test]
fn unaligned_virtual_size_random_workload_passes_qemu_check_and_compare() {
    // The last cluster is only partly inside the disk.
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 3 * MIB + 1536,
            ..Default::default()
        },
        801,
        200,
    );
    run_variant(
        Variant {
            cs: 64 * KIB,
            vsize: 5 * MIB + 512,
            by_qemu: true,
            ..Default::default()
        },
        802,
        150,
    );
    run_variant(
        Variant {
            cs: 4 * KIB,
            vsize: 2 * MIB + 512,
            backing: Some(BackingFormat::Raw),
            ..Default::default()
        },
        803,
        150,
    );
}

fn map_at(p: &Path, off: u64) -> MapEntry {
    qemu_map(p)
        .into_iter()
        .find(|e| e.start <= off && off < e.start + e.length)
        .expect("offset covered by qemu-img map")
}

#[test]
fn write_zeroes_keeps_or_unmaps_clusters_as_requested_and_discard_deallocates() {
    let cs = 64 * KIB;
    for version in [3u32, 2] {
        let dir = TempDir::new("zero-semantics");
        let p = dir.join("img.qcow2");
        oxcow::create(
            &p,
            8 * MIB,
            &CreateOptions {
                version,
                ..Default::default()
            },
        )
        .unwrap();
        let img = open_rw(&p);
        img.write_at(&vec![0x61; (8 * cs) as usize], 0).unwrap();
        // Whole clusters, no unmap: v3 keeps them allocated (preallocated zero clusters).
        img.write_zeroes(cs, 2 * cs, ZeroFlags { may_unmap: false })
            .unwrap();
        // Whole clusters with unmap.
        img.write_zeroes(4 * cs, 2 * cs, ZeroFlags { may_unmap: true })
            .unwrap();
        // Discard of one whole cluster plus partial neighbours.
        img.discard(7 * cs - 100, cs + 200).unwrap();
        img.close().unwrap();
        assert_check_clean(&p);
        let mut model = RawModel::new(8 * MIB, cs);
        model.write(0, &vec![0x61; (8 * cs) as usize]);
        model.zero(cs, 2 * cs);
        model.zero(4 * cs, 2 * cs);
        model.discard(7 * cs - 100, cs + 200);
        let raw = dir.join("ref.raw");
        model.save(&raw);
        assert_compare_identical(&p, &raw);
        let e = map_at(&p, cs);
        assert!(
            e.zero && !e.data,
            "v{version}: zeroed range does not read as zero in qemu-img map: {e:?}"
        );
        if version == 3 {
            assert!(
                e.offset.is_some(),
                "v3: write_zeroes without may_unmap deallocated the cluster: {e:?}"
            );
            let e = map_at(&p, 4 * cs);
            assert!(
                e.zero && e.offset.is_none(),
                "v3: write_zeroes with may_unmap kept the host cluster: {e:?}"
            );
        }
        let e = map_at(&p, 7 * cs);
        assert!(
            e.zero && e.offset.is_none(),
            "v{version}: discarded cluster is still allocated: {e:?}"
        );
        let e = map_at(&p, 6 * cs + 10);
        assert!(
            e.data,
            "v{version}: partial discard at the edge touched the neighbour cluster: {e:?}"
        );
        check_block_status(&p, false);
    }
}

#[test]
fn oxcow_create_options_are_what_qemu_img_info_reports() {
    let dir = TempDir::new("create-info");
    let cases: Vec<(&str, u64, CreateOptions)> = vec![
        ("default", 64 * MIB, CreateOptions::default()),
        (
            "c512-rb64",
            3 * MIB,
            CreateOptions {
                cluster_size: 512,
                refcount_bits: 64,
                ..Default::default()
            },
        ),
        (
            "v2",
            10 * MIB,
            CreateOptions {
                version: 2,
                cluster_size: 4096,
                ..Default::default()
            },
        ),
        (
            "extl2-zstd-lazy",
            100 * MIB,
            CreateOptions {
                extended_l2: true,
                compression: CompressionType::Zstd,
                lazy_refcounts: true,
                ..Default::default()
            },
        ),
        (
            "c2m-rb1",
            64 * MIB,
            CreateOptions {
                cluster_size: 2 << 20,
                refcount_bits: 1,
                ..Default::default()
            },
        ),
        (
            "prealloc",
            4 * MIB,
            CreateOptions {
                cluster_size: 4096,
                preallocation: Preallocation::Metadata,
                ..Default::default()
            },
        ),
    ];
    for (name, size, o) in cases {
        let p = dir.join(&format!("{name}.qcow2"));
        oxcow::create(&p, size, &o).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_check_clean(&p);
        let j = qemu_info(&p);
        let d = j.get("format-specific").get("data");
        assert_eq!(j.get("virtual-size").as_u64(), size, "{name}");
        assert_eq!(
            j.get("cluster-size").as_u64(),
            o.cluster_size as u64,
            "{name}"
        );
        assert_eq!(
            d.get("compat").as_str(),
            if o.version == 2 { "0.10" } else { "1.1" },
            "{name}"
        );
        assert_eq!(
            d.get("refcount-bits").as_u64(),
            o.refcount_bits as u64,
            "{name}"
        );
        if o.version == 3 {
            assert_eq!(d.get("extended-l2").as_bool(), o.extended_l2, "{name}");
            assert_eq!(
                d.get("lazy-refcounts").as_bool(),
                o.lazy_refcounts,
                "{name}"
            );
            let ct = if o.compression == CompressionType::Zstd {
                "zstd"
            } else {
                "zlib"
            };
            assert_eq!(d.get("compression-type").as_str(), ct, "{name}");
        }
        if o.preallocation == Preallocation::Metadata {
            let map = qemu_map(&p);
            assert!(
                map.iter().all(|e| e.offset.is_some()),
                "{name}: preallocation=metadata left unallocated ranges: {map:?}"
            );
        }
        // oxcow reads zeros everywhere, and QEMU can write to it.
        let img = open_ro(&p);
        let mut b = vec![0xffu8; 100_000];
        img.read_at(&mut b, size / 2).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{name}: fresh image not zero");
        drop(img);
        qemu_io(&p, &["write -P 0x42 1000 200000".into()]);
        assert_check_clean(&p);
        let img = open_ro(&p);
        let mut b = vec![0u8; 200_000];
        img.read_at(&mut b, 1000).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x42),
            "{name}: data written by QEMU not read back"
        );
    }
    // Backing file with size 0: the overlay takes the backing file's size; relative name kept.
    let base = dir.join("base.raw");
    std::fs::write(&base, tagged_data(0x11, 0, (3 * MIB) as usize)).unwrap();
    let top = dir.join("top.qcow2");
    oxcow::create(
        &top,
        0,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some(BackingFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let j = qemu_info(&top);
    assert_eq!(j.get("virtual-size").as_u64(), 3 * MIB);
    assert_eq!(j.get("backing-filename").as_str(), "base.raw");
    assert_eq!(j.get("backing-filename-format").as_str(), "raw");
    assert_check_clean(&top);
    assert_compare_identical(&top, &base);
}

/// DESIGN: "a read-write open of a dirty image repairs the refcounts first". QEMU leaves the
/// dirty bit set when a writer with lazy refcounts dies.
#[test]
fn dirty_lazy_refcounts_image_left_by_crashed_qemu_is_repaired_on_writable_open() {
    let dir = TempDir::new("dirty");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=4096,lazy_refcounts=on");
    // qemu-io aborts after writing: the image keeps the dirty bit and stale refcounts.
    let o = run(
        "sh",
        &["-c", &format!("ulimit -c 0; qemu-io -f qcow2 -c 'write -P 0x5a 0 300000' -c 'write -P 0x6b 1000000 5000' -c abort {}", path_str(&p))],
    );
    assert_ne!(o.code, 0, "qemu-io abort did not abort");
    let mut model = RawModel::new(4 * MIB, 4096);
    model.data[..300000].fill(0x5a);
    model.data[1000000..1005000].fill(0x6b);
    {
        let img = open_ro(&p);
        assert!(img.info().unwrap().dirty, "setup: image is not dirty");
        assert_same_bytes(
            &oxcow_read_all(&img),
            &model.data,
            "read-only read of a dirty image",
        );
    }
    let (code, _) = qemu_img_check(&p);
    assert_eq!(code, 2, "setup: dirty image should have stale refcounts");
    let img =
        Image::open(&p, &rw()).unwrap_or_else(|e| panic!("writable open of a dirty image: {e}"));
    img.write_at(&[0x77; 10000], 2 * MIB).unwrap();
    model.write(2 * MIB, &[0x77; 10000]);
    img.close().unwrap();
    let info = open_ro(&p).info().unwrap();
    assert!(
        !info.dirty,
        "dirty bit still set after a writable open and close"
    );
    verify_all(&dir, &p, &model, "repaired dirty image");
}

/// A process that dies after a flush loses at most leaked clusters: simulate it by leaking the
/// handle (no close, no Drop write-back) after more unflushed writes, including writes that
/// grow the refcount table. `qemu-img check` must exit 0 or 3 (never 2), and every byte written
/// before the last flush, in the range not written afterwards, must read back.
#[test]
fn handle_lost_after_flush_leaves_at_most_leaks_and_keeps_flushed_data() {
    for (cs, rb, by_qemu, seed) in [
        (512u64, 64u32, false, 901u64),
        (4 * KIB, 16, true, 902),
        (64 * KIB, 1, false, 903),
    ] {
        let v = Variant {
            cs,
            vsize: 8 * MIB,
            refcount_bits: rb,
            by_qemu,
            ..Default::default()
        };
        let dir = TempDir::new("lost-handle");
        let (p, mut model) = setup(&dir, &v);
        let half = 4 * MIB;
        let g = Geometry {
            vsize: half,
            cs,
            l2cov: v.geometry().l2cov,
        };
        // Phase 1: random workload confined to the lower half, then flush.
        let ops = gen_ops(seed, 150, &g, false);
        let img = open_rw(&p);
        for op in &ops {
            match op {
                Op::Write {
                    off,
                    len,
                    tag,
                    random,
                } => {
                    let d = op_data(*off, *len, *tag, *random);
                    img.write_at(&d, *off).unwrap();
                    model.write(*off, &d);
                }
                Op::WriteV { off, lens, tag } => {
                    let d = op_data(*off, lens.iter().sum(), *tag, false);
                    img.write_at(&d, *off).unwrap();
                    model.write(*off, &d);
                }
                Op::Zero { off, len, unmap } => {
                    img.write_zeroes(*off, *len, ZeroFlags { may_unmap: *unmap })
                        .unwrap();
                    model.zero(*off, *len);
                }
                Op::Discard { off, len } => {
                    img.discard(*off, *len).unwrap();
                    model.discard(*off, *len);
                }
                Op::Flush | Op::Reopen => img.flush().unwrap(),
            }
        }
        img.flush().unwrap();
        // Phase 2: unflushed writes to the upper half only (4 MiB: with 512-byte clusters and
        // 64-bit refcounts this grows the refcount table), then the handle is lost.
        let mut rng = Rng::new(seed);
        let mut off = half;
        while off < 8 * MIB {
            let len = rng.range(1, 300 * KIB).min(8 * MIB - off);
            img.write_at(&tagged_data(0xee, off, len as usize), off)
                .unwrap();
            off += len;
        }
        std::mem::forget(img);
        // What a crashed process leaves behind: the file as it is now (the leaked handle still
        // holds its locks, so work on a copy).
        let crashed = dir.join("crashed.qcow2");
        std::fs::copy(&p, &crashed).unwrap();
        let p = crashed;
        let (code, out) = qemu_img_check(&p);
        assert!(
            code == 0 || code == 3,
            "cs={cs}: check after a lost handle exited {code} (corruption):\n{out}"
        );
        let img = open_ro(&p);
        let mut got = vec![0u8; half as usize];
        img.read_at(&mut got, 0).unwrap();
        assert_same_bytes(
            &got,
            &model.data[..half as usize],
            &format!("cs={cs}: flushed data after a lost handle"),
        );
    }
}

/// oxcow does not maintain persistent bitmaps, so a writable open must clear autoclear bit 0
/// before writing (otherwise QEMU would trust stale bitmaps); the result stays consistent.
#[test]
fn writing_an_image_with_persistent_bitmaps_invalidates_them_and_stays_consistent() {
    let dir = TempDir::new("bitmaps");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=65536");
    qemu_img(&["bitmap", "--add", path_str(&p), "b0"]);
    qemu_io(&p, &["write -P 0x11 0 100000".into()]);
    assert_eq!(be64(&p, 88) & 1, 1, "setup: bitmaps autoclear bit not set");
    {
        let img = open_ro(&p);
        let mut b = vec![0u8; 100000];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x11));
    }
    assert_eq!(
        be64(&p, 88) & 1,
        1,
        "read-only open cleared the bitmaps bit"
    );
    let img = open_rw(&p);
    img.write_at(&[0x22; 5000], 200_000).unwrap();
    img.close().unwrap();
    assert_eq!(
        be64(&p, 88) & 1,
        0,
        "bitmaps autoclear bit still set after oxcow wrote the image"
    );
    let (code, out) = qemu_img_check(&p);
    assert!(code == 0 || code == 3, "check exited {code}:\n{out}");
    let mut model = RawModel::new(4 * MIB, 65536);
    model.data[..100000].fill(0x11);
    model.data[200_000..205_000].fill(0x22);
    let raw = dir.join("ref.raw");
    model.save(&raw);
    assert_compare_identical(&p, &raw);
}

/// Unknown header extensions are kept when oxcow updates the header (here: refcount-table
/// growth rewrites the header's table pointer).
#[test]
fn unknown_header_extensions_survive_oxcow_writes() {
    let dir = TempDir::new("unknown-ext");
    let p = dir.join("img.qcow2");
    oxcow::create(
        &p,
        8 * MIB,
        &CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    )
    .unwrap();
    // Append an unknown extension in place of the end marker (cluster 0 is 512 bytes here).
    let hl = be32(&p, 100) as u64;
    let mut off = hl;
    loop {
        let t = be32(&p, off);
        if t == 0 {
            break;
        }
        off += 8 + (be32(&p, off + 4) as u64).div_ceil(8) * 8;
    }
    assert!(off + 8 + 16 + 8 <= 512, "no room for an extension");
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&13u32.to_be_bytes());
    ext.extend_from_slice(b"hello, qcow2!\0\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    poke(&p, off, &ext);
    assert_check_clean(&p);
    let img = open_rw(&p);
    let data = tagged_data(0x31, 0, (6 * MIB) as usize);
    for (i, c) in data.chunks(100_000).enumerate() {
        img.write_at(c, i as u64 * 100_000).unwrap();
    }
    img.close().unwrap();
    assert!(be32(&p, 56) > 1, "setup: refcount table did not grow");
    assert_eq!(
        peek(&p, off, ext.len()),
        ext,
        "unknown header extension was lost or changed"
    );
    assert_check_clean(&p);
    let mut model = RawModel::new(8 * MIB, 512);
    model.write(0, &data);
    let raw = dir.join("ref.raw");
    model.save(&raw);
    assert_compare_identical(&p, &raw);
}

/// Writes to an overlay whose backing file itself has a backing file (qcow2 -> qcow2 -> raw)
/// copy the right data on COW.
#[test]
fn writes_over_a_two_level_backing_chain_pass_qemu_check_and_compare() {
    let dir = TempDir::new("chain-write");
    let vsize = 4 * MIB;
    let base = dir.join("base.raw");
    let base_data = tagged_data(0x71, 0, (3 * MIB) as usize);
    std::fs::write(&base, &base_data).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&mid),
        &vsize.to_string(),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x72 100000 300000".into(),
            "write -z 600000 100000".into(),
        ],
    );
    let top = dir.join("top.qcow2");
    oxcow::create(
        &top,
        vsize,
        &CreateOptions {
            cluster_size: 65536,
            backing_file: Some("mid.qcow2".into()),
            backing_format: Some(BackingFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap();
    let mid_view = qemu_to_raw(&mid, "qcow2", &dir);
    let mut model = RawModel::with_backing(vsize, 65536, &mid_view, 3);
    let g = Geometry {
        vsize,
        cs: 65536,
        l2cov: 65536 * 8192,
    };
    let ops = gen_ops(904, 150, &g, true);
    apply_ops(&top, &mut model, &ops, 904, &rw());
    verify_all(&dir, &top, &model, "overlay over a two-level chain");
    // The backing files were not modified.
    assert_same_bytes(
        &read_file(&base),
        &base_data,
        "raw base after writes to the overlay",
    );
    assert_same_bytes(
        &qemu_to_raw(&mid, "qcow2", &dir),
        &mid_view,
        "mid image after writes to the overlay",
    );
}

/// Soak test over many seeds and variants (run with `--ignored`; `OXCOW_SOAK_SEEDS=N`).
#[test]
#[ignore]
fn soak_random_workloads_over_many_seeds() {
    let n: u64 = std::env::var("OXCOW_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for seed in 0..n {
        let mut rng = Rng::new(seed ^ 0x50a4);
        let cs = [512, 4 * KIB, 16 * KIB, 64 * KIB][rng.below(4) as usize];
        let version = if rng.chance(25) { 2 } else { 3 };
        let extended_l2 = version == 3 && cs >= 16 * KIB && rng.chance(40);
        let refcount_bits = if version == 2 {
            16
        } else {
            [1, 2, 16, 64][rng.below(4) as usize]
        };
        let backing = match rng.below(3) {
            0 => Some(BackingFormat::Raw),
            1 => Some(BackingFormat::Qcow2),
            _ => None,
        };
        let v = Variant {
            cs,
            vsize: (rng.range(1, 8) * MIB
                + if rng.chance(30) {
                    512 * rng.range(1, 7)
                } else {
                    0
                })
            .max(cs),
            version,
            refcount_bits,
            extended_l2,
            by_qemu: rng.chance(40),
            backing,
            short_backing: rng.chance(50),
            ..Default::default()
        };
        eprintln!("soak seed {seed}: {}", v.name());
        run_variant(v, seed * 7919 + 1, 200);
    }
}

/// Soak of the concurrent workloads (run with `--ignored`; `OXCOW_SOAK_SEEDS=N`).
#[test]
#[ignore]
fn soak_concurrent_workloads_over_many_seeds() {
    let n: u64 = std::env::var("OXCOW_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    for seed in 0..n {
        let cs = [512, 4 * KIB, 64 * KIB][(seed % 3) as usize];
        let base = [
            ConcBase::Plain,
            ConcBase::Backing,
            ConcBase::Snapshot,
            ConcBase::Compressed,
        ][(seed / 3 % 4) as usize];
        eprintln!("concurrent soak seed {seed}: cs={cs}");
        concurrent_case(cs, 10_000 + seed, base);
    }
}

/// DESIGN: "Images written by oxcow interoperate with QEMU's image locking (OFD locks on the
/// same bytes)". While oxcow holds an image read-write, QEMU's read-only openers without -U
/// must be refused, -U must still work; while qemu-nbd serves an image read-write, a writable
/// oxcow open must fail with Locked (EAGAIN).
#[test]
fn image_locking_interoperates_with_qemu() {
    let dir = TempDir::new("locking");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 4 * MIB, "cluster_size=65536");
    {
        let img = open_rw(&p);
        img.write_at(&[1; 1000], 0).unwrap();
        let o = run("qemu-img", &["info", path_str(&p)]);
        assert_ne!(
            o.code, 0,
            "qemu-img info (no -U) succeeded while oxcow holds the image read-write"
        );
        assert!(
            o.stderr.contains("lock"),
            "unexpected qemu-img error: {}",
            o.stderr
        );
        let o = run("qemu-img", &["info", "-U", path_str(&p)]);
        assert_eq!(o.code, 0, "qemu-img info -U failed: {}", o.stderr);
        let o = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write 0 512", path_str(&p)],
        );
        assert_ne!(
            o.code, 0,
            "qemu-io wrote to an image oxcow holds read-write"
        );
        img.close().unwrap();
    }
    // qemu-nbd holding the image read-write.
    let sock = dir.join("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", path_str(&sock), path_str(&p)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rw_result = Image::open(&p, &rw());
    let ro_result = Image::open(&p, &OpenOptions::default());
    let fs_result = Image::open(
        &p,
        &OpenOptions {
            force_share: true,
            ..Default::default()
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(sock.exists(), "setup: qemu-nbd did not start");
    match rw_result {
        Err(e) => assert_eq!(
            e.errno(),
            11,
            "writable open while qemu-nbd holds the image: {e}"
        ),
        Ok(_) => panic!("writable open succeeded while qemu-nbd holds the image read-write"),
    }
    match ro_result {
        Err(e) => assert_eq!(e.errno(), 11, "read-only open while qemu-nbd writes: {e}"),
        Ok(_) => panic!(
            "read-only open (no force_share) succeeded while qemu-nbd holds the image read-write"
        ),
    }
    fs_result
        .unwrap_or_else(|e| panic!("force_share open failed while qemu-nbd holds the image: {e}"));
}
