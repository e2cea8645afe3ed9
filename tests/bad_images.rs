//! Malformed images give clean errors (right errno, a message naming the field) and never a
//! panic or a hang; bad requests are rejected without touching the file; read-only opens never
//! write.

mod common;

use common::*;
use oxcow::{Error, ErrorKind, Image, OpenOptions, ZeroFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const EINVAL: i32 = libc_errno::EINVAL;
const ENOTSUP: i32 = libc_errno::ENOTSUP;
const EUCLEAN: i32 = libc_errno::EUCLEAN;
const EROFS: i32 = libc_errno::EROFS;
const EIO: i32 = libc_errno::EIO;

/// Linux errno values (no libc dev-dependency needed).
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EROFS: i32 = 30;
    pub const ENOTSUP: i32 = 95;
    pub const EUCLEAN: i32 = 117;
}

// Header field offsets.
const H_MAGIC: u64 = 0;
const H_VERSION: u64 = 4;
const H_BACKING_OFF: u64 = 8;
const H_BACKING_SIZE: u64 = 16;
const H_CLUSTER_BITS: u64 = 20;
const H_SIZE: u64 = 24;
const H_CRYPT: u64 = 32;
const H_L1_SIZE: u64 = 36;
const H_L1_OFF: u64 = 40;
const H_RT_OFF: u64 = 48;
const H_RT_CLUSTERS: u64 = 56;
const H_NB_SNAP: u64 = 60;
const H_SNAP_OFF: u64 = 64;
const H_INCOMPAT: u64 = 72;
const H_AUTOCLEAR: u64 = 88;
const H_REFCOUNT_ORDER: u64 = 96;
const H_HEADER_LEN: u64 = 100;
const H_COMPRESSION: u64 = 104;

const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Result of opening and fully reading an image in a guarded thread.
#[derive(Debug)]
enum Outcome {
    /// Open and the full read succeeded.
    Ok,
    /// Open failed.
    OpenErr(i32, String, &'static str),
    /// Open succeeded, a read failed.
    ReadErr(i32, String, &'static str),
}

fn kind(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::InvalidArgument => "InvalidArgument",
        ErrorKind::NotQcow2 => "NotQcow2",
        ErrorKind::Unsupported => "Unsupported",
        ErrorKind::Corrupt => "Corrupt",
        ErrorKind::ReadOnly => "ReadOnly",
        ErrorKind::NoSpace => "NoSpace",
        ErrorKind::Locked => "Locked",
        ErrorKind::Fenced => "Fenced",
        ErrorKind::NoMemory => "NoMemory",
        ErrorKind::Io => "Io",
        ErrorKind::CorruptionPrevented => "CorruptionPrevented",
        _ => "Other",
    }
}

/// Opens (read-only, or writable) and reads the whole disk, in a thread with a timeout.
fn open_and_read(path: &Path, writable: bool) -> Result<Outcome, String> {
    let p = path.to_path_buf();
    with_timeout(
        Duration::from_secs(30),
        &format!("open+read {}", path.display()),
        move || {
            let img = match Image::open(
                &p,
                &OpenOptions {
                    writable,
                    ..Default::default()
                },
            ) {
                Ok(i) => i,
                Err(e) => return Outcome::OpenErr(e.errno(), e.to_string(), kind(&e)),
            };
            let size = img.virtual_size();
            let mut off = 0;
            let mut buf = vec![0u8; MIB as usize];
            while off < size {
                let n = (size - off).min(MIB) as usize;
                if let Err(e) = img.read_at(&mut buf[..n], off) {
                    return Outcome::ReadErr(e.errno(), e.to_string(), kind(&e));
                }
                off += n as u64;
            }
            Outcome::Ok
        },
    )
}

fn put_be32(path: &Path, off: u64, v: u32) {
    poke(path, off, &v.to_be_bytes());
}

fn put_be64(path: &Path, off: u64, v: u64) {
    poke(path, off, &v.to_be_bytes());
}

/// Finds a header extension: returns (offset of its type field, length).
fn find_ext(path: &Path, typ: u32) -> Option<(u64, u32)> {
    let hl = be32(path, H_HEADER_LEN) as u64;
    let mut off = hl;
    loop {
        let t = be32(path, off);
        let l = be32(path, off + 4);
        if t == 0 {
            return None;
        }
        if t == typ {
            return Some((off, l));
        }
        off += 8 + (l as u64).div_ceil(8) * 8;
    }
}

/// A valid v3 image with 64 KiB clusters, data written (so L1/L2 entries exist).
fn base_image(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, 4 * MIB, "cluster_size=65536");
    qemu_io(
        &p,
        &[
            "write -P 0x5a 0 200000".to_string(),
            "write -P 0x6b 3000000 70000".to_string(),
        ],
    );
    p
}

struct Case {
    name: &'static str,
    /// Mutates a copy of the base image.
    mutate: Box<dyn Fn(&Path)>,
    /// Acceptable errnos (first is the preferred one).
    errnos: &'static [i32],
    /// The message must contain one of these (case-insensitive).
    words: &'static [&'static str],
    /// The error may come from the open or only from reading the data.
    read_time_ok: bool,
    /// QEMU itself reads this image without complaint: success is acceptable too (but an
    /// error must still have the right errno, and nothing may panic or hang).
    allow_ok: bool,
}

fn case(
    name: &'static str,
    errnos: &'static [i32],
    words: &'static [&'static str],
    mutate: impl Fn(&Path) + 'static,
) -> Case {
    Case {
        name,
        mutate: Box::new(mutate),
        errnos,
        words,
        read_time_ok: false,
        allow_ok: false,
    }
}

/// A runtime inconsistency found by a read on a writable open marks the image corrupt, like
/// QEMU: incompatible bit 1 is the only change allowed.
fn only_corrupt_bit_set(before: &[u8], after: &[u8]) -> bool {
    let field = 72..80;
    if before.len() != after.len() || before[..field.start] != after[..field.start] {
        return false;
    }
    if before[field.end..] != after[field.end..] {
        return false;
    }
    let word = |b: &[u8]| u64::from_be_bytes(b[field.clone()].try_into().expect("8 bytes"));
    word(after) == word(before) | 2
}

fn run_cases(dir: &TempDir, base: &Path, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in cases {
        let p = dir.join(&format!("bad-{}.qcow2", c.name));
        std::fs::copy(base, &p).unwrap();
        (c.mutate)(&p);
        let before = read_file(&p);
        for writable in [false, true] {
            let mode = if writable { "rw" } else { "ro" };
            if writable && read_file(&p) != before {
                failures.push(format!(
                    "[{}/ro] a read-only open modified the file",
                    c.name
                ));
            }
            match open_and_read(&p, writable) {
                Err(msg) => failures.push(format!("[{}/{mode}] {msg}", c.name)),
                Ok(Outcome::Ok) if c.allow_ok => {}
                Ok(Outcome::Ok) => failures.push(format!(
                    "[{}/{mode}] expected an error (errno {:?}), but open and full read succeeded",
                    c.name, c.errnos
                )),
                Ok(Outcome::OpenErr(errno, msg, k)) | Ok(Outcome::ReadErr(errno, msg, k))
                    if !c.errnos.contains(&errno) =>
                {
                    failures.push(format!(
                        "[{}/{mode}] wrong errno {errno} ({k}), expected {:?}: {msg}",
                        c.name, c.errnos
                    ))
                }
                Ok(Outcome::ReadErr(_, msg, _)) if !c.read_time_ok => failures.push(format!(
                    "[{}/{mode}] open succeeded; the error only came from a read: {msg}",
                    c.name
                )),
                Ok(Outcome::OpenErr(_, msg, _)) | Ok(Outcome::ReadErr(_, msg, _)) => {
                    let lower = msg.to_lowercase();
                    if !c.words.iter().any(|w| lower.contains(&w.to_lowercase())) {
                        failures.push(format!(
                            "[{}/{mode}] message does not name the field ({:?}): {msg}",
                            c.name, c.words
                        ));
                    }
                }
            }
        }
        let after = read_file(&p);
        if after != before && !only_corrupt_bit_set(&before, &after) {
            failures.push(format!(
                "[{}] a failed open or read modified the file beyond setting the corrupt bit",
                c.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} malformed-image failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unmodified_base_image_opens_and_reads() {
    let dir = TempDir::new("bad-base");
    let p = base_image(&dir, "base.qcow2");
    assert!(matches!(open_and_read(&p, false), Ok(Outcome::Ok)));
    assert!(matches!(open_and_read(&p, true), Ok(Outcome::Ok)));
    assert_check_clean(&p);
}

#[test]
fn malformed_headers_give_clean_errors() {
    let dir = TempDir::new("bad-header");
    let base = base_image(&dir, "base.qcow2");
    let cs = 65536u64;
    let cases = vec![
        case("magic", &[EINVAL], &["qcow2", "magic", "format"], |p| {
            poke(p, H_MAGIC, b"QFIX")
        }),
        case(
            "magic-zero",
            &[EINVAL],
            &["qcow2", "magic", "format"],
            |p| put_be32(p, H_MAGIC, 0),
        ),
        case("version-1", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 1)
        }),
        case("version-4", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 4)
        }),
        case("version-huge", &[ENOTSUP], &["version"], |p| {
            put_be32(p, H_VERSION, 0xffff_ffff)
        }),
        case("cluster-bits-8", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 8)
        }),
        case("cluster-bits-0", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 0)
        }),
        case("cluster-bits-22", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 22)
        }),
        case("cluster-bits-64", &[ENOTSUP, EUCLEAN], &["cluster"], |p| {
            put_be32(p, H_CLUSTER_BITS, 64)
        }),
        case(
            "cluster-bits-huge",
            &[ENOTSUP, EUCLEAN],
            &["cluster"],
            |p| put_be32(p, H_CLUSTER_BITS, 0xffff_fff0),
        ),
        case("header-length-short", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 72)
        }),
        case("header-length-zero", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 0)
        }),
        case(
            "header-length-beyond-cluster",
            &[EUCLEAN],
            &["header"],
            move |p| put_be32(p, H_HEADER_LEN, cs as u32 + 8),
        ),
        case("header-length-huge", &[EUCLEAN], &["header"], |p| {
            put_be32(p, H_HEADER_LEN, 0xffff_fff8)
        }),
        case("l1-size-too-small", &[EUCLEAN], &["l1"], |p| {
            put_be32(p, H_L1_SIZE, 0)
        }),
        case("l1-size-huge", &[EUCLEAN], &["l1"], |p| {
            put_be32(p, H_L1_SIZE, 0x7fff_ffff)
        }),
        case("l1-offset-unaligned", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0x30200)
        }),
        case("l1-offset-overflow", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0xffff_ffff_ffff_0000)
        }),
        case("l1-offset-zero", &[EUCLEAN], &["l1"], |p| {
            put_be64(p, H_L1_OFF, 0)
        }),
        case(
            "reftable-offset-zero",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0),
        ),
        case(
            "reftable-offset-unaligned",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0x10008),
        ),
        case(
            "reftable-offset-overflow",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be64(p, H_RT_OFF, 0xffff_ffff_ffff_0000),
        ),
        case(
            "reftable-clusters-zero",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_RT_CLUSTERS, 0),
        ),
        case(
            "reftable-clusters-huge",
            &[EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_RT_CLUSTERS, 0xffff_ffff),
        ),
        case("nb-snapshots-huge", &[EUCLEAN], &["snapshot"], |p| {
            put_be32(p, H_NB_SNAP, 0xffff_ffff)
        }),
        case("nb-snapshots-65537", &[EUCLEAN], &["snapshot"], |p| {
            put_be32(p, H_NB_SNAP, 65537)
        }),
        case(
            "snapshots-offset-unaligned",
            &[EUCLEAN],
            &["snapshot"],
            |p| put_be64(p, H_SNAP_OFF, 0x1234),
        ),
        case(
            "snapshot-table-past-eof",
            &[EUCLEAN, EIO],
            &["snapshot"],
            |p| {
                put_be32(p, H_NB_SNAP, 3);
                put_be64(p, H_SNAP_OFF, 0x10_0000_0000);
            },
        ),
        case(
            "unknown-incompat-bit-unnamed",
            &[ENOTSUP],
            &["feature", "incompatible"],
            |p| put_be64(p, H_INCOMPAT, 1 << 40),
        ),
        case(
            "unknown-incompat-bit-named",
            &[ENOTSUP],
            &["frobnicate"],
            |p| {
                // Rename the last feature-table entry to describe incompatible bit 5.
                let (off, len) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                let last = off + 8 + (len as u64 / 48 - 1) * 48;
                let mut e = vec![0u8; 48];
                e[0] = 0; // incompatible
                e[1] = 5;
                e[2..2 + 18].copy_from_slice(b"frobnicate widgets");
                poke(p, last, &e);
                put_be64(p, H_INCOMPAT, 1 << 5);
            },
        ),
        case(
            "external-data-file-bit",
            &[ENOTSUP, EUCLEAN],
            &["data file", "data-file", "data_file"],
            |p| put_be64(p, H_INCOMPAT, 1 << 2),
        ),
        case(
            "crypt-method-aes",
            &[ENOTSUP],
            &["encrypt", "crypt", "aes"],
            |p| put_be32(p, H_CRYPT, 1),
        ),
        case(
            "crypt-method-luks",
            &[ENOTSUP],
            &["encrypt", "crypt", "luks"],
            |p| put_be32(p, H_CRYPT, 2),
        ),
        case(
            "crypt-method-unknown",
            &[ENOTSUP, EUCLEAN],
            &["encrypt", "crypt"],
            |p| put_be32(p, H_CRYPT, 7),
        ),
        case(
            "compression-type-without-bit",
            &[EUCLEAN],
            &["compression"],
            |p| poke(p, H_COMPRESSION, &[1]),
        ),
        case(
            "compression-bit-without-type",
            &[EUCLEAN],
            &["compression"],
            |p| put_be64(p, H_INCOMPAT, 1 << 3),
        ),
        case(
            "compression-type-unknown",
            &[ENOTSUP],
            &["compression"],
            |p| {
                poke(p, H_COMPRESSION, &[2]);
                put_be64(p, H_INCOMPAT, 1 << 3);
            },
        ),
        case(
            "extension-length-overflow",
            &[EUCLEAN],
            &["extension"],
            |p| {
                let (off, _) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                put_be32(p, off + 4, 0xffff_fff0);
            },
        ),
        case(
            "extension-length-past-cluster",
            &[EUCLEAN],
            &["extension"],
            |p| {
                let (off, _) = find_ext(p, EXT_FEATURE_TABLE).expect("feature table");
                put_be32(p, off + 4, 65536);
            },
        ),
        case(
            "backing-offset-past-cluster",
            &[EUCLEAN],
            &["backing"],
            |p| {
                put_be64(p, H_BACKING_OFF, 0x2_0000);
                put_be32(p, H_BACKING_SIZE, 8);
            },
        ),
        case("backing-offset-huge", &[EUCLEAN], &["backing"], |p| {
            put_be64(p, H_BACKING_OFF, u64::MAX - 3);
            put_be32(p, H_BACKING_SIZE, 8);
        }),
        case("backing-size-too-long", &[EUCLEAN], &["backing"], |p| {
            put_be64(p, H_BACKING_OFF, 0x1000);
            put_be32(p, H_BACKING_SIZE, 2000);
        }),
        case(
            "backing-name-crosses-cluster-end",
            &[EUCLEAN],
            &["backing"],
            |p| {
                put_be64(p, H_BACKING_OFF, 0xfff0);
                put_be32(p, H_BACKING_SIZE, 0x100);
            },
        ),
        case(
            "refcount-order-7",
            &[ENOTSUP, EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_REFCOUNT_ORDER, 7),
        ),
        case(
            "refcount-order-huge",
            &[ENOTSUP, EUCLEAN],
            &["refcount", "reference count"],
            |p| put_be32(p, H_REFCOUNT_ORDER, 0xffff_ffff),
        ),
        case(
            "virtual-size-huge",
            &[EUCLEAN, ENOTSUP],
            &["size", "big", "l1"],
            |p| put_be64(p, H_SIZE, 1 << 62),
        ),
        case(
            "virtual-size-max",
            &[EUCLEAN, ENOTSUP],
            &["size", "big", "l1"],
            |p| put_be64(p, H_SIZE, u64::MAX),
        ),
    ];
    run_cases(&dir, &base, cases);
}

#[test]
fn unknown_backing_format_is_rejected_with_its_name() {
    let dir = TempDir::new("bad-backing-fmt");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        path_str(&top),
    ]);
    let (off, len) = find_ext(&top, EXT_BACKING_FORMAT).expect("backing format extension");
    assert_eq!(len, 3);
    let mut c = case(
        "backing-format-unknown",
        &[ENOTSUP, EINVAL],
        &["xyz"],
        |_| {},
    );
    c.mutate = Box::new(move |p| poke(p, off + 8, b"xyz"));
    let mut c2 = case(
        "backing-format-too-long",
        &[EUCLEAN],
        &["format", "ext_backing_format", "backing"],
        |_| {},
    );
    c2.mutate = Box::new(move |p| put_be32(p, off + 4, 40));
    let mut c3 = case(
        "backing-file-missing",
        &[2 /* ENOENT */],
        &["nonexist", "backing"],
        |_| {},
    );
    c3.mutate = Box::new(|p| {
        // The backing name "base.raw" becomes "nonexist" (same length).
        let off = be64(p, H_BACKING_OFF);
        poke(p, off, b"nonexist");
    });
    run_cases(&dir, &top, vec![c, c2, c3]);
}

#[test]
fn malformed_tables_give_clean_errors_on_read() {
    let dir = TempDir::new("bad-tables");
    let base = base_image(&dir, "base.qcow2");
    let l1 = be64(&base, H_L1_OFF);
    let l2 = be64(&base, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "setup: no L2 table");
    let data0 = be64(&base, l2) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(data0, 0, "setup: no data cluster");
    let mut cases = vec![
        case("l1-entry-unaligned", &[EUCLEAN], &["l2", "l1"], move |p| {
            put_be64(p, l1, (1 << 63) | (l2 + 0x200))
        }),
        case(
            "l1-entry-past-eof",
            &[EUCLEAN, EIO],
            &["l2", "l1", "eof", "end of file", "beyond"],
            move |p| put_be64(p, l1, (1 << 63) | 0x00ff_ffff_fff0_0000),
        ),
        case(
            "l2-entry-unaligned",
            &[EIO, EUCLEAN],
            &["cluster", "l2", "unaligned"],
            move |p| put_be64(p, l2, (1 << 63) | (data0 + 0x200)),
        ),
        case(
            "l2-entry-reserved-bits",
            &[EUCLEAN],
            &["l2", "reserved", "cluster"],
            move |p| put_be64(p, l2, (1 << 63) | data0 | (1 << 60)),
        ),
        case(
            "l1-entry-reserved-bits",
            &[EUCLEAN],
            &["l1", "reserved", "l2"],
            move |p| put_be64(p, l1, (1 << 63) | l2 | (1 << 58)),
        ),
    ];
    for c in cases.iter_mut() {
        c.read_time_ok = true;
        // QEMU ignores reserved bits when reading (only `qemu-img check` reports them).
        c.allow_ok = c.name.contains("reserved");
    }
    run_cases(&dir, &base, cases);
}

#[test]
fn compressed_descriptor_past_eof_gives_clean_error() {
    let dir = TempDir::new("bad-compressed");
    let src = dir.join("src.raw");
    let mut data = vec![0u8; 2 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 100) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let base = dir.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&src),
        path_str(&base),
    ]);
    let l1 = be64(&base, H_L1_OFF);
    let l2 = be64(&base, l1) & 0x00ff_ffff_ffff_fe00;
    let e = be64(&base, l2);
    assert!(
        e & (1 << 62) != 0,
        "setup: first cluster is not compressed ({e:#x})"
    );
    // 64 KiB clusters: x = 62 - (16 - 8) = 54 offset bits.
    let x = 54;
    let sectors_mask = ((1u64 << 62) - 1) & !((1u64 << x) - 1);
    let file_len = std::fs::metadata(&base).unwrap().len();
    let mut cases = vec![
        case(
            "compressed-offset-past-eof",
            &[EUCLEAN, EIO],
            &["compress"],
            move |p| {
                put_be64(
                    p,
                    l2,
                    (1 << 62) | (e & sectors_mask) | (file_len + 10 * MIB),
                )
            },
        ),
        case(
            "compressed-length-past-eof",
            &[EUCLEAN, EIO],
            &["compress"],
            move |p| {
                // Starts 100 bytes before EOF with the maximum sector count.
                put_be64(p, l2, (1 << 62) | sectors_mask | (file_len - 100))
            },
        ),
        case(
            "compressed-garbage",
            &[EUCLEAN, EIO],
            &["compress", "decompress", "inflate"],
            move |p| {
                // Point the descriptor at the L1 table: not a deflate stream for a full cluster.
                put_be64(p, l2, (1 << 62) | (e & sectors_mask) | l1)
            },
        ),
    ];
    for c in cases.iter_mut() {
        c.read_time_ok = true;
    }
    run_cases(&dir, &base, cases);
}

#[test]
fn truncated_files_give_clean_errors() {
    let dir = TempDir::new("bad-truncated");
    let base = base_image(&dir, "base.qcow2");
    let l1 = be64(&base, H_L1_OFF);
    let l2 = be64(&base, l1) & 0x00ff_ffff_ffff_fe00;
    let trunc = |n: u64| {
        move |p: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(n)
                .unwrap()
        }
    };
    let mut cases = vec![
        case(
            "truncated-empty",
            &[EINVAL],
            &["qcow2", "short", "format", "header"],
            trunc(0),
        ),
        case(
            "truncated-in-magic",
            &[EINVAL],
            &["qcow2", "short", "format", "header"],
            trunc(3),
        ),
        case(
            "truncated-in-header",
            &[EINVAL, EUCLEAN],
            &["qcow2", "short", "header", "truncated"],
            trunc(50),
        ),
        case(
            "truncated-before-reftable",
            &[EUCLEAN, EIO],
            &[
                "refcount",
                "reference",
                "eof",
                "end of file",
                "truncated",
                "short",
            ],
            trunc(0x10000),
        ),
        case(
            "truncated-in-l1",
            &[EUCLEAN, EIO],
            &["l1", "eof", "end of file", "truncated", "short"],
            trunc(l1 + 4),
        ),
        case(
            "truncated-before-l2",
            &[EUCLEAN, EIO],
            &["l2", "eof", "end of file", "truncated", "short"],
            trunc(l2),
        ),
    ];
    for c in cases.iter_mut() {
        c.read_time_ok = true;
    }
    run_cases(&dir, &base, cases);
}

/// Random byte corruption of header and metadata: any outcome except a panic or a hang.
#[test]
fn random_metadata_corruption_never_panics_or_hangs() {
    let dir = TempDir::new("bad-fuzz");
    let base = base_image(&dir, "base.qcow2");
    let meta_len = 0x50000u64; // header, reftable, refblock, L1, L2
    let mut rng = Rng::new(0xf00d);
    let mut failures = Vec::new();
    for i in 0..120 {
        let p = dir.join(&format!("fuzz-{i}.qcow2"));
        std::fs::copy(&base, &p).unwrap();
        let n = rng.range(1, 6);
        let mut what = Vec::new();
        for _ in 0..n {
            let off = if rng.chance(60) {
                rng.below(200)
            } else {
                rng.below(meta_len)
            };
            let off = off / 8 * 8 + rng.below(8);
            let byte = if rng.chance(50) {
                rng.below(256) as u8
            } else {
                1u8 << rng.below(8)
            };
            poke(&p, off, &[byte]);
            what.push(format!("{off:#x}={byte:#04x}"));
        }
        for writable in [false, true] {
            if let Err(msg) = open_and_read(&p, writable) {
                failures.push(format!(
                    "fuzz #{i} ({}) rw={writable}: {msg}",
                    what.join(",")
                ));
            }
        }
        let _ = std::fs::remove_file(&p);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------------------------

fn assert_einval<T: std::fmt::Debug>(r: oxcow::Result<T>, what: &str) {
    match r {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => assert_eq!(e.errno(), EINVAL),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn out_of_range_requests_are_rejected_and_change_nothing() {
    let dir = TempDir::new("range");
    let p = dir.join("img.qcow2");
    let vsize = 4 * MIB;
    qemu_create(&p, vsize, "cluster_size=4096");
    qemu_io(
        &p,
        &[
            "write -P 0x5a 0 100000".to_string(),
            format!("write -P 0x6b {} 4096", vsize - 4096),
        ],
    );
    let before = read_file(&p);
    let img = open_rw(&p);
    let buf = vec![0x77u8; 8192];
    let mut rbuf = vec![0u8; 8192];
    // (offset, len) pairs that are out of range or overflow.
    let bad: Vec<(u64, u64)> = vec![
        (vsize, 1),
        (vsize - 1, 2),
        (vsize - 4096, 8192),
        (vsize + 4096, 4096),
        (u64::MAX, 1),
        (u64::MAX - 10, 4096),
        (u64::MAX - 4095, 8192),
        (1 << 63, 4096),
    ];
    for &(off, len) in &bad {
        let what = format!("[{off:#x}, +{len:#x})");
        let l = len.min(8192) as usize;
        assert_einval(img.read_at(&mut rbuf[..l], off), &format!("read {what}"));
        assert_einval(img.write_at(&buf[..l], off), &format!("write {what}"));
        assert_einval(
            img.write_vectored_at(&[&buf[..l / 2], &buf[l / 2..l]], off),
            &format!("writev {what}"),
        );
        {
            let (a, b) = rbuf[..l].split_at_mut(l / 2);
            let mut v: Vec<&mut [u8]> = vec![a, b];
            assert_einval(img.read_vectored_at(&mut v, off), &format!("readv {what}"));
        }
        assert_einval(
            img.write_zeroes(off, len, ZeroFlags::default()),
            &format!("zeroes {what}"),
        );
        assert_einval(
            img.write_zeroes(off, len, ZeroFlags { may_unmap: true }),
            &format!("zeroes unmap {what}"),
        );
        assert_einval(img.discard(off, len), &format!("discard {what}"));
        assert_einval(img.block_status(off, len), &format!("block_status {what}"));
    }
    // Huge counts from a valid offset.
    assert_einval(
        img.write_zeroes(4096, u64::MAX, ZeroFlags::default()),
        "zeroes u64::MAX",
    );
    assert_einval(img.discard(4096, u64::MAX - 4095), "discard overflow");
    assert_einval(
        img.write_zeroes(0, vsize + 1, ZeroFlags { may_unmap: true }),
        "zeroes whole+1",
    );
    assert_einval(img.discard(0, vsize + 512), "discard whole+512");
    img.flush().unwrap();
    img.close().unwrap();
    assert!(
        read_file(&p) == before,
        "rejected requests modified the image file"
    );
    assert_check_clean(&p);
}

#[test]
fn zero_length_requests_succeed_and_change_nothing() {
    let dir = TempDir::new("zero-len");
    let p = dir.join("img.qcow2");
    let vsize = 2 * MIB;
    qemu_create(&p, vsize, "cluster_size=4096");
    qemu_io(&p, &["write -P 0x5a 0 10000".to_string()]);
    let before = read_file(&p);
    let img = open_rw(&p);
    for off in [0, 1, 4096, 12345, vsize - 1, vsize] {
        img.read_at(&mut [], off)
            .unwrap_or_else(|e| panic!("empty read at {off}: {e}"));
        img.write_at(&[], off)
            .unwrap_or_else(|e| panic!("empty write at {off}: {e}"));
        img.write_vectored_at(&[], off)
            .unwrap_or_else(|e| panic!("empty writev at {off}: {e}"));
        img.write_vectored_at(&[&[], &[]], off)
            .unwrap_or_else(|e| panic!("writev of empty bufs at {off}: {e}"));
        img.read_vectored_at(&mut [], off)
            .unwrap_or_else(|e| panic!("empty readv at {off}: {e}"));
        img.write_zeroes(off, 0, ZeroFlags::default())
            .unwrap_or_else(|e| panic!("empty zeroes at {off}: {e}"));
        img.write_zeroes(off, 0, ZeroFlags { may_unmap: true })
            .unwrap_or_else(|e| panic!("empty zeroes at {off}: {e}"));
        img.discard(off, 0)
            .unwrap_or_else(|e| panic!("empty discard at {off}: {e}"));
    }
    img.close().unwrap();
    assert!(
        read_file(&p) == before,
        "zero-length requests modified the image file"
    );
}

#[test]
fn writes_on_read_only_open_fail_with_read_only() {
    let dir = TempDir::new("ro-writes");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 2 * MIB, "cluster_size=4096");
    qemu_io(&p, &["write -P 0x5a 0 10000".to_string()]);
    let before = read_file(&p);
    let img = open_ro(&p);
    assert!(img.info().unwrap().read_only);
    let check = |r: oxcow::Result<()>, what: &str| match r {
        Err(e) if e.kind() == ErrorKind::ReadOnly => assert_eq!(e.errno(), EROFS, "{what}"),
        other => panic!("{what} on a read-only image: expected ReadOnly, got {other:?}"),
    };
    check(img.write_at(&[1, 2, 3], 0), "write_at");
    check(img.write_at(&[1; 4096], 4096), "write_at aligned");
    check(
        img.write_vectored_at(&[&[1, 2], &[3]], 100),
        "write_vectored_at",
    );
    check(
        img.write_zeroes(0, 4096, ZeroFlags::default()),
        "write_zeroes",
    );
    check(
        img.write_zeroes(0, 8192, ZeroFlags { may_unmap: true }),
        "write_zeroes unmap",
    );
    check(img.discard(0, 8192), "discard");
    img.flush().expect("flush of a read-only image is a no-op");
    let mut b = vec![0u8; 100];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    img.close().unwrap();
    assert!(read_file(&p) == before, "read-only image was modified");
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn read_only_open_never_modifies_the_file() {
    let dir = TempDir::new("ro-untouched");
    let base = dir.join("base.qcow2");
    qemu_create(&base, 4 * MIB, "cluster_size=4096");
    qemu_io(&base, &["write -P 0x11 0 300000".to_string()]);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x22 1000 5000".to_string(),
            "write -z 100000 5000".to_string(),
        ],
    );
    // Unknown autoclear and compatible bits must not be cleared by a read-only open.
    put_be64(&top, H_AUTOCLEAR, 1 << 20);
    put_be64(&top, 80, 1 << 33);
    std::thread::sleep(Duration::from_millis(20));
    let files = [top.clone(), base.clone()];
    let before: Vec<_> = files.iter().map(|f| (read_file(f), mtime(f))).collect();
    {
        let img = open_ro(&top);
        let mut all = vec![0u8; img.virtual_size() as usize];
        img.read_at(&mut all, 0).unwrap();
        let _ = img.info().unwrap();
        let _ = img.block_status(0, 4 * MIB).unwrap();
        img.flush().unwrap();
        img.close().unwrap();
    }
    {
        // Dropping without close.
        let img = open_ro(&top);
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, 0).unwrap();
    }
    {
        let img = Image::open(
            &top,
            &OpenOptions {
                force_share: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, 0).unwrap();
    }
    for (f, (bytes, mt)) in files.iter().zip(before) {
        assert!(
            read_file(f) == bytes,
            "read-only open modified {}",
            f.display()
        );
        assert_eq!(
            mtime(f),
            mt,
            "read-only open changed the mtime of {}",
            f.display()
        );
    }
}

#[test]
fn writable_open_clears_unknown_autoclear_bits() {
    let dir = TempDir::new("autoclear");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 2 * MIB, "cluster_size=65536");
    qemu_io(&p, &["write -P 0x33 0 70000".to_string()]);
    put_be64(&p, H_AUTOCLEAR, (1 << 7) | (1 << 40));
    {
        let img = open_ro(&p);
        drop(img);
        assert_eq!(
            be64(&p, H_AUTOCLEAR),
            (1 << 7) | (1 << 40),
            "read-only open touched autoclear bits"
        );
    }
    let img = open_rw(&p);
    let mut b = vec![0u8; 70000];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    img.write_at(&[0x44; 100], 5).unwrap();
    img.close().unwrap();
    assert_eq!(
        be64(&p, H_AUTOCLEAR),
        0,
        "unknown autoclear bits not cleared by a writable open"
    );
    assert_check_clean(&p);
    let o = qemu_io(&p, &["read -P 0x44 5 100".to_string()]);
    assert!(o.stdout.contains("read 100/100"), "{}", o.stdout);
}

#[test]
fn corrupt_bit_refuses_writable_open_but_allows_reads() {
    let dir = TempDir::new("corrupt-bit");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 2 * MIB, "cluster_size=4096");
    qemu_io(&p, &["write -P 0x33 0 7000".to_string()]);
    put_be64(&p, H_INCOMPAT, 1 << 1);
    let before = read_file(&p);
    match Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("writable open of an image with the corrupt bit succeeded"),
        Err(e) => {
            assert!(
                e.kind() == ErrorKind::Corrupt,
                "unexpected error kind: {e:?}"
            );
            assert!(e.to_string().to_lowercase().contains("corrupt"), "{e}");
        }
    }
    let img = open_ro(&p);
    assert!(img.info().unwrap().corrupt);
    let mut b = vec![0u8; 7000];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    drop(img);
    assert!(
        read_file(&p) == before,
        "opens of a corrupt image modified it"
    );
}

#[test]
fn rejected_writable_open_changes_nothing() {
    // An unknown incompatible bit together with unknown autoclear bits: the open must fail
    // before anything (e.g. clearing autoclear bits) is written.
    let dir = TempDir::new("rejected-rw");
    let p = base_image(&dir, "img.qcow2");
    put_be64(&p, H_INCOMPAT, 1 << 9);
    put_be64(&p, H_AUTOCLEAR, 1 << 9);
    let before = read_file(&p);
    let r = Image::open(
        &p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    );
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Unsupported),
        "expected Unsupported, got {:?}",
        r.err()
    );
    assert!(
        read_file(&p) == before,
        "a rejected writable open modified the file"
    );
}

#[test]
fn small_cluster_and_tail_edge_requests_are_accepted() {
    // Requests ending exactly at the (non cluster-aligned) virtual size are valid.
    let dir = TempDir::new("tail");
    let p = dir.join("img.qcow2");
    let vsize = MIB + 3 * 512;
    qemu_create(&p, vsize, "cluster_size=4096");
    let img = open_rw(&p);
    img.write_at(&[0x42; 1000], vsize - 1000).unwrap();
    img.write_zeroes(vsize - 100, 100, ZeroFlags::default())
        .unwrap();
    img.discard(vsize - 3 * 512, 3 * 512).unwrap();
    let mut b = vec![0u8; 1];
    img.read_at(&mut b, vsize - 1).unwrap();
    let x = img.block_status(vsize - 1, 1).unwrap();
    assert_eq!(x.length, 1);
    img.close().unwrap();
    assert_check_clean(&p);
    let _ = KIB;
}

/// Refcounts that claim in-use metadata clusters are free (refcount 0, or a refblock beyond
/// the end of the file) must not lead to guest data being written over the header, L1, L2,
/// refcount structures or existing data: the metadata-overlap guard must stop it (an error is
/// fine), and whatever happens the original data still reads back.
#[test]
fn stale_refcounts_never_let_writes_clobber_metadata_or_data() {
    let dir = TempDir::new("stale-refcounts");
    let base = base_image(&dir, "base.qcow2");
    let reftable = be64(&base, H_RT_OFF);
    let refblock = be64(&base, reftable);
    let l1 = be64(&base, H_L1_OFF);
    let l2 = be64(&base, l1) & 0x00ff_ffff_ffff_fe00;
    type Mutation = Box<dyn Fn(&Path)>;
    let scenarios: Vec<(&str, Mutation)> = vec![
        (
            "metadata-refcounts-zero",
            Box::new(move |p: &Path| {
                // 16-bit refcounts: zero clusters 0..=8 (header, reftable, refblock, L1, L2, data).
                poke(p, refblock, &[0u8; 18]);
            }),
        ),
        (
            "refblock-past-eof",
            Box::new(move |p: &Path| put_be64(p, reftable, 0x40_0000_0000)),
        ),
    ];
    let mut failures = Vec::new();
    for (name, mutate) in scenarios {
        let p = dir.join(&format!("{name}.qcow2"));
        std::fs::copy(&base, &p).unwrap();
        mutate(&p);
        let q = p.clone();
        let r = with_timeout(
            Duration::from_secs(30),
            name,
            move || -> Result<(), (i32, String)> {
                let img = Image::open(
                    &q,
                    &OpenOptions {
                        writable: true,
                        ..Default::default()
                    },
                )
                .map_err(|e| (e.errno(), e.to_string()))?;
                for i in 0..16u64 {
                    let off = MIB + i * 70_000;
                    img.write_at(&vec![0xc3u8; 70_000], off)
                        .map_err(|e| (e.errno(), e.to_string()))?;
                }
                img.flush().map_err(|e| (e.errno(), e.to_string()))?;
                Ok(())
            },
        );
        match r {
            Err(m) => failures.push(format!("[{name}] {m}")),
            Ok(Err((errno, msg))) if ![EUCLEAN, EIO, 123 /* ENOMEDIUM */].contains(&errno) => {
                failures.push(format!("[{name}] unexpected errno {errno}: {msg}"))
            }
            _ => {}
        }
        // The header and the original data must have survived.
        if peek(&p, 0, 4) != b"QFI\xfb" || be64(&p, H_L1_OFF) != l1 {
            failures.push(format!("[{name}] header was overwritten"));
            continue;
        }
        if be64(&p, l1) & 0x00ff_ffff_ffff_fe00 != l2 {
            failures.push(format!("[{name}] L1 table was overwritten"));
            continue;
        }
        match Image::open(
            &p,
            &OpenOptions {
                no_backing: true,
                ..Default::default()
            },
        ) {
            Err(e) => failures.push(format!("[{name}] cannot reopen read-only: {e}")),
            Ok(img) => {
                let mut b = vec![0u8; 200_000];
                match img.read_at(&mut b, 0) {
                    Ok(()) if b.iter().all(|&x| x == 0x5a) => {}
                    Ok(()) => failures.push(format!(
                        "[{name}] original data at guest 0..200000 was overwritten (first bad byte at {:?})",
                        b.iter().position(|&x| x != 0x5a)
                    )),
                    Err(e) => failures.push(format!("[{name}] reading original data: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The base image plus two persistent bitmaps added by qemu-img (one enabled, one disabled).
fn bitmap_image(dir: &TempDir, name: &str) -> PathBuf {
    let p = base_image(dir, name);
    let ps = path_str(&p).to_string();
    run_ok("qemu-img", &["bitmap", "--add", &ps, "b0"]);
    run_ok(
        "qemu-img",
        &["bitmap", "--add", "--disable", &ps, "backup-1"],
    );
    p
}

/// Offset of the first bitmap directory entry (from the bitmaps header extension).
fn bitmap_dir(path: &Path) -> u64 {
    let (ext, _) = find_ext(path, 0x2385_2875).expect("bitmaps extension");
    be64(path, ext + 8 + 16)
}

#[test]
fn bitmap_directory_violations_fail_the_open_like_qemu() {
    let dir = TempDir::new("bad-bitmaps");
    let base = bitmap_image(&dir, "base.qcow2");
    assert!(matches!(open_and_read(&base, false), Ok(Outcome::Ok)));
    const WORDS: &[&str] = &["bitmap 'b0'", "bitmap directory"];
    const EUC: &[i32] = &[EUCLEAN];
    type Mutation = (&'static str, Box<dyn Fn(&Path)>);
    let mutations: Vec<Mutation> = vec![
        (
            "bm-reserved-flag",
            Box::new(|p| put_be32(p, bitmap_dir(p) + 12, 0b110)),
        ),
        (
            "bm-granularity",
            Box::new(|p| poke(p, bitmap_dir(p) + 17, &[8])),
        ),
        ("bm-type", Box::new(|p| poke(p, bitmap_dir(p) + 16, &[2]))),
        (
            "bm-table-size-0",
            Box::new(|p| put_be32(p, bitmap_dir(p) + 8, 0)),
        ),
        (
            "bm-table-unaligned",
            Box::new(|p| {
                let d = bitmap_dir(p);
                put_be64(p, d, be64(p, d) + 512)
            }),
        ),
        (
            "bm-name-overrun",
            Box::new(|p| poke(p, bitmap_dir(p) + 18, &[0xff, 0xff])),
        ),
    ];
    // QEMU is the oracle: it must refuse each mutated image too.
    let mut cases = Vec::new();
    for (name, m) in mutations {
        let probe = dir.join(&format!("qemu-{name}.qcow2"));
        std::fs::copy(&base, &probe).unwrap();
        m(&probe);
        let out = run("qemu-img", &["info", path_str(&probe)]);
        assert_ne!(out.code, 0, "{name}: qemu-img info accepted the image");
        cases.push(case(name, EUC, WORDS, m));
    }
    run_cases(&dir, &base, cases);
}

#[test]
fn bitmap_directory_is_ignored_when_the_bitmaps_autoclear_bit_is_clear() {
    // A program without bitmap support wrote the image: QEMU ignores the extension, so a
    // broken directory must not fail the open either.
    let dir = TempDir::new("bm-stale");
    let p = bitmap_image(&dir, "stale.qcow2");
    put_be32(&p, bitmap_dir(&p) + 12, 0b100);
    let autoclear = be64(&p, 88);
    put_be64(&p, 88, autoclear & !1);
    assert_eq!(
        qemu_img(&["info", path_str(&p)]).code,
        0,
        "qemu-img info refused it"
    );
    assert!(matches!(open_and_read(&p, false), Ok(Outcome::Ok)));
}
