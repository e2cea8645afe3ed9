//! The `oxcow` command line against qemu-img: `info` and `map` print what qemu-img prints on the
//! same images (JSON compared value by value, human output line by line), `convert` output is
//! checked with `qemu-img compare` and `qemu-img check`, `bench` runs on both formats, and bad
//! command lines fail with exit code 1 and a message.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Runs `oxcow` and requires exit 0.
fn oxcow_ok(dir: &Path, args: &[&str]) -> CmdOut {
    let o = oxcow_in(dir, args);
    assert_eq!(
        o.code,
        0,
        "oxcow {} failed:\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.stdout,
        o.stderr
    );
    o
}

/// Runs a program in `dir` with TZ=UTC (qemu-img prints snapshot dates in local time).
fn run_in(dir: &Path, prog: &str, args: &[&str]) -> CmdOut {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .expect("run qemu tool");
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a qemu tool in `dir` and requires exit 0.
fn qemu_in(dir: &Path, prog: &str, args: &[&str]) -> CmdOut {
    let o = run_in(dir, prog, args);
    assert_eq!(o.code, 0, "{prog} {} failed: {}", args.join(" "), o.all());
    o
}

fn qio(dir: &Path, file: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(file);
    let o = qemu_in(dir, "qemu-io", &a);
    assert!(
        !o.all().contains("failed"),
        "qemu-io {cmds:?} on {file}: {}",
        o.all()
    );
}

/// Describes the first difference between two JSON trees, with the path to it.
fn json_diff(path: &str, a: &Json, b: &Json) -> Option<String> {
    match (a, b) {
        (Json::Obj(x), Json::Obj(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => {
                        if let Some(d) = json_diff(&format!("{path}.{k}"), va, vb) {
                            return Some(d);
                        }
                    }
                    (va, vb) => return Some(format!("{path}.{k}: oxcow {va:?} vs qemu {vb:?}")),
                }
            }
            None
        }
        (Json::Arr(x), Json::Arr(y)) => {
            if x.len() != y.len() {
                return Some(format!(
                    "{path}: {} entries in oxcow vs {} in qemu",
                    x.len(),
                    y.len()
                ));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (va, vb))| json_diff(&format!("{path}[{i}]"), va, vb))
        }
        _ if a == b => None,
        _ => Some(format!("{path}: oxcow {a:?} vs qemu {b:?}")),
    }
}

/// qemu-img map also gives the host offset of ranges that hold no data but sit in an allocated
/// cluster (zero or unallocated subclusters, preallocated zero clusters); the library's
/// `block_status` reports host offsets for data only. Drops those offsets from qemu-img's map
/// and merges the rows that then become alike, so everything else is still compared exactly.
fn without_hidden_offsets(map: Json) -> Json {
    let mut out: Vec<Json> = Vec::new();
    for mut e in map.as_array().to_vec() {
        if !e.get("data").as_bool() {
            if let Json::Obj(m) = &mut e {
                m.remove("offset");
            }
        }
        if let (Some(Json::Obj(last)), Json::Obj(cur)) = (out.last_mut(), &e) {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last.get(*k) == cur.get(*k))
                && last.get("offset").is_none()
                && cur.get("offset").is_none();
            if same {
                let len = last["length"].as_u64() + cur["length"].as_u64();
                last.insert("length".into(), Json::Num(len as f64, len.to_string()));
                continue;
            }
        }
        out.push(e);
    }
    Json::Arr(out)
}

/// `oxcow CMD --output json FILE` and `qemu-img CMD --output=json FILE` give equal JSON, and
/// the human outputs are equal too.
fn assert_same_as_qemu(dir: &Path, cmd: &str, file: &str, extra: &[&str]) {
    let mut ox = vec![cmd, "--output", "json"];
    ox.extend_from_slice(extra);
    ox.push(file);
    let mut qa = vec![cmd, "--output=json", "-f", "qcow2"];
    qa.extend_from_slice(extra);
    qa.push(file);
    let mine = oxcow_ok(dir, &ox).stdout;
    let theirs = qemu_in(dir, "qemu-img", &qa).stdout;
    let mut want = Json::parse(&theirs);
    if cmd == "map" {
        want = without_hidden_offsets(want);
    }
    if let Some(d) = json_diff("", &Json::parse(&mine), &want) {
        panic!("{cmd} --output json {file} differs: {d}\noxcow:\n{mine}\nqemu-img:\n{theirs}");
    }
    let mut ox = vec![cmd];
    ox.extend_from_slice(extra);
    ox.push(file);
    let mut qa = vec![cmd, "-f", "qcow2"];
    qa.extend_from_slice(extra);
    qa.push(file);
    // Exit codes must agree too: qemu-img map's human format fails on compressed clusters.
    let mine = oxcow_in(dir, &ox);
    let theirs = run_in(dir, "qemu-img", &qa);
    assert_eq!(
        mine.code,
        theirs.code,
        "{cmd} {file}: exit codes differ: oxcow {} / qemu-img {}",
        mine.all(),
        theirs.all()
    );
    let (mine, theirs) = (mine.stdout, theirs.stdout);
    for (i, (a, b)) in mine.lines().zip(theirs.lines()).enumerate() {
        assert_eq!(a, b, "{cmd} {file}: human output line {i} differs");
    }
    assert_eq!(
        mine.lines().count(),
        theirs.lines().count(),
        "{cmd} {file}: human output length differs:\noxcow:\n{mine}\nqemu-img:\n{theirs}"
    );
}

/// Images in one directory covering what info and map must describe: v2 and v3 headers,
/// options, data, zero clusters, compressed clusters, subclusters, snapshots, a qcow2 chain of
/// three (relative names) and a raw backing file.
///
/// Data is written in whole clusters (or subclusters): qemu-img map also asks the host file
/// system for holes inside allocated clusters (a partly written fresh cluster reports
/// "zero": true there), a fact the oxcow library does not expose.
fn build_zoo(dir: &Path) -> Vec<&'static str> {
    let q = |a: &[&str]| {
        qemu_in(dir, "qemu-img", a);
    };
    q(&["create", "-q", "-f", "qcow2", "plain.qcow2", "16M"]);
    qio(
        dir,
        "plain.qcow2",
        &[
            "write -P 1 0 192k",
            "write -P 2 1M 64k",
            "write -z 2M 128k",
            "write -c -P 3 4M 64k",
            "write -P 4 16320k 64k",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        "v2.qcow2",
        "3M",
    ]);
    qio(dir, "v2.qcow2", &["write -P 5 0 12k", "write -P 6 1M 4k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k,compression_type=zstd,lazy_refcounts=on,refcount_bits=4",
        "ext.qcow2",
        "8M",
    ]);
    qio(
        dir,
        "ext.qcow2",
        &[
            "write -P 7 4k 8k",
            "write -P 8 1M 128k",
            "write -z 1060k 4k",
            "write -c -P 9 2M 128k",
        ],
    );
    q(&["create", "-q", "-f", "qcow2", "snap.qcow2", "4M"]);
    qio(dir, "snap.qcow2", &["write -P 10 0 64k"]);
    q(&["snapshot", "-c", "first", "snap.qcow2"]);
    qio(dir, "snap.qcow2", &["write -P 11 0 4k"]);
    q(&["snapshot", "-c", "second one", "snap.qcow2"]);
    // Persistent bitmaps: one enabled, one disabled with another granularity.
    q(&["bitmap", "--add", "snap.qcow2", "b0"]);
    q(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "snap.qcow2",
        "b1",
    ]);
    // A three-level chain: base <- mid <- top, each writing some ranges, plus a zero cluster
    // hiding backing data and a top smaller than nothing (same size).
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qio(
        dir,
        "base.qcow2",
        &["write -P 12 0 256k", "write -P 13 3M 1M"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    qio(
        dir,
        "mid.qcow2",
        &["write -P 14 64k 64k", "write -z 3M 64k"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "12M",
    ]);
    qio(
        dir,
        "top.qcow2",
        &[
            "write -P 15 128k 64k",
            "write -c -P 16 5M 64k",
            "write -P 17 10M 64k",
        ],
    );
    // A raw backing file with data everywhere (hole reporting on raw files is out of scope).
    std::fs::write(dir.join("raw.img"), vec![0x5au8; 2 * MIB as usize]).unwrap();
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "raw.img",
        "-F",
        "raw",
        "overraw.qcow2",
    ]);
    qio(dir, "overraw.qcow2", &["write -P 18 64k 64k"]);
    vec![
        "plain.qcow2",
        "v2.qcow2",
        "ext.qcow2",
        "snap.qcow2",
        "base.qcow2",
        "mid.qcow2",
        "top.qcow2",
        "overraw.qcow2",
    ]
}

#[test]
fn info_matches_qemu_img() {
    let t = TempDir::new("cli-info");
    for f in build_zoo(t.path()) {
        assert_same_as_qemu(t.path(), "info", f, &[]);
    }
    assert_same_as_qemu(t.path(), "info", "top.qcow2", &["--backing-chain"]);
    // An absolute path (full-backing-filename is then absolute too).
    let abs = t.join("top.qcow2");
    assert_same_as_qemu(t.path(), "info", path_str(&abs), &[]);
}

#[test]
fn map_matches_qemu_img() {
    let t = TempDir::new("cli-map");
    for f in build_zoo(t.path()) {
        assert_same_as_qemu(t.path(), "map", f, &[]);
    }
    assert_same_as_qemu(
        t.path(),
        "map",
        "top.qcow2",
        &["--start-offset", "96k", "--max-length", "5M"],
    );
}

#[test]
fn info_of_images_oxcow_creates_matches_qemu_img() {
    let t = TempDir::new("cli-create");
    let d = t.path();
    let o = oxcow_ok(
        d,
        &[
            "create",
            "-o",
            "cluster_size=16k,lazy_refcounts=on",
            "a.qcow2",
            "10G",
        ],
    );
    assert!(o
        .stdout
        .starts_with("Formatting 'a.qcow2', fmt=qcow2 cluster_size=16384"));
    oxcow_ok(
        d,
        &["create", "-q", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    );
    oxcow_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "c.qcow2",
            "512M",
        ],
    );
    for f in ["a.qcow2", "b.qcow2", "c.qcow2"] {
        assert_same_as_qemu(d, "info", f, &[]);
        assert_check_clean(&d.join(f));
    }
    let j = Json::parse(&oxcow_ok(d, &["info", "--output=json", "b.qcow2"]).stdout);
    assert_eq!(j.get("virtual-size").as_u64(), 10 << 30);
}

/// Fills a raw file with data in some clusters, zeros elsewhere, and a partial last cluster.
fn make_raw(path: &Path, size: u64) -> Vec<u8> {
    let mut rng = Rng::new(7);
    let mut data = vec![0u8; size as usize];
    for i in 0..(size / 65536 + 1) {
        if i % 3 == 1 {
            continue;
        }
        let s = (i * 65536) as usize;
        let e = (s + 65536).min(data.len());
        if s >= e {
            break;
        }
        if i % 5 == 0 {
            // A cluster with a single non-zero byte in the middle still counts as data.
            data[s + 3000.min(e - s - 1)] = 1;
        } else {
            for b in &mut data[s..e] {
                *b = (rng.next_u64() % 200) as u8 + 1;
            }
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn convert_raw_and_qcow2_both_ways() {
    let t = TempDir::new("cli-convert");
    let d = t.path();
    let size = 5 * MIB + 12345;
    make_raw(&d.join("src.raw"), size);
    oxcow_ok(
        d,
        &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "a.qcow2"],
    );
    assert_check_clean(&d.join("a.qcow2"));
    assert_compare_identical(&d.join("a.qcow2"), &d.join("src.raw"));
    // All-zero clusters stay unallocated: every third cluster.
    let map = qemu_map(&d.join("a.qcow2"));
    let unallocated: u64 = map.iter().filter(|e| !e.data).map(|e| e.length).sum();
    assert!(
        unallocated >= 20 * 65536,
        "zero clusters were written: {map:?}"
    );

    // Probed source format, other cluster size, progress on.
    let o = oxcow_ok(
        d,
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "src.raw",
            "b.qcow2",
        ],
    );
    assert!(
        o.stderr.contains("100.00/100%"),
        "no progress: {}",
        o.stderr
    );
    assert_check_clean(&d.join("b.qcow2"));
    assert_compare_identical(&d.join("b.qcow2"), &d.join("src.raw"));

    // qcow2 -> raw, and a chain flattened into one image.
    oxcow_ok(d, &["convert", "-O", "raw", "b.qcow2", "back.raw"]);
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path_str(&d.join("back.raw")),
            path_str(&d.join("src.raw")),
        ],
    );
    assert_eq!(o.code, 0, "qcow2 -> raw differs: {}", o.all());
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
        ],
    );
    qio(
        d,
        "over.qcow2",
        &["write -P 9 64k 128k", "write -z 0 4k", "write -P 3 5M 4k"],
    );
    oxcow_ok(
        d,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "over.qcow2",
            "flat.qcow2",
        ],
    );
    assert_check_clean(&d.join("flat.qcow2"));
    assert_same_guest(&d.join("over.qcow2"), &d.join("flat.qcow2"));
    let info = qemu_info(&d.join("flat.qcow2"));
    assert!(info.opt("backing-filename").is_none());
}

#[test]
fn convert_compressed() {
    let t = TempDir::new("cli-convert-c");
    let d = t.path();
    make_raw(&d.join("src.raw"), 3 * MIB + 4096);
    for ct in ["zlib", "zstd"] {
        let out = format!("c-{ct}.qcow2");
        let opts = format!("compression_type={ct}");
        let o = oxcow_in(
            d,
            &["convert", "-c", "-O", "qcow2", "-o", &opts, "src.raw", &out],
        );
        assert_eq!(o.code, 0, "convert -c failed: {}", o.all());
        assert_check_clean(&d.join(&out));
        assert_compare_identical(&d.join(&out), &d.join("src.raw"));
        let map = qemu_map(&d.join(&out));
        assert!(
            map.iter().any(|e| e.compressed),
            "nothing compressed: {map:?}"
        );
        assert_same_as_qemu(d, "map", &out, &[]);
        assert_same_as_qemu(d, "info", &out, &[]);
    }
    // A backing chain compressed into one self-contained image.
    qemu_in(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "src.raw", "base.qcow2"],
    );
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qio(
        d,
        "top.qcow2",
        &[
            "write -P 9 64k 64k",
            "write -z 192k 64k",
            "write -P 4 3M 4k",
        ],
    );
    oxcow_ok(
        d,
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
    );
    assert_check_clean(&d.join("flat.qcow2"));
    assert_same_guest(&d.join("top.qcow2"), &d.join("flat.qcow2"));
}

#[test]
fn bench_runs_on_both_formats() {
    let t = TempDir::new("cli-bench");
    let d = t.path();
    oxcow_ok(d, &["create", "-q", "b.qcow2", "4M"]);
    std::fs::write(d.join("b.raw"), vec![0u8; 4 * MIB as usize]).unwrap();
    for f in ["b.qcow2", "b.raw"] {
        let fmt = if f.ends_with("raw") { "raw" } else { "qcow2" };
        let o = oxcow_ok(
            d,
            &[
                "bench",
                "-f",
                fmt,
                "-w",
                "-c",
                "64",
                "-d",
                "2",
                "--pattern",
                "7",
                "--flush-interval",
                "64",
                f,
            ],
        );
        assert!(o.stdout.contains("Run completed in"), "{}", o.stdout);
        let o = oxcow_ok(
            d,
            &[
                "bench", "-f", fmt, "-c", "64", "--random", "-s", "8k", "--output", "json", f,
            ],
        );
        let j = Json::parse(&o.stdout);
        assert_eq!(j.get("count").as_u64(), 64);
        assert_eq!(j.get("format").as_str(), fmt);
    }
    assert_check_clean(&d.join("b.qcow2"));
    let want = {
        let mut v = vec![7u8; 64 * 4096];
        v.resize(4 * MIB as usize, 0);
        v
    };
    assert!(
        read_file(&d.join("b.raw")) == want,
        "bench -w wrote the wrong bytes"
    );
}

#[test]
fn bad_command_lines_fail_with_a_message() {
    let t = TempDir::new("cli-errors");
    let d = t.path();
    oxcow_ok(d, &["create", "-q", "x.qcow2", "1M"]);
    std::fs::write(d.join("not-an-image"), b"hello").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["frobnicate"], "unknown command"),
        (&["info", "--bogus", "x.qcow2"], "unknown option '--bogus'"),
        (&["info"], "needs exactly one FILE"),
        (&["info", "missing.qcow2"], "missing.qcow2"),
        (&["info", "not-an-image"], "not in qcow2 format"),
        (&["info", "--output", "xml", "x.qcow2"], "human or json"),
        (&["info", "-f", "vmdk", "x.qcow2"], "only qcow2"),
        (&["map", "-z", "x.qcow2"], "unknown option"),
        (&["create", "y.qcow2", "12Q"], "invalid size"),
        (&["create", "y.qcow2"], "needs a SIZE"),
        (
            &["create", "-o", "cluster_size=3k", "y.qcow2", "1M"],
            "cluster",
        ),
        (
            &["create", "-o", "nonsense=1", "y.qcow2", "1M"],
            "unknown create option",
        ),
        (&["create", "-b", "x.qcow2", "y.qcow2"], "-F"),
        (&["convert", "x.qcow2"], "SRC DST"),
        (
            &["convert", "-O", "vdi", "x.qcow2", "y"],
            "unsupported output format",
        ),
        (
            &["convert", "-c", "-O", "raw", "x.qcow2", "y"],
            "needs -O qcow2",
        ),
        (&["convert", "x.qcow2", "x.qcow2"], "same file"),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "backing_file=x.qcow2,backing_fmt=qcow2",
                "x.qcow2",
                "z",
            ],
            "self-contained",
        ),
        (&["bench", "-c", "lots", "x.qcow2"], "-c must be"),
        (&["bench", "-s", "2M", "x.qcow2"], "does not fit"),
        (
            &["bench", "--flush-interval", "4", "x.qcow2"],
            "only for write",
        ),
        (&["bench", "-t", "fast", "x.qcow2"], "cache mode"),
    ];
    for (args, want) in cases {
        let o = oxcow_in(d, args);
        assert_eq!(o.code, 1, "oxcow {args:?} should exit 1: {}", o.all());
        assert!(
            o.all().contains(want),
            "oxcow {args:?}: expected '{want}' in:\n{}",
            o.all()
        );
    }
    assert!(!d.join("y.qcow2").exists() || oxcow_in(d, &["info", "y.qcow2"]).code == 0);
    for cmd in ["create", "info", "map", "convert", "bench"] {
        let o = oxcow_ok(d, &[cmd, "--help"]);
        assert!(
            o.stdout.contains("Usage: oxcow"),
            "{cmd} --help: {}",
            o.stdout
        );
        assert!(
            o.stdout.contains("Examples:"),
            "{cmd} --help has no examples"
        );
    }
    oxcow_ok(d, &["--help"]);
}

/// Runs `oxcow` with its standard output a pipe whose reader has gone before the command
/// starts (bash runs it after `true`, the pipe's only reader, has exited; the status is
/// oxcow's, from PIPESTATUS).
fn oxcow_into_closed_pipe(dir: &Path, args: &[&str]) -> CmdOut {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"(sleep 0.2; exec "$0" "$@") | true; exit "${PIPESTATUS[0]}""#)
        .arg(env!("CARGO_BIN_EXE_oxcow"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run bash");
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_closed_output_pipe_ends_the_command_quietly_as_sigpipe_would() {
    let dir = TempDir::new("cli-epipe");
    qemu_in(
        dir.path(),
        "qemu-img",
        &["create", "-f", "qcow2", "i.qcow2", "64M"],
    );
    for args in [
        &["info", "i.qcow2"][..],
        &["info", "--output", "json", "i.qcow2"],
        &["map", "i.qcow2"],
        &["bench", "-c", "10", "i.qcow2"],
        &["info", "--help"],
    ] {
        let o = oxcow_into_closed_pipe(dir.path(), args);
        assert_eq!(o.code, 141, "oxcow {args:?}: {}", o.stderr);
        assert!(o.stderr.is_empty(), "oxcow {args:?} said: {}", o.stderr);
    }
}
