//! The read path: map a guest range to host segments (lock-free when the L2 table is cached,
//! under the metadata lock otherwise), then do the I/O with no lock held.

use super::mapview::DataProbe;
use super::{compress, Image};
use crate::error::Result;
use crate::format::entry::{Mapping, SubclusterState};
use crate::format::{Geometry, GuestOffset, HostOffset};
use crate::options::{Extent, EXTENT_ALLOCATED, EXTENT_BACKING, EXTENT_COMPRESSED, EXTENT_ZERO};
use crate::storage::Pinned;

/// Where the bytes of one guest segment come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Host data at this offset.
    Data(HostOffset),
    /// Zeros.
    Zero,
    /// The backing file (zeros without one).
    Backing,
    /// A compressed cluster; `skip` bytes into the decompressed cluster.
    Compressed {
        host: HostOffset,
        csize: u64,
        skip: u64,
    },
}

/// A run of guest bytes with one source.
#[derive(Debug, Clone, Copy)]
struct Segment {
    len: u64,
    source: Source,
}

/// How many segments one mapping pass collects (on the stack: a request rarely maps to
/// more than a few runs, and longer ones are mapped and read in several passes).
const SEGS: usize = 16;

/// Segments collected on the stack, merging runs that continue each other.
struct SegBuf {
    items: [Segment; SEGS],
    n: usize,
}

impl SegBuf {
    fn new() -> SegBuf {
        SegBuf {
            items: [Segment {
                len: 0,
                source: Source::Zero,
            }; SEGS],
            n: 0,
        }
    }

    fn clear(&mut self) {
        self.n = 0;
    }

    fn as_slice(&self) -> &[Segment] {
        &self.items[..self.n]
    }

    /// Appends a run; false (nothing added) when it cannot merge and the buffer is full.
    fn push(&mut self, len: u64, source: Source) -> bool {
        if let Some(last) = self.n.checked_sub(1).map(|i| &mut self.items[i]) {
            let merge = match (last.source, source) {
                (Source::Data(a), Source::Data(b)) => a + last.len == b,
                (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                _ => false,
            };
            if merge {
                last.len += len;
                return true;
            }
        }
        if self.n == SEGS {
            return false;
        }
        self.items[self.n] = Segment { len, source };
        self.n += 1;
        true
    }
}

/// Maps `[offset, end)` (within one L2 table's range) into `out`, cluster by cluster with
/// `lookup`, until `end`, until `lookup` cannot map a cluster (`Ok(None)`: the lock-free view
/// has no table for it) or until `out` is full. Returns the guest offset reached: `out`
/// covers `[offset, reached)`.
fn map_range(
    geo: &Geometry,
    offset: GuestOffset,
    end: GuestOffset,
    out: &mut SegBuf,
    lookup: &mut dyn FnMut(GuestOffset) -> Result<Option<Mapping>>,
) -> Result<GuestOffset> {
    let sub = geo.subcluster_size();
    let mut pos = offset;
    while pos < end {
        let Some(mapping) = lookup(pos)? else {
            return Ok(pos);
        };
        super::datafile::check_mapping(geo, pos, &mapping)?;
        let cluster = pos.cluster_start(geo);
        let cluster_end = cluster + geo.cluster_size();
        while pos < end.min(cluster_end) {
            let sc = pos.subcluster(geo);
            let run = u64::from(mapping.run_from(geo, sc));
            let run_end = (cluster + (u64::from(sc) + run) * sub).min(end);
            let source = match mapping.subcluster(geo, sc) {
                // The mapping gives where the subcluster starts on the host.
                SubclusterState::Data(h) => Source::Data(h + pos.in_cluster(geo) % sub),
                SubclusterState::Zero => Source::Zero,
                SubclusterState::Unallocated => Source::Backing,
                SubclusterState::Compressed => match mapping {
                    Mapping::Compressed { host, csize } => Source::Compressed {
                        host,
                        csize,
                        skip: pos.in_cluster(geo),
                    },
                    _ => Source::Zero,
                },
            };
            if !out.push(run_end.since(pos), source) {
                return Ok(pos);
            }
            pos = run_end;
        }
    }
    Ok(pos)
}

/// Maps a prefix of `[pos, end)` (within one L2 table's range) into `out` and returns the
/// offset reached (always past `pos`): without any lock when the lock-free view has the L2
/// table; otherwise the table is loaded from disk without the lock and installed (so a miss
/// does not stall other readers), with the metadata mutex as the last resort.
fn map_segments(
    img: &Image,
    pinned: &Pinned<'_>,
    pos: GuestOffset,
    end: GuestOffset,
    out: &mut SegBuf,
) -> Result<GuestOffset> {
    let geo = img.geo;
    let fast = |out: &mut SegBuf| {
        out.clear();
        map_range(&geo, pos, end, out, &mut |g| {
            Ok(img.view.lookup(pinned, &geo, img.version, g))
        })
    };
    let reached = fast(out)?;
    if reached > pos {
        return Ok(reached);
    }
    if img.prefetch_l2(pos, true)? {
        let reached = fast(out)?;
        if reached > pos {
            return Ok(reached);
        }
    }
    out.clear();
    let mut m = img.lock_meta();
    map_range(&geo, pos, end, out, &mut |g| {
        m.lookup(&img.file, g).map(Some)
    })
}

/// Reads `buf.len()` guest bytes at `offset` (range already checked), for a request pinned
/// in the image file's grace periods (`pinned`) until its reads are done.
#[inline]
pub fn read(img: &Image, pinned: &Pinned<'_>, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
    if read_one_data_cluster(img, pinned, buf, offset)? {
        return Ok(());
    }
    read_mapped(img, pinned, buf, offset)
}

/// [`read`] in general: segment by segment (out of line, so that the one-step path above
/// inlines into its caller without this one's stack frame).
#[inline(never)]
fn read_mapped(
    img: &Image,
    pinned: &Pinned<'_>,
    buf: &mut [u8],
    offset: GuestOffset,
) -> Result<()> {
    let mut segments = SegBuf::new();
    let mut done = 0usize;
    let request_end = offset + buf.len() as u64;
    while done < buf.len() {
        let pos = offset + done as u64;
        let end = pos.l2_range_end(&img.geo).min(request_end);
        map_segments(img, pinned, pos, end, &mut segments)?;
        for seg in segments.as_slice() {
            // A segment lies within the request, so its length fits the buffer.
            let len = seg.len as usize;
            read_segment(
                img,
                &mut buf[done..done + len],
                offset + done as u64,
                seg.source,
            )?;
            done += len;
        }
    }
    Ok(())
}

/// The common small request in one step: inside one cluster that the lock-free view maps to
/// host data of the image file (no subclusters, no data file), read with one call and no
/// segment list; a miss of the L2 cache loads the slice and looks again. False (nothing
/// read) for anything else, which takes the general path.
#[inline]
fn read_one_data_cluster(
    img: &Image,
    pinned: &Pinned<'_>,
    buf: &mut [u8],
    offset: GuestOffset,
) -> Result<bool> {
    let geo = &img.geo;
    let start = offset.in_cluster(geo);
    if geo.extended_l2 || geo.external_data || start + buf.len() as u64 > geo.cluster_size() {
        return Ok(false);
    }
    let host = match img.view.probe_data(pinned, geo, offset) {
        DataProbe::Data(host) => host,
        DataProbe::Other => return Ok(false),
        DataProbe::Uncached => match load_and_probe(img, pinned, offset)? {
            Some(host) => host,
            None => return Ok(false),
        },
    };
    img.file.read_zero_padded(buf, host + start, "guest data")?;
    Ok(true)
}

/// A miss of [`read_one_data_cluster`]: loads the slice (out of line: the hit stays small)
/// and returns the data cluster the view maps `offset` to now, if any.
#[inline(never)]
fn load_and_probe(
    img: &Image,
    pinned: &Pinned<'_>,
    offset: GuestOffset,
) -> Result<Option<HostOffset>> {
    if !img.prefetch_l2(offset, false)? {
        return Ok(None);
    }
    Ok(match img.view.probe_data(pinned, &img.geo, offset) {
        DataProbe::Data(host) => Some(host),
        DataProbe::Uncached | DataProbe::Other => None,
    })
}

fn read_segment(img: &Image, out: &mut [u8], guest: GuestOffset, source: Source) -> Result<()> {
    match source {
        Source::Data(host) => img.data_file().read_zero_padded(out, host, "guest data"),
        Source::Zero => {
            out.fill(0);
            Ok(())
        }
        Source::Backing => match img.backing() {
            Some(b) => b.read(out, guest.get()),
            None => {
                out.fill(0);
                Ok(())
            }
        },
        Source::Compressed { host, csize, skip } => {
            let cluster = read_compressed(img, host, csize)?;
            out.copy_from_slice(&cluster[skip as usize..skip as usize + out.len()]);
            Ok(())
        }
    }
}

/// Reads and decompresses one compressed cluster.
pub(super) fn read_compressed(img: &Image, host: HostOffset, csize: u64) -> Result<Vec<u8>> {
    // csize is bounded by the descriptor's sector field: at most two clusters.
    let mut raw = vec![0u8; csize as usize];
    let n = img.file.read_some(&mut raw, host, "compressed cluster")?;
    raw.truncate(n);
    let mut cluster = vec![0u8; img.geo.cluster_size() as usize];
    compress::decompress(img.compression, &raw, &mut cluster).map_err(|e| {
        crate::Error::corrupt(format!(
            "{}: compressed cluster at {host:#x}: {e}",
            img.path.display()
        ))
    })?;
    Ok(cluster)
}

/// Extent flags and host offset (0 when the range has no uncompressed data here).
fn status_of(source: Source, has_backing: bool) -> (u32, u64) {
    match source {
        Source::Data(h) => (EXTENT_ALLOCATED, h.get()),
        Source::Zero => (EXTENT_ALLOCATED | EXTENT_ZERO, 0),
        Source::Backing if has_backing => (EXTENT_BACKING, 0),
        Source::Backing => (EXTENT_ZERO, 0),
        Source::Compressed { .. } => (EXTENT_ALLOCATED | EXTENT_COMPRESSED, 0),
    }
}

/// Allocation status from `offset`, as far as it stays the same (at most `count` bytes), for
/// a request pinned in the image file's grace periods.
pub fn block_status(
    img: &Image,
    pinned: &Pinned<'_>,
    offset: GuestOffset,
    count: u64,
) -> Result<Extent> {
    let has_backing = img.has_backing();
    let mut first: Option<(u32, u64)> = None;
    let mut len = 0u64;
    let mut segments = SegBuf::new();
    while len < count {
        let pos = offset + len;
        let end = pos.l2_range_end(&img.geo).min(offset + count);
        map_segments(img, pinned, pos, end, &mut segments)?;
        for seg in segments.as_slice() {
            let (flags, host) = status_of(seg.source, has_backing);
            match first {
                None => first = Some((flags, host)),
                Some((f, h)) => {
                    let contiguous =
                        f & EXTENT_ALLOCATED == 0 || f & EXTENT_COMPRESSED != 0 || h + len == host;
                    if f != flags || !contiguous || f & EXTENT_COMPRESSED != 0 {
                        return Ok(extent(offset, len, f, h));
                    }
                }
            }
            len += seg.len;
        }
    }
    let (f, h) = first.unwrap_or((EXTENT_ZERO, 0));
    Ok(extent(offset, len.min(count), f, h))
}

fn extent(offset: GuestOffset, length: u64, flags: u32, host: u64) -> Extent {
    Extent {
        offset: offset.get(),
        length,
        flags,
        host_offset: if flags & EXTENT_COMPRESSED != 0 {
            0
        } else {
            host
        },
    }
}
