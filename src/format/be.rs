//! Big-endian field access on byte slices whose bounds the caller has already checked.
//!
//! Every helper takes the slice and an offset; out-of-bounds access is a programming error in
//! oxcow (callers validate lengths first), so these index normally.

/// Reads a big-endian u16 at `off`.
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Reads a big-endian u32 at `off`.
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

/// Reads a big-endian u64 at `off`.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Writes a big-endian u16 at `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Decodes a table of big-endian u64 entries (L1, L2, refcount table).
pub fn u64_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64_at(c, 0)).collect()
}

/// Encodes a table of u64 entries as big-endian bytes.
pub fn u64_table_bytes(t: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.len() * 8);
    for v in t {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}
