//! `oxcow bench`: `qemu-img bench` for the oxcow engine. The same request stream can be run
//! through the qcow2 engine or, with `-f raw`, as plain positioned I/O on a raw file, so the two
//! numbers measure the engine's overhead over the physical limit of the same harness.
//!
//! Queue depth maps to threads: `-d N` runs N threads issuing requests concurrently on one
//! shared [`Image`] (the engine is synchronous and thread-safe; qemu-img instead keeps N
//! asynchronous requests in flight from one thread). With `--aio`, `-d N` keeps N requests in
//! flight from one thread through the asynchronous API instead (see `aio`).

mod aio;

use crate::args::{opt, parse_num, parse_size, scan, Arg, CliError, CliResult, OptSpec};
use oxcow::{Image, OpenOptions};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// `oxcow bench --help`.
pub const HELP: &str = "\
Usage: oxcow bench [-f qcow2|raw] [-c COUNT] [-s SIZE] [-S STEP] [-d DEPTH] [--aio] [-w]
                   [--pattern BYTE] [-t CACHE] [-o OFFSET] [--random] [--seed N]
                   [--flush-interval N] [--no-drain] [-U] [-q] [--output human|json]
                   [--overlap-check none|constant|cached|all] [--no-probe]
                   [--l2-cache-size SIZE] [--refcount-cache-size SIZE] [--slice-size SIZE]
                   [--cache-clean-interval SECONDS] FILE

Run COUNT read (or, with -w, write) requests of SIZE bytes against FILE and report the time,
throughput and IOPS. Options mirror 'qemu-img bench', so the same request stream can be sent
through qemu-img for comparison. With -f raw the same harness does positioned I/O on the raw
file directly: the physical limit to compare the qcow2 engine against.

Options:
  -f FMT              qcow2 (through the engine) or raw (direct file I/O); default: probed
  -c COUNT            number of requests (default 75000)
  -s SIZE             request size (default 4k)
  -S STEP             offset increment between requests (default SIZE; 0 = same offset)
  -d DEPTH            requests in flight = threads issuing them on one image (default 1)
  --aio               keep DEPTH requests in flight from one thread through the
                      asynchronous API (oxcow_aio_*), like qemu-img bench -i io_uring;
                      with -f raw, plain io_uring (or a thread pool where io_uring is
                      unavailable) on the raw file: the physical limit of that model
  -w                  write instead of read
  --pattern BYTE      byte value written with -w (default 0)
  -t CACHE            none (O_DIRECT), writeback (default), writethrough (durable writes),
                      directsync (both), unsafe (flushes do nothing)
  -o OFFSET           guest offset of the first request (default 0)
  --random            random offsets (multiples of STEP from OFFSET) instead of sequential
  --seed N            seed of --random (default 1); the same seed gives the same offsets
  --flush-interval N  flush after every N requests (the last flush is timed, so
                      --flush-interval COUNT times the final flush of a write run)
  --no-drain          flush without waiting for the requests in flight
  -U, --force-share   open even if another process holds the image (read runs only)
  --no-probe          never guess a format: FILE needs -f, and a backing file whose format is
                      not recorded is refused
  -q                  quiet: print only the result
  --output FMT        human (default) or json (one machine-readable line)
  --overlap-check M   metadata-overlap guard: none, constant, cached or all (default all)
  --l2-cache-size SIZE       L2 cache size (qemu's l2-cache-size; default: enough to map
                             the whole image, at most 32M)
  --refcount-cache-size SIZE refcount cache size (default: four clusters)
  --slice-size SIZE          cached slice of an L2 table or refcount block (qemu's
                             l2-cache-entry-size): a power of two, 512 up to the cluster
                             size (default 4k)
  --cache-clean-interval SECONDS  drop cache entries unused for this long (qemu's
                             cache-clean-interval; default 600, 0 = never)
  -h, --help          this text

Offsets wrap around to OFFSET when a request would pass the end of the image.

Examples:
  oxcow bench -c 100000 -s 4k disk.qcow2             # 4 KiB sequential reads
  oxcow bench -w -c 20000 -d 2 --random disk.qcow2   # 4 KiB random writes, 2 threads
  oxcow bench -f raw -s 1M -c 500 disk.raw           # the same harness on a raw file
  oxcow bench --aio -d 16 -t none --random disk.qcow2 # 16 in flight from one thread
  oxcow bench -w -c 10000 --flush-interval 10000 --output json new.qcow2
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["-c", "--count"], true),
    opt(&["-s", "--size"], true),
    opt(&["-S", "--step"], true),
    opt(&["-d", "--depth"], true),
    opt(&["--aio"], false),
    opt(&["-w", "--write"], false),
    opt(&["--pattern"], true),
    opt(&["-t", "--cache"], true),
    opt(&["-o", "--offset"], true),
    opt(&["--random"], false),
    opt(&["--seed"], true),
    opt(&["--flush-interval"], true),
    opt(&["--no-drain"], false),
    opt(&["-U", "--force-share"], false),
    opt(&["-q", "--quiet"], false),
    opt(&["--output"], true),
    opt(&["--overlap-check"], true),
    opt(&["--no-probe"], false),
    opt(&["--l2-cache-size"], true),
    opt(&["--refcount-cache-size"], true),
    opt(&["--slice-size", "--l2-cache-entry-size"], true),
    opt(&["--cache-clean-interval"], true),
];

/// The parsed request stream and run options.
struct Params {
    file: String,
    raw: bool,
    count: u64,
    bufsize: u64,
    step: u64,
    depth: u64,
    aio: bool,
    write: bool,
    pattern: u8,
    direct: bool,
    writethrough: bool,
    flush_noop: bool,
    offset: u64,
    random: bool,
    seed: u64,
    flush_interval: u64,
    drain: bool,
    force_share: bool,
    no_probe: bool,
    quiet: bool,
    json: bool,
    overlap_check: oxcow::OverlapCheck,
    l2_cache_size: u64,
    refcount_cache_size: u64,
    slice_size: u64,
    clean_interval: Option<Duration>,
}

/// The device under test: the qcow2 engine or the raw file with the same harness.
enum Target {
    Qcow2(Box<Image>),
    Raw(File),
}

impl Target {
    fn size(&self) -> CliResult<u64> {
        match self {
            Target::Qcow2(i) => Ok(i.virtual_size()),
            Target::Raw(f) => Ok(f.metadata().map_err(|e| CliError::op(e.to_string()))?.len()),
        }
    }

    fn io(&self, write: bool, buf: &mut [u8], off: u64) -> Result<(), String> {
        match (self, write) {
            (Target::Qcow2(i), false) => i.read_at(buf, off).map_err(|e| e.to_string()),
            (Target::Qcow2(i), true) => i.write_at(buf, off).map_err(|e| e.to_string()),
            (Target::Raw(f), false) => f
                .read_exact_at(buf, off)
                .map_err(|e| format!("read at {off:#x}: {e}")),
            (Target::Raw(f), true) => f
                .write_all_at(buf, off)
                .map_err(|e| format!("write at {off:#x}: {e}")),
        }
    }

    fn flush(&self) -> Result<(), String> {
        match self {
            Target::Qcow2(i) => i.flush().map_err(|e| e.to_string()),
            Target::Raw(f) => f.sync_data().map_err(|e| format!("fdatasync: {e}")),
        }
    }
}

/// splitmix64: a tiny, well-mixed PRNG step; request k's random offset depends only on the
/// seed and k, so the stream is the same whatever thread issues it.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Guest offset of request `k`.
fn offset_of(p: &Params, slots: u64, k: u64) -> u64 {
    let step = if p.random && p.step == 0 {
        p.bufsize
    } else {
        p.step
    };
    if step == 0 {
        return p.offset;
    }
    let slot = if p.random {
        mix(p.seed ^ mix(k)) % slots
    } else {
        k % slots
    };
    p.offset + slot * step
}

/// A zero-filled buffer of `len` bytes aligned to 4 KiB, as O_DIRECT needs, carved out of a
/// larger vector (no unsafe allocation API needed).
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let mut v = vec![fill; len + 4096];
        let start = (4096 - (v.as_mut_ptr() as usize % 4096)) % 4096;
        AlignedBuf { v, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn parse(args: &[String]) -> CliResult<Params> {
    let mut p = Params {
        file: String::new(),
        raw: false,
        count: 75000,
        bufsize: 4096,
        step: u64::MAX,
        depth: 1,
        aio: false,
        write: false,
        pattern: 0,
        direct: false,
        writethrough: false,
        flush_noop: false,
        offset: 0,
        random: false,
        seed: 1,
        flush_interval: 0,
        drain: true,
        force_share: false,
        no_probe: false,
        quiet: false,
        json: false,
        overlap_check: oxcow::OverlapCheck::All,
        l2_cache_size: 0,
        refcount_cache_size: 0,
        slice_size: 0,
        clean_interval: None,
    };
    let mut fmt = None;
    let mut files = Vec::new();
    for a in scan("bench", args, SPECS)? {
        match a {
            Arg::Opt("-f", Some(f)) => fmt = Some(f),
            Arg::Opt("-c", Some(v)) => p.count = parse_num("-c", &v)?,
            Arg::Opt("-s", Some(v)) => p.bufsize = parse_size(&v)?,
            Arg::Opt("-S", Some(v)) => p.step = parse_size(&v)?,
            Arg::Opt("-d", Some(v)) => p.depth = parse_num("-d", &v)?,
            Arg::Opt("-w", _) => p.write = true,
            Arg::Opt("--aio", _) => p.aio = true,
            Arg::Opt("--pattern", Some(v)) => {
                p.pattern = u8::try_from(parse_num("--pattern", &v)?)
                    .map_err(|_| CliError::usage("--pattern must be a byte value 0..255"))?
            }
            Arg::Opt("-t", Some(v)) => match v.as_str() {
                "none" | "off" => p.direct = true,
                "writeback" => {}
                "writethrough" => p.writethrough = true,
                "directsync" => {
                    p.direct = true;
                    p.writethrough = true;
                }
                "unsafe" => p.flush_noop = true,
                other => {
                    return Err(CliError::usage(format!(
                        "bench: unknown cache mode '{other}' (none, writeback, writethrough, directsync, unsafe)"
                    )))
                }
            },
            Arg::Opt("-o", Some(v)) => p.offset = parse_size(&v)?,
            Arg::Opt("--random", _) => p.random = true,
            Arg::Opt("--seed", Some(v)) => p.seed = parse_num("--seed", &v)?,
            Arg::Opt("--flush-interval", Some(v)) => {
                p.flush_interval = parse_num("--flush-interval", &v)?
            }
            Arg::Opt("--no-drain", _) => p.drain = false,
            Arg::Opt("-U", _) => p.force_share = true,
            Arg::Opt("--no-probe", _) => p.no_probe = true,
            Arg::Opt("-q", _) => p.quiet = true,
            Arg::Opt("--output", Some(o)) => p.json = crate::parse_output("bench", &o)?,
            Arg::Opt("--overlap-check", Some(v)) => {
                p.overlap_check = match v.as_str() {
                    "none" => oxcow::OverlapCheck::None,
                    "constant" => oxcow::OverlapCheck::Constant,
                    "cached" => oxcow::OverlapCheck::Cached,
                    "all" => oxcow::OverlapCheck::All,
                    _ => {
                        return Err(CliError::usage(
                            "--overlap-check must be none, constant, cached or all",
                        ))
                    }
                }
            }
            Arg::Opt("--l2-cache-size", Some(v)) => p.l2_cache_size = parse_size(&v)?,
            Arg::Opt("--refcount-cache-size", Some(v)) => {
                p.refcount_cache_size = parse_size(&v)?
            }
            Arg::Opt("--slice-size", Some(v)) => p.slice_size = parse_size(&v)?,
            Arg::Opt("--cache-clean-interval", Some(v)) => {
                // qemu's cache-clean-interval: seconds, 0 disables the cleaning.
                p.clean_interval = Some(Duration::from_secs(parse_num(
                    "--cache-clean-interval",
                    &v,
                )?))
            }
            Arg::Pos(f) => files.push(f),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let [file] = files.as_slice() else {
        return Err(CliError::usage("bench needs exactly one FILE"));
    };
    p.file = file.clone();
    p.raw = match fmt.as_deref() {
        Some("raw") => true,
        Some("qcow2") => false,
        None if p.no_probe => {
            return Err(CliError::usage(
                "bench: --no-probe needs the format of FILE (-f qcow2 or -f raw)",
            ))
        }
        None => crate::convert::probe(file)? == "raw",
        Some(other) => {
            return Err(CliError::usage(format!(
                "bench: format must be qcow2 or raw, not '{other}'"
            )))
        }
    };
    if p.step == u64::MAX {
        p.step = p.bufsize;
    }
    if p.bufsize == 0 || p.bufsize > 1 << 30 {
        return Err(CliError::usage("bench: -s must be between 1 byte and 1G"));
    }
    if p.depth == 0 || p.depth > 1024 {
        return Err(CliError::usage("bench: -d must be between 1 and 1024"));
    }
    if p.flush_interval > 0 && !p.write {
        return Err(CliError::usage(
            "bench: --flush-interval is only for write runs (-w)",
        ));
    }
    if !p.drain && p.flush_interval == 0 {
        return Err(CliError::usage("bench: --no-drain needs --flush-interval"));
    }
    if p.write && p.force_share {
        return Err(CliError::usage("bench: -U is only for read runs"));
    }
    Ok(p)
}

fn open(p: &Params) -> CliResult<Target> {
    let err = |e: String| CliError::op(format!("could not open '{}': {e}", p.file));
    if p.raw {
        let mut flags = 0;
        if p.direct {
            flags |= libc::O_DIRECT;
        }
        if p.writethrough {
            flags |= libc::O_DSYNC;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(p.write)
            .custom_flags(flags)
            .open(&p.file)
            .map_err(|e| err(e.to_string()))?;
        Ok(Target::Raw(f))
    } else {
        let img = Image::open(
            &p.file,
            &OpenOptions {
                writable: p.write,
                force_share: p.force_share,
                no_probe: p.no_probe,
                direct: p.direct,
                writethrough: p.writethrough,
                overlap_check: p.overlap_check,
                l2_cache_size: p.l2_cache_size,
                refcount_cache_size: p.refcount_cache_size,
                l2_slice_size: p.slice_size,
                cache_clean_interval: p.clean_interval,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| err(e.to_string()))?;
        Ok(Target::Qcow2(Box::new(img)))
    }
}

/// Runs `oxcow bench ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let p = parse(args)?;
    let target = open(&p)?;
    let size = target.size()?;
    if p.offset.checked_add(p.bufsize).is_none_or(|e| e > size) {
        return Err(CliError::usage(format!(
            "bench: a {}-byte request at offset {} does not fit in the {size}-byte image",
            p.bufsize, p.offset
        )));
    }
    // Number of request positions that fit between OFFSET and the end of the image.
    let step = if p.random && p.step == 0 {
        p.bufsize
    } else {
        p.step
    };
    let slots = (size - p.offset - p.bufsize)
        .checked_div(step)
        .map_or(1, |n| n + 1);
    if !p.quiet && !p.json {
        outln!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {}{})",
            p.count,
            if p.write { "write" } else { "read" },
            p.bufsize,
            p.depth,
            p.offset,
            p.step,
            if p.random { ", random order" } else { "" }
        );
        if p.flush_interval > 0 {
            outln!("Sending flush every {} requests", p.flush_interval);
        }
    }
    let secs = if p.aio {
        aio::run(&p, target, slots)?
    } else {
        run_threads(&p, target, slots)?
    };
    let bytes = p.count as f64 * p.bufsize as f64;
    let mibs = bytes / (1u64 << 20) as f64 / secs.max(1e-9);
    let iops = p.count as f64 / secs.max(1e-9);
    if p.json {
        outln!(
            "{{\"format\": \"{}\", \"op\": \"{}\", \"pattern\": \"{}\", \"count\": {}, \"bufsize\": {}, \"depth\": {}, \"seconds\": {:.6}, \"mib_per_s\": {:.2}, \"iops\": {:.0}}}",
            if p.raw { "raw" } else { "qcow2" },
            if p.write { "write" } else { "read" },
            if p.random { "random" } else { "sequential" },
            p.count,
            p.bufsize,
            p.depth,
            secs,
            mibs,
            iops
        );
    } else {
        outln!("Run completed in {secs:.3} seconds.");
        outln!("Throughput: {mibs:.2} MiB/s, {iops:.0} IOPS");
    }
    Ok(())
}

/// The threaded model: `depth` threads issue synchronous requests on one handle. Returns the
/// timed seconds; closes the handle outside the timed region.
fn run_threads(p: &Params, target: Target, slots: u64) -> CliResult<f64> {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    // Requests hold the read side; a draining flush takes the write side, so it starts only
    // after every request in flight has completed and holds new ones back until it is done.
    let drain = RwLock::new(());
    let fail = |e: String| {
        stop.store(true, Ordering::Relaxed);
        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..p.depth {
            s.spawn(|| {
                let mut buf = AlignedBuf::new(p.bufsize as usize, p.pattern);
                let buf = buf.get();
                while !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= p.count {
                        break;
                    }
                    let off = offset_of(p, slots, k);
                    let r = {
                        let _g = drain.read().unwrap_or_else(|p| p.into_inner());
                        target.io(p.write, buf, off)
                    };
                    if let Err(e) = r {
                        fail(e);
                        break;
                    }
                    if p.flush_interval > 0 && (k + 1) % p.flush_interval == 0 && !p.flush_noop {
                        let r = if p.drain {
                            let _g = drain.write().unwrap_or_else(|p| p.into_inner());
                            target.flush()
                        } else {
                            target.flush()
                        };
                        if let Err(e) = r {
                            fail(format!("flush: {e}"));
                            break;
                        }
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(CliError::op(format!("bench on '{}': {e}", p.file)));
    }
    // The handle is closed (and, after writes, flushed) outside the timed region, as
    // qemu-img bench does; use --flush-interval COUNT to time the final flush.
    if let Target::Qcow2(img) = target {
        (*img)
            .close()
            .map_err(|e| CliError::op(format!("closing '{}': {e}", p.file)))?;
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_stream() {
        let mut p = parse(&["x.raw".to_string(), "-f".into(), "raw".into()]).unwrap();
        p.offset = 4096;
        assert_eq!(offset_of(&p, 3, 0), 4096);
        assert_eq!(offset_of(&p, 3, 2), 4096 + 2 * 4096);
        assert_eq!(offset_of(&p, 3, 3), 4096);
        p.random = true;
        let a: Vec<u64> = (0..100).map(|k| offset_of(&p, 1000, k)).collect();
        let b: Vec<u64> = (0..100).map(|k| offset_of(&p, 1000, k)).collect();
        assert_eq!(a, b);
        assert!(a
            .iter()
            .all(|o| (o - 4096) % 4096 == 0 && *o < 4096 + 1000 * 4096));
        assert!(a.windows(2).any(|w| w[0] > w[1]));
    }
}
