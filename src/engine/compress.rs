//! Compressed-cluster codecs: raw deflate (QEMU's "zlib") and zstd.

use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::options::CompressionType;

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

/// Compresses one cluster. Returns `None` when the result would not be smaller than the
/// input (the caller then stores the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Deflate => {
            use flate2::{Compress, Compression, FlushCompress};
            let mut c = Compress::new(Compression::default(), false);
            let mut out = Vec::with_capacity(input.len());
            c.compress_vec(input, &mut out, FlushCompress::Finish)
                .map_err(|e| Error::io("deflate compression", std::io::Error::other(e)))?;
            if c.total_in() as usize != input.len() {
                return Ok(None);
            }
            out
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compression", e))?
        }
    };
    Ok(if out.len() < input.len() {
        Some(out)
    } else {
        None
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
