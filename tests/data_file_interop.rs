//! External data files against QEMU 10: images whose guest data lives in a data file
//! (`-o data_file=...`, with and without `data_file_raw`) made and written by qemu-img/qemu-io
//! read identically through oxcow, and images oxcow makes and writes pass `qemu-img check`,
//! compare equal to the model, report what qemu-img reports, and (raw) keep a data file equal
//! to the guest disk. Data-file names are absolute here (QEMU resolves a relative one against
//! the current directory, which the test threads share); tests/data_file_cli.rs covers
//! relative names through the CLI.

mod common;

use common::*;
use oxcow::{BitmapAddOptions, CreateOptions, Image, ZeroFlags};
use std::path::{Path, PathBuf};

const SIZE: u64 = 4 * MIB;
const ENOTSUP: i32 = 95;

/// `qemu-img create` of a data-file image `name` in `dir` with the extra options `extra`;
/// returns the image and data file paths.
fn qemu_data_image(dir: &TempDir, name: &str, raw: bool, extra: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(&format!("{name}.qcow2"));
    let data = dir.join(&format!("{name}.data"));
    let raw = if raw { "on" } else { "off" };
    let opts = format!("data_file={},data_file_raw={raw}{extra}", path_str(&data));
    qemu_create(&img, SIZE, &opts);
    (img, data)
}

/// The same through oxcow.
fn oxcow_data_image(dir: &TempDir, name: &str, raw: bool, cs: u32) -> (PathBuf, PathBuf) {
    let img = dir.join(&format!("{name}.qcow2"));
    let data = dir.join(&format!("{name}.data"));
    let o = CreateOptions {
        cluster_size: cs,
        data_file: Some(path_str(&data).to_string()),
        data_file_raw: raw,
        ..Default::default()
    };
    oxcow::create(&img, SIZE, &o).expect("oxcow create with a data file");
    (img, data)
}

/// One guest operation, run through qemu-io or through oxcow.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    ZeroUnmap(u64, u64),
    Discard(u64, u64),
}

impl Op {
    fn qemu_io(self) -> String {
        match self {
            Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::ZeroUnmap(o, l) => format!("write -z -u {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }

    fn oxcow(self, img: &Image) {
        let r = match self {
            Op::Write(o, l, p) => img.write_at(&vec![p; l as usize], o),
            Op::Zero(o, l) => img.write_zeroes(o, l, ZeroFlags { may_unmap: false }),
            Op::ZeroUnmap(o, l) => img.write_zeroes(o, l, ZeroFlags { may_unmap: true }),
            Op::Discard(o, l) => img.discard(o, l),
        };
        r.unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }

    /// What the guest reads afterwards (a discard reads zeros: no backing file here).
    fn model(self, m: &mut [u8]) {
        let (o, l, v) = match self {
            Op::Write(o, l, p) => (o, l, p),
            Op::Zero(o, l) | Op::ZeroUnmap(o, l) | Op::Discard(o, l) => (o, l, 0),
        };
        m[o as usize..(o + l) as usize].fill(v);
    }
}

/// Writes over allocated and unallocated clusters, partial clusters, zeroing with and without
/// unmap and discards, including guest cluster 0 (host offset 0 in the data file).
fn ops() -> Vec<Op> {
    vec![
        Op::Write(0, 64 * KIB, 0x11),
        Op::Write(100 * KIB, 300 * KIB, 0x22),
        Op::Write(MIB + 512, 4 * KIB, 0x33),
        Op::Zero(128 * KIB, 64 * KIB),
        Op::ZeroUnmap(256 * KIB, 64 * KIB),
        Op::Discard(0, 64 * KIB),
        Op::Write(4 * KIB, 4 * KIB, 0x44),
        Op::Zero(MIB + 8 * KIB, 8 * KIB),
        Op::Write(3 * MIB, MIB, 0x55),
        Op::Discard(3 * MIB + 64 * KIB, 128 * KIB),
    ]
}

fn model_of(ops: &[Op]) -> Vec<u8> {
    let mut m = vec![0u8; SIZE as usize];
    for op in ops {
        op.model(&mut m);
    }
    m
}

fn save(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write reference");
    p
}

/// The format-specific data of `qemu-img info --output=json`.
fn qcow2_specific(p: &Path) -> Json {
    qemu_info(p).get("format-specific").get("data").clone()
}

#[test]
fn images_written_by_qemu_read_identically_through_oxcow() {
    let dir = TempDir::new("df-qemu-read");
    for (raw, extra) in [(false, ""), (true, ""), (false, ",extended_l2=on")] {
        let (img, _data) = qemu_data_image(&dir, &format!("q{raw}{}", extra.len()), raw, extra);
        let cmds: Vec<String> = ops().iter().map(|o| o.qemu_io()).collect();
        qemu_io(&img, &cmds);
        let want = qemu_to_raw(&img, "qcow2", &dir);
        assert_eq!(want, model_of(&ops()), "qemu's own view (raw={raw}{extra})");
        let got = oxcow_read_all(&open_ro(&img));
        assert_same_bytes(
            &got,
            &want,
            &format!("oxcow read of qemu image (raw={raw}{extra})"),
        );
        // And after oxcow opened it read-write and closed it, qemu still agrees.
        open_rw(&img).close().expect("close");
        assert_check_clean(&img);
        assert_eq!(qemu_to_raw(&img, "qcow2", &dir), want);
    }
}

#[test]
fn images_written_by_oxcow_pass_qemu_check_and_compare_with_and_without_raw() {
    let dir = TempDir::new("df-oxcow-write");
    for (raw, cs) in [(false, 65536), (true, 65536), (false, 4096), (true, 4096)] {
        let (img, data) = oxcow_data_image(&dir, &format!("o{raw}{cs}"), raw, cs);
        {
            let im = open_rw(&img);
            for op in ops() {
                op.oxcow(&im);
            }
            im.close().expect("close");
        }
        let model = model_of(&ops());
        let reference = save(&dir, "ref.raw", &model);
        assert_check_clean(&img);
        assert_compare_identical(&img, &reference);
        let spec = qcow2_specific(&img);
        assert_eq!(spec.get("data-file").as_str(), path_str(&data));
        assert_eq!(
            spec.get("data-file-raw").as_bool(),
            raw,
            "data_file_raw kept"
        );
        if raw {
            // The data file is the guest disk, byte for byte.
            assert_same_bytes(&read_file(&data), &model, "raw data file vs guest");
        }
        assert_same_bytes(&oxcow_read_all(&open_ro(&img)), &model, "oxcow reads back");
    }
}

#[test]
fn twin_images_written_by_qemu_io_and_by_oxcow_agree() {
    let dir = TempDir::new("df-twin");
    for raw in [false, true] {
        let (q, _) = qemu_data_image(&dir, &format!("q{raw}"), raw, "");
        let (o, _) = qemu_data_image(&dir, &format!("o{raw}"), raw, "");
        let cmds: Vec<String> = ops().iter().map(|o| o.qemu_io()).collect();
        qemu_io(&q, &cmds);
        let im = open_rw(&o);
        for op in ops() {
            op.oxcow(&im);
        }
        im.close().expect("close");
        assert_check_clean(&o);
        assert_same_guest(&q, &o);
        let (mut a, mut b) = (qcow2_specific(&q), qcow2_specific(&o));
        // The names differ; everything else qemu-img reports about the format is the same.
        for j in [&mut a, &mut b] {
            if let Json::Obj(fields) = j {
                fields.remove("data-file");
            }
        }
        assert_eq!(a, b, "format-specific info (raw={raw})");
        let (mq, mo) = (qemu_map(&q), qemu_map(&o));
        let data = |m: &[MapEntry]| {
            m.iter()
                .filter(|e| e.data)
                .map(|e| (e.start, e.length, e.offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(data(&mq), data(&mo), "data extents and offsets (raw={raw})");
    }
}

#[test]
fn oxcow_info_json_equals_qemu_img_info_on_data_file_images() {
    let dir = TempDir::new("df-info");
    for raw in [false, true] {
        let (img, _) = oxcow_data_image(&dir, &format!("i{raw}"), raw, 65536);
        let out = run(
            env!("CARGO_BIN_EXE_oxcow"),
            &["info", "--output=json", path_str(&img)],
        );
        assert_eq!(out.code, 0, "oxcow info: {}", out.all());
        let ours = Json::parse(&out.stdout);
        assert_eq!(ours, qemu_info(&img), "info --output=json (raw={raw})");
    }
}

#[test]
fn a_raw_data_file_image_maps_every_cluster_one_to_one_like_qemu() {
    let dir = TempDir::new("df-raw-layout");
    let (q, qd) = qemu_data_image(&dir, "q", true, "");
    let (o, od) = oxcow_data_image(&dir, "o", true, 65536);
    assert_eq!(qemu_map(&q).len(), 1);
    let (mq, mo) = (qemu_map(&q), qemu_map(&o));
    assert_eq!(
        (mq[0].start, mq[0].length, mq[0].data, mq[0].offset),
        (mo[0].start, mo[0].length, mo[0].data, mo[0].offset)
    );
    assert_eq!(file_len(&qd), SIZE);
    assert_eq!(file_len(&od), SIZE);
    assert_eq!(file_len(&q), file_len(&o), "same metadata layout");
    assert_check_clean(&o);
    // With extended L2 entries QEMU maps the clusters but marks no subcluster allocated.
    let (q, _) = qemu_data_image(&dir, "qx", true, ",extended_l2=on");
    let (o, _) = dir_image_extl2(&dir, "ox");
    let strip = |m: Vec<MapEntry>| {
        m.iter()
            .map(|e| (e.start, e.length, e.present, e.zero, e.data, e.offset))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(qemu_map(&q)),
        strip(qemu_map(&o)),
        "extended L2 raw layout"
    );
    assert_eq!(
        read_file(&q)[0x40000..0x50000],
        read_file(&o)[0x40000..0x50000]
    );
}

/// A raw data-file image with extended L2 entries, made by oxcow.
fn dir_image_extl2(dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(&format!("{name}.qcow2"));
    let data = dir.join(&format!("{name}.data"));
    let o = CreateOptions {
        extended_l2: true,
        data_file: Some(path_str(&data).to_string()),
        data_file_raw: true,
        ..Default::default()
    };
    oxcow::create(&img, SIZE, &o).expect("oxcow create");
    (img, data)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    let dir = TempDir::new("df-create-refusals");
    let img = dir.join("x.qcow2");
    let data = path_str(&dir.join("x.data")).to_string();
    let cases: Vec<(CreateOptions, &str)> = vec![
        (
            CreateOptions {
                data_file_raw: true,
                ..Default::default()
            },
            "data-file-raw requires data-file",
        ),
        (
            CreateOptions {
                data_file: Some(data.clone()),
                version: 2,
                ..Default::default()
            },
            "External data files are only supported with compatibility level 1.1",
        ),
        (
            CreateOptions {
                data_file: Some(data.clone()),
                data_file_raw: true,
                backing_file: Some("base.qcow2".into()),
                backing_format: Some(oxcow::BackingFormat::Qcow2),
                ..Default::default()
            },
            "Backing file and data-file-raw cannot be used at the same time",
        ),
    ];
    for (o, msg) in cases {
        let e = oxcow::create(&img, MIB, &o).expect_err(msg);
        assert!(e.to_string().contains(msg), "expected {msg:?}, got {e}");
    }
}

#[test]
fn create_truncates_an_existing_data_file_like_qemu_img() {
    let dir = TempDir::new("df-create-existing");
    let data = dir.join("d.raw");
    std::fs::write(&data, vec![0xeeu8; 6 * MIB as usize]).expect("old data");
    let img = dir.join("x.qcow2");
    let o = CreateOptions {
        data_file: Some(path_str(&data).to_string()),
        ..Default::default()
    };
    oxcow::create(&img, 2 * MIB, &o).expect("create");
    assert_eq!(read_file(&data), vec![0u8; 2 * MIB as usize]);
    assert_eq!(oxcow_read_all(&open_ro(&img)), vec![0u8; 2 * MIB as usize]);
}

#[test]
fn compressed_writes_and_internal_snapshots_are_refused_like_qemu() {
    let dir = TempDir::new("df-refuse");
    let (img, _) = oxcow_data_image(&dir, "r", false, 65536);
    let im = open_rw(&img);
    let e = im
        .write_compressed(&vec![7u8; 65536], 0)
        .expect_err("compressed write");
    assert_eq!(e.errno(), ENOTSUP, "{e}");
    let e = im.snapshot_create("s").expect_err("snapshot");
    assert_eq!(e.errno(), ENOTSUP, "{e}");
    im.close().expect("close");
    // QEMU refuses both too.
    let q = run("qemu-img", &["snapshot", "-c", "s", path_str(&img)]);
    assert_ne!(q.code, 0, "qemu-img snapshot -c: {}", q.all());
    assert_check_clean(&img);
}

#[test]
fn a_missing_data_file_or_name_fails_the_open_with_qemus_message() {
    let dir = TempDir::new("df-missing");
    let (img, data) = oxcow_data_image(&dir, "m", false, 65536);
    std::fs::rename(&data, dir.join("moved")).expect("move data file");
    let e = Image::open(&img, &Default::default())
        .err()
        .expect("open without data file fails");
    assert!(e.to_string().contains("Could not open"), "{e}");
    assert_eq!(e.errno(), 2, "ENOENT: {e}");
    // The data-file bit without a name: QEMU wants a 'data-file' option.
    let hdr = read_file(&img);
    let ext = common::malformed::find_ext(&img, 0x4441_5441).expect("data file extension");
    poke(&img, ext.0, &[0, 0, 0, 0xfe]); // another (unknown) extension type
    let e = Image::open(&img, &Default::default())
        .err()
        .expect("open without name fails");
    assert!(
        e.to_string()
            .contains("'data-file' is required for this image"),
        "{e}"
    );
    std::fs::write(&img, hdr).expect("restore");
}

#[test]
fn resize_makes_the_data_file_follow_the_disk_like_qemu_img() {
    let dir = TempDir::new("df-resize");
    for raw in [false, true] {
        for (grow, shrink) in [(8 * MIB, false), (3 * MIB, true)] {
            let tag = format!("{raw}{grow}");
            let (q, qd) = qemu_data_image(&dir, &format!("q{tag}"), raw, "");
            let (o, od) = qemu_data_image(&dir, &format!("o{tag}"), raw, "");
            qemu_io(&q, &[Op::Write(MIB, 2 * MIB + 4096, 9).qemu_io()]);
            qemu_io(&o, &[Op::Write(MIB, 2 * MIB + 4096, 9).qemu_io()]);
            let size = grow.to_string();
            let mut args = vec!["resize", "-f", "qcow2"];
            if shrink {
                args.push("--shrink");
            }
            args.extend([path_str(&q), size.as_str()]);
            run_ok("qemu-img", &args);
            let im = open_rw(&o);
            im.resize(grow, shrink).expect("oxcow resize");
            im.close().expect("close");
            assert_check_clean(&o);
            assert_same_guest(&q, &o);
            assert_eq!(file_len(&od), file_len(&qd), "data file length (raw={raw})");
            let (mq, mo) = (qemu_map(&q), qemu_map(&o));
            let data = |m: &[MapEntry]| {
                m.iter()
                    .filter(|e| e.data)
                    .map(|e| (e.start, e.length, e.offset))
                    .collect::<Vec<_>>()
            };
            assert_eq!(data(&mq), data(&mo), "mapping after resize (raw={raw})");
        }
    }
}

#[test]
fn bitmaps_record_oxcow_writes_on_a_raw_data_file_image_and_qemu_reads_them() {
    let dir = TempDir::new("df-bitmap");
    let (img, data) = oxcow_data_image(&dir, "b", true, 65536);
    let touched = [(0, 4096), (MIB + 100, 70 * KIB), (3 * MIB, 64 * KIB)];
    {
        let im = open_rw(&img);
        im.bitmap_add("backup", BitmapAddOptions::default())
            .expect("bitmap add");
        for (i, &(o, l)) in touched.iter().enumerate() {
            im.write_at(&vec![i as u8 + 1; l as usize], o)
                .expect("write");
        }
        im.close().expect("close");
    }
    assert_check_clean(&img);
    let granularity = 65536;
    assert_eq!(
        common::bitmaps::qemu_dirty_ranges(&img, "backup"),
        common::bitmaps::granules(&touched, granularity, SIZE)
    );
    // The raw data file is the disk: an incremental backup can copy the dirty ranges from it.
    let guest = qemu_to_raw(&img, "qcow2", &dir);
    assert_same_bytes(&read_file(&data), &guest, "raw data file vs guest");
    assert!(
        qcow2_specific(&img).get("data-file-raw").as_bool(),
        "data_file_raw kept"
    );
}

#[test]
fn reopen_moves_the_data_file_between_read_only_and_read_write() {
    let dir = TempDir::new("df-reopen");
    let (img, data) = oxcow_data_image(&dir, "r", true, 65536);
    let im = open_ro(&img);
    im.reopen(&oxcow::OpenOptions {
        writable: true,
        ..Default::default()
    })
    .expect("reopen rw");
    im.write_at(&[5u8; 8192], 8192).expect("write after reopen");
    im.reopen(&oxcow::OpenOptions::default())
        .expect("reopen ro");
    let e = im.write_at(&[1u8; 512], 0).expect_err("read-only again");
    assert_eq!(e.errno(), 30, "EROFS: {e}");
    drop(im);
    qemu_io(&img, &[Op::Write(0, 4096, 6).qemu_io()]);
    let mut want = vec![0u8; SIZE as usize];
    Op::Write(8192, 8192, 5).model(&mut want);
    Op::Write(0, 4096, 6).model(&mut want);
    assert_same_bytes(&read_file(&data), &want, "data file");
    assert_check_clean(&img);
}

#[test]
fn a_data_cluster_away_from_its_guest_offset_is_a_corruption_like_in_qemu() {
    let dir = TempDir::new("df-misplaced");
    let (img, _) = oxcow_data_image(&dir, "c", false, 65536);
    {
        let im = open_rw(&img);
        im.write_at(&[3u8; 65536], 65536).expect("write");
        im.close().expect("close");
    }
    let l1 = be64(&img, 0x30000) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 1 now claims to live at data-file offset 2 clusters.
    poke(&img, l1 + 8, &(0x8000_0000_0002_0000u64).to_be_bytes());
    let im = open_ro(&img);
    let mut buf = vec![0u8; 4096];
    let e = im.read_at(&mut buf, 65536).expect_err("misplaced cluster");
    assert!(
        e.to_string()
            .contains("External data file host cluster offset 0x20000 does not match"),
        "{e}"
    );
    drop(im);
    let q = run("qemu-io", &["-r", "-c", "read 64k 4k", path_str(&img)]);
    assert!(
        q.all().contains("does not match guest cluster offset"),
        "{}",
        q.all()
    );
}

#[test]
fn the_data_file_is_locked_like_qemus_data_child() {
    // QEMU's data child shares write but not resize (observed with qemu-nbd): a raw writer
    // of the data file may open it, a resize of it is refused while the image is open.
    let dir = TempDir::new("df-locks");
    let (img, data) = oxcow_data_image(&dir, "l", false, 65536);
    let resize = || run("qemu-img", &["resize", "-f", "raw", path_str(&data), "8M"]);
    let raw_io = || {
        run(
            "qemu-io",
            &["-f", "raw", "-c", "read 0 512", path_str(&data)],
        )
    };
    for writable in [true, false] {
        let im = if writable {
            open_rw(&img)
        } else {
            open_ro(&img)
        };
        let held = resize();
        assert_ne!(held.code, 0, "resized the data file of an open image");
        assert!(held.all().contains("\"resize\" lock"), "{}", held.all());
        assert_eq!(raw_io().code, 0, "QEMU shares write on its data child");
        drop(im);
    }
    let free = resize();
    assert_eq!(free.code, 0, "{}", free.all());
}

#[test]
fn an_unknown_autoclear_bit_is_cleared_but_data_file_raw_is_kept() {
    let dir = TempDir::new("df-autoclear");
    let (img, _) = oxcow_data_image(&dir, "a", true, 65536);
    // Autoclear features live at header offset 88.
    poke(&img, 88, &(0x22u64).to_be_bytes());
    open_rw(&img).close().expect("close");
    assert_eq!(be64(&img, 88), 0x2, "only data_file_raw stays");
    assert_check_clean(&img);
}

#[test]
fn a_header_naming_the_image_itself_as_its_data_file_is_refused() {
    let dir = TempDir::new("df-self");
    let img = dir.join("s.qcow2");
    // Made with another data file, then the header is pointed at the image itself.
    let other = dir.join("other.data");
    let o = CreateOptions {
        data_file: Some(path_str(&other).to_string()),
        ..Default::default()
    };
    oxcow::create(&img, MIB, &o).expect("create");
    let (ext, len) = common::malformed::find_ext(&img, 0x4441_5441).expect("data file ext");
    let own = path_str(&img).as_bytes().to_vec();
    assert!(own.len() <= len as usize, "the own name is the shorter one");
    let mut field = own.clone();
    field.resize(len as usize, 0);
    poke(&img, ext + 8, &field);
    poke(&img, ext + 4, &(own.len() as u32).to_be_bytes());
    let e = Image::open(
        &img,
        &oxcow::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .err()
    .expect("the image as its own data file");
    assert!(e.to_string().contains("is the image itself"), "{e}");
}

#[test]
fn an_overlay_with_a_data_file_copies_on_write_from_its_backing_file() {
    let dir = TempDir::new("df-backing");
    let base = dir.join("base.qcow2");
    qemu_create(&base, SIZE, "");
    qemu_io(&base, &[Op::Write(0, SIZE, 0x77).qemu_io()]);
    let mut twins = Vec::new();
    for name in ["q", "o"] {
        let img = dir.join(&format!("{name}.qcow2"));
        let data = dir.join(&format!("{name}.data"));
        let opts = format!(
            "data_file={},backing_file={},backing_fmt=qcow2",
            path_str(&data),
            path_str(&base)
        );
        qemu_create(&img, SIZE, &opts);
        twins.push(img);
    }
    let ops = [
        Op::Write(4096, 512, 1),
        Op::Write(MIB + 100, 70 * KIB, 2),
        Op::Discard(2 * MIB, 128 * KIB),
        Op::Zero(3 * MIB, 64 * KIB),
    ];
    qemu_io(
        &twins[0],
        &ops.iter().map(|o| o.qemu_io()).collect::<Vec<_>>(),
    );
    let im = open_rw(&twins[1]);
    for op in ops {
        op.oxcow(&im);
    }
    im.close().expect("close");
    assert_check_clean(&twins[1]);
    assert_same_guest(&twins[0], &twins[1]);
    assert_same_bytes(
        &oxcow_read_all(&open_ro(&twins[1])),
        &qemu_to_raw(&twins[0], "qcow2", &dir),
        "oxcow read of the overlay",
    );
}

#[test]
fn a_metadata_only_open_reads_zeros_where_nothing_is_mapped_and_fails_data_reads_with_eio() {
    let dir = TempDir::new("df-metaonly");
    let (img, data) = qemu_data_image(&dir, "m", false, "");
    qemu_io(&img, &["write -P 0x5a 0 64k".to_string()]);
    std::fs::remove_file(&data).expect("remove the data file");
    let meta_only = oxcow::OpenOptions {
        no_data_file: true,
        ..Default::default()
    };
    let h = Image::open(&img, &meta_only).expect("metadata-only open without the data file");
    assert_eq!(h.virtual_size(), SIZE);
    let mut buf = vec![0xffu8; 4096];
    h.read_at(&mut buf, 1 << 20)
        .expect("an unmapped cluster reads");
    assert!(
        buf.iter().all(|&b| b == 0),
        "unmapped cluster must read as zeros"
    );
    let e = h
        .read_at(&mut buf, 0)
        .expect_err("data in the data file cannot be read");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    drop(h);
    let writable = oxcow::OpenOptions {
        writable: true,
        ..meta_only
    };
    let e = Image::open(&img, &writable)
        .err()
        .expect("writable metadata-only open");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
}
