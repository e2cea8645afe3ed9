//! The bitmap commands of the `oxcow` CLI against qemu-img: each `oxcow bitmap` command line
//! runs on one copy of an image and the same `qemu-img bitmap` command line on another, and
//! both must end with the same exit code, the same message and the same bitmaps (qemu-img
//! info) with the same dirty sets (read by QEMU through qemu-nbd); `oxcow info` shows bitmaps
//! like qemu-img info, `oxcow map --bitmap` lists QEMU's dirty set, and `oxcow convert
//! --bitmaps` copies bitmaps like `qemu-img convert --bitmaps`.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Runs the built `oxcow` binary in `dir`.
fn oxcow(dir: &Path, args: &[&str]) -> CmdOut {
    run_in(dir, env!("CARGO_BIN_EXE_oxcow"), args)
}

/// Runs a program in `dir` and requires exit 0.
fn ok(dir: &Path, prog: &str, args: &[&str]) -> CmdOut {
    let o = run_in(dir, prog, args);
    assert_eq!(o.code, 0, "{prog} {} failed:\n{}", args.join(" "), o.all());
    o
}

/// The `bitmaps` list of `qemu-img info --output=json` (empty without one).
fn bitmaps(dir: &Path, file: &str) -> Json {
    let out = ok(dir, "qemu-img", &["info", "-U", "--output=json", file]).stdout;
    Json::parse(&out)
        .get("format-specific")
        .get("data")
        .opt("bitmaps")
        .cloned()
        .unwrap_or(Json::Arr(Vec::new()))
}

/// The dirty ranges of bitmap `name` of `file` as QEMU reports them: qemu-nbd exports the
/// bitmap and qemu-img map reads it through x-dirty-bitmap, where dirty ranges are the ones
/// with "data": false. Adjacent ranges merged.
fn qemu_dirty(dir: &Path, file: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = dir.join(format!("nbd-{}.sock", unique_id()));
    let sock = path_str(&sock);
    ok(
        dir,
        "qemu-nbd",
        &["-r", "-f", "qcow2", "-B", name, "-k", sock, "--fork", file],
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
    );
    let out = ok(
        dir,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts],
    );
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in Json::parse(&out.stdout).as_array() {
        if r.get("data").as_bool() {
            continue;
        }
        let (s, l) = (r.get("start").as_u64(), r.get("length").as_u64());
        match spans.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => spans.push((s, l)),
        }
    }
    spans
}

/// The consistent bitmaps' names in a qemu-img info bitmaps list.
fn consistent_names(list: &Json) -> Vec<String> {
    list.as_array()
        .iter()
        .filter(|b| {
            !b.get("flags")
                .as_array()
                .contains(&Json::Str("in-use".into()))
        })
        .map(|b| b.get("name").as_str().to_string())
        .collect()
}

/// qemu-img's message as oxcow words it: the program name and the file name differ.
fn as_oxcow(stderr: &str, qemu_file: &str, oxcow_file: &str) -> String {
    stderr
        .replace("qemu-img", "oxcow")
        .replace(qemu_file, oxcow_file)
}

/// Stands for the image file in [`same_outcome`]'s arguments.
const FILE: &str = "<file>";

/// Runs `args` through qemu-img with `qf` for [`FILE`] and through oxcow with `of`, in `dir`:
/// exit codes and messages (qemu-img's worded as oxcow's) must agree (`what` names the
/// case). Returns the exit code.
fn same_outcome(dir: &Path, args: &[&str], (qf, of): (&str, &str), what: &str) -> i32 {
    let with = |f| -> Vec<&str> {
        args.iter()
            .map(|&a| if a == FILE { f } else { a })
            .collect()
    };
    let q = run_in(dir, "qemu-img", &with(qf));
    let o = oxcow(dir, &with(of));
    assert_eq!(
        o.code,
        q.code,
        "{what}: exit codes differ:\noxcow: {}\nqemu-img: {}",
        o.all(),
        q.all()
    );
    assert_eq!(
        o.stderr,
        as_oxcow(&q.stderr, qf, of),
        "{what}: messages differ"
    );
    q.code
}

/// `of` has the same bitmaps as `qf` (qemu-img info) with the same dirty sets (read by QEMU),
/// and checks clean.
fn assert_same_bitmaps(dir: &Path, (qf, of): (&str, &str), what: &str) {
    let (ql, ol) = (bitmaps(dir, qf), bitmaps(dir, of));
    assert_eq!(ol, ql, "{what}: qemu-img info bitmaps differ");
    for b in consistent_names(&ql) {
        assert_eq!(
            qemu_dirty(dir, of, &b),
            qemu_dirty(dir, qf, &b),
            "{what}: dirty set of {b} differs"
        );
    }
    assert_check_clean(&dir.join(of));
}

/// A 16M image with data, bitmap `base` (enabled, dirty at 1M and 5M..5M+64k) and bitmap
/// `off` (disabled, 4k granules, dirty at 2M), plus `other.qcow2` (same size, bitmap `ob`
/// dirty at 8M), `big.qcow2` (32M, bitmap `bb`) and `r.raw`.
fn base_images(dir: &Path) {
    let q = |a: &[&str]| {
        ok(dir, "qemu-img", a);
    };
    let io = |f: &str, cmds: &[&str]| {
        let mut a = vec!["-f", "qcow2"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(f);
        ok(dir, "qemu-io", &a);
    };
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    io("base.qcow2", &["write -P 1 0 3M"]);
    q(&["bitmap", "--add", "base.qcow2", "base"]);
    q(&["bitmap", "--add", "-g", "4k", "base.qcow2", "off"]);
    io("base.qcow2", &["write 2M 4k"]);
    q(&["bitmap", "--disable", "base.qcow2", "off"]);
    io("base.qcow2", &["write 1M 100", "write -z 5M 64k"]);
    q(&["create", "-q", "-f", "qcow2", "other.qcow2", "16M"]);
    q(&["bitmap", "--add", "other.qcow2", "ob"]);
    io("other.qcow2", &["write 8M 4k"]);
    q(&["create", "-q", "-f", "qcow2", "big.qcow2", "32M"]);
    q(&["bitmap", "--add", "big.qcow2", "bb"]);
    q(&["create", "-q", "-f", "raw", "r.raw", "16M"]);
}

/// Runs `bitmap ARGS FILE NAME` through qemu-img on a copy of `base` and through oxcow on
/// another copy; exit codes, messages, bitmap lists and dirty sets must agree.
fn same_as_qemu(dir: &Path, base: &str, args: &[&str], name: &str) {
    let (qf, of) = ("q.qcow2", "o.qcow2");
    std::fs::copy(dir.join(base), dir.join(qf)).expect("copy");
    std::fs::copy(dir.join(base), dir.join(of)).expect("copy");
    let mut a = vec!["bitmap"];
    a.extend_from_slice(args);
    a.extend([FILE, name]);
    let what = format!("bitmap {} <file> {name:?}", args.join(" "));
    same_outcome(dir, &a, (qf, of), &what);
    assert_same_bitmaps(dir, (qf, of), &what);
    assert_check_clean(&dir.join(of));
}

#[test]
fn bitmap_commands_match_qemu_img() {
    let dir = TempDir::new("cli-bitmap-ops");
    let d = dir.path();
    base_images(d);
    let cases: &[(&[&str], &str)] = &[
        (&["--add"], "new"),
        (&["--add", "-g", "4k"], "new"),
        (&["--add", "-g", "0"], "new"),
        (&["--add", "--disable"], "new"),
        (&["--add", "-g", "512", "--disable", "--clear"], "new"),
        (&["--add", "--remove"], "new"),
        (&["--add", "-g", "1M", "--merge", "base"], "new"),
        (&["--remove"], "base"),
        (&["--clear"], "base"),
        (&["--disable"], "base"),
        (&["--enable"], "off"),
        (&["--disable", "--enable"], "base"),
        (&["--enable"], "base"),
        (&["--disable"], "off"),
        (&["--clear"], "off"),
        (&["--add", "-g", "2G"], "huge"),
        (&["--add", "-g", "512", "--merge", "base"], "fine"),
        (&["--merge", "base"], "off"),
        (&["--merge", "base", "--clear", "--merge", "base"], "off"),
        (&["--merge", "ob", "-b", "other.qcow2"], "off"),
        (
            &["--merge", "ob", "-b", "other.qcow2", "-F", "qcow2"],
            "base",
        ),
        // Refused operations, and partial sequences: what ran before the failure stays.
        (&["--add"], "base"),
        (&["--add", "--add"], "dup"),
        (&["--remove"], "nope"),
        (&["--clear"], "nope"),
        (&["--enable"], "nope"),
        (&["--merge", "nope"], "off"),
        (&["--merge", "base"], "nope"),
        (&["--merge", "nope1"], "nope2"),
        (&["--disable", "--add"], "z"),
        (&["--clear", "--remove", "--remove"], "base"),
        (&["--add", "-g", "1000"], "g"),
        (&["--add", "-g", "256"], "g"),
        (&["--add", "-g", "4G"], "g"),
        (&["--add", "-g", "abc"], "g"),
        (&["--add"], ""),
        (&["--merge", "bb", "-b", "big.qcow2"], "off"),
        (&["--merge", "x", "-b", "r.raw", "-F", "raw"], "off"),
        // Command-line refusals.
        (&[], "base"),
        (&["-g", "4k", "--clear"], "base"),
        (&["-F", "qcow2", "--clear"], "base"),
        (&["-b", "other.qcow2", "--clear"], "base"),
    ];
    for (args, name) in cases {
        same_as_qemu(d, "base.qcow2", args, name);
    }
}

/// `base.qcow2` with every bitmap left in use by a qemu-io killed while it held the image.
fn crashed_image(dir: &Path) -> &'static str {
    std::fs::copy(dir.join("base.qcow2"), dir.join("crashed.qcow2")).expect("copy");
    let mut child = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 9M 4k",
            "-c",
            "flush",
            "-c",
            "sleep 60000",
            "crashed.qcow2",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    for _ in 0..200 {
        let out = ok(dir, "qemu-img", &["info", "-U", "crashed.qcow2"]).stdout;
        if out.contains("in-use") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    // Let the flushed write finish: the crash should leave the bitmaps in use, not leaks.
    std::thread::sleep(std::time::Duration::from_secs(1));
    child.kill().expect("kill qemu-io");
    child.wait().expect("reap qemu-io");
    "crashed.qcow2"
}

#[test]
fn inconsistent_bitmaps_are_refused_like_qemu_img() {
    let dir = TempDir::new("cli-bitmap-busy");
    let d = dir.path();
    base_images(d);
    let crashed = crashed_image(d);
    let cases: &[(&[&str], &str)] = &[
        (&["--clear"], "base"),
        (&["--enable"], "base"),
        (&["--disable"], "off"),
        (&["--merge", "off"], "base"),
        (&["--merge", "base"], "off"),
        (&["--merge", "ob", "-b", "other.qcow2"], "base"),
        (&["--add"], "fresh"),
        (&["--remove"], "base"),
        (&["--remove"], "off"),
    ];
    for (args, name) in cases {
        same_as_qemu(d, crashed, args, name);
    }
}

/// `oxcow info` (human and JSON) prints the bitmaps section exactly as qemu-img info does.
fn assert_info_bitmaps_match(dir: &Path, file: &str, force_share: bool) {
    let mut oa = vec!["info", "--output", "json"];
    let mut qa = vec!["info", "--output=json"];
    if force_share {
        oa.push("-U");
        qa.push("-U");
    }
    oa.push(file);
    qa.push(file);
    let mine = Json::parse(&ok(dir, env!("CARGO_BIN_EXE_oxcow"), &oa).stdout);
    let theirs = Json::parse(&ok(dir, "qemu-img", &qa).stdout);
    let fsd = |j: &Json| j.get("format-specific").get("data").opt("bitmaps").cloned();
    assert_eq!(
        fsd(&mine),
        fsd(&theirs),
        "info --output json bitmaps of {file}"
    );
    let section = |s: &str| -> Vec<String> {
        s.lines()
            .skip_while(|l| !l.starts_with("    bitmaps:"))
            .take_while(|l| !l.starts_with("    refcount bits:"))
            .map(str::to_string)
            .collect()
    };
    let mut oh = vec!["info"];
    let mut qh = vec!["info"];
    if force_share {
        oh.push("-U");
        qh.push("-U");
    }
    oh.push(file);
    qh.push(file);
    let mine = ok(dir, env!("CARGO_BIN_EXE_oxcow"), &oh).stdout;
    let theirs = ok(dir, "qemu-img", &qh).stdout;
    assert_eq!(
        section(&mine),
        section(&theirs),
        "info bitmaps section of {file}"
    );
}

#[test]
fn info_shows_bitmaps_like_qemu_img() {
    let dir = TempDir::new("cli-bitmap-info");
    let d = dir.path();
    base_images(d);
    assert_info_bitmaps_match(d, "base.qcow2", false);
    let crashed = crashed_image(d);
    assert_info_bitmaps_match(d, crashed, false);
    // Bitmaps oxcow added and wrote through, closed: auto, not in use.
    ok(
        d,
        env!("CARGO_BIN_EXE_oxcow"),
        &["bitmap", "--add", "-g", "2M", "base.qcow2", "x"],
    );
    let img = oxcow::Image::open(
        d.join("base.qcow2"),
        &oxcow::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("open");
    img.write_at(&[1u8; 512], 7 << 20).expect("write");
    // While oxcow holds the image read-write the bitmaps are in use on disk (-U to look).
    assert_info_bitmaps_match(d, "base.qcow2", true);
    assert!(bitmaps(d, "base.qcow2").as_array().iter().all(|b| b
        .get("flags")
        .as_array()
        .contains(&Json::Str("in-use".into()))));
    img.close().expect("close");
    assert_info_bitmaps_match(d, "base.qcow2", false);
    assert_eq!(qemu_dirty(d, "base.qcow2", "x"), vec![(6 << 20, 2 << 20)]);
}

/// Version-2 images cannot hold bitmaps: refused with qemu-img's message (which names the
/// block node where oxcow names the file).
#[test]
fn version_2_images_refuse_bitmaps() {
    let dir = TempDir::new("cli-bitmap-v2");
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "16M",
        ],
    );
    let o = oxcow(d, &["bitmap", "--add", "v2.qcow2", "b"]);
    let q = run_in(d, "qemu-img", &["bitmap", "--add", "v2.qcow2", "b"]);
    assert_eq!((o.code, q.code), (1, 1));
    let node = q
        .stderr
        .split("persistent in '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        o.stderr,
        as_oxcow(&q.stderr, &node, "v2.qcow2"),
        "qemu-img: {}",
        q.stderr
    );
    assert_eq!(bitmaps(d, "v2.qcow2"), Json::Arr(Vec::new()));
}

/// A bitmaps extension left stale by a program without bitmap support (autoclear bit 0 clear):
/// `bitmap --add` drops it with qemu-img's warning, the old bitmaps' clusters become leaks.
#[test]
fn stale_extension_is_dropped_with_a_warning() {
    let dir = TempDir::new("cli-bitmap-stale");
    let d = dir.path();
    base_images(d);
    // The autoclear features field is the big-endian u64 at header offset 88.
    poke(&d.join("base.qcow2"), 95, &[0]);
    std::fs::copy(d.join("base.qcow2"), d.join("q.qcow2")).expect("copy");
    std::fs::copy(d.join("base.qcow2"), d.join("o.qcow2")).expect("copy");
    let q = run_in(d, "qemu-img", &["bitmap", "--add", "q.qcow2", "x"]);
    let o = oxcow(d, &["bitmap", "--add", "o.qcow2", "x"]);
    assert_eq!((o.code, q.code), (0, 0), "{}\n{}", o.all(), q.all());
    assert!(
        q.stderr
            .starts_with("qemu-img: warning: a program lacking bitmap support")
            && o.stderr
                .starts_with("oxcow: warning: o.qcow2: a program lacking bitmap support"),
        "oxcow: {}\nqemu-img: {}",
        o.stderr,
        q.stderr
    );
    assert_eq!(bitmaps(d, "o.qcow2"), bitmaps(d, "q.qcow2"));
    let (oc, qc) = (
        run_in(d, "qemu-img", &["check", "o.qcow2"]),
        run_in(d, "qemu-img", &["check", "q.qcow2"]),
    );
    assert_eq!(oc.code, qc.code, "{}\n{}", oc.all(), qc.all());
    assert_eq!(oc.code, 3, "leaks only: {}", oc.all());
}

#[test]
fn map_bitmap_lists_qemu_dirty_set() {
    let dir = TempDir::new("cli-bitmap-map");
    let d = dir.path();
    base_images(d);
    let want = qemu_dirty(d, "base.qcow2", "base");
    assert_eq!(
        want,
        vec![
            (1 << 20, 64 << 10),
            (2 << 20, 64 << 10),
            (5 << 20, 64 << 10)
        ]
    );
    let out = ok(
        d,
        env!("CARGO_BIN_EXE_oxcow"),
        &["map", "--bitmap", "base", "--output", "json", "base.qcow2"],
    );
    let rows = Json::parse(&out.stdout);
    let mut next = 0;
    let mut dirty = Vec::new();
    for r in rows.as_array() {
        let (s, l) = (r.get("start").as_u64(), r.get("length").as_u64());
        assert_eq!(s, next, "rows cover the disk without gaps");
        next = s + l;
        if r.get("dirty").as_bool() {
            dirty.push((s, l));
        }
    }
    assert_eq!(next, 16 << 20);
    assert_eq!(dirty, want);
    let human = ok(
        d,
        env!("CARGO_BIN_EXE_oxcow"),
        &["map", "--bitmap", "base", "base.qcow2"],
    )
    .stdout;
    assert_eq!(
        human,
        "Offset          Length\n0x100000        0x10000\n0x200000        0x10000\n\
         0x500000        0x10000\n"
    );
    // A window: -s/-l clip the rows.
    let out = ok(
        d,
        env!("CARGO_BIN_EXE_oxcow"),
        &[
            "map",
            "--bitmap",
            "off",
            "--output",
            "json",
            "-s",
            "2M",
            "-l",
            "6k",
            "base.qcow2",
        ],
    );
    assert_eq!(
        out.stdout,
        "[{ \"start\": 2097152, \"length\": 4096, \"dirty\": true},\n\
         { \"start\": 2101248, \"length\": 2048, \"dirty\": false}]\n"
    );
    let bad = oxcow(d, &["map", "--bitmap", "nope", "base.qcow2"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("nope"), "{}", bad.stderr);
}

/// `convert ARGS SRC DST` through qemu-img and oxcow: same exit code and message, and (on
/// success) the same bitmaps with the same dirty sets and the same guest data.
fn convert_same_as_qemu(dir: &Path, args: &[&str], src: &str) {
    let (qf, of) = ("cq.qcow2", "co.qcow2");
    let _ = std::fs::remove_file(dir.join(qf));
    let _ = std::fs::remove_file(dir.join(of));
    let mut a = vec!["convert"];
    a.extend_from_slice(args);
    a.extend([src, FILE]);
    let what = format!("convert {} {src}", args.join(" "));
    let code = same_outcome(dir, &a, (qf, of), &what);
    assert_eq!(
        dir.join(of).exists(),
        dir.join(qf).exists(),
        "{what}: DST created by one only"
    );
    if code != 0 {
        return;
    }
    assert_same_bitmaps(dir, (qf, of), &what);
    ok(dir, "qemu-img", &["compare", "-q", qf, of]);
}

#[test]
fn convert_bitmaps_like_qemu_img() {
    let dir = TempDir::new("cli-bitmap-convert");
    let d = dir.path();
    base_images(d);
    convert_same_as_qemu(d, &["--bitmaps", "-O", "qcow2"], "base.qcow2");
    convert_same_as_qemu(d, &["--bitmaps", "-c", "-O", "qcow2"], "base.qcow2");
    convert_same_as_qemu(d, &["--bitmaps", "-O", "raw"], "base.qcow2");
    convert_same_as_qemu(
        d,
        &["--bitmaps", "-O", "qcow2", "-o", "compat=0.10"],
        "base.qcow2",
    );
    convert_same_as_qemu(d, &["--bitmaps", "-f", "raw", "-O", "qcow2"], "r.raw");
    convert_same_as_qemu(d, &["--skip-broken-bitmaps", "-O", "qcow2"], "base.qcow2");
    let crashed = crashed_image(d);
    convert_same_as_qemu(d, &["--bitmaps", "-O", "qcow2"], crashed);
    convert_same_as_qemu(
        d,
        &["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"],
        crashed,
    );
    // Without --bitmaps nothing is copied.
    convert_same_as_qemu(d, &["-O", "qcow2"], "base.qcow2");
}
