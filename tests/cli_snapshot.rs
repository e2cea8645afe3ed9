//! `oxcow snapshot` and `oxcow convert -l` against `qemu-img snapshot` / `qemu-img convert -l`:
//! the same command lines on two copies give the same tables (apart from dates), the same
//! exit codes and messages (with "oxcow" for "qemu-img"), and clean images.

mod common;
mod snapshots_support;

use common::*;
use snapshots_support::*;
use std::path::Path;

/// Runs the built `oxcow` binary.
fn oxcow(args: &[&str]) -> CmdOut {
    run(env!("CARGO_BIN_EXE_oxcow"), args)
}

/// Runs the same `snapshot` arguments through both tools (the file last) and returns both
/// outcomes.
fn both(args: &[&str], q: &Path, o: &Path) -> (CmdOut, CmdOut) {
    let mut qa = vec!["snapshot"];
    qa.extend_from_slice(args);
    qa.push(path_str(q));
    let mut oa = vec!["snapshot"];
    oa.extend_from_slice(args);
    oa.push(path_str(o));
    (run("qemu-img", &qa), oxcow(&oa))
}

/// `convert -l SEL -O raw SRC DST`: snapshot SEL of SRC as raw bytes in DST.
fn to_raw<'a>(sel: &'a str, src: &'a str, dst: &'a str) -> [&'a str; 7] {
    ["convert", "-l", sel, "-O", "raw", src, dst]
}

fn pair(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let q = dir.join("q.qcow2");
    qemu_create_with_data(&q, 4 * MIB, "", 0x3c, 256 * KIB);
    let o = dir.join("o.qcow2");
    std::fs::copy(&q, &o).expect("copy");
    (q, o)
}

#[test]
fn create_list_apply_delete_match_qemu_img_snapshot() {
    let dir = TempDir::new("cli-snap");
    let (q, o) = pair(&dir);
    let script: &[&[&str]] = &[
        &["-l"],
        &["-c", "one"],
        &["-c", "two"],
        &["-c", "two"],
        &[],
        &["-a", "one"],
        &["-a", "3"],
        &["-d", "two"],
        &["-l"],
        &["-d", "2"],
        &["-a", "missing"],
        &["-d", "missing"],
        &["-c", "x", "-d", "y"],
        &["-l", "-U"],
    ];
    for args in script {
        let (a, b) = both(args, &q, &o);
        assert_eq!(
            a.code,
            b.code,
            "{args:?}: exit codes\n{}\n{}",
            a.all(),
            b.all()
        );
        assert_eq!(undated(&a.stdout), undated(&b.stdout), "{args:?}: stdout");
        let msg = |s: &str| {
            s.lines()
                .next()
                .unwrap_or("")
                .replace("qemu-img: ", "")
                .replace("oxcow: ", "")
                .replace(path_str(&q), "FILE")
                .replace(path_str(&o), "FILE")
        };
        assert_eq!(msg(&a.stderr), msg(&b.stderr), "{args:?}: message");
    }
    assert_equivalent(&dir, &q, &o);
}

#[test]
fn usage_errors_and_help() {
    let h = oxcow(&["snapshot", "--help"]);
    assert_eq!(h.code, 0);
    assert!(h.stdout.contains("-c, --create SNAPSHOT"), "{}", h.stdout);
    let none = oxcow(&["snapshot"]);
    assert_eq!(none.code, 1);
    assert!(
        none.stderr.contains("Expecting one image file name"),
        "{}",
        none.stderr
    );
    let bad = oxcow(&["snapshot", "-z", "x.qcow2"]);
    assert_eq!(bad.code, 1);
    let missing = oxcow(&["snapshot", "-l", "/nonexistent/x.qcow2"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .contains("Could not open '/nonexistent/x.qcow2'"),
        "{}",
        missing.stderr
    );
}

#[test]
fn convert_l_reads_a_snapshot_like_qemu_img_convert_l() {
    let dir = TempDir::new("cli-convert-l");
    let (q, _) = pair(&dir);
    qemu_img(&["snapshot", "-c", "old", path_str(&q)]);
    qemu_io(&q, &["write -P 0x99 0 128k".into()]);
    qemu_img(&["snapshot", "-c", "new", path_str(&q)]);
    for sel in [
        "snapshot.name=old",
        "snapshot.id=1",
        "old",
        "snapshot.id=1,snapshot.name=old",
    ] {
        let want = dir.join("want.raw");
        let got = dir.join("got.raw");
        qemu_img(&to_raw(sel, path_str(&q), path_str(&want)));
        let o = oxcow(&to_raw(sel, path_str(&q), path_str(&got)));
        assert_eq!(o.code, 0, "{sel}: {}", o.all());
        assert!(
            read_file(&want) == read_file(&got),
            "{sel}: contents differ"
        );
    }
    let got = dir.join("s.qcow2");
    let o = oxcow(&[
        "convert",
        "-s",
        "old",
        "-O",
        "qcow2",
        path_str(&q),
        path_str(&got),
    ]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert_check_clean(&got);
    let want = dir.join("want.raw");
    qemu_img(&to_raw("old", path_str(&q), path_str(&want)));
    assert_compare_identical(&got, &want);
    for sel in ["snapshot.name=nope", "snapshot.id=2,snapshot.name=old"] {
        let a = run("qemu-img", &to_raw(sel, path_str(&q), "/tmp/x"));
        let b = oxcow(&to_raw(sel, path_str(&q), path_str(&dir.join("n.raw"))));
        assert_eq!((a.code, b.code), (1, 1), "{sel}");
        assert!(
            b.stderr
                .contains("Failed to load snapshot: Can't find snapshot"),
            "{}",
            b.stderr
        );
    }
}

#[test]
fn info_lists_snapshots_made_by_oxcow_as_qemu_img_info_does() {
    let dir = TempDir::new("cli-snap-info");
    let (q, o) = pair(&dir);
    let _ = both(&["-c", "s1"], &q, &o);
    let a = qemu_img(&["info", "--output=json", path_str(&q)]);
    let b = qemu_img(&["info", "--output=json", path_str(&o)]);
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                !l.contains("date-") && !l.contains("\"filename\"") && !l.contains("actual-size")
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(&a.stdout), strip(&b.stdout));
    let oi = oxcow(&["info", path_str(&o)]);
    assert!(
        oi.stdout.contains("Snapshot list:") && oi.stdout.contains("s1"),
        "{}",
        oi.stdout
    );
}

#[test]
fn apply_on_an_image_with_bitmaps_fails_with_qemu_img_s_message() {
    let dir = TempDir::new("cli-snap-bitmaps");
    let (q, o) = pair(&dir);
    for p in [&q, &o] {
        qemu_img(&["bitmap", "--add", path_str(p), "b0"]);
    }
    for args in [&["-c", "s"][..], &["-a", "s"], &["-d", "s"]] {
        let (a, b) = both(args, &q, &o);
        assert_eq!(a.code, b.code, "{args:?}: {} / {}", a.all(), b.all());
        assert_eq!(
            a.stderr.replace("qemu-img: ", ""),
            b.stderr.replace("oxcow: ", ""),
            "{args:?}"
        );
    }
    assert_check_clean(&o);
}

fn host_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks()
}

#[test]
fn delete_gives_the_freed_clusters_back_to_the_file_system_like_qemu_img() {
    let dir = TempDir::new("cli-snap-punch");
    let q = dir.join("q.qcow2");
    qemu_create_with_data(&q, 64 * MIB, "", 0x11, 16 * MIB);
    assert_eq!(
        run("qemu-img", &["snapshot", "-c", "s1", path_str(&q)]).code,
        0
    );
    qemu_io(&q, &["write -P 0x22 0 16M".to_string()]);
    let o = dir.join("o.qcow2");
    std::fs::copy(&q, &o).expect("copy");
    let before = host_blocks(&o);
    let (qo, oo) = both(&["-d", "s1"], &q, &o);
    assert_eq!((qo.code, oo.code), (0, 0), "{} / {}", qo.all(), oo.all());
    let (qb, ob) = (host_blocks(&q), host_blocks(&o));
    assert!(
        qb + 16 * MIB / 512 * 9 / 10 <= before,
        "qemu-img no longer punches: {before} -> {qb} blocks"
    );
    assert!(
        ob <= qb + 1024,
        "oxcow kept {ob} blocks, qemu-img {qb} (from {before})"
    );
    assert_check_clean(&o);
    assert_same_guest(&o, &q);
}
