//! `oxcow convert -c` and parallel compressed writes against qemu-img: the output passes
//! `qemu-img check`, compares equal to the source, reads back through qemu-io, is never longer
//! than qemu-img's own `convert -c` output for the same input (holes inside the file count),
//! is byte-identical whatever the number of compressor threads, and leaves zero ranges of the
//! source unallocated (compressed or not).

mod common;

use common::*;
use oxcow::{Image, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Runs the built `oxcow` binary in `dir` and requires exit 0.
fn oxcow_ok(dir: &Path, args: &[&str]) {
    let out = oxcow_in(dir, args);
    assert_eq!(out.code, 0, "oxcow {}: {}", args.join(" "), out.all());
}

/// Text-like data: words from a skewed vocabulary, spaces and newlines (compresses about
/// 2:1 to 4:1 like logs and source trees).
fn text_like(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let vocab: Vec<Vec<u8>> = (0..4000)
        .map(|i| {
            let n = 2 + rng.below(10) as usize;
            let letters = b"etaoinshrdlucmfwypvbgkjqxz";
            let span = 6 + (i % 20);
            (0..n)
                .map(|_| letters[rng.below(span as u64) as usize])
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        // Skewed choice: low indices (common words) much more often.
        let r = rng.below(4000);
        let w = &vocab[(r * r / 4000) as usize];
        out.extend_from_slice(w);
        out.push(if rng.chance(8) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// Mixed data: random clusters, zero clusters, half-random half-zero clusters and text.
fn mixed(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; len];
    for (i, c) in out.chunks_mut(65536).enumerate() {
        match i % 5 {
            0 => rng.fill(c),
            1 => {}
            2 => rng.fill(&mut c[..32768]),
            3 => c.copy_from_slice(&text_like(c.len(), i as u64)),
            _ => rng.fill(&mut c[..1000]),
        }
    }
    out
}

fn parse_cluster_size(opts: &str) -> u64 {
    let v = opts
        .split(',')
        .find_map(|kv| kv.strip_prefix("cluster_size="))
        .unwrap_or("64k");
    match v.strip_suffix('k') {
        Some(n) => n.parse::<u64>().unwrap() << 10,
        None => match v.strip_suffix('M') {
            Some(n) => n.parse::<u64>().unwrap() << 20,
            None => v.parse().unwrap(),
        },
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Converts `src.raw` with both tools and checks everything the issue asks of the output.
fn convert_and_compare(dir: &TempDir, data: &[u8], opts: &str) {
    let d = dir.path();
    std::fs::write(dir.join("src.raw"), data).unwrap();
    let o = ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts];
    oxcow_ok(d, &[&o[..], &["src.raw", "ox.qcow2"]].concat());
    qemu_img(
        &[
            &o[..],
            &[
                path_str(&dir.join("src.raw")),
                path_str(&dir.join("q.qcow2")),
            ],
        ]
        .concat(),
    );
    let (ox, q) = (dir.join("ox.qcow2"), dir.join("q.qcow2"));
    assert_check_clean(&ox);
    assert_compare_identical(&ox, &dir.join("src.raw"));
    // qemu-io reads the first and the last cluster back with the source's bytes.
    let probe = |off: usize| {
        let end = (off + 4096).min(data.len());
        let want = &data[off..end];
        if want.iter().all(|&b| b == want[0]) {
            let cmd = format!("read -P {:#x} {off} {}", want[0], end - off);
            let out = qemu_io(&ox, &[cmd]);
            assert!(
                !out.all().contains("Pattern verification failed"),
                "{}",
                out.all()
            );
        }
    };
    probe(0);
    probe(data.len().saturating_sub(4096));
    let (lo, lq) = (file_len(&ox), file_len(&q));
    assert!(
        lo <= lq,
        "oxcow's file is {lo} bytes long, qemu-img's {lq} ({opts})"
    );
    // No holes inside but the end of the last packing cluster, where the clusters that did
    // not compress follow the compressed stream (and the file system's last partial block).
    // With 1-bit refcounts a host cluster holds one compressed cluster: nothing is packed,
    // and the rest of every such cluster is a hole in QEMU's layout too.
    let cs = parse_cluster_size(opts);
    let packs = !opts.contains("refcount_bits=1");
    assert!(
        !packs || allocated(&ox) + cs + 4096 >= lo,
        "oxcow's file has holes: {} allocated of {lo}",
        allocated(&ox)
    );
}

#[test]
fn text_output_is_valid_and_not_larger_than_qemu_imgs() {
    let dir = TempDir::new("compress-text");
    let data = text_like((6 * MIB) as usize + 12345, 1);
    convert_and_compare(&dir, &data, "cluster_size=64k");
    convert_and_compare(&dir, &data, "cluster_size=4k,compression_type=zstd");
    convert_and_compare(&dir, &data, "cluster_size=512");
    convert_and_compare(&dir, &data, "cluster_size=2M");
}

#[test]
fn mixed_output_is_valid_and_not_larger_than_qemu_imgs() {
    let dir = TempDir::new("compress-mixed");
    let data = mixed((5 * MIB) as usize, 2);
    convert_and_compare(&dir, &data, "cluster_size=64k");
    convert_and_compare(&dir, &data, "compression_type=zstd");
    convert_and_compare(&dir, &data, "cluster_size=16k,refcount_bits=1");
    convert_and_compare(&dir, &data, "compat=0.10");
}

#[test]
fn output_is_identical_whatever_the_thread_count() {
    let dir = TempDir::new("compress-threads");
    let d = dir.path();
    let mut data = text_like((3 * MIB) as usize, 3);
    data.extend_from_slice(&mixed((2 * MIB) as usize, 4));
    std::fs::write(dir.join("src.raw"), &data).unwrap();
    for ct in ["zlib", "zstd"] {
        let o = format!("compression_type={ct}");
        let mut files = Vec::new();
        for m in ["1", "2", "3", "7", "16"] {
            let out = format!("m{m}-{ct}.qcow2");
            oxcow_ok(
                d,
                &[
                    "convert", "-c", "-m", m, "-O", "qcow2", "-o", &o, "src.raw", &out,
                ],
            );
            files.push(std::fs::read(dir.join(&out)).unwrap());
        }
        for f in &files[1..] {
            assert!(
                f == &files[0],
                "{ct}: the output depends on the thread count"
            );
        }
        assert_compare_identical(&dir.join(&format!("m2-{ct}.qcow2")), &dir.join("src.raw"));
    }
}

#[test]
fn zero_ranges_stay_unallocated_compressed_or_not() {
    let dir = TempDir::new("compress-zero");
    let d = dir.path();
    // A qcow2 source with data, explicit zero clusters, zero-filled data and unallocated
    // space; and a raw source with a hole and written zeros.
    let src = dir.join("src.qcow2");
    qemu_create(&src, 16 * MIB, "");
    qemu_io(
        &src,
        &[
            "write -P 1 0 1M".into(),
            "write -z 2M 2M".into(),
            "write -P 0 5M 1M".into(),
            "write -P 2 10M 64k".into(),
        ],
    );
    for c in [true, false] {
        let out = if c { "c.qcow2" } else { "u.qcow2" };
        let mut args = vec!["convert"];
        if c {
            args.push("-c");
        }
        args.extend(["-O", "qcow2", "src.qcow2", out]);
        oxcow_ok(d, &args);
        assert_check_clean(&dir.join(out));
        assert_same_guest(&dir.join(out), &src);
        let data: u64 = qemu_map(&dir.join(out))
            .iter()
            .filter(|e| e.data)
            .map(|e| e.length)
            .sum();
        assert_eq!(
            data,
            MIB + 64 * 1024,
            "{out}: only the non-zero clusters hold data"
        );
    }
}

#[test]
fn concurrent_compressed_writers_pack_without_corruption() {
    let dir = TempDir::new("compress-library");
    let path = dir.join("lib.qcow2");
    qemu_create(&path, 16 * MIB, "cluster_size=64k");
    let img = Image::open(
        &path,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let data = text_like((16 * MIB) as usize, 5);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (img, data) = (&img, &data);
            s.spawn(move || {
                for c in (t..256).step_by(4) {
                    let off = (c * 65536) as usize;
                    img.write_compressed(&data[off..off + 65536], off as u64)
                        .unwrap();
                }
            });
        }
    });
    img.close().unwrap();
    assert_check_clean(&path);
    std::fs::write(dir.join("ref.raw"), &data).unwrap();
    assert_compare_identical(&path, &dir.join("ref.raw"));
    // Packed: no more host clusters than the compressed bytes need, plus metadata.
    let info = qemu_img(&["check", "--output=json", path_str(&path)]).stdout;
    let j = Json::parse(&info);
    assert_eq!(j.get("compressed-clusters").as_u64(), 256);
}

#[test]
fn holes_and_zeros_of_a_raw_source_stay_unallocated() {
    let dir = TempDir::new("compress-rawholes");
    let d = dir.path();
    let src = dir.join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(32 * MIB + 1000).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&text_like(100_000, 9), 3 * MIB).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 10 * MIB).unwrap(); // written zeros
    f.write_all_at(b"tail", 32 * MIB + 996).unwrap();
    drop(f);
    for c in [true, false] {
        let out = if c { "c.qcow2" } else { "u.qcow2" };
        let mut args = vec!["convert", "-f", "raw"];
        if c {
            args.push("-c");
        }
        args.extend(["-O", "qcow2", "src.raw", out]);
        oxcow_ok(d, &args);
        assert_check_clean(&dir.join(out));
        assert_compare_identical(&dir.join(out), &src);
        let data: u64 = qemu_map(&dir.join(out))
            .iter()
            .filter(|e| e.data)
            .map(|e| e.length)
            .sum();
        // 100 000 bytes at 3 MiB touch two 64 KiB clusters; the tail touches the last one.
        assert_eq!(data, 2 * 65536 + (32 * MIB + 1024 - 32 * MIB), "{out}");
    }
}
