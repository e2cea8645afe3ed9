//! Persistent-bitmap helpers: QEMU's view of a bitmap's dirty set (exported by `qemu-nbd -B`
//! and read with `qemu-img map ... x-dirty-bitmap=`), oxcow's view (walking
//! `Image::bitmap_status`), the granules a list of writes covers, and `qemu-img info`'s bitmap
//! list.

use super::{path_str, qemu_info, run, unique_id, Json};
use oxcow::Image;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Dirty ranges as (offset, length), sorted and merged.
pub type Ranges = Vec<(u64, u64)>;

/// Sorts and merges touching ranges.
pub fn merge_ranges(mut r: Ranges) -> Ranges {
    r.sort();
    let mut out: Ranges = Vec::new();
    for (o, l) in r {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// The granules of `granularity` bytes that the byte ranges `touched` cover, as ranges
/// clamped to a disk of `size` bytes.
pub fn granules(touched: &[(u64, u64)], granularity: u64, size: u64) -> Ranges {
    merge_ranges(
        touched
            .iter()
            .filter(|&&(_, l)| l > 0)
            .map(|&(o, l)| {
                let a = o / granularity * granularity;
                let b = ((o + l).div_ceil(granularity) * granularity).min(size);
                (a, b - a)
            })
            .collect(),
    )
}

/// A `qemu-nbd` serving one image read-only with a bitmap exported; killed on drop.
struct Nbd {
    child: Child,
    sock: std::path::PathBuf,
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn serve(path: &Path, bitmap: &str) -> Nbd {
    let sock = std::env::temp_dir().join(format!("oxcow-nbd-{}.sock", unique_id()));
    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", bitmap, "-k"])
        .arg(&sock)
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let nbd = Nbd { child, sock };
    let t0 = Instant::now();
    while !nbd.sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nbd
}

/// QEMU's dirty set of bitmap `name` of the image at `path`: exported with `qemu-nbd -B` and
/// read with `qemu-img map`, where dirty ranges show as `"data": false`.
pub fn qemu_dirty_ranges(path: &Path, name: &str) -> Ranges {
    let nbd = serve(path, name);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=,x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        path_str(&nbd.sock)
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    assert_eq!(out.code, 0, "qemu-img map over nbd: {}", out.all());
    let j = Json::parse(&out.stdout);
    merge_ranges(
        j.as_array()
            .iter()
            .filter(|e| !e.get("data").as_bool())
            .map(|e| (e.get("start").as_u64(), e.get("length").as_u64()))
            .collect(),
    )
}

/// oxcow's dirty set of bitmap `name`, by walking `bitmap_status` over the whole disk.
pub fn oxcow_dirty_ranges(img: &Image, name: &str) -> Ranges {
    let size = img.virtual_size();
    let mut off = 0;
    let mut out = Vec::new();
    while off < size {
        let e = img
            .bitmap_status(name, off, size - off)
            .unwrap_or_else(|e| panic!("bitmap_status({name}, {off}): {e}"));
        assert!(e.length > 0 && e.offset == off, "bad extent {e:?}");
        if e.flags & oxcow::EXTENT_DIRTY != 0 {
            out.push((off, e.length));
        }
        off += e.length;
    }
    merge_ranges(out)
}

/// `qemu-img info`'s bitmaps as (name, granularity, flags) in directory order.
pub fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let j = qemu_info(path);
    let Some(bms) = j
        .opt("format-specific")
        .and_then(|f| f.opt("data"))
        .and_then(|d| d.opt("bitmaps"))
    else {
        return Vec::new();
    };
    bms.as_array()
        .iter()
        .map(|b| {
            (
                b.get("name").as_str().to_string(),
                b.get("granularity").as_u64(),
                b.get("flags")
                    .as_array()
                    .iter()
                    .map(|f| f.as_str().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// oxcow's bitmaps in the same shape as [`qemu_bitmaps`] (flags `auto`, `in-use`).
pub fn oxcow_bitmaps(img: &Image) -> Vec<(String, u64, Vec<String>)> {
    img.bitmaps()
        .expect("bitmaps")
        .into_iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.flags & oxcow::BITMAP_INCONSISTENT != 0 {
                flags.push("in-use".to_string());
            }
            if b.flags & oxcow::BITMAP_AUTO != 0 {
                flags.push("auto".to_string());
            }
            (b.name, b.granularity, flags)
        })
        .collect()
}
