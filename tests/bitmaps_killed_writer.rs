//! A writer killed (SIGKILL) while it tracks bitmaps leaves them in use: QEMU shows them
//! in-use, oxcow reports them inconsistent, refuses to use them (Busy) and can remove them;
//! nothing else is damaged (at worst leaked clusters).

mod common;

use common::bitmaps::*;
use common::*;
use oxcow::{ErrorKind, Image, OpenOptions, BITMAP_ENABLED, BITMAP_INCONSISTENT};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "OXCOW_BITMAP_KILL_CHILD";

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

/// Child process body: writes in a loop, flushing now and then, printing `FLUSHED` after each
/// flush.
#[test]
#[ignore = "entry point of the child process of the killed-writer test"]
fn bitmap_kill_child_workload() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = Image::open(&path, &rw()).expect("child open");
    let chunks = img.virtual_size() / 65536;
    let mut n = 0u64;
    loop {
        let off = (n * 7919 % chunks) * 65536;
        img.write_at(&[n as u8 | 1; 4096], off)
            .expect("child write");
        n += 1;
        if n % 16 == 0 {
            img.flush().expect("child flush");
            println!("FLUSHED");
        }
    }
}

#[test]
fn killed_writer_leaves_bitmaps_in_use_and_oxcow_refuses_them_but_can_remove_them() {
    killed_writer("cluster_size=65536");
}

#[test]
fn killed_lazy_refcounts_writer_is_repaired_and_keeps_its_bitmaps_in_use() {
    killed_writer("cluster_size=65536,lazy_refcounts=on");
}

fn killed_writer(opts: &str) {
    let dir = TempDir::new("bm-kill");
    let p = dir.join("img.qcow2");
    qemu_create(&p, 32 * MIB, opts);
    qemu_img(&["bitmap", "--add", path_str(&p), "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", path_str(&p), "b1"]);
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "bitmap_kill_child_workload",
            "--nocapture",
        ])
        .env(CHILD_ENV, &p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut flushes = 0;
    while flushes < 5 {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("FLUSHED") => flushes += 1,
            Some(Ok(_)) => {}
            _ => panic!("child exited early"),
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    let flags: Vec<Vec<String>> = qemu_bitmaps(&p).into_iter().map(|b| b.2).collect();
    assert!(
        flags.iter().all(|f| f.contains(&"in-use".to_string())),
        "QEMU does not see the bitmaps in use: {flags:?}"
    );
    assert_check_no_corruption(&p, "after the kill");

    let img = Image::open(&p, &rw()).expect("open after the kill");
    let list = img.bitmaps().expect("list");
    assert_eq!(list.len(), 2);
    for b in &list {
        assert!(b.flags & BITMAP_INCONSISTENT != 0, "{b:?}");
        assert!(b.flags & BITMAP_ENABLED == 0, "{b:?}");
    }
    let busy = |r: oxcow::Result<()>| r.expect_err("an inconsistent bitmap was used").kind();
    assert_eq!(busy(img.bitmap_enable("b0")), ErrorKind::Busy);
    assert_eq!(busy(img.bitmap_clear("b0")), ErrorKind::Busy);
    assert_eq!(busy(img.bitmap_merge("b1", "b0")), ErrorKind::Busy);
    assert_eq!(
        img.bitmap_status("b0", 0, 1).expect_err("status").kind(),
        ErrorKind::Busy
    );
    // Oracle: `qemu-img resize` refuses too ("Bitmap 'b0' is inconsistent and cannot be
    // used"), and leaves the size alone.
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&p, &copy).expect("copy");
    let q = run("qemu-img", &["resize", path_str(&copy), "+1M"]);
    assert!(
        q.code != 0 && q.stderr.contains("is inconsistent"),
        "{}",
        q.all()
    );
    assert_eq!(busy(img.resize(33 * MIB, false)), ErrorKind::Busy);
    assert_eq!(img.virtual_size(), 32 * MIB);
    // The disk stays writable; the inconsistent bitmaps are not tracked and stay in use.
    img.write_at(&[9; 512], 0).expect("write");
    img.bitmap_remove("b0")
        .expect("remove an inconsistent bitmap");
    img.close().expect("close");
    let left = qemu_bitmaps(&p);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, "b1");
    assert!(left[0].2.contains(&"in-use".to_string()));
    assert_check_no_corruption(&p, "after the remove");
    // QEMU can remove the other one too, and the image ends clean once leaks are repaired.
    qemu_img(&["bitmap", "--remove", path_str(&p), "b1"]);
    qemu_img(&["check", "-r", "leaks", path_str(&p)]);
    assert_check_clean(&p);
}
