//! Crash points of a resize, with the host file simulated in memory: for every prefix of the
//! writes the resize makes (and reorderings of the writes between two syncs) the file must
//! pass `qemu-img check` with at worst leaks and hold either the old image (old size, old
//! bytes) or the new one (new size, old bytes inside it, zeros in the grown area); once the
//! resize has returned, the image is clean.

use super::Image;
use crate::engine::crash_tests::{durable_state, rw, state_at, Scratch};
use crate::storage::sim::{Event, SimFile};
use crate::storage::HostFile;
use crate::{CreateOptions, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run qemu tool");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The guest bytes of the image at `p`, read through oxcow.
fn guest(p: &Path) -> Vec<u8> {
    let img = Image::open(p, &OpenOptions::default()).expect("open crash state");
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut v, 0).expect("read crash state");
    v
}

/// One crash state: at worst leaks (`clean`: none), and the old or the new guest.
fn check_state(dir: &Path, bytes: &[u8], old: &[u8], new: &[u8], clean: bool, what: &str) {
    let p = dir.join("state.qcow2");
    std::fs::write(&p, bytes).expect("write state");
    // A lazy-refcounts image left dirty is repaired by the next read-write open (QEMU's
    // check would count the refcounts it has not written yet as corruptions).
    let dirty = bytes[4..8] == [0, 0, 0, 3] && bytes[79] & 1 == 1;
    if dirty {
        let img = Image::open(&p, &rw()).unwrap_or_else(|e| panic!("{what}: repairing open: {e}"));
        img.close().expect("close after repair");
    }
    let (code, out) = qemu(&["qemu-img", "check", "-q", p.to_str().expect("utf-8")]);
    let allowed: &[i32] = if clean { &[0] } else { &[0, 3] };
    assert!(
        allowed.contains(&code),
        "{what}: qemu-img check exit {code}: {out}"
    );
    let got = guest(&p);
    assert!(
        got == old || got == new,
        "{what}: guest of {} bytes is neither the old ({}) nor the new ({}) image",
        got.len(),
        old.len(),
        new.len()
    );
    if clean {
        assert!(
            got == new,
            "{what}: the completed resize left the old image"
        );
    }
}

/// Resizes the image at `path` (already prepared on disk) to `new_size` on a simulated file
/// and checks every crash point of the resize.
fn crash_points(dir: &Path, path: &Path, new_size: u64, shrink: bool, tag: &str) {
    let old = guest(path);
    let mut new = old.clone();
    new.resize(new_size as usize, 0);
    let sim = Arc::new(SimFile::new(std::fs::read(path).expect("read image")));
    let file = HostFile::new(sim.clone(), path.display().to_string());
    let img = Image::open_file(file, path, &rw(), 0).expect("open simulated image");
    let base = sim.contents();
    let start = sim.journal().len();
    img.resize(new_size, shrink).expect("resize");
    let journal = sim.journal()[start..].to_vec();
    std::mem::forget(img); // the process "dies" here
    assert!(journal.len() > 2, "{tag}: the resize wrote nothing");
    let mut mask = 0x9e37_79b9_7f4a_7c15u64;
    for k in 0..=journal.len() {
        let what = format!("{tag}: crash after {k}/{} journal entries", journal.len());
        let plain = state_at(&base, &journal, k, &|_| false);
        check_state(dir, &plain, &old, &new, false, &what);
        mask = mask.rotate_left(7) ^ (k as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
        let m = mask;
        let reordered = state_at(&base, &journal, k, &|i| m >> (i % 64) & 1 == 1);
        check_state(
            dir,
            &reordered,
            &old,
            &new,
            false,
            &format!("{what}, reordered"),
        );
        // Each single write since the last sync lost on its own.
        let last_sync = journal[..k]
            .iter()
            .rposition(|e| matches!(e, Event::Sync))
            .map_or(0, |i| i + 1);
        for lost in last_sync..k {
            let state = state_at(&base, &journal, k, &|i| i == lost);
            let what = format!("{what}, write {lost} lost");
            check_state(dir, &state, &old, &new, false, &what);
        }
    }
    let done = state_at(&base, &journal, journal.len(), &|_| false);
    check_state(
        dir,
        &done,
        &old,
        &new,
        true,
        &format!("{tag}: after the resize"),
    );
}

fn create_with_data(path: &Path, size: u64, opts: &CreateOptions, chunks: &[(u64, u64, u8)]) {
    crate::create(path, size, opts).expect("create");
    write_chunks(path, chunks);
}

#[test]
fn every_crash_point_of_a_growth_within_the_l1_table_leaves_old_or_new() {
    let dir = Scratch::new("resize-grow-in");
    let p = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 4096,
        ..Default::default()
    };
    create_with_data(
        &p,
        1 << 20,
        &opts,
        &[(0, 20000, 3), ((1 << 20) - 5000, 5000, 5)],
    );
    crash_points(&dir.0, &p, 3 << 19, false, "grow within the L1");
}

#[test]
fn every_crash_point_of_an_l1_relocation_leaves_old_or_new() {
    let dir = Scratch::new("resize-grow-past");
    let p = dir.0.join("img.qcow2");
    // 512-byte clusters: the L1 table of 1 MiB is one cluster, of 8 MiB four.
    let opts = CreateOptions {
        cluster_size: 512,
        ..Default::default()
    };
    create_with_data(&p, 1 << 20, &opts, &[(0, 3000, 7), (700_000, 40_000, 9)]);
    crash_points(&dir.0, &p, 8 << 20, false, "grow past the L1");
}

#[test]
fn every_crash_point_of_a_growth_over_a_longer_backing_leaves_old_or_new() {
    let dir = Scratch::new("resize-grow-backing");
    let base = dir.0.join("base.qcow2");
    create_with_data(
        &base,
        4 << 20,
        &CreateOptions::default(),
        &[(0, 4 << 20, 0x5a)],
    );
    let p = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 4096,
        backing_file: Some("base.qcow2".into()),
        backing_format: Some(crate::BackingFormat::Qcow2),
        ..Default::default()
    };
    create_with_data(&p, 1_000_448, &opts, &[(8192, 8192, 1)]);
    crash_points(&dir.0, &p, 3 << 20, false, "grow over a longer backing");
}

#[test]
fn every_crash_point_of_a_shrink_with_data_past_the_cut_leaves_old_or_new() {
    let dir = Scratch::new("resize-shrink");
    let p = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 4096,
        ..Default::default()
    };
    let size = 8 << 20;
    create_with_data(
        &p,
        size,
        &opts,
        &[
            (0, 10_000, 1),
            (3 << 20, 100_000, 2),
            (size - 70_000, 70_000, 3),
        ],
    );
    // A snapshot shares some of the clusters past the cut: they only lose a reference.
    let (code, out) = qemu(&[
        "qemu-img",
        "snapshot",
        "-c",
        "s1",
        p.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
    write_chunks(&p, &[(size - 8192, 8192, 4), (5 << 20, 4096, 6)]);
    crash_points(&dir.0, &p, (3 << 20) + 6144, true, "shrink");
    // And without the snapshot's references, on a fresh copy.
    let q = dir.0.join("plain.qcow2");
    create_with_data(&q, size, &opts, &[(0, 10_000, 1), (6 << 20, 300_000, 2)]);
    crash_points(&dir.0, &q, 1 << 20, true, "shrink, no snapshot");
}

/// Writes each `(offset, length, tag)` chunk (bytes `tag ^ i`) through `img`.
fn write_into(img: &Image, chunks: &[(u64, u64, u8)]) {
    for &(off, len, tag) in chunks {
        let buf: Vec<u8> = (0..len).map(|i| tag ^ (i as u8)).collect();
        img.write_at(&buf, off).expect("write");
    }
}

/// Writes the chunks into the image at `path` (see [`write_into`]) and closes it.
fn write_chunks(path: &Path, chunks: &[(u64, u64, u8)]) {
    let img = Image::open(path, &rw()).expect("open");
    write_into(&img, chunks);
    img.close().expect("close");
}

/// An I/O error at each write of a resize: the call may fail, the handle is then closed
/// (writing back what it can), and the file holds the old or the new image with at most
/// leaks; a crash right after leaves the same.
fn io_errors(dir: &Path, path: &Path, new_size: u64, shrink: bool, tag: &str) {
    let old = guest(path);
    let mut new = old.clone();
    new.resize(new_size as usize, 0);
    let base = std::fs::read(path).expect("read image");
    let writes = {
        let sim = Arc::new(SimFile::new(base.clone()));
        let file = HostFile::new(sim.clone(), path.display().to_string());
        let img = Image::open_file(file, path, &rw(), 0).expect("open simulated image");
        img.resize(new_size, shrink).expect("resize");
        drop(img);
        sim.journal()
            .iter()
            .filter(|e| matches!(e, Event::Write(..)))
            .count()
    };
    assert!(writes > 2, "{tag}: only {writes} writes");
    for n in 0..writes {
        let sim = Arc::new(SimFile::new(base.clone()));
        let file = HostFile::new(sim.clone(), path.display().to_string());
        let img = Image::open_file(file, path, &rw(), 0).expect("open simulated image");
        sim.fail_write_after(n as u64);
        let _ = img.resize(new_size, shrink);
        drop(img);
        let what = format!("{tag}: EIO at write {n}/{writes}");
        check_state(dir, &sim.contents(), &old, &new, false, &what);
        let durable = durable_state(&base, &sim.journal());
        check_state(
            dir,
            &durable,
            &old,
            &new,
            false,
            &format!("{what}, then a crash"),
        );
    }
}

#[test]
fn an_io_error_at_any_write_of_a_resize_leaves_old_or_new_with_at_most_leaks() {
    let dir = Scratch::new("resize-eio");
    let p = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 512,
        ..Default::default()
    };
    create_with_data(&p, 1 << 20, &opts, &[(0, 3000, 7), (700_000, 40_000, 9)]);
    io_errors(&dir.0, &p, 8 << 20, false, "grow past the L1");
    io_errors(&dir.0, &p, 600_064, true, "shrink");
}

#[test]
fn every_crash_point_of_a_resize_of_a_lazy_refcounts_image_is_repaired_to_old_or_new() {
    let dir = Scratch::new("resize-lazy");
    let p = dir.0.join("img.qcow2");
    let opts = CreateOptions {
        cluster_size: 512,
        lazy_refcounts: true,
        ..Default::default()
    };
    create_with_data(&p, 1 << 20, &opts, &[(0, 3000, 7), (700_000, 40_000, 9)]);
    // Leave it dirty (lazily counted writes not written back), as a running VM would.
    create_extra_dirty(&p, &[(900_000, 5000, 11)]);
    crash_points(&dir.0, &p, 8 << 20, false, "lazy: grow past the L1");
    let q = dir.0.join("shrink.qcow2");
    create_with_data(&q, 4 << 20, &opts, &[(0, 3000, 7), (3 << 20, 100_000, 9)]);
    crash_points(&dir.0, &q, 1 << 20, true, "lazy: shrink");
}

/// Writes and flushes through a handle, then leaves the file as a crash before the clean close
/// would have: lazily counted, dirty.
fn create_extra_dirty(path: &Path, chunks: &[(u64, u64, u8)]) {
    let img = Image::open(path, &rw()).expect("open");
    write_into(&img, chunks);
    img.flush().expect("flush");
    // The file as a crash would leave it (dirty bit set), restored after the clean close.
    let dirty = std::fs::read(path).expect("read dirty image");
    assert_eq!(dirty[79] & 1, 1, "the image is not dirty");
    drop(img);
    std::fs::write(path, dirty).expect("restore dirty image");
}
