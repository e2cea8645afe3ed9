//! Issue 18: `oxcow bench` takes the metadata cache options (--l2-cache-size,
//! --refcount-cache-size, --slice-size), and refuses a slice size qemu would refuse for
//! l2-cache-entry-size.

mod common;

use common::*;
use std::process::Command;

fn bench(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxcow"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run oxcow");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bench_runs_with_two_slice_caches_and_refuses_a_bad_slice_size() {
    let dir = TempDir::new("slices-cli");
    let path = dir.join("img.qcow2");
    let p = path.to_str().expect("utf-8 path");
    oxcow::create(&path, 64 << 20, &oxcow::CreateOptions::default()).expect("create");
    let tiny = [
        "--l2-cache-size",
        "1",
        "--refcount-cache-size",
        "1",
        "--slice-size",
        "512",
        "-q",
    ];
    let (code, text) = bench(
        &[
            &["-w", "-c", "64", "-S", "1M", "--flush-interval", "64"][..],
            &tiny,
            &[p],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "write bench with tiny caches: {text}");
    let (code, text) = bench(&[&["-c", "256", "-S", "256k"][..], &tiny, &[p]].concat());
    assert_eq!(code, 0, "read bench with tiny caches: {text}");
    let (code, text) = bench(&["--slice-size", "1000", "-c", "1", p]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("power of two"), "{text}");
}
