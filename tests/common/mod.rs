//! Shared helpers for the interop tests: temp dirs, running qemu tools, a seeded PRNG, a raw
//! reference model, a tiny JSON parser for `qemu-img ... --output=json`, and timeouts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use oxcow::{Image, OpenOptions};

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

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

pub struct CmdOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs a program and returns its exit code and output.
pub fn run(prog: &str, args: &[&str]) -> CmdOut {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a program and panics (with its output) unless it exits 0.
pub fn run_ok(prog: &str, args: &[&str]) -> CmdOut {
    let o = run(prog, args);
    assert_eq!(
        o.code,
        0,
        "command failed: {prog} {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.stdout,
        o.stderr
    );
    o
}

pub fn qemu_img(args: &[&str]) -> CmdOut {
    run_ok("qemu-img", args)
}

/// `qemu-img create -f qcow2 [-o opts] path size`.
pub fn qemu_create(path: &Path, size: u64, opts: &str) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(path_str(path));
    args.push(&size);
    qemu_img(&args);
}

/// Runs qemu-io on a qcow2 image with the given commands (one `-c` each, in one process).
pub fn qemu_io(path: &Path, cmds: &[String]) -> CmdOut {
    qemu_io_fmt(path, "qcow2", cmds)
}

pub fn qemu_io_fmt(path: &Path, fmt: &str, cmds: &[String]) -> CmdOut {
    let mut out = CmdOut {
        code: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    // Keep the command line reasonably short.
    for chunk in cmds.chunks(64) {
        let mut args: Vec<&str> = vec!["-f", fmt];
        for c in chunk {
            args.push("-c");
            args.push(c);
        }
        args.push(path_str(path));
        let o = run("qemu-io", &args);
        let failed = o.code != 0
            || o.stdout.contains("failed")
            || o.stderr.contains("failed")
            || o.stdout.contains("Error")
            || o.stderr.contains("rror");
        assert!(
            !failed,
            "qemu-io failed on {} with {:?}\nstdout:\n{}\nstderr:\n{}",
            path.display(),
            chunk,
            o.stdout,
            o.stderr
        );
        out.stdout.push_str(&o.stdout);
        out.stderr.push_str(&o.stderr);
    }
    out
}

/// `qemu-img check` → (exit code, combined output).
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let o = run("qemu-img", &["check", "-f", "qcow2", path_str(path)]);
    (o.code, o.all())
}

/// Asserts `qemu-img check` exits 0, printing its output otherwise.
pub fn assert_check_clean(path: &Path) {
    let (code, out) = qemu_img_check(path);
    assert_eq!(
        code,
        0,
        "qemu-img check {} exited {code}:\n{out}",
        path.display()
    );
}

/// `qemu-img compare` of a qcow2 image against a raw file → (exit code, output).
/// Exit 0 = identical, 1 = different, 2 = error.
pub fn qemu_compare(qcow2: &Path, raw: &Path) -> (i32, String) {
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path_str(qcow2),
            path_str(raw),
        ],
    );
    (o.code, o.all())
}

/// `qemu-img compare` of two qcow2 images (guest contents, backing chains included).
pub fn assert_same_guest(a: &Path, b: &Path) {
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            path_str(a),
            path_str(b),
        ],
    );
    assert_eq!(
        o.code,
        0,
        "qemu-img compare {} {}: {}",
        a.display(),
        b.display(),
        o.all()
    );
}

pub fn assert_compare_identical(qcow2: &Path, raw: &Path) {
    let (code, out) = qemu_compare(qcow2, raw);
    assert_eq!(
        code,
        0,
        "qemu-img compare {} {}: exit {code}\n{out}",
        qcow2.display(),
        raw.display()
    );
}

/// Converts any image QEMU can read (with its backing chain) to raw bytes.
pub fn qemu_to_raw(path: &Path, fmt: &str, dir: &TempDir) -> Vec<u8> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let out = dir.join(&format!("convert-{n}.raw"));
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        path_str(path),
        path_str(&out),
    ]);
    let data = fs::read(&out).expect("read converted raw");
    let _ = fs::remove_file(&out);
    data
}

/// Parses `qemu-img info --output=json`.
pub fn qemu_info(path: &Path) -> Json {
    let o = qemu_img(&["info", "--output=json", path_str(path)]);
    Json::parse(&o.stdout)
}

/// Parses `qemu-img map --output=json` (of the qcow2 image at `path`).
pub fn qemu_map(path: &Path) -> Vec<MapEntry> {
    let o = qemu_img(&["map", "-f", "qcow2", "--output=json", path_str(path)]);
    let j = Json::parse(&o.stdout);
    j.as_array()
        .iter()
        .map(|e| MapEntry {
            start: e.get("start").as_u64(),
            length: e.get("length").as_u64(),
            depth: e.get("depth").as_u64(),
            present: e.get("present").as_bool(),
            zero: e.get("zero").as_bool(),
            data: e.get("data").as_bool(),
            compressed: e.opt("compressed").map(|v| v.as_bool()).unwrap_or(false),
            offset: e.opt("offset").map(|v| v.as_u64()),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Tiny JSON parser (enough for qemu-img output)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64, String),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    pub fn parse(s: &str) -> Json {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i);
        skip_ws(b, &mut i);
        assert_eq!(i, b.len(), "trailing data in JSON: {s}");
        v
    }
    pub fn opt(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.get(key),
            _ => None,
        }
    }
    pub fn get(&self, key: &str) -> &Json {
        self.opt(key)
            .unwrap_or_else(|| panic!("JSON key {key} missing in {self:?}"))
    }
    pub fn as_u64(&self) -> u64 {
        match self {
            Json::Num(_, s) => s.parse().unwrap_or_else(|_| panic!("not a u64: {s}")),
            _ => panic!("not a number: {self:?}"),
        }
    }
    pub fn as_bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            _ => panic!("not a bool: {self:?}"),
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            _ => panic!("not a string: {self:?}"),
        }
    }
    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => panic!("not an array: {self:?}"),
        }
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && (b[*i] as char).is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize) -> Json {
    skip_ws(b, i);
    match b[*i] {
        b'{' => {
            *i += 1;
            let mut m = BTreeMap::new();
            skip_ws(b, i);
            if b[*i] == b'}' {
                *i += 1;
                return Json::Obj(m);
            }
            loop {
                skip_ws(b, i);
                let k = match parse_value(b, i) {
                    Json::Str(s) => s,
                    v => panic!("bad JSON key {v:?}"),
                };
                skip_ws(b, i);
                assert_eq!(b[*i], b':');
                *i += 1;
                let v = parse_value(b, i);
                m.insert(k, v);
                skip_ws(b, i);
                match b[*i] {
                    b',' => *i += 1,
                    b'}' => {
                        *i += 1;
                        return Json::Obj(m);
                    }
                    c => panic!("bad JSON object char {}", c as char),
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut a = Vec::new();
            skip_ws(b, i);
            if b[*i] == b']' {
                *i += 1;
                return Json::Arr(a);
            }
            loop {
                a.push(parse_value(b, i));
                skip_ws(b, i);
                match b[*i] {
                    b',' => *i += 1,
                    b']' => {
                        *i += 1;
                        return Json::Arr(a);
                    }
                    c => panic!("bad JSON array char {}", c as char),
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = String::new();
            loop {
                let c = b[*i];
                *i += 1;
                match c {
                    b'"' => return Json::Str(s),
                    b'\\' => {
                        let e = b[*i];
                        *i += 1;
                        match e {
                            b'n' => s.push('\n'),
                            b't' => s.push('\t'),
                            b'r' => s.push('\r'),
                            b'b' => s.push('\u{8}'),
                            b'f' => s.push('\u{c}'),
                            b'u' => {
                                let h = std::str::from_utf8(&b[*i..*i + 4]).unwrap();
                                *i += 4;
                                let cp = u32::from_str_radix(h, 16).unwrap();
                                s.push(char::from_u32(cp).unwrap_or('?'));
                            }
                            other => s.push(other as char),
                        }
                    }
                    _ => {
                        // Re-assemble UTF-8 sequences byte by byte.
                        let start = *i - 1;
                        let mut end = *i;
                        while end < b.len() && (b[end] & 0xc0) == 0x80 {
                            end += 1;
                        }
                        s.push_str(std::str::from_utf8(&b[start..end]).unwrap_or("?"));
                        *i = end;
                    }
                }
            }
        }
        b't' => {
            *i += 4;
            Json::Bool(true)
        }
        b'f' => {
            *i += 5;
            Json::Bool(false)
        }
        b'n' => {
            *i += 4;
            Json::Null
        }
        _ => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).unwrap().to_string();
            Json::Num(t.parse().unwrap(), t)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Data that is recognisable when a comparison fails: every 8-byte word holds a tag and its
/// own guest offset.
pub fn tagged_data(tag: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let word = pos / 8;
        let wb = (word ^ ((tag as u64) << 56)).to_le_bytes();
        *b = wb[(pos % 8) as usize] ^ tag;
        if *b == 0 {
            *b = tag | 1;
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Raw reference model
// ---------------------------------------------------------------------------------------------

/// What the guest should see, kept in memory and written to a raw file for `qemu-img compare`.
pub struct RawModel {
    pub data: Vec<u8>,
    pub cluster_size: u64,
    /// v2 image with a backing file: discarded clusters read the backing data again.
    pub discard_reveals_backing: bool,
    /// The backing content as seen through the overlay (zero-extended to the virtual size).
    pub backing: Option<Vec<u8>>,
}

impl RawModel {
    pub fn new(size: u64, cluster_size: u64) -> RawModel {
        RawModel {
            data: vec![0; size as usize],
            cluster_size,
            discard_reveals_backing: false,
            backing: None,
        }
    }

    pub fn with_backing(size: u64, cluster_size: u64, backing: &[u8], version: u32) -> RawModel {
        let mut b = vec![0u8; size as usize];
        let n = backing.len().min(size as usize);
        b[..n].copy_from_slice(&backing[..n]);
        RawModel {
            data: b.clone(),
            cluster_size,
            discard_reveals_backing: version == 2,
            backing: Some(b),
        }
    }

    pub fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }

    pub fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// Clusters entirely inside `[off, off+len)` become zeros (or backing data in v2 with a
    /// backing file); partial clusters are untouched.
    pub fn discard(&mut self, off: u64, len: u64) {
        let cs = self.cluster_size;
        let first = off.div_ceil(cs);
        let end = (off + len) / cs;
        for c in first..end {
            let a = (c * cs) as usize;
            let b = ((c + 1) * cs).min(self.data.len() as u64) as usize;
            match (&self.backing, self.discard_reveals_backing) {
                (Some(bk), true) => self.data[a..b].copy_from_slice(&bk[a..b]),
                _ => self.data[a..b].fill(0),
            }
        }
    }

    pub fn save(&self, path: &Path) {
        fs::write(path, &self.data).expect("write raw reference");
    }
}

// ---------------------------------------------------------------------------------------------
// oxcow helpers
// ---------------------------------------------------------------------------------------------

pub fn open_rw(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "oxcow open rw {}: {e} (errno {})",
            path.display(),
            e.errno()
        )
    })
}

pub fn open_ro(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default()).unwrap_or_else(|e| {
        panic!(
            "oxcow open ro {}: {e} (errno {})",
            path.display(),
            e.errno()
        )
    })
}

/// Reads the whole guest disk through oxcow in odd-sized chunks, some of them vectored.
pub fn oxcow_read_all(img: &Image) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let chunk = [1 << 20, 65536 + 4097, 123_457, 300_000][(i % 4) as usize];
        let n = (size - off).min(chunk) as usize;
        let buf = &mut out[off as usize..off as usize + n];
        if i % 3 == 2 && n > 10 {
            let (a, rest) = buf.split_at_mut(n / 3);
            let (b, c) = rest.split_at_mut(7.min(rest.len()));
            let mut bufs: Vec<&mut [u8]> = vec![a, b, c];
            img.read_vectored_at(&mut bufs, off)
                .unwrap_or_else(|e| panic!("read_vectored_at({off:#x}, {n}): {e}"));
        } else {
            img.read_at(buf, off)
                .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}): {e}"));
        }
        off += n as u64;
        i += 1;
    }
    out
}

/// Panics with the first differing offset (and some context) if `got != want`.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let mut last = first;
        let mut count = 0u64;
        for i in first..got.len() {
            if got[i] != want[i] {
                last = i;
                count += 1;
            }
        }
        let ctx = |v: &[u8]| {
            let a = first.saturating_sub(8);
            let b = (first + 24).min(v.len());
            format!("{:02x?}", &v[a..b])
        };
        panic!(
            "{what}: {count} bytes differ, first at {first:#x}, last at {last:#x}\n  got  [{:#x}..]: {}\n  want [{:#x}..]: {}",
            first.saturating_sub(8),
            ctx(got),
            first.saturating_sub(8),
            ctx(want)
        );
    }
}

/// Random unaligned sub-range reads through oxcow, compared with `want`.
pub fn spot_check_reads(img: &Image, want: &[u8], rng: &mut Rng, n: usize) {
    let size = want.len() as u64;
    for _ in 0..n {
        let off = rng.below(size);
        let len = rng.range(1, (size - off).min(200_000));
        let mut buf = vec![0xeeu8; len as usize];
        img.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {len}): {e}"));
        assert_same_bytes(
            &buf,
            &want[off as usize..(off + len) as usize],
            &format!("read {off:#x}+{len}"),
        );
    }
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

/// Converts the image to a raw file with qemu-img (following the backing chain).
pub fn qemu_to_raw_file(path: &Path, fmt: &str, dir: &TempDir) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let out = dir.join(&format!("convert-{n}.raw"));
    qemu_img(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        path_str(path),
        path_str(&out),
    ]);
    out
}

/// Streams the whole guest disk through oxcow (odd chunk sizes, some vectored reads) and
/// compares it with a raw file, then does random unaligned spot reads.
pub fn assert_oxcow_matches_raw_file(img: &Image, raw: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(raw).expect("open raw");
    let raw_len = f.metadata().unwrap().len();
    let size = img.virtual_size();
    assert_eq!(
        size,
        raw_len,
        "virtual size {size} vs raw length {raw_len} of {}",
        raw.display()
    );
    let chunks = [1u64 << 20, 65536 + 4097, 123_457, (3 << 20) - 1, 511];
    let mut off = 0u64;
    let mut i = 0usize;
    while off < size {
        let n = (size - off).min(chunks[i % chunks.len()]) as usize;
        let mut got = vec![0xeeu8; n];
        if i % 3 == 2 && n > 10 {
            let (a, rest) = got.split_at_mut(n / 3);
            let (b, c) = rest.split_at_mut(7);
            let mut bufs: Vec<&mut [u8]> = vec![a, b, c];
            img.read_vectored_at(&mut bufs, off)
                .unwrap_or_else(|e| panic!("read_vectored_at({off:#x}, {n}): {e}"));
        } else {
            img.read_at(&mut got, off)
                .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}): {e}"));
        }
        let mut want = vec![0u8; n];
        f.read_exact_at(&mut want, off).unwrap();
        assert_same_bytes(
            &got,
            &want,
            &format!("oxcow read at guest {off:#x}+{n:#x} vs {}", raw.display()),
        );
        off += n as u64;
        i += 1;
    }
    let mut rng = Rng::new(seed);
    for _ in 0..64 {
        let off = rng.below(size);
        let len = rng.range(1, (size - off).min(100_000));
        let mut got = vec![0xeeu8; len as usize];
        img.read_at(&mut got, off)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {len}): {e}"));
        let mut want = vec![0u8; len as usize];
        f.read_exact_at(&mut want, off).unwrap();
        assert_same_bytes(&got, &want, &format!("spot read at {off:#x}+{len}"));
    }
}

/// Walks oxcow's block_status across every `qemu-img map` entry and checks the flags agree.
pub fn check_block_status(p: &Path, has_backing: bool) {
    let map = qemu_map(p);
    let img = open_ro(p);
    let mut expected_next = 0;
    for e in &map {
        assert_eq!(e.start, expected_next, "qemu map not contiguous");
        expected_next = e.start + e.length;
        let mut pos = e.start;
        while pos < e.start + e.length {
            let want_len = e.start + e.length - pos;
            let x = img
                .block_status(pos, want_len)
                .unwrap_or_else(|err| panic!("block_status({pos:#x}, {want_len:#x}): {err}"));
            assert_eq!(x.offset, pos);
            assert!(
                x.length >= 1 && x.length <= want_len,
                "extent length {x:?} for request {want_len:#x}"
            );
            let ctx = format!("{}: oxcow {x:?} vs qemu {e:?}", p.display());
            if e.depth == 0 && e.present {
                assert!(
                    x.flags & oxcow::EXTENT_ALLOCATED != 0,
                    "not allocated: {ctx}"
                );
                assert!(
                    x.flags & oxcow::EXTENT_BACKING == 0,
                    "backing flag on allocated range: {ctx}"
                );
                if e.compressed {
                    assert!(
                        x.flags & oxcow::EXTENT_COMPRESSED != 0,
                        "compressed flag missing: {ctx}"
                    );
                } else {
                    assert!(
                        x.flags & oxcow::EXTENT_COMPRESSED == 0,
                        "compressed flag set: {ctx}"
                    );
                }
                if e.zero && !e.data {
                    assert!(
                        x.flags & oxcow::EXTENT_ZERO != 0,
                        "zero flag missing: {ctx}"
                    );
                } else {
                    assert!(
                        x.flags & oxcow::EXTENT_ZERO == 0,
                        "zero flag set on data: {ctx}"
                    );
                    if let Some(o) = e.offset {
                        assert_eq!(x.host_offset, o + (pos - e.start), "host offset: {ctx}");
                    }
                }
            } else if has_backing {
                assert_eq!(
                    x.flags & (oxcow::EXTENT_ALLOCATED | oxcow::EXTENT_BACKING),
                    oxcow::EXTENT_BACKING,
                    "expected backing: {ctx}"
                );
            } else {
                assert!(
                    x.flags & oxcow::EXTENT_ALLOCATED == 0,
                    "unallocated range reported allocated: {ctx}"
                );
                assert!(
                    x.flags & oxcow::EXTENT_ZERO != 0,
                    "unallocated range without backing not zero: {ctx}"
                );
            }
            pos += x.length;
        }
    }
    assert_eq!(expected_next, img.virtual_size());
}
