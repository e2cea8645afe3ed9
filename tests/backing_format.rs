//! Backing formats are obeyed, never guessed when recorded: the format-probing attack.
//!
//! A guest can write anything to its raw disk, including bytes that look like a qcow2 header
//! naming a host file as its backing file. When that raw disk becomes the backing file of an
//! overlay whose header records "raw", the overlay's guest must see those bytes as data, never
//! as an image to follow (QEMU's behaviour on the same files is the oracle). Only a chain that
//! records no format is probed, as QEMU probes it; OXCOW_OPEN_NO_PROBE refuses such a chain.

mod common;

use common::*;
use oxcow::{Image, OpenOptions};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const ENOTSUP: i32 = 95;

/// The files of one attack: a host file the attacker wants to read, a raw guest disk whose
/// first bytes are a qcow2 image (optionally naming that host file as its backing file), and
/// overlays of the raw disk.
struct Attack {
    dir: TempDir,
    raw_disk: PathBuf,
}

impl Attack {
    fn new(tag: &str, inner_names_secret: bool) -> Attack {
        let dir = TempDir::new(tag);
        let secret = dir.join("secret.raw");
        std::fs::write(&secret, vec![0x5e; SIZE as usize]).expect("secret");
        let inner = dir.join("inner.qcow2");
        if inner_names_secret {
            let backing = format!("backing_file={},backing_fmt=raw", path_str(&secret));
            qemu_create(&inner, SIZE, &backing);
        } else {
            qemu_create(&inner, SIZE, "");
        }
        qemu_io(&inner, &["write -P 0x1c 1M 64k".to_string()]);
        // The guest writes the image into its raw disk, which is bigger than the image.
        let mut disk = read_file(&inner);
        disk.resize(SIZE as usize, 0x77);
        let raw_disk = dir.join("disk.raw");
        std::fs::write(&raw_disk, &disk).expect("raw disk");
        Attack { dir, raw_disk }
    }

    /// An overlay of the raw disk with qcow2 version `compat` ("0.10" or "1.1"), recording
    /// `-F raw`.
    fn overlay(&self, compat: &str) -> PathBuf {
        let p = self.dir.join(&format!("overlay-{compat}.qcow2"));
        let opts = format!("compat={compat}");
        qemu_create_overlay(&p, None, &opts, path_str(&self.raw_disk), "raw");
        p
    }
}

fn guest_view(p: &Path) -> Vec<u8> {
    oxcow_read_all(&open_ro(p))
}

fn no_probe() -> OpenOptions {
    OpenOptions {
        no_probe: true,
        ..Default::default()
    }
}

#[test]
fn a_recorded_raw_backing_format_is_obeyed_on_version_2_and_3() {
    for inner_names_secret in [false, true] {
        let attack = Attack::new("fmt-raw", inner_names_secret);
        let raw_bytes = read_file(&attack.raw_disk);
        for compat in ["0.10", "1.1"] {
            let ov = attack.overlay(compat);
            let what = format!("compat={compat}, inner backing file: {inner_names_secret}");
            // Oracle: QEMU reads the raw bytes.
            let qemu = qemu_to_raw(&ov, "qcow2", &attack.dir);
            assert_same_bytes(&qemu, &raw_bytes, &format!("{what}: qemu's view"));
            assert_same_bytes(&guest_view(&ov), &raw_bytes, &what);
            // The format is recorded, so a caller that forbids probing opens it too.
            let img = Image::open(&ov, &no_probe()).expect("recorded format, no probe");
            assert_eq!(
                img.info().expect("info").backing_format.as_deref(),
                Some("raw")
            );
        }
    }
}

#[test]
fn version_2_extensions_are_read_and_kept() {
    let attack = Attack::new("fmt-v2-ext", false);
    let ov = attack.overlay("0.10");
    let img = open_rw(&ov);
    let info = img.info().expect("info");
    assert_eq!(info.version, 2);
    assert_eq!(info.backing_format.as_deref(), Some("raw"));
    img.write_at(&[0xab; 4096], MIB).expect("write");
    img.close().expect("close");
    // qemu-img still sees the recorded format after oxcow wrote to the image.
    let q = qemu_info(&ov);
    assert_eq!(q.get("backing-filename-format").as_str(), "raw");
    assert_check_clean(&ov);
}

#[test]
fn oxcow_created_version_2_overlays_record_their_backing_format() {
    let attack = Attack::new("fmt-v2-create", true);
    let ov = attack.dir.join("ox-v2.qcow2");
    let opts = oxcow::CreateOptions {
        version: 2,
        backing_file: Some(path_str(&attack.raw_disk).to_string()),
        backing_format: Some(oxcow::BackingFormat::Raw),
        ..Default::default()
    };
    oxcow::create(&ov, SIZE, &opts).expect("create v2 overlay");
    let q = qemu_info(&ov);
    assert_eq!(q.get("backing-filename-format").as_str(), "raw");
    assert_check_clean(&ov);
    let raw_bytes = read_file(&attack.raw_disk);
    assert_same_bytes(&qemu_to_raw(&ov, "qcow2", &attack.dir), &raw_bytes, "qemu");
    assert_same_bytes(&guest_view(&ov), &raw_bytes, "oxcow");
}

/// Removes the backing format extension (the first extension QEMU writes) by ending the
/// extension area where it starts.
fn drop_backing_format_extension(p: &Path) {
    let version = be32(p, 4);
    let start = if version == 2 {
        72
    } else {
        be32(p, 100) as u64
    };
    assert_eq!(
        be32(p, start),
        0xe279_2aca,
        "setup: backing format extension first"
    );
    poke(p, start, &[0u8; 8]);
}

#[test]
fn an_unrecorded_format_is_probed_like_qemu_and_refused_with_no_probe() {
    for compat in ["0.10", "1.1"] {
        let attack = Attack::new("fmt-probe", true);
        let ov = attack.overlay(compat);
        drop_backing_format_extension(&ov);
        // Oracle: QEMU probes the raw disk, finds a qcow2 header and follows it, down to the
        // secret host file. oxcow without NO_PROBE does the same, as the probed view is what
        // the image means to QEMU.
        let qemu = qemu_to_raw(&ov, "qcow2", &attack.dir);
        assert_eq!(
            qemu[0], 0x5e,
            "setup: qemu follows the inner image's backing file"
        );
        let img = open_ro(&ov);
        assert_eq!(img.info().expect("info").backing_format, None);
        assert_same_bytes(&oxcow_read_all(&img), &qemu, &format!("compat={compat}"));
        drop(img);

        let e = Image::open(&ov, &no_probe())
            .err()
            .expect("NO_PROBE opened a chain with an unrecorded backing format");
        assert_eq!(e.errno(), ENOTSUP, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(path_str(&ov)), "names the image: {msg}");
        assert!(msg.contains("not recorded"), "says why: {msg}");
        // Without the backing file nothing is probed.
        let bare = OpenOptions {
            no_backing: true,
            ..no_probe()
        };
        Image::open(&ov, &bare).expect("NO_PROBE with NO_BACKING");
    }
}

#[test]
fn no_probe_applies_to_every_image_of_the_chain() {
    let attack = Attack::new("fmt-chain", false);
    let mid = attack.overlay("1.1");
    drop_backing_format_extension(&mid);
    let top = attack.dir.join("top.qcow2");
    qemu_create(
        &top,
        SIZE,
        &format!("backing_file={},backing_fmt=qcow2", path_str(&mid)),
    );
    let e = Image::open(&top, &no_probe())
        .err()
        .expect("NO_PROBE opened a chain whose middle image records no format");
    assert_eq!(e.errno(), ENOTSUP, "{e}");
    assert!(e.to_string().contains(path_str(&mid)), "{e}");
    open_ro(&top);
}

fn oxcow_cli(args: &[&str]) -> CmdOut {
    run(env!("CARGO_BIN_EXE_oxcow"), args)
}

#[test]
fn cli_no_probe_refuses_unrecorded_formats_and_accepts_recorded_ones() {
    let attack = Attack::new("fmt-cli", true);
    let recorded = attack.overlay("1.1");
    let unrecorded = attack.overlay("0.10");
    drop_backing_format_extension(&unrecorded);
    let out = attack.dir.join("out.raw");
    let out = path_str(&out);
    for (args, ok) in [
        (vec!["info", "--backing-chain", "--no-probe"], true),
        (vec!["map", "--no-probe"], true),
        (
            vec!["convert", "--no-probe", "-f", "qcow2", "-O", "raw"],
            true,
        ),
    ] {
        for (img, recorded_fmt) in [(&recorded, true), (&unrecorded, false)] {
            let mut a = args.clone();
            a.push(path_str(img));
            if a[0] == "convert" {
                let _ = std::fs::remove_file(out);
                a.push(out);
            }
            let r = oxcow_cli(&a);
            let want_ok = ok && recorded_fmt;
            assert_eq!(r.code == 0, want_ok, "{a:?}: {}", r.all());
            if !want_ok {
                assert!(r.all().contains("not recorded"), "{a:?}: {}", r.all());
            }
        }
    }
    let r = oxcow_cli(&[
        "convert",
        "--no-probe",
        "-O",
        "raw",
        path_str(&recorded),
        out,
    ]);
    assert_ne!(
        r.code, 0,
        "convert --no-probe without -f guessed SRC's format"
    );
}
