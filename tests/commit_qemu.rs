//! Commit against QEMU: every scenario builds one backing chain, copies it, runs `qemu-img
//! commit` on one copy and `Image::commit` on the other, then compares every layer pairwise:
//! `qemu-img check` clean, `qemu-img compare` identical, `qemu-img info --output=json` equal
//! (apart from the host file's sizes), and an emptied top is as long as qemu-img leaves it.

mod common;

use common::*;
use oxcow::{CommitOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};

/// A chain built twice: `q` for qemu-img, `o` for oxcow; `layers` lists (file name, format)
/// from the base up, the last one is the top.
struct Twin {
    _dir: TempDir,
    q: PathBuf,
    o: PathBuf,
    layers: Vec<(&'static str, &'static str)>,
}

fn twin(tag: &str, layers: &[(&'static str, &'static str)], setup: impl FnOnce(&Path)) -> Twin {
    let dir = TempDir::new(tag);
    let q = dir.join("q");
    let o = dir.join("o");
    std::fs::create_dir_all(&q).expect("mkdir");
    std::fs::create_dir_all(&o).expect("mkdir");
    setup(&q);
    for (name, _) in layers {
        std::fs::copy(q.join(name), o.join(name)).expect("copy layer");
    }
    Twin {
        _dir: dir,
        q,
        o,
        layers: layers.to_vec(),
    }
}

fn top(t: &Twin) -> &'static str {
    t.layers.last().expect("a top layer").0
}

/// `qemu-img commit [-d] [-b base] top` in the qemu copy.
fn qemu_commit(t: &Twin, base: Option<&str>, keep: bool) {
    let mut args = vec!["commit", "-q", "-f", "qcow2"];
    if keep {
        args.push("-d");
    }
    if let Some(b) = base {
        args.extend(["-b", b]);
    }
    args.push(top(t));
    let o = run_in(&t.q, "qemu-img", &args);
    assert_eq!(o.code, 0, "qemu-img {args:?}: {}", o.all());
}

/// The same commit through oxcow's API in the oxcow copy.
fn oxcow_commit(t: &Twin, base: Option<&str>, keep: bool) {
    let img = Image::open(
        t.o.join(top(t)),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("open top");
    let opts = CommitOptions {
        base: base.map(|b| t.o.join(b)),
        keep_top: keep,
        ..Default::default()
    };
    img.commit(&opts).expect("commit");
    img.close().expect("close");
}

/// `qemu-img info --output=json` without the host file's sizes (`actual-size` and the
/// protocol child): where each engine places clusters is its own business. The length of an
/// emptied top is compared separately ([`assert_same_top_length`]).
fn info_without_sizes(dir: &Path, name: &str, fmt: &str) -> Json {
    let o = run_in(dir, "qemu-img", &["info", "--output=json", "-f", fmt, name]);
    assert_eq!(o.code, 0, "qemu-img info {name}: {}", o.all());
    match Json::parse(&o.stdout) {
        Json::Obj(mut m) => {
            m.remove("actual-size");
            m.remove("children");
            Json::Obj(m)
        }
        j => panic!("info is not an object: {j:?}"),
    }
}

/// qemu-img rewrites an emptied version-3 top without snapshots or bitmaps to its bare
/// structures; oxcow cuts the file after its last allocated cluster: same length.
fn assert_same_top_length(t: &Twin) {
    let len = |p: PathBuf| std::fs::metadata(p).expect("stat").len();
    let name = top(t);
    assert_eq!(
        len(t.q.join(name)),
        len(t.o.join(name)),
        "{name}: file length after emptying"
    );
}

/// The guest ranges a qcow2 image itself allocates, and how (data or zeros).
fn own_allocations(p: &Path) -> Vec<(u64, u64, bool)> {
    qemu_map(p)
        .into_iter()
        .filter(|e| e.depth == 0 && e.present)
        .map(|e| (e.start, e.length, e.zero))
        .collect()
}

/// Every layer: check clean, same guest contents, same info; the layers above the base
/// allocate the same ranges (emptied or kept alike). The base may differ in how it stores
/// zeros (qemu-img sets zero flags where the base reads zeros already, oxcow leaves those).
fn assert_same_layers(t: &Twin) {
    for (name, _) in t.layers.iter().skip(1) {
        assert_eq!(
            own_allocations(&t.q.join(name)),
            own_allocations(&t.o.join(name)),
            "{name}: allocations differ"
        );
    }
    for (name, fmt) in &t.layers {
        let (q, o) = (t.q.join(name), t.o.join(name));
        if *fmt == "qcow2" {
            assert_check_clean(&q);
            assert_check_clean(&o);
        }
        let c = run(
            "qemu-img",
            &["compare", "-f", fmt, "-F", fmt, path_str(&q), path_str(&o)],
        );
        assert_eq!(c.code, 0, "{name}: qemu-img compare: {}", c.all());
        assert_eq!(
            info_without_sizes(&t.q, name, fmt),
            info_without_sizes(&t.o, name, fmt),
            "{name}: qemu-img info differs"
        );
    }
}

fn run_both(t: &Twin, base: Option<&str>, keep: bool) {
    qemu_commit(t, base, keep);
    oxcow_commit(t, base, keep);
    assert_same_layers(t);
}

fn io(dir: &Path, name: &str, fmt: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io_fmt(&dir.join(name), fmt, &cmds);
}

fn create(dir: &Path, name: &str, size: &str, backing: Option<(&str, &str)>, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.extend([name, size]);
    let o = run_in(dir, "qemu-img", &args);
    assert_eq!(o.code, 0, "qemu-img {args:?}: {}", o.all());
}

/// A qcow2 base with data, and a top holding data, zero clusters over base data and over
/// nothing, a compressed cluster and a cluster of written zeros.
fn two_levels(dir: &Path, opts: &str, base_size: &str) {
    create(dir, "base.qcow2", base_size, None, opts);
    io(
        dir,
        "base.qcow2",
        "qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 1536k 256k"],
    );
    create(dir, "top.qcow2", "4M", Some(("base.qcow2", "qcow2")), opts);
    io(
        dir,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x21 64k 64k",
            "write -z 128k 128k",
            "write -z 3M 128k",
            "write -c -P 0x33 512k 64k",
            "write -P 0 1600k 64k",
            "write -P 0x24 3500k 300k",
        ],
    );
}

const TWO: &[(&str, &str)] = &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")];
const THREE: &[(&str, &str)] = &[
    ("base.qcow2", "qcow2"),
    ("mid.qcow2", "qcow2"),
    ("top.qcow2", "qcow2"),
];

#[test]
fn commit_into_qcow2_empties_the_top_like_qemu_img() {
    let t = twin("commit-q2", TWO, |d| two_levels(d, "", "4M"));
    run_both(&t, None, false);
    // The emptied top reads everything from the base.
    assert_eq!(own_allocations(&t.o.join("top.qcow2")), vec![]);
    assert_same_top_length(&t);
}

#[test]
fn commit_with_keep_top_leaves_the_top_as_it_was() {
    let t = twin("commit-q2-d", TWO, |d| two_levels(d, "", "4M"));
    run_both(&t, None, true);
}

#[test]
fn commit_grows_a_base_shorter_than_the_top() {
    let t = twin("commit-short", TWO, |d| two_levels(d, "", "2M"));
    run_both(&t, None, false);
    assert_same_top_length(&t);
    let t = twin("commit-short-d", TWO, |d| two_levels(d, "", "2M"));
    run_both(&t, None, true);
}

#[test]
fn commit_of_extended_l2_and_small_clusters_matches_qemu_img() {
    let opts = "cluster_size=16k,extended_l2=on";
    let t = twin("commit-ext", TWO, |d| two_levels(d, opts, "4M"));
    run_both(&t, None, false);
    assert_same_top_length(&t);
    let t = twin("commit-v2", TWO, |d| {
        create(d, "base.qcow2", "4M", None, "compat=0.10");
        io(d, "base.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
        create(
            d,
            "top.qcow2",
            "4M",
            Some(("base.qcow2", "qcow2")),
            "compat=0.10",
        );
        io(
            d,
            "top.qcow2",
            "qcow2",
            &["write -P 0x21 64k 200k", "write -c -P 0x33 2M 64k"],
        );
    });
    run_both(&t, None, false);
}

/// A raw base of 1 MiB under a 4 MiB top.
fn raw_base(dir: &Path) {
    std::fs::write(dir.join("base.raw"), vec![0x5au8; 1 << 20]).expect("raw base");
    create(dir, "top.qcow2", "4M", Some(("base.raw", "raw")), "");
    io(
        dir,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x21 64k 64k",
            "write -z 0 64k",
            "write -z 2M 64k",
            "write -c -P 0x33 512k 64k",
            "write -P 0x24 3M 100k",
        ],
    );
}

#[test]
fn commit_into_a_raw_base_grows_it_like_qemu_img() {
    let layers: &[(&str, &str)] = &[("base.raw", "raw"), ("top.qcow2", "qcow2")];
    let t = twin("commit-raw", layers, raw_base);
    run_both(&t, None, false);
    assert_same_top_length(&t);
    let t = twin("commit-raw-d", layers, raw_base);
    run_both(&t, None, true);
    let len = |p: PathBuf| std::fs::metadata(p).expect("stat").len();
    assert_eq!(len(t.q.join("base.raw")), len(t.o.join("base.raw")));
}

#[test]
fn commit_punches_zeroed_ranges_out_of_a_raw_base_like_qemu_img() {
    let layers: &[(&str, &str)] = &[("base.raw", "raw"), ("top.qcow2", "qcow2")];
    let t = twin("commit-raw-punch", layers, raw_base);
    run_both(&t, None, true);
    // qemu-img punches the zero cluster over the base's data: the host file's allocation
    // (what `map` reports for a raw file) must be the same, not zeros written as data.
    let map = |dir: &Path| {
        let o = run_in(
            dir,
            "qemu-img",
            &["map", "--output=json", "-f", "raw", "base.raw"],
        );
        assert_eq!(o.code, 0, "qemu-img map: {}", o.all());
        o.stdout
    };
    let (q, o) = (map(&t.q), map(&t.o));
    assert!(q.contains("\"zero\": true"), "qemu-img left no hole: {q}");
    assert_eq!(q, o, "raw base allocation differs from qemu-img's");
}

/// base <- mid <- top: the mid holds a zero cluster over base data and a compressed
/// cluster, the top data over both.
fn three_levels(dir: &Path) {
    create(dir, "base.qcow2", "4M", None, "");
    io(dir, "base.qcow2", "qcow2", &["write -P 0x11 0 2M"]);
    create(dir, "mid.qcow2", "4M", Some(("base.qcow2", "qcow2")), "");
    io(
        dir,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x22 1M 512k",
            "write -z 0 64k",
            "write -c -P 0x23 3M 64k",
        ],
    );
    create(dir, "top.qcow2", "4M", Some(("mid.qcow2", "qcow2")), "");
    io(
        dir,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x33 1200k 64k",
            "write -z 3M 32k",
            "write -P 0x34 3900k 8k",
        ],
    );
}

#[test]
fn commit_with_a_base_three_levels_down_keeps_top_and_mid_like_qemu_img() {
    let t = twin("commit-3", THREE, three_levels);
    run_both(&t, Some("base.qcow2"), false);
}

#[test]
fn commit_with_the_direct_backing_named_keeps_the_top_like_qemu_img() {
    let t = twin("commit-3-mid", THREE, three_levels);
    run_both(&t, Some("mid.qcow2"), false);
}

/// `args` run as `qemu-img commit ARGS top` in the qemu copy and `oxcow commit ARGS top` in
/// the oxcow copy: same exit code, same message, same layers.
fn cli_both(t: &Twin, args: &[&str]) {
    let mut full = vec!["commit"];
    full.extend(args);
    full.push(top(t));
    let q = run_in(&t.q, "qemu-img", &full);
    let o = run_in(&t.o, env!("CARGO_BIN_EXE_oxcow"), &full);
    assert_eq!(q.code, 0, "qemu-img {full:?}: {}", q.all());
    assert_eq!(o.code, 0, "oxcow {full:?}: {}", o.all());
    // qemu-img draws -p progress on stdout, oxcow on stderr: the messages are the last line.
    let last = |s: &str| s.lines().last().unwrap_or("").to_string();
    assert_eq!(last(&o.stdout), last(&q.stdout), "stdout of {full:?}");
    if args.contains(&"-p") {
        assert!(o.stderr.contains("(100.00/100%)"), "oxcow -p: {}", o.stderr);
    }
    assert_same_layers(t);
}

#[test]
fn cli_commit_matches_qemu_img_commit() {
    let t = twin("commit-cli", TWO, |d| two_levels(d, "", "2M"));
    cli_both(&t, &[]);
    assert_eq!(
        run_in(&t.o, env!("CARGO_BIN_EXE_oxcow"), &["commit", "top.qcow2"]).stdout,
        "Image committed.\n"
    );
    let t = twin("commit-cli-d", TWO, |d| two_levels(d, "", "4M"));
    cli_both(&t, &["-d", "-q"]);
    let t = twin("commit-cli-b", THREE, three_levels);
    cli_both(&t, &["-b", "base.qcow2", "-f", "qcow2"]);
    let layers: &[(&str, &str)] = &[("base.raw", "raw"), ("top.qcow2", "qcow2")];
    let t = twin("commit-cli-raw", layers, raw_base);
    cli_both(&t, &["-p"]);
}

#[test]
fn cli_commit_refusals_match_qemu_img() {
    let t = twin("commit-cli-err", THREE, three_levels);
    for args in [
        &["commit", "-b", "nowhere.qcow2", "top.qcow2"][..],
        &["commit", "base.qcow2"][..],
    ] {
        let q = run_in(&t.q, "qemu-img", args);
        let o = run_in(&t.o, env!("CARGO_BIN_EXE_oxcow"), args);
        assert_eq!(
            (q.code, o.code),
            (1, 1),
            "{args:?}: {} / {}",
            q.all(),
            o.all()
        );
        let msg = q.stderr.trim_start_matches("qemu-img: ").trim();
        assert!(
            o.stderr.contains(msg),
            "{args:?}: qemu-img says {msg:?}, oxcow {:?}",
            o.stderr
        );
    }
    let o = run_in(&t.o, env!("CARGO_BIN_EXE_oxcow"), &["commit", "--help"]);
    assert!(o.stdout.contains("-b BASE"), "{}", o.stdout);
}

#[test]
fn commit_of_a_top_with_an_internal_snapshot_and_a_bitmap_matches_qemu_img() {
    let t = twin("commit-snap", TWO, |d| {
        two_levels(d, "", "4M");
        let o = run_in(d, "qemu-img", &["snapshot", "-c", "s1", "top.qcow2"]);
        assert_eq!(o.code, 0, "{}", o.all());
        io(d, "top.qcow2", "qcow2", &["write -P 0x44 64k 32k"]);
        let o = run_in(d, "qemu-img", &["bitmap", "--add", "top.qcow2", "b0"]);
        assert_eq!(o.code, 0, "{}", o.all());
    });
    run_both(&t, None, false);
    // The snapshot still reads as it was taken, in both copies.
    for dir in [&t.q, &t.o] {
        let o = run_in(
            dir,
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                "top.qcow2",
                "s1.raw",
            ],
        );
        assert_eq!(o.code, 0, "{}", o.all());
    }
    assert_eq!(
        read_file(&t.q.join("s1.raw")),
        read_file(&t.o.join("s1.raw"))
    );
}

#[test]
fn commit_through_a_shorter_middle_image_zeroes_what_the_top_reads_as_zeros() {
    // The top reads zeros past the middle image's end, over base data: the base gets zeros.
    let t = twin("commit-short-mid", THREE, |d| {
        create(d, "base.qcow2", "4M", None, "");
        io(d, "base.qcow2", "qcow2", &["write -P 0x11 0 4M"]);
        create(d, "mid.qcow2", "2M", Some(("base.qcow2", "qcow2")), "");
        create(d, "top.qcow2", "4M", Some(("mid.qcow2", "qcow2")), "");
        io(d, "top.qcow2", "qcow2", &["write -P 0x33 3M 64k"]);
    });
    run_both(&t, Some("base.qcow2"), false);
    let b = qemu_to_raw(&t.o.join("base.qcow2"), "qcow2", &t._dir);
    assert!(b[2 << 20..3 << 20].iter().all(|&x| x == 0));
}

/// A base whose guest data lives in a raw data file (named by its absolute path, so each
/// copy of the chain uses its own), under a top with data and zero clusters.
fn data_file_chain(dir: &Path) {
    let data = dir.join("base.data");
    let opts = format!("data_file={},data_file_raw=on", path_str(&data));
    create(dir, "base.qcow2", "4M", None, &opts);
    io(dir, "base.qcow2", "qcow2", &["write -P 0x11 0 2M"]);
    create(dir, "top.qcow2", "4M", Some(("base.qcow2", "qcow2")), "");
    io(
        dir,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x22 512k 1M",
            "write -z 64k 64k",
            "write -P 0x23 3M 64k",
        ],
    );
}

#[test]
fn commit_into_a_base_with_a_raw_data_file_matches_qemu_img() {
    let dir = TempDir::new("commit-data-file");
    let (q, o) = (dir.join("q"), dir.join("o"));
    for d in [&q, &o] {
        std::fs::create_dir_all(d).expect("mkdir");
        data_file_chain(d);
    }
    let c = run_in(&q, "qemu-img", &["commit", "-q", "top.qcow2"]);
    assert_eq!(c.code, 0, "qemu-img commit: {}", c.all());
    let img = Image::open(
        o.join("top.qcow2"),
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("open top");
    img.commit(&CommitOptions::default()).expect("commit");
    img.close().expect("close");
    for name in ["base.qcow2", "top.qcow2"] {
        let (a, b) = (q.join(name), o.join(name));
        assert_check_clean(&a);
        assert_check_clean(&b);
        let c = run("qemu-img", &["compare", path_str(&a), path_str(&b)]);
        assert_eq!(c.code, 0, "{name}: qemu-img compare: {}", c.all());
        assert_eq!(
            own_allocations(&a),
            own_allocations(&b),
            "{name}: allocations"
        );
    }
    // data_file_raw: the data file is the guest disk, in both copies.
    let read = |p: PathBuf| std::fs::read(p).expect("read data file");
    assert!(
        read(q.join("base.data")) == read(o.join("base.data")),
        "the raw data files differ"
    );
}
