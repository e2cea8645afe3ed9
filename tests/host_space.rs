//! Host space: allocating writes write only their data where the new cluster already reads as
//! zeros (no zero-fill of the rest), reused clusters still read as zeros around new data, and
//! discard_unmap gives freed clusters' blocks back to the file system. qemu-img is the oracle.

mod common;

use common::*;
use oxcow::{Image, OpenOptions, ZeroFlags};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const CS: u64 = 64 * KIB;

/// Bytes this thread has passed to write system calls so far (`wchar` of
/// /proc/thread-self/io): oxcow does its I/O on the calling thread.
fn written_by_this_thread() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar line")
}

fn open_with(path: &Path, discard_unmap: bool) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            discard_unmap,
            ..Default::default()
        },
    )
    .expect("open read-write")
}

fn host_blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks()
}

/// Writes `n` 4 KiB requests at `stride` into a fresh image with a final flush and returns the
/// host bytes written, after checking the image against the model with qemu-img.
fn host_bytes_of_4k_writes(tag: &str, n: u64, stride: u64) -> u64 {
    let dir = TempDir::new(tag);
    let path = dir.join("img.qcow2");
    let size = n * stride;
    qemu_create(&path, size, "");
    let img = open_with(&path, false);
    let mut model = RawModel::new(size, CS);
    let before = written_by_this_thread();
    for i in 0..n {
        let data = tagged_data(i as u8 | 1, i * stride, 4096);
        img.write_at(&data, i * stride).expect("write");
        model.write(i * stride, &data);
    }
    img.flush().expect("flush");
    let written = written_by_this_thread() - before;
    img.close().expect("close");
    assert_check_clean(&path);
    assert_compare_model(&path, &model, &dir);
    written
}

#[test]
fn strided_allocating_4k_writes_put_about_their_data_on_the_host() {
    // One 4 KiB write per 64 KiB cluster: without the zero-fill elision every write would
    // put a whole cluster (16x the data) on the host.
    let n = 2000;
    let data = n * 4096;
    let written = host_bytes_of_4k_writes("strided", n, CS);
    // Metadata: 2000 L2 entries and refcounts, written back once.
    assert!(
        written < data + data / 4,
        "{written} host bytes for {data} bytes of data"
    );
}

#[test]
fn sequential_allocating_4k_writes_put_about_their_data_on_the_host() {
    let n = 4096; // 16 MiB
    let data = n * 4096;
    let written = host_bytes_of_4k_writes("sequential", n, 4096);
    assert!(
        written < data + data / 20,
        "{written} host bytes for {data} bytes of data"
    );
}

/// Fills the image, discards everything, flushes (the clusters become free, holding stale
/// bytes), then writes a little into every cluster: the rest of every cluster reads as zeros.
fn partial_writes_into_freed_clusters(tag: &str, create_opts: &str, at: u64, len: usize) {
    let dir = TempDir::new(tag);
    let path = dir.join("img.qcow2");
    let size = 4 * MIB;
    qemu_create(&path, size, create_opts);
    let img = open_with(&path, false);
    img.write_at(&vec![0xee; size as usize], 0).expect("fill");
    img.flush().expect("flush");
    img.discard(0, size).expect("discard");
    img.flush().expect("flush");
    let mut model = RawModel::new(size, CS);
    for c in 0..size / CS {
        let data = tagged_data(c as u8 | 1, c * CS + at, len);
        img.write_at(&data, c * CS + at).expect("write");
        model.write(c * CS + at, &data);
    }
    img.close().expect("close");
    assert_check_clean(&path);
    assert_compare_model(&path, &model, &dir);
    // The freed clusters were reused, not appended.
    assert!(
        std::fs::metadata(&path).expect("stat").len() < 2 * size,
        "{tag}: the file grew instead of reusing the freed clusters"
    );
}

#[test]
fn partial_writes_into_reused_clusters_read_as_zeros_around_the_data() {
    partial_writes_into_freed_clusters("reuse", "", 8192, 4096);
    partial_writes_into_freed_clusters("reuse-unaligned", "", 1000, 333);
    partial_writes_into_freed_clusters("reuse-extl2", "extended_l2=on", 5000, 700);
}

#[test]
fn partial_writes_into_preallocated_clusters_read_as_zeros_around_the_data() {
    let dir = TempDir::new("prealloc");
    let path = dir.join("img.qcow2");
    let size = 4 * MIB;
    qemu_create(&path, size, "preallocation=metadata");
    let img = open_with(&path, false);
    let mut model = RawModel::new(size, CS);
    for c in 0..size / CS {
        let data = tagged_data(c as u8 | 1, c * CS + 4096, 4096);
        img.write_at(&data, c * CS + 4096).expect("write");
        model.write(c * CS + 4096, &data);
    }
    img.close().expect("close");
    assert_check_clean(&path);
    assert_compare_model(&path, &model, &dir);
}

/// Writes 8 MiB, discards 90 % of it (or unmaps it with write_zeroes) and flushes: returns the
/// host blocks before and after, having checked the image against the model.
fn discard_ninety_percent(tag: &str, discard_unmap: bool, zeroes: bool) -> (u64, u64) {
    let dir = TempDir::new(tag);
    let path = dir.join("img.qcow2");
    let (size, data) = (16 * MIB, 8 * MIB);
    let cut = data / CS * 9 / 10 * CS;
    qemu_create(&path, size, "");
    let img = open_with(&path, discard_unmap);
    let mut model = RawModel::new(size, CS);
    let bytes = tagged_data(7, 0, data as usize);
    img.write_at(&bytes, 0).expect("write");
    model.write(0, &bytes);
    img.flush().expect("flush");
    let before = host_blocks(&path);
    if zeroes {
        img.write_zeroes(0, cut, ZeroFlags { may_unmap: true })
            .expect("write_zeroes");
    } else {
        img.discard(0, cut).expect("discard");
    }
    model.zero(0, cut);
    img.flush().expect("flush");
    let after = host_blocks(&path);
    img.close().expect("close");
    assert_check_clean(&path);
    assert_compare_model(&path, &model, &dir);
    (before, after)
}

#[test]
fn discard_unmap_gives_the_blocks_of_discarded_clusters_back() {
    let cut_blocks = 8 * MIB / CS * 9 / 10 * CS / 512;
    for zeroes in [false, true] {
        let (before, after) = discard_ninety_percent("unmap", true, zeroes);
        assert!(
            after + cut_blocks * 95 / 100 <= before,
            "zeroes={zeroes}: {before} blocks before, {after} after discarding {cut_blocks}"
        );
    }
}

#[test]
fn without_discard_unmap_nothing_is_punched() {
    let (before, after) = discard_ninety_percent("keep", false, false);
    assert!(
        after + 64 >= before,
        "{before} blocks before, {after} after: something was punched"
    );
}

#[test]
fn discard_unmap_never_punches_clusters_a_snapshot_still_uses() {
    let dir = TempDir::new("unmap-snap");
    let path = dir.join("img.qcow2");
    let size = 4 * MIB;
    qemu_create(&path, size, "");
    let mut model = RawModel::new(size, CS);
    {
        let img = open_with(&path, false);
        let bytes = tagged_data(3, 0, size as usize);
        img.write_at(&bytes, 0).expect("write");
        model.write(0, &bytes);
        img.close().expect("close");
    }
    qemu_img(&["snapshot", "-c", "snap", path_str(&path)]);
    let img = open_with(&path, true);
    img.discard(0, size).expect("discard");
    img.flush().expect("flush");
    img.close().expect("close");
    assert_check_clean(&path);
    // The snapshot still holds every byte.
    let snap = dir.join("snap.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snap",
        "-O",
        "raw",
        path_str(&path),
        path_str(&snap),
    ]);
    assert_compare_model(&snap_as_qcow2(&dir, &snap), &model, &dir);
}

/// `qemu-img compare` wants the tested image as qcow2: wraps a raw file in one.
fn snap_as_qcow2(dir: &TempDir, raw: &Path) -> std::path::PathBuf {
    let q = dir.join("snap.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(raw),
        path_str(&q),
    ]);
    q
}

/// An image whose data lives in `dir/d.raw`, its first 8 MiB written by qemu-io.
fn written_data_file_image(dir: &TempDir, raw: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let (img, data) = (dir.join("img.qcow2"), dir.join("d.raw"));
    let raw_opt = if raw { ",data_file_raw=on" } else { "" };
    qemu_create_with_data(
        &img,
        16 * MIB,
        &format!("data_file={}{raw_opt}", data.display()),
        0x5a,
        8 * MIB,
    );
    (img, data)
}

#[test]
fn discard_unmap_punches_the_data_file_like_qemu() {
    for raw in [false, true] {
        let (q, o) = (TempDir::new("dfq"), TempDir::new("dfo"));
        let (q_img, q_data) = written_data_file_image(&q, raw);
        let (o_img, o_data) = written_data_file_image(&o, raw);
        let full = host_blocks(&o_data);
        let opts = format!(
            "driver=qcow2,file.filename={},discard=unmap",
            q_img.display()
        );
        run_ok("qemu-io", &["--image-opts", "-c", "discard 0 4M", &opts]);
        let img = open_with(&o_img, true);
        img.discard(0, 4 * MIB).expect("discard");
        img.close().expect("close");
        let (qb, ob) = (host_blocks(&q_data), host_blocks(&o_data));
        assert!(
            ob + 4 * MIB / 512 * 95 / 100 <= full,
            "raw={raw}: data file kept its blocks ({full} before, {ob} after; qemu: {qb})"
        );
        assert!(ob <= qb + 64, "raw={raw}: oxcow {ob} blocks, qemu {qb}");
        assert_check_clean(&o_img);
        assert_same_guest(&o_img, &q_img);
    }
}

/// Writes `writes` (offset, length) into a fresh 64 MiB image opened with or without O_DIRECT,
/// then closes it; returns the file's length while the image was open (after the writes) and
/// after the close. The image is checked and compared with the model.
fn lengths_of_writes(tag: &str, direct: bool, writes: &[(u64, usize)]) -> (u64, u64) {
    let dir = TempDir::new(tag);
    let path = dir.join("img.qcow2");
    let size = 64 * MIB;
    qemu_create(&path, size, "");
    let img = Image::open(
        &path,
        &OpenOptions {
            writable: true,
            direct,
            ..Default::default()
        },
    )
    .expect("open");
    let mut model = RawModel::new(size, CS);
    for (i, &(at, len)) in writes.iter().enumerate() {
        let data = tagged_data(i as u8 | 1, at, len);
        img.write_at(&data, at).expect("write");
        model.write(at, &data);
    }
    img.flush().expect("flush");
    let open_len = std::fs::metadata(&path).expect("stat").len();
    assert!(
        img.info().expect("info").file_size <= open_len,
        "{tag}: the reported size counts more than the file"
    );
    img.close().expect("close");
    let closed_len = std::fs::metadata(&path).expect("stat").len();
    assert_check_clean(&path);
    assert_compare_model(&path, &model, &dir);
    (open_len, closed_len)
}

/// Whether O_DIRECT opens work where the tests' temporary files live (tmpfs before 6.6 not).
fn direct_io_supported() -> bool {
    let dir = TempDir::new("direct-probe");
    let path = dir.join("probe.qcow2");
    qemu_create(&path, MIB, "");
    Image::open(
        &path,
        &OpenOptions {
            direct: true,
            ..Default::default()
        },
    )
    .is_ok()
}

/// Whether the tests' temporary files live on tmpfs or ramfs, where files never grow ahead
/// (reserved blocks there would be memory), as coreutils' `stat -f` names the file system.
fn temp_files_in_memory() -> bool {
    let dir = TempDir::new("fs-probe");
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", path_str(&dir.join("."))])
        .output()
        .expect("run stat -f");
    let fs = String::from_utf8_lossy(&out.stdout);
    matches!(fs.trim(), "tmpfs" | "ramfs")
}

#[test]
fn files_on_disk_grow_ahead_of_allocation_and_cut_the_growth_off_at_close() {
    // Strided 4 KiB writes (one per cluster), a sequential run, an unaligned write (the
    // O_DIRECT read-modify-write path) and a last write that ends inside its cluster.
    let mut writes: Vec<(u64, usize)> = (0..200).map(|i| (i * CS, 4096)).collect();
    writes.extend((0..64).map(|i| (20 * MIB + i * 4096, 4096)));
    writes.push((30 * MIB + 1000, 3000));
    writes.push((40 * MIB + 8192, 4096));
    let in_memory = temp_files_in_memory();
    let (buffered_open, buffered) = lengths_of_writes("grow-buffered", false, &writes);
    assert_eq!(
        buffered_open > buffered,
        !in_memory,
        "buffered: {buffered_open} bytes open, {buffered} closed (temporary files in memory: {in_memory})"
    );
    if !direct_io_supported() {
        eprintln!("no O_DIRECT for temporary files: the O_DIRECT half skipped");
        return;
    }
    let (direct_open, direct) = lengths_of_writes("grow-direct", true, &writes);
    assert_eq!(
        direct_open > direct,
        !in_memory,
        "O_DIRECT: {direct_open} bytes open, {direct} closed (temporary files in memory: {in_memory})"
    );
    assert_eq!(
        direct, buffered,
        "O_DIRECT and buffered writes leave different lengths"
    );
}

#[test]
fn direct_io_whole_cluster_writes_leave_the_file_as_long_as_qemus() {
    if !direct_io_supported() {
        eprintln!("no O_DIRECT for temporary files: skipped");
        return;
    }
    let writes: Vec<(u64, usize)> = (0..150).map(|i| (i * 3 * CS, CS as usize)).collect();
    let (_, ours) = lengths_of_writes("grow-vs-qemu", true, &writes);
    let dir = TempDir::new("grow-qemu");
    let path = dir.join("q.qcow2");
    qemu_create(&path, 64 * MIB, "");
    let cmds: Vec<String> = writes
        .iter()
        .map(|&(at, len)| format!("write -P 0x11 {at} {len}"))
        .collect();
    let mut args: Vec<String> = ["-f", "qcow2", "-t", "none"].map(String::from).to_vec();
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path_str(&path).to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &argv);
    assert_eq!(ours, std::fs::metadata(&path).expect("stat").len());
}
