//! Which byte ranges of a plain file hold data (`SEEK_DATA`/`SEEK_HOLE`), as qemu-img asks the
//! file system when it measures or maps a raw file.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Most ranges returned: a file fragmented beyond this is reported as data from the last
/// range on (an overestimate, never an underestimate), so a hostile file cannot make the
/// caller allocate without bound.
const MAX_RANGES: usize = 1 << 20;

/// The data ranges `(start, length)` of `file` below `size`, in order. Where the file system
/// cannot tell holes from data (`EINVAL` from `SEEK_DATA`) the whole file is one range.
pub fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        if out.len() == MAX_RANGES {
            out.push((off, size - off));
            break;
        }
        let data = match seek(file, off, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && off == 0 => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.min(size);
        if hole <= data {
            // Cannot happen on a sane file system; stop rather than loop.
            out.push((data, size - data));
            break;
        }
        out.push((data, hole - data));
        off = hole;
    }
    Ok(out)
}

/// Whether `off` (below `size`) lies in data or in a hole, and how many bytes from `off` stay
/// so (at most `size - off`). A file system that cannot tell reports data throughout.
pub fn extent_at(file: &File, off: u64, size: u64) -> io::Result<(bool, u64)> {
    if off >= size {
        return Ok((false, 0));
    }
    match seek(file, off, libc::SEEK_DATA) {
        Ok(d) if d > off => Ok((false, d.min(size) - off)),
        Ok(_) => {
            let hole = seek(file, off, libc::SEEK_HOLE)?.min(size);
            Ok((true, hole.max(off + 1) - off))
        }
        // No data at or after `off`: a hole up to the end.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((false, size - off)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((true, size - off)),
        Err(e) => Err(e),
    }
}

fn seek(file: &File, off: u64, whence: i32) -> io::Result<u64> {
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes a descriptor and two integers and touches no memory of ours; the
    // descriptor is valid for the whole call because `file` is borrowed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_skipped_and_data_found() {
        let dir = std::env::temp_dir().join(format!("oxcow-extents-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        let r = data_ranges(&f, 16 << 20).unwrap();
        // File systems without hole reporting answer "all data"; both cover the write.
        assert!(r
            .iter()
            .any(|&(s, l)| s <= 8 << 20 && s + l >= (8 << 20) + 4096));
        assert!(r.iter().map(|&(_, l)| l).sum::<u64>() <= 16 << 20);
        drop(f);
        let _ = std::fs::remove_file(&dir);
    }
}
