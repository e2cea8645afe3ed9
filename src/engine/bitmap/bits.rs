//! One in-memory dirty bitmap: a bit per granule of guest data, set lock-free by writers.
//!
//! The bits are cut into chunks of one bitmap-data cluster each (the unit of the on-disk
//! bitmap table), allocated only when a bit in them is first set, so memory follows the dirty
//! data and not the disk size. A chunk stored on disk as "all ones" (table entry 1) stays a
//! marker without memory. Writers set bits with `fetch_or`; readers (status, store, merge) run
//! with writers quiesced or accept a snapshot that may or may not include a concurrent write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// One chunk of bits (one bitmap-data cluster).
#[derive(Debug)]
enum Chunk {
    /// Every bit set (loaded from an all-ones table entry or merged from one).
    Ones,
    /// The bits, 64 per word, bit `i` of the chunk at `words[i / 64] >> (i % 64)`.
    Words(Box<[AtomicU64]>),
}

/// What one chunk holds, for storing it.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkImage {
    /// No bit set: stored as table entry 0.
    Zero,
    /// The cluster's bytes in QEMU's layout (bit `i` at byte `i / 8`, bit `i % 8`), bits past
    /// the end of the disk cleared.
    Bytes(Vec<u8>),
}

/// A dirty bitmap over a disk of `size` bytes, `1 << gbits` bytes per bit.
#[derive(Debug)]
pub struct DirtyBits {
    gbits: u8,
    size: u64,
    nbits: u64,
    /// log2 of the bits per chunk (cluster size in bits).
    chunk_log: u32,
    chunks: Box<[OnceLock<Chunk>]>,
}

impl DirtyBits {
    /// An empty bitmap. The caller bounds the chunk count ([`Self::chunks_for`]) first.
    pub fn new(size: u64, gbits: u8, cluster_bits: u32) -> DirtyBits {
        let chunk_log = cluster_bits + 3;
        let n = Self::chunks_for(size, gbits, cluster_bits);
        DirtyBits {
            gbits,
            size,
            nbits: size.div_ceil(1u64 << gbits),
            chunk_log,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Chunks (= bitmap table entries) a bitmap of this shape has.
    pub fn chunks_for(size: u64, gbits: u8, cluster_bits: u32) -> u64 {
        size.div_ceil(1u64 << gbits)
            .div_ceil(1u64 << (cluster_bits + 3))
    }

    /// Bytes of memory the chunk index takes (for budgets).
    pub fn index_bytes(&self) -> u64 {
        (self.chunks.len() * std::mem::size_of::<OnceLock<Chunk>>()) as u64
    }

    /// Guest bytes per bit, as a power of two.
    pub fn granularity_bits(&self) -> u8 {
        self.gbits
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    fn words_per_chunk(&self) -> usize {
        1usize << (self.chunk_log - 6)
    }

    fn new_words(&self) -> Chunk {
        Chunk::Words(
            (0..self.words_per_chunk())
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// Marks every granule that `[off, off + len)` touches dirty (clamped to the disk).
    pub fn set_range(&self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        let first = off >> self.gbits;
        let last = (end - 1) >> self.gbits;
        self.set_bits(first, last + 1);
    }

    /// Sets bits `[a, b)`.
    fn set_bits(&self, a: u64, b: u64) {
        let b = b.min(self.nbits);
        if a >= b {
            return;
        }
        let cl = self.chunk_log;
        for c in (a >> cl)..=((b - 1) >> cl) {
            let base = c << cl;
            let lo = a.max(base) - base;
            let hi = b.min(base + (1u64 << cl)) - base;
            let Some(slot) = self.chunks.get(c as usize) else {
                return;
            };
            let chunk = slot.get_or_init(|| self.new_words());
            if let Chunk::Words(w) = chunk {
                set_word_range(w, lo, hi);
            }
        }
    }

    /// Whether bit `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        let c = (bit >> self.chunk_log) as usize;
        match self.chunks.get(c).and_then(|s| s.get()) {
            None => false,
            Some(Chunk::Ones) => true,
            Some(Chunk::Words(w)) => {
                let i = bit & ((1u64 << self.chunk_log) - 1);
                w[(i / 64) as usize].load(Ordering::Relaxed) >> (i % 64) & 1 == 1
            }
        }
    }

    /// The first bit in `[from, to)` whose state is not `dirty`, or `to`.
    pub fn next_change(&self, from: u64, to: u64, dirty: bool) -> u64 {
        let to = to.min(self.nbits);
        let cl = self.chunk_log;
        let mut bit = from;
        while bit < to {
            let c = bit >> cl;
            let chunk_end = ((c + 1) << cl).min(to);
            match self.chunks.get(c as usize).and_then(|s| s.get()) {
                None if dirty => return bit,
                Some(Chunk::Ones) if !dirty => return bit,
                None | Some(Chunk::Ones) => bit = chunk_end,
                Some(Chunk::Words(w)) => {
                    let base = c << cl;
                    match first_other(w, bit - base, chunk_end - base, dirty) {
                        Some(i) => return base + i,
                        None => bit = chunk_end,
                    }
                }
            }
        }
        to
    }

    /// Number of bits.
    #[cfg(test)]
    pub fn bit_count(&self) -> u64 {
        self.nbits
    }

    /// The dirty runs, in bytes of the disk: calls `f(offset, len)` for each maximal run.
    pub fn for_each_dirty(&self, mut f: impl FnMut(u64, u64)) {
        let mut bit = 0;
        while bit < self.nbits {
            let start = self.next_change(bit, self.nbits, false);
            if start >= self.nbits {
                break;
            }
            let end = self.next_change(start, self.nbits, true);
            let off = start << self.gbits;
            let stop = (end << self.gbits).min(self.size);
            f(off, stop - off);
            bit = end;
        }
    }

    /// Sets every bit set in `other` (any granularity; the same disk size): a granule of this
    /// bitmap is dirty when any byte it covers is dirty in `other`.
    pub fn merge_from(&self, other: &DirtyBits) {
        if other.gbits == self.gbits && other.chunk_log == self.chunk_log {
            for (c, slot) in other.chunks.iter().enumerate() {
                match slot.get() {
                    None => {}
                    Some(Chunk::Ones) => self.fill_chunk(c),
                    Some(Chunk::Words(w)) => {
                        if let Some(dst) = self.chunks.get(c) {
                            if w.iter().any(|x| x.load(Ordering::Relaxed) != 0) {
                                if let Chunk::Words(d) = dst.get_or_init(|| self.new_words()) {
                                    for (d, s) in d.iter().zip(w.iter()) {
                                        d.fetch_or(s.load(Ordering::Relaxed), Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            return;
        }
        other.for_each_dirty(|off, len| self.set_range(off, len));
    }

    /// Sets every bit of chunk `c`.
    fn fill_chunk(&self, c: usize) {
        let Some(slot) = self.chunks.get(c) else {
            return;
        };
        if slot.set(Chunk::Ones).is_err() {
            if let Some(Chunk::Words(w)) = slot.get() {
                for x in w.iter() {
                    x.store(!0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Loads chunk `c` as all ones (table entry 1).
    pub fn load_ones(&self, c: usize) {
        self.fill_chunk(c);
    }

    /// Loads chunk `c` from a bitmap-data cluster in QEMU's layout. Returns whether memory
    /// was allocated (the cluster had a bit set).
    pub fn load_bytes(&self, c: usize, bytes: &[u8]) -> bool {
        if bytes.iter().all(|&b| b == 0) {
            return false;
        }
        let Some(slot) = self.chunks.get(c) else {
            return false;
        };
        let chunk = slot.get_or_init(|| self.new_words());
        if let Chunk::Words(w) = chunk {
            for (x, b) in w.iter().zip(bytes.chunks(8)) {
                let mut le = [0u8; 8];
                le[..b.len()].copy_from_slice(b);
                x.fetch_or(u64::from_le_bytes(le), Ordering::Relaxed);
            }
        }
        // Bits past the end of the disk are not part of the bitmap.
        self.clear_tail();
        true
    }

    /// Clears the bits past the last granule of the disk in the last chunk.
    fn clear_tail(&self) {
        let Some(Chunk::Words(w)) = self.chunks.last().and_then(|s| s.get()) else {
            return;
        };
        let within = self.nbits - ((self.chunks.len() as u64 - 1) << self.chunk_log);
        for (i, x) in w.iter().enumerate() {
            let lo = i as u64 * 64;
            if lo >= within {
                x.store(0, Ordering::Relaxed);
            } else if within - lo < 64 {
                x.fetch_and((1u64 << (within - lo)) - 1, Ordering::Relaxed);
            }
        }
    }

    /// Chunk `c` as it is stored: nothing when no bit is set, else its bytes with the bits past
    /// the end of the disk cleared.
    pub fn chunk_image(&self, c: usize) -> ChunkImage {
        let Some(chunk) = self.chunks.get(c).and_then(|s| s.get()) else {
            return ChunkImage::Zero;
        };
        let base = (c as u64) << self.chunk_log;
        let within = self.nbits.saturating_sub(base).min(1u64 << self.chunk_log);
        let mut out = vec![0u8; self.words_per_chunk() * 8];
        for (i, o) in out.chunks_mut(8).enumerate() {
            let lo = i as u64 * 64;
            if lo >= within {
                break;
            }
            let mut v = match chunk {
                Chunk::Ones => !0,
                Chunk::Words(w) => w[i].load(Ordering::Relaxed),
            };
            if within - lo < 64 {
                v &= (1u64 << (within - lo)) - 1;
            }
            o.copy_from_slice(&v.to_le_bytes());
        }
        if out.iter().all(|&b| b == 0) {
            ChunkImage::Zero
        } else {
            ChunkImage::Bytes(out)
        }
    }

    /// A copy of this bitmap for a disk of `new_size` bytes: bits past the new end are
    /// dropped, a grown disk starts clean past the old end.
    #[allow(dead_code)] // called through Bitmaps::resize by the resize operation
    pub fn resized(&self, new_size: u64) -> DirtyBits {
        let out = DirtyBits::new(new_size, self.gbits, self.chunk_log - 3);
        self.for_each_dirty(|off, len| out.set_range(off, len));
        out
    }
}

/// Sets bits `[lo, hi)` of a chunk's words.
fn set_word_range(w: &[AtomicU64], lo: u64, hi: u64) {
    let mut i = lo;
    while i < hi {
        let word = (i / 64) as usize;
        let start = i % 64;
        let n = (hi - i).min(64 - start);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << start
        };
        // Skip the atomic read-modify-write when the bits are set already (rewrites of the
        // same blocks are the common case), keeping the cache line shared.
        if w[word].load(Ordering::Relaxed) & mask != mask {
            w[word].fetch_or(mask, Ordering::Relaxed);
        }
        i += n;
    }
}

/// The first bit in `[lo, hi)` of a chunk whose state is not `dirty`.
fn first_other(w: &[AtomicU64], lo: u64, hi: u64, dirty: bool) -> Option<u64> {
    let mut i = lo;
    while i < hi {
        let word = (i / 64) as usize;
        let start = i % 64;
        let v = w[word].load(Ordering::Relaxed);
        let other = (if dirty { !v } else { v }) >> start;
        let n = (hi - i).min(64 - start);
        let masked = if n == 64 {
            other
        } else {
            other & ((1u64 << n) - 1)
        };
        if masked != 0 {
            return Some(i + u64::from(masked.trailing_zeros()));
        }
        i += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_the_granules_they_touch_and_nothing_else() {
        let b = DirtyBits::new(1 << 20, 12, 9); // 256 bits, chunks of 4096 bits
        b.set_range(4095, 2); // granules 0 and 1
        b.set_range(10 * 4096, 4096); // granule 10
        assert!(b.get(0) && b.get(1) && !b.get(2) && b.get(10) && !b.get(11));
        assert_eq!(b.next_change(0, 256, true), 2);
        assert_eq!(b.next_change(2, 256, false), 10);
        assert_eq!(b.next_change(11, 256, false), 256);
        let mut runs = Vec::new();
        b.for_each_dirty(|o, l| runs.push((o, l)));
        assert_eq!(runs, vec![(0, 8192), (40960, 4096)]);
    }

    #[test]
    fn searches_start_anywhere_inside_a_word() {
        let b = DirtyBits::new(1 << 20, 9, 9); // 2048 bits
        b.set_range(70 * 512, 10 * 512); // bits 70..80
        assert_eq!(b.next_change(71, 2048, true), 80);
        assert_eq!(b.next_change(65, 2048, false), 70);
        assert_eq!(b.next_change(80, 2048, false), 2048);
        assert_eq!(b.next_change(75, 78, true), 78);
    }

    #[test]
    fn memory_is_allocated_only_for_chunks_with_a_dirty_bit() {
        let b = DirtyBits::new(1 << 40, 16, 16); // 16 Mi bits, 32 chunks of 512 Ki bits
        assert_eq!(b.chunk_count(), 32);
        b.set_range(1 << 39, 1);
        let allocated = b.chunks.iter().filter(|c| c.get().is_some()).count();
        assert_eq!(allocated, 1);
        assert_eq!(b.chunk_image(0), ChunkImage::Zero);
    }

    #[test]
    fn chunk_images_use_qemus_bit_order_and_clear_the_tail() {
        let b = DirtyBits::new(100 * 512, 9, 9); // 100 bits in one 4096-bit chunk
        b.set_range(0, 512);
        b.set_range(9 * 512, 1);
        let ChunkImage::Bytes(img) = b.chunk_image(0) else {
            panic!("dirty chunk stored as zero");
        };
        assert_eq!(img.len(), 512);
        assert_eq!(img[0], 1);
        assert_eq!(img[1], 2);
        let ones = DirtyBits::new(100 * 512, 9, 9);
        ones.load_ones(0);
        let ChunkImage::Bytes(img) = ones.chunk_image(0) else {
            panic!("all-ones chunk stored as zero");
        };
        assert_eq!(img[11], 0xff);
        assert_eq!(img[12], 0x0f, "bits past the disk must be clear");
        assert!(img[13..].iter().all(|&x| x == 0));
        let back = DirtyBits::new(100 * 512, 9, 9);
        assert!(back.load_bytes(0, &img));
        assert_eq!(back.next_change(0, 100, true), 100);
    }

    #[test]
    fn merges_across_granularities_cover_every_dirty_byte() {
        let fine = DirtyBits::new(1 << 20, 9, 16);
        fine.set_range(70_000, 10);
        let coarse = DirtyBits::new(1 << 20, 16, 16);
        coarse.merge_from(&fine);
        assert!(coarse.get(1) && !coarse.get(0) && !coarse.get(2));
        let back = DirtyBits::new(1 << 20, 9, 16);
        back.merge_from(&coarse);
        assert_eq!(back.next_change(0, 4096, false), 128);
        assert_eq!(back.next_change(128, 4096, true), 256);
        let r = coarse.resized(1 << 16);
        assert!(!r.get(1) && r.bit_count() == 1);
    }
}
