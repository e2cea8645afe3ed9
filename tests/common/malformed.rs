//! The malformed-image case runner shared by the `bad_*` tests: errno values, qcow2 header
//! field offsets, a guarded open-and-read-everything, a valid base image to mutate, and
//! `run_cases`, which checks each mutated copy (read-only and writable open) for the right errno,
//! a message naming the field, no panic, no hang, and no write beyond the corrupt bit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oxcow::{Error, ErrorKind, Image, OpenOptions};

use super::*;

pub const EINVAL: i32 = libc_errno::EINVAL;
pub const ENOTSUP: i32 = libc_errno::ENOTSUP;
pub const EUCLEAN: i32 = libc_errno::EUCLEAN;
pub const EROFS: i32 = libc_errno::EROFS;
pub const EIO: i32 = libc_errno::EIO;

/// Linux errno values (no libc dev-dependency needed).
pub mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EROFS: i32 = 30;
    pub const ENOTSUP: i32 = 95;
    pub const EUCLEAN: i32 = 117;
}

pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Result of opening and fully reading an image in a guarded thread.
#[derive(Debug)]
pub enum Outcome {
    /// Open and the full read succeeded.
    Ok,
    /// Open failed.
    OpenErr(i32, String, &'static str),
    /// Open succeeded, a read failed.
    ReadErr(i32, String, &'static str),
}

pub fn kind(e: &Error) -> &'static str {
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
pub fn open_and_read(path: &Path, writable: bool) -> Result<Outcome, String> {
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

pub fn put_be32(path: &Path, off: u64, v: u32) {
    poke(path, off, &v.to_be_bytes());
}

pub fn put_be64(path: &Path, off: u64, v: u64) {
    poke(path, off, &v.to_be_bytes());
}

/// Finds a header extension: returns (offset of its type field, length).
pub fn find_ext(path: &Path, typ: u32) -> Option<(u64, u32)> {
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
pub fn base_image(dir: &TempDir, name: &str) -> PathBuf {
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

pub struct Case {
    pub name: &'static str,
    /// Mutates a copy of the base image.
    pub mutate: Box<dyn Fn(&Path)>,
    /// Acceptable errnos (first is the preferred one).
    pub errnos: &'static [i32],
    /// The message must contain one of these (case-insensitive).
    pub words: &'static [&'static str],
    /// The error may come from the open or only from reading the data.
    pub read_time_ok: bool,
    /// QEMU itself reads this image without complaint: success is acceptable too (but an
    /// error must still have the right errno, and nothing may panic or hang).
    pub allow_ok: bool,
}

pub fn case(
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
pub fn only_corrupt_bit_set(before: &[u8], after: &[u8]) -> bool {
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

pub fn run_cases(dir: &TempDir, base: &Path, cases: Vec<Case>) {
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
