//! A file system that runs out of room: writes fail with -ENOSPC, everything flushed before
//! the failure survives, and the image stays consistent (`qemu-img check` finds at worst
//! leaks).
//!
//! The room is limited with RLIMIT_FSIZE (`ulimit -f`), a real kernel limit on a real file:
//! writes past it fail with EFBIG, which oxcow reports as no space, like a full block device.
//! The limit is process-wide, so the workload runs in a child process (this test binary,
//! re-executed with only the ignored entry-point test selected).

mod common;

use common::*;
use oxcow::{CreateOptions, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1024 * 1024;
const ENOSPC: i32 = 28;
const CHILD_ENV: &str = "OXCOW_ENOSPC_CHILD_IMAGE";

fn chunk(tag: u64) -> Vec<u8> {
    tagged_data((tag as u8) | 1, tag * MIB, MIB as usize)
}

/// The child's workload: 1 MiB allocating writes, each followed by a flush, until one fails.
/// Prints `OK <index>` for every write+flush that succeeded and `FAIL <index> <errno>` for
/// the first failure; then checks the handle still serves reads of flushed data.
#[test]
#[ignore = "entry point of the child process of writes_on_a_full_file_system_fail_with_enospc_and_keep_the_image_consistent"]
fn enospc_child_workload() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = Image::open(
        &path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("child open");
    let n = img.virtual_size() / MIB;
    for i in 0..n {
        let r = img.write_at(&chunk(i), i * MIB).and_then(|()| img.flush());
        match r {
            Ok(()) => println!("OK {i}"),
            Err(e) => {
                println!("FAIL {i} {}", e.errno());
                eprintln!("first failure: {e}");
                break;
            }
        }
    }
    // Flushed data still reads back through the same handle after the failure.
    let mut buf = vec![0u8; MIB as usize];
    img.read_at(&mut buf, 0).expect("read after ENOSPC");
    assert_eq!(buf, chunk(0), "flushed data changed after ENOSPC");
    std::mem::forget(img); // like a process that dies after the error: no close.
}

fn run_child(image: &Path, limit_kib: u64) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    // Ignore SIGXFSZ so that writes past the limit fail with EFBIG instead of killing us.
    let script = format!(
        "trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" --ignored --exact enospc_child_workload --nocapture --test-threads=1"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(exe)
        .env(CHILD_ENV, image)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn writes_on_a_full_file_system_fail_with_enospc_and_keep_the_image_consistent() {
    for (cs, refcount_bits) in [(65536u32, 16u32), (4096, 64)] {
        let dir = TempDir::new(&format!("enospc-{cs}"));
        let path = dir.join("full.qcow2");
        oxcow::create(
            &path,
            32 * MIB,
            &CreateOptions {
                cluster_size: cs,
                refcount_bits,
                ..Default::default()
            },
        )
        .expect("create");
        let start = std::fs::metadata(&path).expect("stat").len();
        // Room for a few MiB of data, then the "disk" is full.
        let stdout = run_child(&path, (start + 5 * MIB + 300 * 1024) / 1024);
        let ok: Vec<u64> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("OK "))
            .map(|n| n.trim().parse().expect("index"))
            .collect();
        let fail = stdout
            .lines()
            .find_map(|l| l.strip_prefix("FAIL "))
            .unwrap_or_else(|| panic!("cs {cs}: the limit was never hit:\n{stdout}"));
        let errno: i32 = fail
            .split_whitespace()
            .nth(1)
            .and_then(|e| e.parse().ok())
            .expect("errno");
        assert_eq!(errno, ENOSPC, "cs {cs}: first failure: {fail}");
        assert!(ok.len() >= 3, "cs {cs}: too few writes fit: {ok:?}");

        // The limit is gone (the child has exited): the image must be consistent, at worst
        // leaking the clusters of the failed write.
        let (code, report) = qemu_img_check(&path);
        assert!(
            code == 0 || code == 3,
            "cs {cs}: qemu-img check exit {code} after ENOSPC:\n{report}"
        );
        let img = open_ro(&path);
        for &i in &ok {
            let mut buf = vec![0u8; MIB as usize];
            img.read_at(&mut buf, i * MIB).expect("read");
            assert_same_bytes(&buf, &chunk(i), &format!("cs {cs}: flushed chunk {i}"));
        }
        drop(img);
        // And oxcow can keep writing once there is room again.
        let img = open_rw(&path);
        let last = 31 * MIB;
        img.write_at(&chunk(31), last)
            .expect("write after room is back");
        img.close().expect("close");
        let (code, report) = qemu_img_check(&path);
        assert!(
            code == 0 || code == 3,
            "cs {cs}: check after recovery: {report}"
        );
    }
}
