//! `oxcow resize` against `qemu-img resize`: the same command line on two copies of an image
//! gives the same exit code, the same messages (up to the program name) and equivalent images.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn run_in(prog: &str, dir: &Path, args: &[&str]) -> CmdOut {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    CmdOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `resize ARGS` (with `IMG` standing for the image) through both tools on copies of
/// the image made by `setup`, and compares outcomes.
fn same_as_qemu(tag: &str, setup: &str, args: &[&str]) {
    let dir = TempDir::new(tag);
    let (q, o) = (dir.join("q.qcow2"), dir.join("o.qcow2"));
    qemu_create(&q, 4 * MIB, "");
    qemu_io(&q, &[format!("write -P 0x5a 0 {setup}")]);
    std::fs::copy(&q, &o).expect("copy");
    let with = |img: &str| -> Vec<String> {
        let mut v = vec!["resize".to_string()];
        v.extend(args.iter().map(|a| {
            if *a == "IMG" {
                img.to_string()
            } else {
                a.to_string()
            }
        }));
        v
    };
    let qa = with("q.qcow2");
    let oa = with("o.qcow2");
    let qr = run_in(
        "qemu-img",
        dir.path(),
        &qa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let or = run_in(
        env!("CARGO_BIN_EXE_oxcow"),
        dir.path(),
        &oa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        or.code,
        qr.code,
        "{args:?}: exit codes\noxcow: {}\nqemu: {}",
        or.all(),
        qr.all()
    );
    assert_eq!(or.stdout, qr.stdout, "{args:?}: stdout");
    let norm = |s: &str, prog: &str| s.replace(&format!("{prog}: "), "TOOL: ");
    assert_eq!(
        norm(&or.stderr, "oxcow"),
        norm(&qr.stderr, "qemu-img"),
        "{args:?}: stderr"
    );
    assert_check_clean(&o);
    assert_same_guest(&q, &o);
    assert_eq!(
        qemu_info(&o).get("virtual-size").as_u64(),
        qemu_info(&q).get("virtual-size").as_u64()
    );
}

#[test]
fn absolute_and_relative_growth_print_image_resized() {
    same_as_qemu("cli-grow", "1M", &["IMG", "10G"]);
    same_as_qemu("cli-grow-rel", "1M", &["IMG", "+3M"]);
    same_as_qemu("cli-grow-q", "1M", &["-q", "IMG", "+1.5M"]);
    same_as_qemu("cli-same", "1M", &["-f", "qcow2", "IMG", "4M"]);
}

#[test]
fn shrinking_needs_the_flag_with_qemu_img_messages() {
    same_as_qemu("cli-shrink-refused", "4M", &["IMG", "1M"]);
    same_as_qemu("cli-shrink-refused-rel", "4M", &["IMG", "-1M"]);
    same_as_qemu("cli-shrink", "4M", &["--shrink", "IMG", "1M"]);
    same_as_qemu("cli-shrink-rel", "4M", &["--shrink", "IMG", "-1536K"]);
    same_as_qemu(
        "cli-shrink-dashdash",
        "4M",
        &["--shrink", "IMG", "--", "-1M"],
    );
}

#[test]
fn bad_sizes_fail_with_qemu_img_messages() {
    same_as_qemu("cli-zero", "1M", &["IMG", "0"]);
    same_as_qemu("cli-negative", "1M", &["--shrink", "IMG", "-5M"]);
    same_as_qemu("cli-unaligned", "1M", &["IMG", "4194817"]);
    same_as_qemu("cli-too-big", "1M", &["IMG", "9E"]);
    same_as_qemu("cli-l1-limit", "1M", &["IMG", "7E"]);
    same_as_qemu("cli-garbage", "1M", &["IMG", "12x"]);
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let dir = TempDir::new("cli-usage");
    let bin = env!("CARGO_BIN_EXE_oxcow");
    let r = run_in(bin, dir.path(), &["resize", "only-one-arg"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Expecting image file name and size"),
        "{}",
        r.stderr
    );
    let r = run_in(bin, dir.path(), &["resize", "missing.qcow2", "1G"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Could not open 'missing.qcow2'"),
        "{}",
        r.stderr
    );
    let r = run_in(bin, dir.path(), &["resize", "--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("--shrink"), "{}", r.stdout);
}
