//! What each fuzz target does with one input, shared by the libFuzzer targets
//! (`fuzz/fuzz_targets/`) and the replay of committed reproducers in the main crate
//! (`tests/fuzz_regressions.rs` includes this file with `#[path]`), so that a regression test
//! runs exactly the operations the fuzzer ran.
//!
//! The properties: no panic, no hang, bounded memory (libFuzzer's `-timeout` and
//! `-rss_limit_mb` watch the last two), plus the per-target assertions below. Errors returned
//! by oxcow are fine: a mutated image is expected to be refused or fenced cleanly.

use oxcow::format::header::Header;
use oxcow::{CheckFix, CheckReport, CreateOptions, Image, OpenOptions, ZeroFlags};
use std::fs;
use std::path::{Path, PathBuf};

/// Guest bytes read by one request, at most.
const READ_CHUNK: u64 = 64 << 10;
/// Disks up to this size are read whole; bigger ones at `SPREAD_READS` places.
const READ_WHOLE_LIMIT: u64 = 8 << 20;
const SPREAD_READS: u64 = 16;
/// Extents walked by block status, at most.
const MAX_EXTENTS: usize = 64;
/// Bytes at the end of the input that also drive the writes (8 per operation).
const OP_TAIL: usize = 48;
/// Longest write, zero or discard an operation asks for.
const MAX_OP_LEN: u64 = 128 << 10;
/// The external data file the data-file seeds name (relative: resolved against the working
/// directory, which `Workdir::enter` makes the work directory).
const DATA_FILE: &str = "data.raw";

/// What fuzz/seed.sh writes into `data.raw` before qemu-io's writes: 2 MiB of 'd'.
fn data_file_content() -> Vec<u8> {
    vec![b'd'; 2 << 20]
}

/// A private directory for one fuzzing process (or one regression test) holding the image
/// under test, the backing files the seed images name (`backing.raw`, `backing.qcow2`) and the
/// external data file they name (`data.raw`).
pub struct Workdir {
    dir: PathBuf,
    image: PathBuf,
}

impl Workdir {
    /// Creates `<base>/oxcow-fuzz-<pid>-<tag>` where `base` is `$OXCOW_FUZZ_TMPDIR`, else
    /// /dev/shm when it exists, else the system temp dir.
    pub fn new(tag: &str) -> Workdir {
        let base = std::env::var_os("OXCOW_FUZZ_TMPDIR")
            .map(PathBuf::from)
            .or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                shm.is_dir().then_some(shm)
            })
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("oxcow-fuzz-{}-{tag}", std::process::id()));
        fs::create_dir_all(&dir).expect("create the fuzz work directory");
        // The same backing files fuzz/seed.sh made the seed images with.
        fs::write(dir.join("backing.raw"), vec![b'a'; 2 << 20]).expect("write backing.raw");
        let bq = dir.join("backing.qcow2");
        let _ = fs::remove_file(&bq);
        let opts = CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        oxcow::create(&bq, 2 << 20, &opts).expect("create backing.qcow2");
        let img = Image::open(
            &bq,
            &OpenOptions {
                writable: true,
                ..OpenOptions::default()
            },
        )
        .expect("open backing.qcow2");
        img.write_at(&[0x42; 128 << 10], 0)
            .expect("write backing.qcow2");
        img.close().expect("close backing.qcow2");
        let image = dir.join("image.qcow2");
        let wd = Workdir { dir, image };
        wd.restore_data_file();
        wd
    }

    /// Makes this directory the process's working directory. Relative external data-file
    /// names resolve against it (as in QEMU), and a mutated header may name any file: a fuzzing
    /// process must never write into the checkout it was started from. The libFuzzer targets
    /// call this once; the regression tests (many work directories in one process) do not, so
    /// a reproducer whose data file is `data.raw` replays only under the fuzzer.
    pub fn enter(&self) {
        std::env::set_current_dir(&self.dir).expect("enter the fuzz work directory");
    }

    /// `data.raw`, the raw external data file the data-file seeds name, as fuzz/seed.sh made it.
    fn restore_data_file(&self) {
        fs::write(self.dir.join(DATA_FILE), data_file_content()).expect("write data.raw");
    }

    /// The path the image under test is written to.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Replaces the image under test with `data`. An input that may name the data file gets a
    /// fresh copy of it: writes through an earlier input must not change how this one runs
    /// (every execution is a function of its input alone, or findings do not reproduce).
    fn put(&self, data: &[u8]) {
        fs::write(&self.image, data).expect("write the image under test");
        if data
            .windows(DATA_FILE.len())
            .any(|w| w == DATA_FILE.as_bytes())
        {
            self.restore_data_file();
        }
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Target `header`: parse arbitrary bytes as cluster 0; when they parse, serialize the header
/// again and check that the bytes parse back to the same header. Feature names are kept as
/// (lossily decoded) strings, so a name that is not UTF-8 may change once; after one round trip
/// the header must be a fixed point, bytes included.
pub fn header(data: &[u8]) {
    let _ = Header::probe_cluster_size(data);
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let _ = h.geometry();
    let mut first = h.clone();
    let Ok(bytes) = first.to_cluster0() else {
        return; // does not fit one cluster: a clean error
    };
    assert_eq!(
        bytes.len() as u64,
        h.cluster_size(),
        "to_cluster0 must produce exactly one cluster"
    );
    let back = match Header::parse(&bytes) {
        Ok(back) => back,
        Err(e) => panic!("a serialized header does not parse: {e}\n{h:#?}"),
    };
    let mut expect = first.clone();
    expect.feature_names.clone_from(&back.feature_names);
    expect.backing_format.clone_from(&back.backing_format);
    assert_eq!(back, expect, "serialize-then-parse changed the header");
    // Second round: now an exact fixed point.
    let mut second = back.clone();
    let Ok(bytes2) = second.to_cluster0() else {
        panic!("a header that serialized once does not serialize again: {back:#?}");
    };
    match Header::parse(&bytes2) {
        Ok(h2) => assert_eq!(h2, second, "the second round trip changed the header"),
        Err(e) => panic!("a twice-serialized header does not parse: {e}\n{back:#?}"),
    }
}

/// Target `image_io`: the input is an image. Opens it read-only (with its backing chain)
/// and reads across the disk, then read-write (without backing) and runs the writes, zeroes,
/// discards and flushes that the last bytes of the input describe, checking that every
/// successful write reads back, then closes.
pub fn image_io(data: &[u8], wd: &Workdir) {
    wd.put(data);
    let path = wd.image();
    let ro = OpenOptions::default();
    match Image::open(path, &ro) {
        Ok(img) => read_around(&img),
        Err(_) => {
            // Perhaps only the backing chain is broken: the image itself may still read.
            let nb = OpenOptions {
                no_backing: true,
                ..OpenOptions::default()
            };
            if let Ok(img) = Image::open(path, &nb) {
                read_around(&img);
            }
        }
    }
    let Ok(img) = Image::open(path, &writable_without_backing()) else {
        return;
    };
    let tail = &data[data.len().saturating_sub(OP_TAIL)..];
    for op in tail.chunks_exact(8) {
        run_op(&img, op);
    }
    let _ = img.flush();
    read_around(&img);
    let _ = img.close();
}

/// Read-write, without the backing chain: the operations exercise this image's metadata.
fn writable_without_backing() -> OpenOptions {
    OpenOptions {
        writable: true,
        no_backing: true,
        ..OpenOptions::default()
    }
}

/// Info, a block-status walk and reads over the whole disk (or spread over a big one).
fn read_around(img: &Image) {
    let _ = img.info();
    let size = img.virtual_size();
    let mut off = 0;
    for _ in 0..MAX_EXTENTS {
        if off >= size {
            break;
        }
        match img.block_status(off, size - off) {
            Ok(e) if e.length > 0 => off = e.offset.saturating_add(e.length),
            _ => break,
        }
    }
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let read = |off: u64, buf: &mut [u8]| {
        let len = READ_CHUNK.min(size - off) as usize;
        let _ = img.read_at(&mut buf[..len], off);
    };
    if size <= READ_WHOLE_LIMIT {
        let mut off = 0;
        while off < size {
            read(off, &mut buf);
            off += READ_CHUNK;
        }
    } else {
        for i in 0..SPREAD_READS {
            let off = (size as u128 * i as u128 / SPREAD_READS as u128) as u64;
            read(off, &mut buf);
        }
        read(size - READ_CHUNK.min(size), &mut buf);
    }
    if size >= 1024 {
        let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
        let _ = img.read_vectored_at(&mut [&mut a[..], &mut b[..]], size - 1024);
    }
}

/// One operation from 8 bytes: kind, where (a fraction of the disk), how long, which byte.
fn run_op(img: &Image, op: &[u8]) {
    let size = img.virtual_size();
    if size == 0 {
        return;
    }
    let kind = op[0];
    let frac = u32::from_be_bytes([op[1], op[2], op[3], op[4]]) as u128;
    let mut off = ((size as u128 * frac) >> 32) as u64;
    if kind & 0x80 == 0 {
        off &= !511; // mostly sector aligned, sometimes not
    }
    let len = (u16::from_be_bytes([op[5], op[6]]) as u64 * 4 % MAX_OP_LEN + 1).min(size - off);
    let fill = op[7];
    match kind % 8 {
        0..=2 => {
            let buf = vec![fill; len as usize];
            if img.write_at(&buf, off).is_ok() {
                let mut back = vec![0u8; len as usize];
                if img.read_at(&mut back, off).is_ok() && back != buf {
                    assert_damaged(
                        img,
                        &format!("a successful write of {len} bytes at {off:#x}"),
                    );
                }
            }
        }
        3 => {
            let may_unmap = kind & 0x40 != 0;
            if img.write_zeroes(off, len, ZeroFlags { may_unmap }).is_ok() {
                let mut back = vec![0xffu8; len as usize];
                if img.read_at(&mut back, off).is_ok() && back.iter().any(|&b| b != 0) {
                    assert_damaged(
                        img,
                        &format!("a successful write_zeroes of {len} bytes at {off:#x}"),
                    );
                }
            }
        }
        4 | 5 => {
            let _ = img.discard(off, len);
        }
        6 => {
            let _ = img.flush();
        }
        _ => {
            let mut buf = vec![0u8; len as usize];
            let _ = img.read_at(&mut buf, off);
        }
    }
}

/// A successful write that does not read back is acceptable only on an image whose metadata
/// was damaged already in a way no request can see cheaply, e.g. two L2 entries that map to
/// the same host cluster (QEMU writes through both too): `check` must report it. On a sound
/// image it is an engine bug.
fn assert_damaged(img: &Image, what: &str) {
    let _ = img.flush();
    // An image that cannot even be checked is damaged.
    if let Ok(r) = img.check(CheckFix::None, None) {
        assert!(
            r.corruptions > 0 || r.check_errors > 0,
            "{what} does not read back, and check finds the image sound: {r:#?}"
        );
    }
}

/// What a check or a repair returned, for the assertions below.
fn counts(r: &CheckReport) -> (u64, u64, u64) {
    (r.corruptions, r.leaks, r.check_errors)
}

/// Target `check_repair`: check the image, repair it (fully, or leaks only when the last
/// input byte says so), check it again. A repair may leave what it cannot fix (like qemu-img,
/// e.g. clusters past the end of the file), but it must be honest and must not make things
/// worse: the plain check afterwards finds exactly the corruptions, leaks and check errors the
/// repair reported as remaining, and no more corruptions than the check before the repair.
pub fn check_repair(data: &[u8], wd: &Workdir) {
    wd.put(data);
    let path = wd.image();
    let before = Image::check_path(path, CheckFix::None, false, None);
    let fix = if data.last().is_some_and(|b| b & 7 == 7) {
        CheckFix::Leaks
    } else {
        CheckFix::All
    };
    let Ok(repaired) = Image::check_path(path, fix, false, None) else {
        return; // a clean error
    };
    if repaired.check_errors > 0 {
        // The repair could not complete (qemu-img check's exit code 1, e.g. "need to rebuild
        // refcount structures" with leaks-only repairs): a clean error.
        return;
    }
    let after = match Image::check_path(path, CheckFix::None, false, None) {
        Ok(r) => r,
        Err(e) => panic!("the image does not check any more after a successful repair: {e}"),
    };
    assert_eq!(
        counts(&after),
        counts(&repaired),
        "a check after the repair disagrees with what the repair reported \
         (corruptions, leaks, check errors)\nrepair: {repaired:#?}\nafter: {after:#?}"
    );
    if let Ok(before) = before {
        if before.check_errors == 0 {
            assert!(
                after.corruptions <= before.corruptions,
                "the repair made corruptions: before {before:#?}\nafter: {after:#?}"
            );
        }
        // Leaks may stay next to corruptions a repair cannot fix (e.g. a refcount overflow
        // with 1-bit refcounts, as with qemu-img), not on an image it reports clean.
        if fix == CheckFix::All && after.corruptions == 0 {
            assert_eq!(after.leaks, 0, "a full repair left leaks: {after:#?}");
        }
    }
}

/// Target `manage`: the input is an image. When `check` finds it sound, opens it read-write
/// (without backing) and runs the management operations the last bytes of the input
/// describe (internal snapshots created, applied, deleted; persistent bitmaps added,
/// cleared, removed; resizes; writes and flushes between them), closes it, and checks it
/// again: operations on a sound image may leak clusters after a failure, never corrupt it.
/// On a damaged image they only must not panic or hang.
pub fn manage(data: &[u8], wd: &Workdir) {
    wd.put(data);
    let path = wd.image();
    let sound = Image::check_path(path, CheckFix::None, false, None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);
    let Ok(img) = Image::open(path, &writable_without_backing()) else {
        return;
    };
    let tail = &data[data.len().saturating_sub(OP_TAIL)..];
    for (n, op) in tail.chunks_exact(8).enumerate() {
        run_manage_op(&img, n, op);
    }
    let fenced = img.flush().is_err();
    let _ = img.close();
    if !sound || fenced {
        return;
    }
    match Image::check_path(path, CheckFix::None, false, None) {
        Ok(r) => assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "management operations corrupted a sound image: {r:#?}"
        ),
        Err(e) => panic!("a sound image does not check after management operations: {e}"),
    }
}

/// Largest size change one resize operation asks for.
const MAX_RESIZE_DELTA: u64 = 4 << 20;

/// One management operation from 8 bytes: kind, an argument, and a fill byte.
fn run_manage_op(img: &Image, n: usize, op: &[u8]) {
    let size = img.virtual_size();
    let arg = u32::from_be_bytes([op[1], op[2], op[3], op[4]]);
    match op[0] % 10 {
        0 | 1 if size > 0 => {
            let off = ((size as u128 * arg as u128) >> 32) as u64 & !511;
            let len = (u16::from_be_bytes([op[5], op[6]]) as u64 * 512 % MAX_OP_LEN + 512)
                .min(size - off);
            let _ = img.write_at(&vec![op[7]; len as usize], off);
        }
        2 => {
            let _ = img.snapshot_create(&format!("s{n}"));
        }
        3 | 4 => {
            let list = img.snapshots();
            if !list.is_empty() {
                let s = &list[arg as usize % list.len()];
                let _ = if op[0] % 10 == 3 {
                    img.snapshot_apply(&s.id)
                } else {
                    img.snapshot_delete(&s.id)
                };
            }
        }
        5 => {
            let g = 512u64 << (op[5] % 12);
            let _ = img.bitmap_add(
                &format!("b{}", op[6] % 4),
                oxcow::BitmapAddOptions {
                    granularity: g,
                    disabled: op[7] & 1 == 1,
                },
            );
        }
        6 => {
            let name = format!("b{}", op[6] % 4);
            let _ = match op[7] % 3 {
                0 => img.bitmap_remove(&name),
                1 => img.bitmap_clear(&name),
                _ => img.bitmap_merge(&name, &format!("b{}", op[5] % 4)),
            };
        }
        7 => {
            let delta = (u64::from(arg) % MAX_RESIZE_DELTA) & !511;
            let new = if op[5] & 1 == 0 {
                size.saturating_add(delta)
            } else {
                size.saturating_sub(delta)
            };
            let _ = img.resize(new, true);
        }
        8 => {
            let _ = img.flush();
        }
        _ => {
            let _ = img.write_zeroes(0, size.min(1 << 20), ZeroFlags { may_unmap: true });
        }
    }
}
