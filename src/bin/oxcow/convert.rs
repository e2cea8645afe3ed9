//! `oxcow convert`: copy the guest contents of a qcow2 or raw image into a new qcow2 or raw
//! image, optionally compressed, leaving all-zero clusters unallocated like qemu-img.

use crate::args::{opt, scan, Arg, CliError, CliResult, OptSpec};
use crate::create::apply_create_options;
use crate::progress::Progress;
use oxcow::{CreateOptions, Image, OpenOptions, EXTENT_ALLOCATED, EXTENT_BACKING, EXTENT_ZERO};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// `oxcow convert --help`.
pub const HELP: &str = "\
Usage: oxcow convert [-f qcow2|raw] [-O qcow2|raw] [-o OPTIONS] [-c] [-m N] [-p] [-q] [-U] [--no-probe]
                     [--bitmaps [--skip-broken-bitmaps]] SRC DST

Copy the guest-visible contents of SRC (including everything it reads from its backing chain)
into a new image DST. Ranges that read as zeros are not written: they stay unallocated in a
qcow2 DST and become holes in a raw DST, so the copy is as sparse as possible.

Options:
  -f FMT             format of SRC: qcow2 or raw (default: probed from the file's first bytes)
  -O FMT             format of DST: raw (default, like qemu-img) or qcow2
  -o OPTIONS         qcow2 creation options for DST, as for 'oxcow create -o'
                     (cluster_size=, compat=, refcount_bits=, compression_type=, ...)
  -c                 write DST's clusters compressed (qcow2 only; compression_type= picks zlib
                     or zstd). Clusters are compressed on all cores and written in guest
                     order, packed back to back like qemu-img packs them
  -m N               compress on N threads (1 to 16; default: one per core). The output
                     file is the same whatever N is
  -p                 show a progress line on stderr
  -q                 quiet (no progress line even with -p)
  -U, --force-share  read SRC even if another process holds it
  --no-probe         never guess a format: SRC needs -f, and a backing file whose format is not
                     recorded is refused (use it for untrusted images)
  -l SNAPSHOT        copy internal snapshot SNAPSHOT of a qcow2 SRC instead of its current
                     state: snapshot.id=ID, snapshot.name=NAME (comma-separated, both must
                     match) or a bare id or name
  -s SNAPSHOT        the same as '-l SNAPSHOT' (qemu-img's older spelling)
  --bitmaps          also copy SRC's persistent bitmaps (names, granularities, auto flags,
                     dirty bits) into DST; both must be qcow2. Inconsistent bitmaps are
                     refused unless --skip-broken-bitmaps (which skips them with a warning)
  -h, --help         this text

Examples:
  oxcow convert -O qcow2 disk.raw disk.qcow2
  oxcow convert -f qcow2 -O raw overlay.qcow2 flat.raw
  oxcow convert -c -p -O qcow2 -o compression_type=zstd disk.qcow2 small.qcow2
  oxcow convert -l snapshot.name=before-upgrade -O raw disk.qcow2 old.raw
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["-O", "--target-format"], true),
    opt(&["-o", "--options"], true),
    opt(&["-c", "--compress"], false),
    opt(&["-m"], true),
    opt(&["-p", "--progress"], false),
    opt(&["-q", "--quiet"], false),
    opt(&["-U", "--force-share"], false),
    opt(&["--no-probe"], false),
    opt(&["-l"], true),
    opt(&["-s"], true),
    opt(&["--bitmaps"], false),
    opt(&["--skip-broken-bitmaps"], false),
];

/// Where the guest data comes from.
enum Source {
    Qcow2(Box<Image>),
    Raw(File, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Qcow2(i) => i.virtual_size(),
            Source::Raw(_, s) => *s,
        }
    }

    /// Bytes from `off` (at most `max`) known to read as zeros without reading them, or the
    /// length of the stretch that must be read (returned as `(false, n)`).
    fn known_zero(&self, off: u64, max: u64) -> CliResult<(bool, u64)> {
        match self {
            Source::Qcow2(img) => {
                let e = img.block_status(off, max)?;
                let zero = e.flags & EXTENT_ZERO != 0
                    || e.flags & (EXTENT_ALLOCATED | EXTENT_BACKING) == 0;
                Ok((zero, e.length))
            }
            // Holes of a sparse raw file are skipped without reading them.
            Source::Raw(f, size) => {
                let (data, len) =
                    oxcow::storage::extents::extent_at(f, off, *size).map_err(|e| {
                        CliError::op(format!("reading the allocation at {off:#x}: {e}"))
                    })?;
                Ok((!data, len.clamp(1, max)))
            }
        }
    }

    fn read(&self, buf: &mut [u8], off: u64, name: &str) -> CliResult<()> {
        match self {
            Source::Qcow2(img) => Ok(img.read_at(buf, off)?),
            Source::Raw(f, _) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], off + done as u64) {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) => {
                            return Err(CliError::op(format!(
                                "reading {name} at {:#x}: {e}",
                                off + done as u64
                            )))
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// Where the data goes.
enum Target {
    Qcow2 { img: Box<Image>, compressed: bool },
    Raw(File),
}

/// Sniffs the qcow2 magic, as qemu-img probes formats when -f is not given.
pub fn probe(path: &str) -> CliResult<&'static str> {
    let f = File::open(path).map_err(|e| CliError::op(format!("could not open '{path}': {e}")))?;
    let mut magic = [0u8; 4];
    let n = f.read_at(&mut magic, 0).unwrap_or(0);
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// What `oxcow convert` was asked to do.
struct Request {
    src: String,
    dst: String,
    src_fmt: Option<String>,
    out_fmt: String,
    create: CreateOptions,
    compress: bool,
    /// Compressor threads for `-c`.
    threads: usize,
    progress: bool,
    force_share: bool,
    no_probe: bool,
    /// Read this internal snapshot of SRC instead of its current state.
    snapshot: Option<crate::snapshot::Selector>,
    /// `--bitmaps` (and whether `--skip-broken-bitmaps` was given).
    bitmaps: bool,
    skip_broken_bitmaps: bool,
}

/// Runs `oxcow convert ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let Some(req) = parse(args)? else {
        return Ok(()); // -o help was printed
    };
    validate(&req)?;
    let source = open_source(&req)?;
    let size = source.size();
    let bitmaps = match (req.bitmaps, &source) {
        (false, _) => Vec::new(),
        (true, Source::Qcow2(img)) => {
            crate::bitmap::convert_plan(Some(img), req.skip_broken_bitmaps)?
        }
        (true, Source::Raw(..)) => crate::bitmap::convert_plan(None, req.skip_broken_bitmaps)?,
    };
    let target = create_target(&req, size)?;
    if req.bitmaps {
        crate::bitmap::convert_target_check(&req.out_fmt, req.create.version)?;
    }
    copy(&source, &target, size, &req)?;
    if let (Source::Qcow2(s), Target::Qcow2 { img, .. }) = (&source, &target) {
        crate::bitmap::convert_copy(s, img, &bitmaps)?;
    }
    let dst = &req.dst;
    match target {
        Target::Qcow2 { img, compressed } => {
            (*img)
                .close()
                .map_err(|e| CliError::op(format!("closing '{dst}': {e}")))?;
            if compressed {
                align_end(dst)?;
            }
            Ok(())
        }
        Target::Raw(f) => f
            .sync_all()
            .map_err(|e| CliError::op(format!("syncing '{dst}': {e}"))),
    }
}

/// The request, or `None` when `-o help` (or `-o ?`) printed the options instead.
fn parse(args: &[String]) -> CliResult<Option<Request>> {
    let mut req = Request {
        src: String::new(),
        dst: String::new(),
        src_fmt: None,
        out_fmt: "raw".to_string(),
        create: CreateOptions::default(),
        compress: false,
        threads: crate::compress_pipe::default_threads(),
        progress: false,
        force_share: false,
        no_probe: false,
        snapshot: None,
        bitmaps: false,
        skip_broken_bitmaps: false,
    };
    let mut quiet = false;
    let mut pos = Vec::new();
    for a in scan("convert", args, SPECS)? {
        match a {
            Arg::Opt("-f", Some(f)) => req.src_fmt = Some(f),
            Arg::Opt("-O", Some(f)) => req.out_fmt = f,
            Arg::Opt("-o", Some(l)) => {
                if apply_create_options(&mut req.create, &l)? {
                    return Ok(None);
                }
            }
            Arg::Opt("-c", _) => req.compress = true,
            Arg::Opt("-m", Some(n)) => req.threads = parse_threads(&n)?,
            Arg::Opt("-p", _) => req.progress = true,
            Arg::Opt("-q", _) => quiet = true,
            Arg::Opt("-U", _) => req.force_share = true,
            Arg::Opt("--no-probe", _) => req.no_probe = true,
            Arg::Opt("-l", Some(l)) => req.snapshot = Some(crate::snapshot::Selector::parse(&l)?),
            Arg::Opt("-s", Some(n)) => req.snapshot = Some(crate::snapshot::Selector::bare(&n)),
            Arg::Opt("--bitmaps", _) => req.bitmaps = true,
            Arg::Opt("--skip-broken-bitmaps", _) => req.skip_broken_bitmaps = true,
            Arg::Pos(p) => pos.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let [src, dst] = pos.as_slice() else {
        return Err(CliError::usage("convert needs SRC DST"));
    };
    req.src = src.clone();
    req.dst = dst.clone();
    req.progress &= !quiet;
    Ok(Some(req))
}

/// `-m N`: 1 to 16, with qemu-img's message otherwise.
fn parse_threads(v: &str) -> CliResult<usize> {
    match v.parse::<usize>() {
        Ok(n) if (1..=crate::compress_pipe::MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(CliError::usage(format!(
            "Invalid number of coroutines specified. Must be between 1 and {}.",
            crate::compress_pipe::MAX_THREADS
        ))),
    }
}

/// Refuses what convert cannot do before anything is created.
fn validate(req: &Request) -> CliResult<()> {
    let out_fmt = req.out_fmt.as_str();
    if out_fmt != "raw" && out_fmt != "qcow2" {
        return Err(CliError::usage(format!(
            "unsupported output format '{out_fmt}' (raw or qcow2)"
        )));
    }
    if req.skip_broken_bitmaps && !req.bitmaps {
        return Err(CliError::op(
            "Use of --skip-broken-bitmaps requires --bitmaps",
        ));
    }
    if req.compress && out_fmt != "qcow2" {
        return Err(CliError::usage(
            "-c (compressed output) needs -O qcow2: raw images cannot store compressed data",
        ));
    }
    if req.create.backing_file.is_some() || req.create.backing_format.is_some() {
        // Zero ranges are skipped, so a backing file under DST would show through them.
        return Err(CliError::usage(
            "convert writes a self-contained image: -o backing_file/backing_fmt are not supported",
        ));
    }
    let same = match (
        std::fs::canonicalize(&req.src),
        std::fs::canonicalize(&req.dst),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(CliError::usage(format!(
            "SRC and DST are the same file ('{}')",
            req.src
        )));
    }
    Ok(())
}

/// Opens SRC in the format given, or (without --no-probe) the one its first bytes show.
fn open_source(req: &Request) -> CliResult<Source> {
    let src = req.src.as_str();
    let src_fmt = match &req.src_fmt {
        Some(f) => f.clone(),
        None if req.no_probe => {
            return Err(CliError::usage(
                "convert: --no-probe needs the format of SRC (-f qcow2 or -f raw)",
            ))
        }
        None => probe(src)?.to_string(),
    };
    let open_err = |e: String| CliError::op(format!("could not open '{src}': {e}"));
    match src_fmt.as_str() {
        "qcow2" => {
            let opts = OpenOptions {
                force_share: req.force_share,
                no_probe: req.no_probe,
                ..OpenOptions::default()
            };
            let mut img = Image::open(src, &opts).map_err(|e| open_err(e.to_string()))?;
            if let Some(sel) = &req.snapshot {
                let snapshot = Some(sel.resolve(&img)?);
                drop(img);
                let opts = OpenOptions { snapshot, ..opts };
                img = Image::open(src, &opts).map_err(|e| open_err(e.to_string()))?;
            }
            Ok(Source::Qcow2(Box::new(img)))
        }
        "raw" if req.snapshot.is_some() => Err(CliError::usage(
            "convert: a raw SRC has no snapshots (-l/-s need a qcow2 SRC)",
        )),
        "raw" => {
            let f = File::open(src).map_err(|e| open_err(e.to_string()))?;
            let len = f
                .metadata()
                .map_err(|e| CliError::op(format!("{src}: {e}")))?
                .len();
            Ok(Source::Raw(f, len))
        }
        other => Err(CliError::usage(format!(
            "unsupported source format '{other}' (qcow2 or raw)"
        ))),
    }
}

/// Creates DST with `size` bytes of guest data.
fn create_target(req: &Request, size: u64) -> CliResult<Target> {
    let dst = req.dst.as_str();
    if req.out_fmt != "qcow2" {
        let f = File::create(dst).map_err(|e| CliError::op(format!("creating '{dst}': {e}")))?;
        f.set_len(size)
            .map_err(|e| CliError::op(format!("sizing '{dst}': {e}")))?;
        return Ok(Target::Raw(f));
    }
    oxcow::create(dst, size, &req.create).map_err(|e| CliError::op(format!("{dst}: {e}")))?;
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = Image::open(dst, &opts)
        .map_err(|e| CliError::op(format!("could not open '{dst}': {e}")))?;
    Ok(Target::Qcow2 {
        img: Box::new(img),
        compressed: req.compress,
    })
}

/// The copy loop: chunks aligned to the target's allocation unit, zero units skipped; a
/// compressed target gets its clusters through the parallel compressor pipeline.
fn copy(source: &Source, target: &Target, size: u64, req: &Request) -> CliResult<()> {
    // The unit that is either written or left out: a qcow2 cluster, or a 4 KiB block for raw
    // (qemu-img's default -S sparseness granularity).
    let unit = match target {
        Target::Qcow2 { .. } => req.create.cluster_size as u64,
        Target::Raw(_) => 4096,
    };
    let (src, dst) = (req.src.as_str(), req.dst.as_str());
    match target {
        Target::Qcow2 {
            img,
            compressed: true,
        } => crate::compress_pipe::run(img, req.threads, dst, |sink| {
            // DST's size is SRC's rounded up to whole sectors: the short last cluster is
            // padded with zeros up to DST's end, as compressed writes take whole clusters.
            let dst_size = img.virtual_size();
            read_data(source, size, unit, src, req.progress, |b, off| {
                for (i, piece) in b.chunks(unit as usize).enumerate() {
                    if piece.iter().any(|&x| x != 0) {
                        let at = off + i as u64 * unit;
                        let want = unit.min(dst_size.saturating_sub(at)) as usize;
                        if piece.len() < want {
                            let mut padded = piece.to_vec();
                            padded.resize(want, 0);
                            sink.push(at, &padded)?;
                        } else {
                            sink.push(at, piece)?;
                        }
                    }
                }
                Ok(())
            })
        }),
        _ => read_data(source, size, unit, src, req.progress, |b, off| {
            write_nonzero(target, b, off, unit, dst)
        }),
    }
}

/// Reads SRC in unit-aligned chunks of whole units, in guest order, skipping whole units it
/// knows read as zeros, and hands each chunk read to `sink` with its guest offset.
fn read_data<F>(
    source: &Source,
    size: u64,
    unit: u64,
    src: &str,
    progress: bool,
    mut sink: F,
) -> CliResult<()>
where
    F: FnMut(&[u8], u64) -> CliResult<()>,
{
    let chunk = (4u64 << 20).max(unit);
    let mut buf = vec![0u8; chunk as usize];
    let mut p = Progress::new(progress);
    let mut off = 0u64;
    while off < size {
        p.update(off, size);
        let n = chunk.min(size - off);
        let (zero, known) = source.known_zero(off, n)?;
        // `off` stays unit-aligned: whole units that read as zeros need no read and no write;
        // anything else is read in whole units, since a unit's other bytes may hold data.
        let whole = known / unit * unit;
        if zero && whole > 0 {
            off += whole;
            continue;
        }
        let n = known.div_ceil(unit).saturating_mul(unit).min(size - off);
        let b = &mut buf[..n as usize];
        source.read(b, off, src)?;
        sink(b, off)?;
        off += n;
    }
    p.finish();
    Ok(())
}

/// Extends a compressed image's file to a whole number of 512-byte sectors, as qemu-img
/// does: the last compressed cluster may end mid-sector, and sector-based readers (O_DIRECT)
/// read whole sectors. The extension is a hole of at most 511 bytes.
fn align_end(dst: &str) -> CliResult<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(|e| CliError::op(format!("could not open '{dst}': {e}")))?;
    let len = f
        .metadata()
        .map_err(|e| CliError::op(format!("{dst}: {e}")))?
        .len();
    if len % 512 != 0 {
        f.set_len(len.div_ceil(512) * 512)
            .and_then(|()| f.sync_all())
            .map_err(|e| CliError::op(format!("sizing '{dst}': {e}")))?;
    }
    Ok(())
}

/// Writes the units of `b` (guest offset `off`) that hold a non-zero byte, merging runs of
/// consecutive data units into one request.
fn write_nonzero(target: &Target, b: &[u8], off: u64, unit: u64, dst: &str) -> CliResult<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    let flush_run = |s: usize, e: usize| -> CliResult<()> {
        let data = &b[s..e];
        let at = off + s as u64;
        match target {
            Target::Qcow2 { img, .. } => img
                .write_at(data, at)
                .map_err(|e| CliError::op(format!("writing '{dst}' at {at:#x}: {e}"))),
            Target::Raw(f) => f
                .write_all_at(data, at)
                .map_err(|e| CliError::op(format!("writing '{dst}' at {at:#x}: {e}"))),
        }
    };
    while i < b.len() {
        let e = (i + unit as usize).min(b.len());
        let piece = &b[i..e];
        let nonzero = piece.iter().any(|&x| x != 0);
        if nonzero {
            run_start.get_or_insert(i);
        } else if let Some(s) = run_start.take() {
            flush_run(s, i)?;
        }
        i = e;
    }
    if let Some(s) = run_start {
        flush_run(s, b.len())?;
    }
    Ok(())
}
