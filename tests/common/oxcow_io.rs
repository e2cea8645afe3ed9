//! Opening images with oxcow and checking what it reads against a reference.

use std::fs;
use std::path::Path;

use oxcow::{Image, OpenOptions};

use super::{qemu_map, Rng};

// ---------------------------------------------------------------------------------------------
// oxcow helpers
// ---------------------------------------------------------------------------------------------

pub fn open_rw(path: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "oxcow open rw {}: {e} (errno {})",
            path.display(),
            e.errno()
        )
    })
}

pub fn open_ro(path: &Path) -> Image {
    Image::open(path, &OpenOptions::default()).unwrap_or_else(|e| {
        panic!(
            "oxcow open ro {}: {e} (errno {})",
            path.display(),
            e.errno()
        )
    })
}

/// Reads the whole guest disk through oxcow in odd-sized chunks, some of them vectored.
pub fn oxcow_read_all(img: &Image) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let chunk = [1 << 20, 65536 + 4097, 123_457, 300_000][(i % 4) as usize];
        let n = (size - off).min(chunk) as usize;
        let buf = &mut out[off as usize..off as usize + n];
        if i % 3 == 2 && n > 10 {
            let (a, rest) = buf.split_at_mut(n / 3);
            let (b, c) = rest.split_at_mut(7.min(rest.len()));
            let mut bufs: Vec<&mut [u8]> = vec![a, b, c];
            img.read_vectored_at(&mut bufs, off)
                .unwrap_or_else(|e| panic!("read_vectored_at({off:#x}, {n}): {e}"));
        } else {
            img.read_at(buf, off)
                .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}): {e}"));
        }
        off += n as u64;
        i += 1;
    }
    out
}

/// Panics with the first differing offset (and some context) if `got != want`.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let mut last = first;
        let mut count = 0u64;
        for i in first..got.len() {
            if got[i] != want[i] {
                last = i;
                count += 1;
            }
        }
        let ctx = |v: &[u8]| {
            let a = first.saturating_sub(8);
            let b = (first + 24).min(v.len());
            format!("{:02x?}", &v[a..b])
        };
        panic!(
            "{what}: {count} bytes differ, first at {first:#x}, last at {last:#x}\n  got  [{:#x}..]: {}\n  want [{:#x}..]: {}",
            first.saturating_sub(8),
            ctx(got),
            first.saturating_sub(8),
            ctx(want)
        );
    }
}

/// Random unaligned sub-range reads through oxcow, compared with `want`.
pub fn spot_check_reads(img: &Image, want: &[u8], rng: &mut Rng, n: usize) {
    let size = want.len() as u64;
    for _ in 0..n {
        let off = rng.below(size);
        let len = rng.range(1, (size - off).min(200_000));
        let mut buf = vec![0xeeu8; len as usize];
        img.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {len}): {e}"));
        assert_same_bytes(
            &buf,
            &want[off as usize..(off + len) as usize],
            &format!("read {off:#x}+{len}"),
        );
    }
}
/// Streams the whole guest disk through oxcow (odd chunk sizes, some vectored reads) and
/// compares it with a raw file, then does random unaligned spot reads.
pub fn assert_oxcow_matches_raw_file(img: &Image, raw: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(raw).expect("open raw");
    let raw_len = f.metadata().unwrap().len();
    let size = img.virtual_size();
    assert_eq!(
        size,
        raw_len,
        "virtual size {size} vs raw length {raw_len} of {}",
        raw.display()
    );
    let chunks = [1u64 << 20, 65536 + 4097, 123_457, (3 << 20) - 1, 511];
    let mut off = 0u64;
    let mut i = 0usize;
    while off < size {
        let n = (size - off).min(chunks[i % chunks.len()]) as usize;
        let mut got = vec![0xeeu8; n];
        if i % 3 == 2 && n > 10 {
            let (a, rest) = got.split_at_mut(n / 3);
            let (b, c) = rest.split_at_mut(7);
            let mut bufs: Vec<&mut [u8]> = vec![a, b, c];
            img.read_vectored_at(&mut bufs, off)
                .unwrap_or_else(|e| panic!("read_vectored_at({off:#x}, {n}): {e}"));
        } else {
            img.read_at(&mut got, off)
                .unwrap_or_else(|e| panic!("read_at({off:#x}, {n}): {e}"));
        }
        let mut want = vec![0u8; n];
        f.read_exact_at(&mut want, off).unwrap();
        assert_same_bytes(
            &got,
            &want,
            &format!("oxcow read at guest {off:#x}+{n:#x} vs {}", raw.display()),
        );
        off += n as u64;
        i += 1;
    }
    let mut rng = Rng::new(seed);
    for _ in 0..64 {
        let off = rng.below(size);
        let len = rng.range(1, (size - off).min(100_000));
        let mut got = vec![0xeeu8; len as usize];
        img.read_at(&mut got, off)
            .unwrap_or_else(|e| panic!("read_at({off:#x}, {len}): {e}"));
        let mut want = vec![0u8; len as usize];
        f.read_exact_at(&mut want, off).unwrap();
        assert_same_bytes(&got, &want, &format!("spot read at {off:#x}+{len}"));
    }
}

/// Walks oxcow's block_status across every `qemu-img map` entry and checks the flags agree.
pub fn check_block_status(p: &Path, has_backing: bool) {
    let map = qemu_map(p);
    let img = open_ro(p);
    let mut expected_next = 0;
    for e in &map {
        assert_eq!(e.start, expected_next, "qemu map not contiguous");
        expected_next = e.start + e.length;
        let mut pos = e.start;
        while pos < e.start + e.length {
            let want_len = e.start + e.length - pos;
            let x = img
                .block_status(pos, want_len)
                .unwrap_or_else(|err| panic!("block_status({pos:#x}, {want_len:#x}): {err}"));
            assert_eq!(x.offset, pos);
            assert!(
                x.length >= 1 && x.length <= want_len,
                "extent length {x:?} for request {want_len:#x}"
            );
            let ctx = format!("{}: oxcow {x:?} vs qemu {e:?}", p.display());
            if e.depth == 0 && e.present {
                assert!(
                    x.flags & oxcow::EXTENT_ALLOCATED != 0,
                    "not allocated: {ctx}"
                );
                assert!(
                    x.flags & oxcow::EXTENT_BACKING == 0,
                    "backing flag on allocated range: {ctx}"
                );
                if e.compressed {
                    assert!(
                        x.flags & oxcow::EXTENT_COMPRESSED != 0,
                        "compressed flag missing: {ctx}"
                    );
                } else {
                    assert!(
                        x.flags & oxcow::EXTENT_COMPRESSED == 0,
                        "compressed flag set: {ctx}"
                    );
                }
                if e.zero && !e.data {
                    assert!(
                        x.flags & oxcow::EXTENT_ZERO != 0,
                        "zero flag missing: {ctx}"
                    );
                } else {
                    assert!(
                        x.flags & oxcow::EXTENT_ZERO == 0,
                        "zero flag set on data: {ctx}"
                    );
                    if let Some(o) = e.offset {
                        assert_eq!(x.host_offset, o + (pos - e.start), "host offset: {ctx}");
                    }
                }
            } else if has_backing {
                assert_eq!(
                    x.flags & (oxcow::EXTENT_ALLOCATED | oxcow::EXTENT_BACKING),
                    oxcow::EXTENT_BACKING,
                    "expected backing: {ctx}"
                );
            } else {
                assert!(
                    x.flags & oxcow::EXTENT_ALLOCATED == 0,
                    "unallocated range reported allocated: {ctx}"
                );
                assert!(
                    x.flags & oxcow::EXTENT_ZERO != 0,
                    "unallocated range without backing not zero: {ctx}"
                );
            }
            pos += x.length;
        }
    }
    assert_eq!(expected_next, img.virtual_size());
}
