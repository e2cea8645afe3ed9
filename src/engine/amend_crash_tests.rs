//! Crash points of amend (refcount width rewrite, compat changes, lazy refcounts) and of a
//! safe rebase, on the simulated host file: every prefix of the write sequence and
//! reorderings between syncs must leave an image that `qemu-img check` finds clean or with
//! leaks only, and that reads exactly as before (neither operation changes guest content).

use super::amend::{amend_file, AmendOptions};
use super::crash_tests::{each_crash_state, open_sim, Rng, Scratch};
use super::Image;
use crate::storage::sim::SimFile;
use crate::storage::HostFile;
use crate::OpenOptions;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// A chain in the scratch directory: old.qcow2 (data), new.qcow2 (other data) and
/// top.qcow2 over old with data, zero clusters (one zero-allocated) and a snapshot.
const SETUP: &str = "qemu-img create -q -f qcow2 old.qcow2 2M
    qemu-io -c 'write -P 1 0 1M' old.qcow2 >/dev/null
    qemu-img create -q -f qcow2 new.qcow2 2M
    qemu-io -c 'write -P 2 512k 128k' new.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b old.qcow2 -F qcow2 top.qcow2
    qemu-io -c 'write -P 3 0 64k' top.qcow2 >/dev/null
    qemu-img snapshot -c s1 top.qcow2
    qemu-io -c 'write -P 4 64k 128k' -c 'write -P 5 1536k 64k' -c 'write -z 1536k 64k' top.qcow2 >/dev/null";

/// The same without a backing file (a downgrade refuses zero clusters over one).
const SETUP_ALONE: &str = "qemu-img create -q -f qcow2 top.qcow2 2M
    qemu-io -c 'write -P 3 0 64k' -c 'write -z 64k 64k' top.qcow2 >/dev/null
    qemu-img snapshot -c s1 top.qcow2
    qemu-io -c 'write -P 4 128k 128k' -c 'write -P 5 1536k 64k' -c 'write -z 1536k 64k' top.qcow2 >/dev/null";

fn setup(dir: &Path, script: &str) -> Vec<u8> {
    let out = Command::new("sh")
        .args(["-c", &format!("set -e; {script}")])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.join("top.qcow2")).expect("read top")
}

fn guest(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::default()).expect("open");
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut v, 0).expect("read");
    v
}

/// Writes `bytes` as state.qcow2 next to the chain; checks it and its guest content.
fn check_state(dir: &Path, bytes: &[u8], want: &[u8], what: &str) {
    let p = dir.join("state.qcow2");
    std::fs::write(&p, bytes).expect("write state");
    crate::engine::crash_tests::assert_qemu_check(&p, &[0, 3], what);
    assert!(guest(&p) == want, "{what}: the guest content changed");
}

fn amend_crash(tag: &str, script: &str, opts: AmendOptions) {
    let dir = Scratch::new(tag);
    let base = setup(&dir.0, script);
    let path = dir.0.join("top.qcow2");
    let want = guest(&path);
    let sim = Arc::new(SimFile::new(base.clone()));
    let file = HostFile::new(sim.clone(), path.display().to_string());
    amend_file(&file, &opts).unwrap_or_else(|e| panic!("{tag}: amend: {e}"));
    let journal = sim.journal();
    let mut rng = Rng(0x5eed);
    let states = each_crash_state(
        &base,
        &journal,
        60,
        |_| rng.next(),
        |bytes, what| check_state(&dir.0, bytes, &want, &format!("{tag}: {what}")),
    );
    assert!(states >= 4, "{tag}: too few crash states ({states})");
}

#[test]
fn amend_crash_points_leave_the_old_or_the_new_image() {
    let rc = |bits| AmendOptions {
        refcount_bits: Some(bits),
        ..Default::default()
    };
    amend_crash("amend-rc64", SETUP, rc(64));
    amend_crash("amend-rc2", SETUP, rc(2));
    let compat = |v| AmendOptions {
        version: Some(v),
        ..Default::default()
    };
    amend_crash("amend-v2", SETUP_ALONE, compat(2));
    // Zero clusters over a backing file, in a table shared with a snapshot and not.
    let zeros = "qemu-img create -q -f qcow2 old.qcow2 2M
        qemu-io -c 'write -P 1 0 2M' old.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -b old.qcow2 -F qcow2 top.qcow2
        qemu-io -c 'write -P 3 0 64k' -c 'write -z 128k 64k' top.qcow2 >/dev/null
        qemu-img snapshot -c s1 top.qcow2
        qemu-io -c 'write -z 1M 128k' top.qcow2 >/dev/null";
    amend_crash("amend-v2-backing", zeros, compat(2));
    let both = AmendOptions {
        version: Some(3),
        refcount_bits: Some(8),
        lazy_refcounts: Some(true),
        size: None,
    };
    let v2 = format!("{SETUP_ALONE}\nqemu-img amend -o compat=0.10 top.qcow2");
    amend_crash("amend-v3", &v2, both);
}

#[test]
fn safe_rebase_crash_points_keep_the_guest_content() {
    for (tag, target) in [
        ("rebase-new", Some(("new.qcow2", "qcow2"))),
        ("rebase-none", None),
    ] {
        let dir = Scratch::new(tag);
        let base = setup(&dir.0, SETUP);
        let path = dir.0.join("top.qcow2");
        let want = guest(&path);
        let (sim, img) = open_sim(base.clone(), &path);
        img.rebase(target, false)
            .unwrap_or_else(|e| panic!("{tag}: rebase: {e}"));
        let journal = sim.journal();
        drop(img);
        let mut rng = Rng(0xbead);
        let states = each_crash_state(
            &base,
            &journal,
            60,
            |_| rng.next(),
            |bytes, what| check_state(&dir.0, bytes, &want, &format!("{tag}: {what}")),
        );
        assert!(states >= 4, "{tag}: too few crash states ({states})");
    }
}
