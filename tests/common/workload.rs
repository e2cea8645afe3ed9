//! The random write workload shared by the `interop_write_*` tests: seeded operation lists
//! (writes, vectored writes, zeroes, discards, flushes, reopens) applied to an oxcow image and
//! to a raw reference model, image variants (created by oxcow or qemu-img, with or without a
//! backing file), and the checks every workload ends with (`qemu-img check`, `qemu-img compare`
//! against the model, oxcow's own read-back, then a qemu-io round and a second oxcow round).

use std::path::{Path, PathBuf};

use oxcow::{
    BackingFormat, CompressionType, CreateOptions, Image, OpenOptions, Preallocation, ZeroFlags,
};

use super::*;

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub enum Op {
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

pub struct Geometry {
    pub vsize: u64,
    pub cs: u64,
    pub l2cov: u64,
}

impl Geometry {
    /// A disk of `vsize` bytes in clusters of `cs` bytes with standard (8-byte) L2 entries.
    pub fn new(vsize: u64, cs: u64) -> Geometry {
        Geometry {
            vsize,
            cs,
            l2cov: cs * (cs / 8),
        }
    }
}

pub fn gen_offset(rng: &mut Rng, g: &Geometry) -> u64 {
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

pub fn gen_len(rng: &mut Rng, g: &Geometry) -> u64 {
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

pub fn clamp(off: u64, len: u64, g: &Geometry) -> u64 {
    len.min(g.vsize - off).max(1)
}

pub fn gen_ops(seed: u64, n: usize, g: &Geometry, allow_reopen: bool) -> Vec<Op> {
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

pub fn op_data(op_off: u64, len: u64, tag: u8, random: bool) -> Vec<u8> {
    if random {
        Rng::new(op_off ^ ((tag as u64) << 40) ^ len).bytes(len as usize)
    } else {
        tagged_data(tag, op_off, len as usize)
    }
}

/// Applies one operation to `img` and, once it succeeded, to `model`. `WriteV` is one vectored
/// write when `vectored`, else one plain write of the same data; `Reopen` is only a flush here
/// (`apply_ops` re-opens).
pub fn apply_op(img: &Image, model: &mut RawModel, op: &Op, vectored: bool) -> oxcow::Result<()> {
    match op {
        Op::Write {
            off,
            len,
            tag,
            random,
        } => {
            let d = op_data(*off, *len, *tag, *random);
            img.write_at(&d, *off)?;
            model.write(*off, &d);
        }
        Op::WriteV { off, lens, tag } => {
            let total: u64 = lens.iter().sum();
            let d = op_data(*off, total, *tag, false);
            if vectored {
                let mut bufs: Vec<&[u8]> = Vec::new();
                let mut p = 0usize;
                for l in lens {
                    bufs.push(&d[p..p + *l as usize]);
                    p += *l as usize;
                }
                img.write_vectored_at(&bufs, *off)?;
            } else {
                img.write_at(&d, *off)?;
            }
            model.write(*off, &d);
        }
        Op::Zero { off, len, unmap } => {
            img.write_zeroes(*off, *len, ZeroFlags { may_unmap: *unmap })?;
            model.zero(*off, *len);
        }
        Op::Discard { off, len } => {
            img.discard(*off, *len)?;
            model.discard(*off, *len);
        }
        Op::Flush | Op::Reopen => img.flush()?,
    }
    Ok(())
}

/// Applies `ops` to the image at `path` (opened read-write, re-opened on `Reopen`) and to
/// `model`, spot-checking reads after each reopen.
pub fn apply_ops(path: &Path, model: &mut RawModel, ops: &[Op], seed: u64, open: &OpenOptions) {
    let mut img =
        Image::open(path, open).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut rng = Rng::new(seed ^ 0xabcdef);
    for (i, op) in ops.iter().enumerate() {
        let ctx = || format!("op #{i} {op:?} on {}", path.display());
        match op {
            Op::Reopen => {
                img.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", ctx()));
                img = Image::open(path, open).unwrap_or_else(|e| panic!("{}: reopen: {e}", ctx()));
                spot_check_reads(&img, &model.data, &mut rng, 8);
            }
            _ => apply_op(&img, model, op, true).unwrap_or_else(|e| panic!("{}: {e}", ctx())),
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
pub fn verify_all(dir: &TempDir, path: &Path, model: &RawModel, what: &str) {
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

/// Applies `ops` through a read-write open (`apply_ops`), then runs the checks every workload
/// ends with (`verify_all`).
pub fn apply_and_verify(
    dir: &TempDir,
    path: &Path,
    model: &mut RawModel,
    ops: &[Op],
    seed: u64,
    what: &str,
) {
    apply_ops(path, model, ops, seed, &rw());
    verify_all(dir, path, model, what);
}

/// How many seeds a soak test runs: `OXCOW_SOAK_SEEDS`, else `default`.
pub fn soak_seeds(default: u64) -> u64 {
    std::env::var("OXCOW_SOAK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// qemu-io writes more data (data, zeroes, unmapped zeroes, discards of whole clusters), then
/// oxcow re-opens and must read everything; then a second oxcow round on top.
pub fn qemu_then_oxcow_round(
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
    apply_and_verify(
        dir,
        path,
        model,
        &ops,
        seed,
        "second oxcow round after qemu-io",
    );
}

pub fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Variants
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Variant {
    pub cs: u64,
    pub vsize: u64,
    pub version: u32,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    pub lazy: bool,
    pub by_qemu: bool,
    pub backing: Option<BackingFormat>,
    /// Backing file shorter than the overlay.
    pub short_backing: bool,
    pub prealloc: bool,
    pub writethrough: bool,
    /// Open with O_DIRECT.
    pub direct: bool,
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
    pub fn geometry(&self) -> Geometry {
        let per = if self.extended_l2 { 16 } else { 8 };
        Geometry {
            vsize: self.vsize,
            cs: self.cs,
            l2cov: self.cs * (self.cs / per),
        }
    }
    pub fn name(&self) -> String {
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
pub fn setup(dir: &TempDir, v: &Variant) -> (PathBuf, RawModel) {
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
                qemu_convert_raw_to_qcow2(
                    &raw,
                    &dir.join("base.qcow2"),
                    "cluster_size=4096",
                    false,
                );
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
        match (backing_name, v.backing) {
            (Some(b), Some(f)) => qemu_create_overlay(&p, Some(v.vsize), &o, b, f.name()),
            _ => qemu_create(&p, v.vsize, &o),
        }
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
            ..Default::default()
        };
        oxcow::create(&p, v.vsize, &o)
            .unwrap_or_else(|e| panic!("oxcow::create {}: {e}", v.name()));
        // The fresh image is already valid for QEMU.
        assert_check_clean(&p);
    }
    (p, model)
}

pub fn run_variant(v: Variant, seed: u64, nops: usize) {
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
