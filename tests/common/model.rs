//! A seeded PRNG, recognisable test data, and the raw reference model of a guest disk.

use std::fs;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Seeded PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Data that is recognisable when a comparison fails: every 8-byte word holds a tag and its
/// own guest offset.
pub fn tagged_data(tag: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let word = pos / 8;
        let wb = (word ^ ((tag as u64) << 56)).to_le_bytes();
        *b = wb[(pos % 8) as usize] ^ tag;
        if *b == 0 {
            *b = tag | 1;
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Raw reference model
// ---------------------------------------------------------------------------------------------

/// What the guest should see, kept in memory and written to a raw file for `qemu-img compare`.
pub struct RawModel {
    pub data: Vec<u8>,
    pub cluster_size: u64,
    /// v2 image with a backing file: discarded clusters read the backing data again.
    pub discard_reveals_backing: bool,
    /// The backing content as seen through the overlay (zero-extended to the virtual size).
    pub backing: Option<Vec<u8>>,
}

impl RawModel {
    pub fn new(size: u64, cluster_size: u64) -> RawModel {
        RawModel {
            data: vec![0; size as usize],
            cluster_size,
            discard_reveals_backing: false,
            backing: None,
        }
    }

    pub fn with_backing(size: u64, cluster_size: u64, backing: &[u8], version: u32) -> RawModel {
        let mut b = vec![0u8; size as usize];
        let n = backing.len().min(size as usize);
        b[..n].copy_from_slice(&backing[..n]);
        RawModel {
            data: b.clone(),
            cluster_size,
            discard_reveals_backing: version == 2,
            backing: Some(b),
        }
    }

    pub fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }

    pub fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// Clusters entirely inside `[off, off+len)` become zeros (or backing data in v2 with a
    /// backing file); partial clusters are untouched.
    pub fn discard(&mut self, off: u64, len: u64) {
        let cs = self.cluster_size;
        let first = off.div_ceil(cs);
        let end = (off + len) / cs;
        for c in first..end {
            let a = (c * cs) as usize;
            let b = ((c + 1) * cs).min(self.data.len() as u64) as usize;
            match (&self.backing, self.discard_reveals_backing) {
                (Some(bk), true) => self.data[a..b].copy_from_slice(&bk[a..b]),
                _ => self.data[a..b].fill(0),
            }
        }
    }

    pub fn save(&self, path: &Path) {
        fs::write(path, &self.data).expect("write raw reference");
    }
}
