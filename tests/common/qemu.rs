//! Running qemu-img and qemu-io, and the argument lists the tests repeat, as named helpers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{unique_id, Json, RawModel, TempDir};

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
    output_of(Command::new(prog).args(args), prog)
}

/// Runs a program in `dir` (relative names resolve like in a user's shell).
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> CmdOut {
    output_of(Command::new(prog).args(args).current_dir(dir), prog)
}

/// Runs the built `oxcow` binary in `dir` (relative names resolve like in a user's shell).
pub fn oxcow_in(dir: &Path, args: &[&str]) -> CmdOut {
    run_in(dir, env!("CARGO_BIN_EXE_oxcow"), args)
}

/// Runs `cmd` (the program `prog`) to completion and collects its exit code and output.
fn output_of(cmd: &mut Command, prog: &str) -> CmdOut {
    let out = cmd
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
    qemu_create_with(path, Some(size), opts, None);
}

/// `qemu_create`, then `qemu-io -c 'write -P pattern 0 len'`: an image whose first `len` bytes
/// hold `pattern` (so L1, L2 and data clusters exist).
pub fn qemu_create_with_data(path: &Path, size: u64, opts: &str, pattern: u8, len: u64) {
    qemu_create(path, size, opts);
    qemu_io(path, &[format!("write -P {pattern:#x} 0 {len}")]);
}

/// `qemu-img create -q -f qcow2 [-o opts] -b backing -F backing_fmt path [size]`: a qcow2
/// overlay. `backing` is the name written into the header (relative names are relative to
/// the overlay's directory); without a size the overlay takes the backing file's size.
pub fn qemu_create_overlay(
    path: &Path,
    size: Option<u64>,
    opts: &str,
    backing: &str,
    backing_fmt: &str,
) {
    qemu_create_with(path, size, opts, Some((backing, backing_fmt)));
}

fn qemu_create_with(path: &Path, size: Option<u64>, opts: &str, backing: Option<(&str, &str)>) {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((name, fmt)) = backing {
        args.extend(["-b", name, "-F", fmt]);
    }
    args.push(path_str(path));
    args.extend(size.as_deref());
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

/// `qemu-img compare -f qcow2 -F other_fmt a b` (guest contents, backing chains included).
fn qemu_compare_fmt(a: &Path, b: &Path, other_fmt: &str) -> CmdOut {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            other_fmt,
            path_str(a),
            path_str(b),
        ],
    )
}

/// `qemu-img compare` of a qcow2 image against a raw file → (exit code, output).
/// Exit 0 = identical, 1 = different, 2 = error.
pub fn qemu_compare(qcow2: &Path, raw: &Path) -> (i32, String) {
    let o = qemu_compare_fmt(qcow2, raw, "raw");
    (o.code, o.all())
}

/// Saves `model` as `ref.raw` in `dir` and asserts `qemu-img compare` finds the qcow2 image
/// identical to it.
pub fn assert_compare_model(qcow2: &Path, model: &RawModel, dir: &TempDir) {
    let raw = dir.join("ref.raw");
    model.save(&raw);
    assert_compare_identical(qcow2, &raw);
}

/// `qemu-img compare` of two qcow2 images (guest contents, backing chains included).
pub fn assert_same_guest(a: &Path, b: &Path) {
    let o = qemu_compare_fmt(a, b, "qcow2");
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
    let out = qemu_to_raw_file(path, fmt, dir);
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

/// Converts the image to a raw file with qemu-img (following the backing chain).
pub fn qemu_to_raw_file(path: &Path, fmt: &str, dir: &TempDir) -> PathBuf {
    let out = dir.join(&format!("convert-{}.raw", unique_id()));
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

// ---------------------------------------------------------------------------------------------
// More qemu-img argument lists the tests repeat
// ---------------------------------------------------------------------------------------------

/// `qemu-img convert -q [-c] -f raw -O qcow2 [-o opts] src dst`: a qcow2 image holding the
/// raw file's data (every cluster compressed with `compress`).
pub fn qemu_convert_raw_to_qcow2(src: &Path, dst: &Path, opts: &str, compress: bool) {
    let mut args = vec!["convert", "-q"];
    if compress {
        args.push("-c");
    }
    args.extend(["-f", "raw", "-O", "qcow2"]);
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path_str(src), path_str(dst)]);
    qemu_img(&args);
}

/// `qemu-img snapshot -c name path`: an internal snapshot of the current state.
pub fn qemu_snapshot_create(path: &Path, name: &str) {
    qemu_img(&["snapshot", "-c", name, path_str(path)]);
}

/// `qemu-img snapshot -a name path`: reverts the image to the snapshot.
pub fn qemu_snapshot_apply(path: &Path, name: &str) {
    qemu_img(&["snapshot", "-a", name, path_str(path)]);
}

/// `qemu-img snapshot -d name path`.
pub fn qemu_snapshot_delete(path: &Path, name: &str) {
    qemu_img(&["snapshot", "-d", name, path_str(path)]);
}

/// `qemu-img bitmap --add [--disable] path name`: a persistent dirty bitmap.
pub fn qemu_bitmap_add(path: &Path, name: &str, enabled: bool) {
    let mut args = vec!["bitmap", "--add"];
    if !enabled {
        args.push("--disable");
    }
    args.extend([path_str(path), name]);
    qemu_img(&args);
}

/// `qemu-img info [-U] path`, without asserting success: whether QEMU accepts (or may lock)
/// the image is what the caller checks.
pub fn qemu_info_status(path: &Path, force_share: bool) -> CmdOut {
    let mut args = vec!["info"];
    if force_share {
        args.push("-U");
    }
    args.push(path_str(path));
    run("qemu-img", &args)
}

/// Asserts `qemu-img check` finds no corruption: exit 0, or 3 (leaked clusters only).
pub fn assert_check_no_corruption(path: &Path, what: &str) {
    let (code, out) = qemu_img_check(path);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check {} exited {code} (corruption):\n{out}",
        path.display()
    );
}
