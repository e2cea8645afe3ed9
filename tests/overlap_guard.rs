//! The metadata-overlap guard: on images damaged on purpose so that the engine would write
//! over metadata, every such write is stopped with -EIO, the image is marked corrupt and the
//! handle fenced, the caller's handler receives a structured event, the protected metadata
//! bytes are unchanged and `qemu-img info` reports `corrupt: true`. A read-only image reports
//! once and writes nothing. Mode `none` lets the same write through (the guard is what stops
//! it).

mod common;

use common::*;
use oxcow::{CorruptionEvent, Image, OpenOptions, OverlapCheck};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1024 * 1024;
const CS: u64 = 65536;
const EIO: i32 = 5;
const EUCLEAN: i32 = 117;
const ENOMEDIUM: i32 = 123;
const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A v3 image with data in guest clusters 0..4 and 48..50 (so an L2 table exists).
fn base(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, 64 * MIB, "cluster_size=65536");
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 256k".to_string(),
            "write -P 0x22 3M 128k".to_string(),
        ],
    );
    p
}

struct Layout {
    l1: u64,
    l2: u64,
    reftable: u64,
    refblock: u64,
}

fn layout(p: &Path) -> Layout {
    let l1 = be64(p, 40);
    let l2 = be64(p, l1) & OFFSET_MASK;
    let reftable = be64(p, 48);
    let refblock = be64(p, reftable) & OFFSET_MASK;
    Layout {
        l1,
        l2,
        reftable,
        refblock,
    }
}

fn rw_with_events(p: &Path, mode: OverlapCheck) -> (Image, Arc<Mutex<Vec<CorruptionEvent>>>) {
    let img = Image::open(
        p,
        &OpenOptions {
            writable: true,
            overlap_check: mode,
            ..Default::default()
        },
    )
    .expect("open rw");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    img.set_event_handler(Some(Arc::new(move |e: &CorruptionEvent| {
        sink.lock().expect("events").push(e.clone());
    })));
    (img, events)
}

/// Checks the consequences of one prevented write: -EIO, one fatal event naming `structure`
/// at `target`, fenced handle, corrupt bit on disk (and in `qemu-img info`), and the bytes of
/// every protected cluster in `keep` unchanged.
#[allow(clippy::too_many_arguments)] // one call per scenario; a struct would only rename them
fn assert_prevented(
    name: &str,
    p: &Path,
    img: Image,
    result: oxcow::Result<()>,
    events: &Mutex<Vec<CorruptionEvent>>,
    structure: &str,
    target: u64,
    keep: &[(u64, Vec<u8>)],
) {
    let e = result.expect_err(&format!("{name}: the write over metadata succeeded"));
    assert_eq!(e.errno(), EIO, "{name}: {e}");
    assert!(
        e.to_string().contains(structure),
        "{name}: message does not name {structure}: {e}"
    );
    let ev = events.lock().expect("events").clone();
    assert_eq!(ev.len(), 1, "{name}: expected exactly one event: {ev:?}");
    assert!(
        ev[0].fatal,
        "{name}: event on a writable image must be fatal"
    );
    assert!(
        ev[0].message.contains(structure),
        "{name}: event message: {}",
        ev[0].message
    );
    let (off, size) = (
        ev[0].host_offset.expect("offset"),
        ev[0].size.expect("size"),
    );
    assert!(
        off < target + CS && target < off + size,
        "{name}: event range {off:#x}+{size} does not cover {target:#x}"
    );
    // Fenced: nothing more is accepted, reads included.
    let mut b = [0u8; 512];
    assert_eq!(
        img.read_at(&mut b, 0).expect_err("fenced read").errno(),
        ENOMEDIUM
    );
    assert_eq!(
        img.write_at(&b, 0).expect_err("fenced write").errno(),
        ENOMEDIUM
    );
    assert_eq!(
        events.lock().expect("events").len(),
        1,
        "{name}: a second event"
    );
    drop(img); // releases the locks, so QEMU can look
    for (at, bytes) in keep {
        let mut now = peek(p, *at, bytes.len());
        if *at == 0 {
            // The corrupt bit (incompatible features, bytes 72..80) is the one allowed change.
            now[72..80].copy_from_slice(&bytes[72..80]);
        }
        assert!(
            &now == bytes,
            "{name}: protected metadata at {at:#x} changed"
        );
    }
    let info = qemu_info(p);
    assert!(
        info.get("format-specific")
            .get("data")
            .get("corrupt")
            .as_bool(),
        "{name}: qemu-img info does not report corrupt"
    );
    let e = Image::open(
        p,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap_or_else(|| panic!("{name}: a corrupt image opened read-write"));
    assert_eq!(e.errno(), EUCLEAN, "{name}: {e}");
    assert!(e.to_string().contains("check -r all"), "{name}: {e}");
}

fn cluster(p: &Path, off: u64) -> (u64, Vec<u8>) {
    (off, peek(p, off, CS as usize))
}

#[test]
fn guest_write_into_a_cluster_mapped_onto_a_refcount_block_is_stopped() {
    let dir = TempDir::new("og-refblock");
    let p = base(&dir, "a.qcow2");
    let l = layout(&p);
    // Guest cluster 1 now claims to live in the refcount block (owned: COPIED set).
    put(&p, l.l2 + 8, COPIED | l.refblock);
    let keep = vec![cluster(&p, l.refblock), cluster(&p, l.l1), cluster(&p, 0)];
    let (img, events) = rw_with_events(&p, OverlapCheck::All);
    let r = img.write_at(&[0xee; 4096], CS + 100);
    assert_prevented(
        "refblock",
        &p,
        img,
        r,
        &events,
        "refcount block",
        l.refblock,
        &keep,
    );
}

#[test]
fn guest_write_into_a_cluster_mapped_onto_the_l1_table_or_refcount_table_is_stopped() {
    for (name, structure) in [("l1", "active L1 table"), ("reftable", "refcount table")] {
        let dir = TempDir::new(&format!("og-{name}"));
        let p = base(&dir, "a.qcow2");
        let l = layout(&p);
        let target = if name == "l1" { l.l1 } else { l.reftable };
        put(&p, l.l2 + 2 * 8, COPIED | target);
        let keep = vec![cluster(&p, target), cluster(&p, 0)];
        let (img, events) = rw_with_events(&p, OverlapCheck::All);
        let r = img.write_at(&[0xee; 100], 2 * CS + 7);
        assert_prevented(name, &p, img, r, &events, structure, target, &keep);
    }
}

#[test]
fn l1_entry_pointing_at_the_l1_table_itself_cannot_make_l2_writeback_clobber_it() {
    let dir = TempDir::new("og-l1-self");
    let p = base(&dir, "a.qcow2");
    let l = layout(&p);
    // The second L1 entry (guest 512 MiB.. with 64K clusters: out of this 64M disk), so use
    // entry 0 instead and redirect its L2 table to the L1 table itself.
    put(&p, l.l1, COPIED | l.l1);
    let keep = vec![cluster(&p, l.l1), cluster(&p, 0)];
    let (img, events) = rw_with_events(&p, OverlapCheck::All);
    // The write allocates a data cluster and links it in the "L2 table" (the L1); the
    // write-back of that table is what the guard must stop.
    let r = img
        .write_at(&[0x5a; 512], 40 * CS)
        .and_then(|()| img.flush());
    assert_prevented(
        "l1-self",
        &p,
        img,
        r,
        &events,
        "active L1 table",
        l.l1,
        &keep,
    );
}

#[test]
fn writes_into_a_snapshot_l2_table_are_stopped() {
    let dir = TempDir::new("og-snap-l2");
    let p = base(&dir, "a.qcow2");
    run_ok("qemu-img", &["snapshot", "-c", "s1", path_str(&p)]);
    // After the snapshot, a write makes the active L1 get its own copy of the L2 table.
    qemu_io(&p, &["write -P 0x33 5M 64k".to_string()]);
    let l = layout(&p);
    let snap_l2 = snapshot_l2(&p);
    assert_ne!(snap_l2, l.l2, "setup: the active L2 table is still shared");
    put(&p, l.l2 + 3 * 8, COPIED | snap_l2);
    let keep = vec![cluster(&p, snap_l2)];
    let (img, events) = rw_with_events(&p, OverlapCheck::All);
    let r = img.write_at(&[0xee; 4096], 3 * CS);
    assert_prevented(
        "snapshot-l2",
        &p,
        img,
        r,
        &events,
        "inactive L2 table",
        snap_l2,
        &keep,
    );
}

/// The first L2 table of the first snapshot.
fn snapshot_l2(p: &Path) -> u64 {
    let snapshots = be64(p, 64);
    let snap_l1 = be64(p, snapshots);
    be64(p, snap_l1) & OFFSET_MASK
}

fn put(p: &Path, at: u64, v: u64) {
    poke(p, at, &v.to_be_bytes());
}

#[test]
fn mode_none_lets_the_same_write_through_and_cached_skips_snapshot_tables() {
    // Proves it is the guard that stops the writes above: without it the data lands in the
    // refcount block (a corruption qemu-img check then reports).
    let dir = TempDir::new("og-none");
    let p = base(&dir, "a.qcow2");
    let l = layout(&p);
    put(&p, l.l2 + 8, COPIED | l.refblock);
    let before = peek(&p, l.refblock, 4096);
    let (img, events) = rw_with_events(&p, OverlapCheck::None);
    img.write_at(&[0xee; 4096], CS).expect("unguarded write");
    img.close().expect("close");
    assert!(events.lock().expect("events").is_empty());
    assert_ne!(peek(&p, l.refblock, 4096), before, "the write did not land");

    let p = base(&dir, "b.qcow2");
    run_ok("qemu-img", &["snapshot", "-c", "s1", path_str(&p)]);
    qemu_io(&p, &["write -P 0x33 5M 64k".to_string()]);
    let l = layout(&p);
    let snap_l2 = snapshot_l2(&p);
    put(&p, l.l2 + 3 * 8, COPIED | snap_l2);
    let (img, _events) = rw_with_events(&p, OverlapCheck::Cached);
    img.write_at(&[0xee; 512], 3 * CS)
        .expect("cached mode does not protect snapshot L2 tables, like QEMU");
    // Switching to `all` at runtime protects them again.
    img.set_overlap_check(OverlapCheck::All);
    let e = img
        .write_at(&[0xee; 512], 3 * CS + 512)
        .expect_err("all mode");
    assert_eq!(e.errno(), EIO);
}

#[test]
fn read_only_image_reports_an_inconsistency_once_and_writes_nothing() {
    let dir = TempDir::new("og-ro");
    let p = base(&dir, "a.qcow2");
    let l = layout(&p);
    // Unaligned data cluster offsets in two L2 entries.
    let e0 = be64(&p, l.l2);
    put(&p, l.l2, e0 + 0x200);
    let e1 = be64(&p, l.l2 + 8);
    put(&p, l.l2 + 8, e1 + 0x200);
    let before = read_file(&p);
    let img = Image::open(&p, &OpenOptions::default()).expect("open ro");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let img = Arc::new(img);
    let again = Arc::clone(&img);
    img.set_event_handler(Some(Arc::new(move |e: &CorruptionEvent| {
        // A handler may call back into the image.
        let _ = again.info();
        sink.lock().expect("events").push(e.clone());
    })));
    let mut b = vec![0u8; 4096];
    assert_eq!(
        img.read_at(&mut b, 0).expect_err("unaligned entry").errno(),
        EIO
    );
    assert_eq!(
        img.read_at(&mut b, CS)
            .expect_err("unaligned entry")
            .errno(),
        EIO
    );
    // Other data still reads.
    img.read_at(&mut b, 3 * MIB).expect("read of intact data");
    assert!(b.iter().all(|&x| x == 0x22));
    let ev = events.lock().expect("events").clone();
    assert_eq!(ev.len(), 1, "a read-only image reports once: {ev:?}");
    assert!(!ev[0].fatal);
    assert!(ev[0].message.contains("unaligned"), "{}", ev[0].message);
    assert_eq!(read_file(&p), before, "a read-only image was modified");
}

/// A version-2 overlay of a raw template with data in guest clusters 0..4 and 48..50: the
/// backing format extension sits at bytes 72.. and the name right after it, where version 3
/// has its feature fields.
fn base_v2(dir: &TempDir) -> PathBuf {
    let template = dir.join("template.raw");
    std::fs::write(&template, vec![0x42; 4 * MIB as usize]).expect("template");
    let p = dir.join("v2.qcow2");
    qemu_create(
        &p,
        64 * MIB,
        "compat=0.10,backing_file=template.raw,backing_fmt=raw",
    );
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 256k".to_string(),
            "write -P 0x22 3M 128k".to_string(),
        ],
    );
    p
}

/// One fatal event saying that nothing could be recorded, the handle fenced, and not a byte
/// of the file changed (QEMU writes nothing to a version-2 image either).
fn assert_fenced_in_memory_only(
    name: &str,
    p: &Path,
    img: Image,
    result: oxcow::Result<()>,
    events: &Mutex<Vec<CorruptionEvent>>,
    before: &[u8],
) {
    let e = result.expect_err(&format!("{name}: the write succeeded"));
    assert_eq!(e.errno(), EIO, "{name}: {e}");
    let ev = events.lock().expect("events").clone();
    assert_eq!(ev.len(), 1, "{name}: {ev:?}");
    assert!(ev[0].fatal, "{name}");
    assert!(
        ev[0].message.contains("could not be recorded on disk"),
        "{name}: {}",
        ev[0].message
    );
    let mut b = [0u8; 512];
    assert_eq!(img.write_at(&b, 0).expect_err("fenced").errno(), ENOMEDIUM);
    assert_eq!(
        img.read_at(&mut b, 0).expect_err("fenced").errno(),
        ENOMEDIUM
    );
    drop(img);
    assert!(read_file(p) == before, "{name}: the version-2 file changed");
    let info = qemu_info(p);
    assert_eq!(
        info.get("backing-filename").as_str(),
        "template.raw",
        "{name}"
    );
    assert_eq!(
        info.get("backing-filename-format").as_str(),
        "raw",
        "{name}"
    );
}

#[test]
fn a_prevented_write_on_a_version_2_image_fences_it_in_memory_and_changes_no_byte() {
    let dir = TempDir::new("og-v2-guard");
    let p = base_v2(&dir);
    let l = layout(&p);
    put(&p, l.l2 + 8, COPIED | l.refblock);
    let before = read_file(&p);
    let (img, events) = rw_with_events(&p, OverlapCheck::All);
    let r = img.write_at(&[0xee; 4096], CS + 100);
    assert_fenced_in_memory_only("guard", &p, img, r, &events, &before);
}

#[test]
fn a_runtime_inconsistency_on_a_version_2_image_fences_it_in_memory_and_changes_no_byte() {
    let dir = TempDir::new("og-v2-runtime");
    let p = base_v2(&dir);
    let l = layout(&p);
    let e0 = be64(&p, l.l2);
    put(&p, l.l2, e0 + 0x200);
    let before = read_file(&p);
    let (img, events) = rw_with_events(&p, OverlapCheck::All);
    let r = img.write_at(&[0xee; 100], 10);
    assert_fenced_in_memory_only("unaligned", &p, img, r, &events, &before);
}
