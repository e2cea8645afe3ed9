//! Shared helpers for the integration tests: temp dirs, file pokes and timeouts (here), running
//! qemu tools and the repeated qemu-img argument lists (`qemu`), a seeded PRNG and a raw
//! reference model (`model`), a tiny JSON parser for `qemu-img ... --output=json` (`json`),
//! oxcow read-back checks (`oxcow_io`), and the engines several test files share: the random
//! write workload (`workload`), the many-writers stress model (`stress`, `stress_run`) and the
//! malformed-image case runner (`malformed`).
#![allow(dead_code)]

mod header;
mod json;
mod model;
mod oxcow_io;
mod qemu;

pub mod aio;
pub mod bitmaps;
pub mod malformed;
pub mod nbd;
pub mod nbd_wire;
pub mod stress;
pub mod stress_model;
pub mod stress_run;
pub mod workload;

pub use header::*;
pub use json::*;
pub use model::*;
pub use oxcow_io::*;
pub use qemu::*;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Temp dir guard
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed on drop (kept when the test panics
/// and `OXCOW_KEEP_TMP` is set, so failures can be inspected).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "oxcow-test-{}-{}-{}-{}",
            std::process::id(),
            n,
            nanos,
            tag
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("OXCOW_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A number not handed out before in this process (for unique file names).
pub fn unique_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread and fails if it does not finish within `timeout`. Returns `Err` with
/// the panic message if `f` panicked.
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(p)) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "<non-string panic>".into());
            Err(format!("{what}: PANIC: {msg}"))
        }
        Err(_) => Err(format!("{what}: HANG: did not finish within {timeout:?}")),
    }
}

pub fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Overwrites bytes of a file in place.
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

pub fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).expect("open for peek");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

pub fn be64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(peek(path, offset, 8).try_into().unwrap())
}

pub fn be32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(peek(path, offset, 4).try_into().unwrap())
}

/// Appends a line to the shared findings file (best effort).
pub fn note_finding(text: &str) {
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/tmp/oxcow-test-findings.md")
    {
        let _ = writeln!(f, "{text}");
    }
}
