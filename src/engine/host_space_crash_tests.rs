//! Crash points of the host-space paths, on the simulated host file: allocating writes that
//! leave the zero-fill to the host (a reused cluster still holding a discarded cluster's bytes
//! must read as zeros around the new data in every crash state), and discard with
//! `discard_unmap` (punching freed clusters never touches data that is still mapped).

use super::crash_tests::{each_crash_state, open_sim, rw, Rng, Scratch};
use super::Image;
use crate::format::GuestOffset;
use crate::storage::sim::SimFile;
use crate::storage::HostFile;
use crate::{CreateOptions, OpenOptions};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;
/// Bytes of every cluster the first phase fills and then discards.
const STALE: u8 = 0xee;
/// Bytes of the second phase's partial writes.
const NEW: u8 = 0x5a;

/// The host cluster offsets the guest clusters of `[0, SIZE)` map to.
fn host_clusters(img: &Image) -> HashSet<u64> {
    let cs = img.geo.cluster_size();
    let mut m = img.lock_meta();
    (0..SIZE / cs)
        .filter_map(|c| m.lookup(&img.file, GuestOffset::new(c * cs)).ok())
        .filter_map(|map| map.host_cluster())
        .map(|h| h.get())
        .collect()
}

/// `qemu-img check` finds at worst leaks in `bytes`; returns the guest contents.
fn check_and_read(dir: &Path, bytes: &[u8], what: &str) -> Vec<u8> {
    check_and_read_lazy(dir, bytes, false, what)
}

/// [`check_and_read`]; with `lazy`, after the read-write open that repairs a dirty
/// lazy-refcounts image, and then the check must be clean.
fn check_and_read_lazy(dir: &Path, bytes: &[u8], lazy: bool, what: &str) -> Vec<u8> {
    let p = dir.join("state.qcow2");
    std::fs::write(&p, bytes).expect("write state");
    if lazy {
        let img = Image::open(&p, &rw()).unwrap_or_else(|e| panic!("{what}: repairing open: {e}"));
        img.close().expect("close");
    }
    crate::engine::crash_tests::assert_qemu_check(&p, if lazy { &[0] } else { &[0, 3] }, what);
    let img = Image::open(&p, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open after crash: {e}"));
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{what}: read after crash: {e}"));
    got
}

/// Fills every cluster with stale bytes, clears them all (`discard`: the clusters are freed;
/// else write_zeroes without unmap: they stay allocated as zero clusters, stale bytes and all)
/// and makes that durable, then writes `len` bytes at `at` into every cluster (reusing the
/// freed or zero clusters) and checks every crash state: around the new bytes every cluster
/// reads as zeros, never as the stale bytes.
fn reused_clusters_read_as_zeros(
    tag: &str,
    opts: CreateOptions,
    (at, len): (u64, u64),
    fallocate: bool,
    discard: bool,
) {
    let dir = Scratch::new(tag);
    let path = dir.0.join("img.qcow2");
    let cs = u64::from(opts.cluster_size);
    crate::create(&path, SIZE, &opts).expect("create");
    let (sim, img) = open_sim(std::fs::read(&path).expect("read"), &path);
    if !fallocate {
        sim.refuse_fallocate();
    }
    img.write_at(&vec![STALE; SIZE as usize], 0).expect("fill");
    img.flush().expect("flush fill");
    let stale_hosts = host_clusters(&img);
    if discard {
        img.discard(0, SIZE).expect("discard");
    } else {
        let keep = crate::ZeroFlags { may_unmap: false };
        img.write_zeroes(0, SIZE, keep).expect("write_zeroes");
    }
    img.flush().expect("flush discard");
    let base = sim.contents();
    let start = sim.journal().len();
    for c in 0..SIZE / cs {
        img.write_at(&vec![NEW; len as usize], c * cs + at)
            .expect("partial write");
    }
    img.flush().expect("flush writes");
    let reused = host_clusters(&img).intersection(&stale_hosts).count();
    assert!(
        reused as u64 >= SIZE / cs / 2,
        "{tag}: only {reused} writes reused a freed cluster"
    );
    let journal = sim.journal()[start..].to_vec();
    std::mem::forget(img); // the process "dies" here
    let mut rng = Rng(31);
    let states = each_crash_state(
        &base,
        &journal,
        60,
        |_| rng.next(),
        |bytes, what| {
            let what = format!("{tag}: {what}");
            let got = check_and_read(&dir.0, bytes, &what);
            for (i, &b) in got.iter().enumerate() {
                let inside = (at..at + len).contains(&(i as u64 % cs));
                assert!(
                    b == 0 || (inside && b == NEW),
                    "{what}: guest byte {i:#x} reads {b:#x} (a reused cluster's stale bytes?)"
                );
            }
        },
    );
    assert!(states > 20, "{tag}: too few crash states ({states})");
    // After the completed flush every new byte is there.
    let all = super::crash_tests::state_at(&base, &journal, journal.len(), &|_| false);
    let got = check_and_read(&dir.0, &all, &format!("{tag}: after the flush"));
    for (i, &b) in got.iter().enumerate() {
        let inside = (at..at + len).contains(&(i as u64 % cs));
        assert_eq!(b, if inside { NEW } else { 0 }, "{tag}: byte {i:#x}");
    }
}

#[test]
fn every_crash_point_of_partial_writes_into_reused_clusters_reads_zeros_around_the_data() {
    let plain = CreateOptions {
        cluster_size: 4096,
        ..Default::default()
    };
    let span = (1024, 512);
    reused_clusters_read_as_zeros("reuse-falloc", plain.clone(), span, true, true);
    reused_clusters_read_as_zeros("reuse-nofalloc", plain.clone(), span, false, true);
    // Zero clusters that kept their host cluster (write_zeroes without unmap).
    reused_clusters_read_as_zeros("zero-falloc", plain.clone(), span, true, false);
    reused_clusters_read_as_zeros("zero-nofalloc", plain, span, false, false);
    let ext = CreateOptions {
        cluster_size: 16384,
        extended_l2: true,
        ..Default::default()
    };
    reused_clusters_read_as_zeros("reuse-extl2", ext.clone(), (1024 + 50, 100), true, true);
    reused_clusters_read_as_zeros("zero-extl2", ext, (1024 + 50, 100), true, false);
}

/// Opens `bytes` read-write with discard=unmap on a simulated file named `path`.
fn open_sim_unmap(bytes: Vec<u8>, path: &Path) -> (Arc<SimFile>, Image) {
    let sim = Arc::new(SimFile::new(bytes));
    let file = HostFile::new(sim.clone(), path.display().to_string());
    let opts = OpenOptions {
        discard_unmap: true,
        ..rw()
    };
    let img = Image::open_file(file, path, &opts, 0).expect("open simulated image");
    (sim, img)
}

/// One round of random writes, discards and unmapping write_zeroes; returns the guest bytes
/// it touched.
fn round(img: &Image, model: &mut [u8], rng: &mut Rng, cs: u64) -> Vec<bool> {
    let mut touched = vec![false; SIZE as usize];
    for _ in 0..12 {
        let off = rng.next() % (SIZE - 1);
        let len = (1 + rng.next() % (4 * cs)).min(SIZE - off);
        let r = off as usize..(off + len) as usize;
        touched[r.clone()].fill(true);
        match rng.next() % 3 {
            0 => {
                let (a, b) = (off.div_ceil(cs) * cs, (off + len) / cs * cs);
                img.discard(off, len).expect("discard");
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            1 => {
                let flags = crate::ZeroFlags { may_unmap: true };
                img.write_zeroes(off, len, flags).expect("write_zeroes");
                model[r].fill(0);
            }
            _ => {
                let tag = rng.next() as u8 | 1;
                let buf: Vec<u8> = (0..len).map(|i| tag ^ (i as u8)).collect();
                img.write_at(&buf, off).expect("write");
                model[r].copy_from_slice(&buf);
            }
        }
    }
    touched
}

/// With discard=unmap, rounds of discards, unmapping write_zeroes and writes (reusing the
/// punched clusters), each ended by a flush: in every crash state, every byte the round in
/// progress did not touch reads as after the last completed flush. A punch of a cluster still
/// mapped, or reused before the punch, would zero flushed data.
#[test]
fn every_crash_point_of_discard_with_unmap_keeps_the_data_still_mapped() {
    discard_unmap_crash_points("unmap", false);
}

#[test]
fn every_crash_point_of_discard_with_unmap_on_a_lazy_refcounts_image_keeps_the_data() {
    discard_unmap_crash_points("unmap-lazy", true);
}

fn discard_unmap_crash_points(tag: &str, lazy: bool) {
    let dir = Scratch::new(tag);
    let path = dir.0.join("img.qcow2");
    let cs = 4096u64;
    let opts = CreateOptions {
        cluster_size: cs as u32,
        lazy_refcounts: lazy,
        ..Default::default()
    };
    crate::create(&path, SIZE, &opts).expect("create");
    let (sim, img) = open_sim_unmap(std::fs::read(&path).expect("read"), &path);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i * 7 + 1) as u8 | 1).collect();
    img.write_at(&model, 0).expect("fill");
    img.flush().expect("flush fill");
    let base = sim.contents();
    let start = sim.journal().len();
    let mut rng = Rng(41);
    // Per completed flush: its journal position (relative to `start`), the guest contents
    // then, and the bytes the next round touched.
    let mut flushes: Vec<(usize, Vec<u8>, Vec<bool>)> = Vec::new();
    let mut before = model.clone();
    let mut at = 0;
    for _ in 0..6 {
        let touched = round(&img, &mut model, &mut rng, cs);
        img.flush().expect("flush round");
        flushes.push((at, std::mem::replace(&mut before, model.clone()), touched));
        at = sim.journal().len() - start;
    }
    let journal = sim.journal()[start..].to_vec();
    std::mem::forget(img); // the process "dies" here
    let mut rng = Rng(43);
    let states = each_crash_state(
        &base,
        &journal,
        100,
        |_| rng.next(),
        |bytes, what| {
            let k: usize = what
                .split_whitespace()
                .nth(2)
                .and_then(|f| f.split('/').next())
                .and_then(|n| n.parse().ok())
                .expect("crash point in the description");
            let Some((_, flushed, touched)) = flushes.iter().rev().find(|f| f.0 <= k) else {
                return;
            };
            let got = check_and_read_lazy(&dir.0, bytes, lazy, &format!("{tag}: {what}"));
            for (i, &g) in got.iter().enumerate() {
                assert!(
                    touched[i] || g == flushed[i],
                    "{tag}: {what}: flushed byte {i:#x} reads {g:#x}, expected {:#x}",
                    flushed[i]
                );
            }
        },
    );
    assert!(states > 40, "too few crash states ({states})");
    let all = super::crash_tests::state_at(&base, &journal, journal.len(), &|_| false);
    assert_eq!(
        check_and_read_lazy(&dir.0, &all, lazy, &format!("{tag}: after the last flush")),
        model
    );
}
