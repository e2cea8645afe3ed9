//! Compressed-cluster codecs: raw deflate (QEMU's "zlib") and zstd.

use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::options::CompressionType;
use std::cell::RefCell;

/// Decompresses one cluster: fills all of `out` from `input`, which may carry trailing bytes
/// (compressed data is stored in whole sectors). Fails if the stream ends before `out` is full.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let before_out = d.total_out();
        let before_in = d.total_in();
        let status = d
            .decompress(
                &input[d.total_in() as usize..],
                &mut out[d.total_out() as usize..],
                FlushDecompress::Finish,
            )
            .map_err(|e| {
                Error::corrupt(format!("invalid deflate data in compressed cluster: {e}"))
            })?;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        let stalled = d.total_out() == before_out && d.total_in() == before_in;
        if status == Status::StreamEnd || stalled {
            return Err(Error::corrupt(format!(
                "compressed cluster decompresses to {} bytes, expected {}",
                d.total_out(),
                out.len()
            )));
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| {
        Error::new(
            ErrorKind::NoMemory,
            format!("cannot create zstd decoder: {e}"),
        )
    })?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let in_before = inb.pos();
        let out_before = outb.pos();
        dec.run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("invalid zstd data in compressed cluster: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if inb.pos() == in_before && outb.pos() == out_before {
            return Err(Error::corrupt(format!(
                "compressed cluster decompresses to {} bytes, expected {}",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
}

/// QEMU's deflate parameters for compressed clusters: raw deflate (no zlib header) with a
/// 4 KiB window, so any reader that inflates with window bits -12 (QEMU does) can decode it.
const DEFLATE_WINDOW_BITS: u8 = 12;
/// zlib's default level, the one QEMU uses (`Z_DEFAULT_COMPRESSION`).
const DEFLATE_LEVEL: u32 = 6;
/// zstd's default level (`ZSTD_CLEVEL_DEFAULT`), the one QEMU uses.
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    /// One deflate state per thread, reset between clusters: allocating the state (about
    /// 300 KiB) for every 64 KiB cluster would cost as much as compressing it.
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    /// One zstd context per thread, for the same reason.
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one cluster. Returns `None` when the result would not be smaller than the
/// input (the caller then stores the cluster uncompressed, as QEMU does). Thread-safe and
/// lock-free: callers compress on as many threads as they like.
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    // Only output shorter than the input is useful; the encoders stop at the limit.
    let Some(limit) = input.len().checked_sub(1).filter(|&l| l > 0) else {
        return Ok(None);
    };
    match kind {
        CompressionType::Deflate => deflate(input, limit),
        CompressionType::Zstd => zstd_compress(input, limit),
    }
}

fn deflate(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(
                Compression::new(DEFLATE_LEVEL),
                false,
                DEFLATE_WINDOW_BITS,
            )
        });
        c.reset();
        let mut out = Vec::with_capacity(limit);
        let status = c
            .compress_vec(input, &mut out, FlushCompress::Finish)
            .map_err(|e| Error::io("deflate compression", std::io::Error::other(e)))?;
        // Anything but a finished stream means the output hit the limit.
        let done = status == Status::StreamEnd && c.total_in() as usize == input.len();
        Ok(done.then_some(out))
    })
}

fn zstd_compress(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::new(ErrorKind::NoMemory, format!("zstd context: {e}")))?,
            ),
        };
        let mut out = Vec::with_capacity(limit);
        // An error here is "destination too small" (incompressible data) or a context
        // failure; either way the cluster is stored uncompressed.
        match c.compress_to_buffer(input, &mut out) {
            Ok(n) if n <= limit => Ok(Some(out)),
            _ => Ok(None),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 300) as u8).collect()
    }

    #[test]
    fn both_codecs_round_trip_with_trailing_garbage() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let data = sample();
            let mut c = compress(kind, &data).unwrap().unwrap();
            c.extend_from_slice(&[0xAB; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn incompressible_or_tiny_input_is_stored_uncompressed() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(compress(kind, &noise).unwrap().is_none());
            assert!(compress(kind, &[7]).unwrap().is_none());
            assert!(compress(kind, &[]).unwrap().is_none());
        }
    }

    #[test]
    fn deflate_uses_a_4k_window_so_window_bits_12_decoders_accept_it() {
        // Data whose only repetition is 8 KiB back: a 32 KiB window would reference it.
        let mut x = 99u64;
        let block: Vec<u8> = (0..8192)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let data = [block.clone(), block.clone(), block].concat();
        let c = compress(CompressionType::Deflate, &data[..16384]).unwrap();
        // With a 4 KiB window the repeat is out of reach: nothing to gain, stored raw.
        assert!(
            c.is_none(),
            "a 32 KiB window found the 8 KiB-distant repeat"
        );
        // A strict 4 KiB-window inflater decodes what we write.
        let data = sample();
        let c = compress(CompressionType::Deflate, &data).unwrap().unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = Vec::with_capacity(data.len());
        d.decompress_vec(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn partly_random_clusters_of_every_size_compress_without_panicking() {
        // Guard for the capped-output path on every cluster size (zlib-rs 0.6.8 panicked on
        // some 16 KiB clusters there; tests/compress_convert.rs's mixed data caught it).
        let mut x = 7u64;
        for cs in [512usize, 4096, 16384, 65536, 2 << 20] {
            for random_part in [cs / 64, cs / 4, cs / 2, cs - cs / 16, cs] {
                let mut data = vec![0u8; cs];
                for b in &mut data[..random_part] {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                for kind in [CompressionType::Deflate, CompressionType::Zstd] {
                    if let Some(c) = compress(kind, &data).unwrap() {
                        let mut out = vec![0u8; cs];
                        decompress(kind, &c, &mut out).unwrap();
                        assert_eq!(out, data);
                    }
                }
            }
        }
    }

    #[test]
    fn compression_is_deterministic_across_threads() {
        let data = sample();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let here = compress(kind, &data).unwrap();
            let there =
                std::thread::scope(|s| s.spawn(|| compress(kind, &data).unwrap()).join().unwrap());
            assert_eq!(here, there);
            // A reused context gives the same bytes as a fresh one.
            assert_eq!(compress(kind, &data).unwrap(), here);
        }
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let data = sample();
            let c = compress(kind, &data).unwrap().unwrap();
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress(kind, &[0xff; 100], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }
}
