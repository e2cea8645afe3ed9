//! A stale bitmaps extension (autoclear bit 0 clear: a program without bitmap support wrote
//! the image) is ignored like QEMU ignores it, dropped from the header at the first
//! read-write open with QEMU's hint delivered as an event, reported by `oxcow check`, and
//! after `check -r leaks` / `-r all` the image takes writes (they reuse the freed clusters).

mod common;

use common::bitmaps::*;
use common::malformed::{find_ext, put_be64};
use common::*;
use oxcow::{CorruptionEvent, Image, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Mutex};

const BITMAPS_EXT: u32 = 0x2385_2875;

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..Default::default()
    }
}

fn oxcow_cli(args: &[&str]) -> CmdOut {
    run(env!("CARGO_BIN_EXE_oxcow"), args)
}

/// An image with two bitmaps with data, then made stale.
fn stale_image(p: &Path) {
    qemu_create(p, 16 * MIB, "cluster_size=4096");
    qemu_img(&["bitmap", "--add", "-g", "512", path_str(p), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", path_str(p), "b1"]);
    qemu_io(p, &["write 0 8M".to_string()]);
    let autoclear = be64(p, 88);
    put_be64(p, 88, autoclear & !1);
}

#[test]
fn a_stale_extension_is_dropped_at_the_first_writable_open_with_qemus_hint() {
    let dir = TempDir::new("bm-stale");
    let p = dir.join("img.qcow2");
    stale_image(&p);
    let o = oxcow_cli(&["check", path_str(&p)]);
    assert!(
        o.stderr.contains("lacking bitmap support") && o.stderr.contains("check -r"),
        "no hint from oxcow check: {}",
        o.all()
    );
    let img = Image::open(&p, &OpenOptions::default()).expect("open read-only");
    assert!(
        img.bitmaps().expect("list").is_empty(),
        "stale bitmaps listed"
    );
    drop(img);
    assert!(
        find_ext(&p, BITMAPS_EXT).is_some(),
        "a read-only open wrote"
    );
    let img = Image::open(&p, &rw()).expect("open read-write");
    let seen: Arc<Mutex<Vec<CorruptionEvent>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    img.set_event_handler(Some(Arc::new(move |e: &CorruptionEvent| {
        s2.lock().unwrap().push(e.clone())
    })));
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].message.contains("check -r") && !events[0].fatal);
    assert!(
        find_ext(&p, BITMAPS_EXT).is_none(),
        "extension still in the header"
    );
    img.write_at(&[3; 4096], 9 * MIB).expect("write");
    img.close().expect("close");
    let (code, out) = qemu_img_check(&p);
    assert_eq!(code, 3, "the stale clusters are leaks: {out}");
}

#[test]
fn writes_after_check_repairs_of_a_stale_extension_work() {
    for repair in ["leaks", "all"] {
        let dir = TempDir::new("bm-stale-repair");
        let p = dir.join("img.qcow2");
        stale_image(&p);
        let img = Image::open(&p, &rw()).expect("open");
        img.write_at(&[1; 512], 0).expect("write");
        img.close().expect("close");
        let o = oxcow_cli(&["check", "-r", repair, path_str(&p)]);
        assert_eq!(o.code, 0, "check -r {repair}: {}", o.all());
        let img = Image::open(&p, &rw()).expect("reopen");
        // Allocating writes that reuse the freed bitmap clusters.
        for i in 0..64u64 {
            img.write_at(&[0x5a; 4096], 8 * MIB + i * 4096)
                .unwrap_or_else(|e| panic!("-r {repair}: write {i}: {e}"));
        }
        img.bitmap_add("fresh", Default::default()).expect("add");
        img.write_at(&[0x6b; 100], 12 * MIB).expect("write");
        img.close().expect("close");
        assert_check_clean(&p);
        assert_eq!(qemu_dirty_ranges(&p, "fresh"), vec![(12 * MIB, 4096)]);
        let o = qemu_io(&p, &["read -P 0x5a 8M 256k".to_string()]);
        assert!(o.stdout.contains("read 262144/262144"), "{}", o.all());
    }
}
