//! Commit failure paths on real files: the base locked by another process (-EAGAIN) and the
//! base replaced on disk since the open (-ESTALE) change nothing, leave the handle usable on
//! its old chain, and a retry once the cause is gone succeeds.

mod common;

use common::*;
use oxcow::{CommitOptions, Image};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const EAGAIN: i32 = 11;
const ESTALE: i32 = 116;

/// base.qcow2 (0x11 in the first MiB) <- top.qcow2 (0x22 at 512 KiB, 256 KiB).
fn chain(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create_with_data(&base, 2 * MIB, "", 0x11, MIB);
    qemu_create_overlay(&top, None, "", "base.qcow2", "qcow2");
    qemu_io(&top, &["write -P 0x22 512k 256k".to_string()]);
    (base, top)
}

/// A qemu-io process holding `path` open read-only (which denies writers, as QEMU's
/// read-only users do), until killed.
fn qemu_io_holding(path: &Path) -> Child {
    // Counted before the spawn: qemu-io may take its locks before we look.
    let before = locks_on(path);
    let mut child = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "sleep 60000", path_str(path)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    // Wait until it holds its locks (more OFD locks on the file than before).
    // Generous: the machine may be busy.
    for _ in 0..3000 {
        if locks_on(path) > before {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "qemu-io exited ({status}) before locking {}",
                path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-io did not lock {}", path.display());
}

/// How many locks /proc/locks lists on the file at `path`.
fn locks_on(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("stat").ino();
    let locks = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
    let suffix = format!(":{ino} ");
    locks.lines().filter(|l| l.contains(&suffix)).count()
}

fn guest(img: &Image) -> Vec<u8> {
    oxcow_read_all(img)
}

#[test]
fn commit_into_a_base_locked_by_qemu_io_fails_with_eagain_and_changes_nothing() {
    let dir = TempDir::new("commit-eagain");
    let (base, top) = chain(&dir);
    let img = open_rw(&top);
    let before = (read_file(&base), read_file(&top), guest(&img));
    let mut holder = qemu_io_holding(&base);
    let e = img
        .commit(&CommitOptions::default())
        .expect_err("the base is locked");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(e.errno(), EAGAIN, "{e}");
    assert_eq!(read_file(&base), before.0, "base changed");
    assert_eq!(read_file(&top), before.1, "top changed");
    // The handle still works on its chain, and a retry succeeds once the lock is gone.
    assert_eq!(guest(&img), before.2);
    img.write_at(&[0x33; 4096], 0)
        .expect("write after the failure");
    img.commit(&CommitOptions::default())
        .expect("retry after the lock is gone");
    let want = guest(&img);
    img.close().expect("close");
    assert_check_clean(&base);
    assert_check_clean(&top);
    let b = open_ro(&base);
    assert_eq!(&guest(&b)[..want.len()], &want[..]);
}

#[test]
fn commit_into_a_base_replaced_on_disk_fails_with_estale_and_changes_nothing() {
    let dir = TempDir::new("commit-estale");
    let (base, top) = chain(&dir);
    let img = open_rw(&top);
    let want = guest(&img);
    // Another file renamed over the base's name while the chain is open.
    let other = dir.join("other.qcow2");
    qemu_create_with_data(&other, 2 * MIB, "", 0x77, MIB);
    std::fs::rename(&other, &base).expect("rename over the base");
    let before = (read_file(&base), read_file(&top));
    let e = img
        .commit(&CommitOptions::default())
        .expect_err("the base was replaced");
    assert_eq!(e.errno(), ESTALE, "{e}");
    assert_eq!(
        read_file(&base),
        before.0,
        "the file now named base changed"
    );
    assert_eq!(read_file(&top), before.1, "top changed");
    assert_eq!(guest(&img), want, "the handle lost its chain");
    img.close().expect("close");
    assert_check_clean(&base);
    assert_check_clean(&top);
}

#[test]
fn commit_of_an_image_without_backing_file_or_with_a_base_not_in_the_chain_is_einval() {
    let dir = TempDir::new("commit-einval");
    let (base, top) = chain(&dir);
    let b = open_rw(&base);
    let e = b.commit(&CommitOptions::default()).expect_err("no backing");
    assert_eq!(e.errno(), 22);
    assert!(
        e.to_string().contains("does not have a backing file"),
        "{e}"
    );
    drop(b);
    let img = open_rw(&top);
    let e = img
        .commit(&CommitOptions {
            base: Some(dir.join("nowhere.qcow2")),
            ..Default::default()
        })
        .expect_err("not in the chain");
    assert_eq!(e.errno(), 22);
    assert!(e.to_string().contains("Did not find"), "{e}");
}

#[test]
fn commit_on_a_read_only_handle_is_erofs() {
    let dir = TempDir::new("commit-erofs");
    let (_, top) = chain(&dir);
    let img = open_ro(&top);
    let e = img
        .commit(&CommitOptions::default())
        .expect_err("read-only");
    assert_eq!(e.errno(), 30);
}
