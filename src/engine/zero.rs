//! write_zeroes and discard: metadata-only updates where the format allows, explicit zero
//! writes through the write path where it does not.

use super::{write, Image};
use crate::error::Result;
use crate::format::entry::Mapping;
use crate::format::{Geometry, GuestOffset, HostOffset};

/// What to do with one cluster.
enum Decision {
    /// Nothing: it already reads as required.
    Skip,
    /// Replace the mapping; release the old references when `release`.
    Set { new: Mapping, release: bool },
    /// Write explicit zeros over the given bytes of the cluster.
    WriteZeros,
}

/// Applies `decide(old_mapping, start_in_cluster, end_in_cluster)` to every cluster touched by
/// `[offset, end)`, collecting the ranges that need explicit zero writes.
fn update_clusters(
    img: &Image,
    offset: GuestOffset,
    end: GuestOffset,
    decide: &mut dyn FnMut(Mapping, u64, u64) -> Decision,
) -> Result<Vec<(GuestOffset, u64)>> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut fallback = Vec::new();
    let mut pos = offset;
    let mut m = img.lock_meta();
    while pos < end {
        let cluster = pos.cluster_start(&geo);
        let gidx = pos.cluster(&geo);
        if img.inflight.is_claimed(gidx) {
            drop(m);
            img.wait_claim_released(gidx);
            m = img.lock_meta();
            continue;
        }
        let a = pos.since(cluster);
        let b = end.since(cluster).min(cs);
        let step = m
            .lookup(&img.file, pos)
            .and_then(|old| match decide(old, a, b) {
                Decision::Skip => Ok(()),
                Decision::WriteZeros => {
                    fallback.push((pos, b - a));
                    Ok(())
                }
                Decision::Set { new, release } => {
                    let table = m.l2_for_write(&img.file, pos.l1_index(&geo))?;
                    m.set_mapping(&img.file, table, pos.l2_index(&geo), new)?;
                    if release {
                        m.release(old);
                    }
                    Ok(())
                }
            });
        if let Err(e) = step {
            return Err(img.on_error(e));
        }
        pos = cluster + b;
    }
    drop(m);
    Ok(fallback)
}

fn write_explicit_zeros(img: &Image, ranges: &[(GuestOffset, u64)]) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(ranges.iter().map(|r| r.1).max().unwrap_or(0)) as usize];
    let pin = img.file.grace().pin();
    for &(mut off, mut len) in ranges {
        while len > 0 {
            let n = len.min(CHUNK);
            write::write(img, &pin.pinned(), &zeros[..n as usize], off)?;
            off += n;
            len -= n;
        }
    }
    Ok(())
}

/// How write_zeroes treats one cluster, given what the image format can express.
struct ZeroPolicy {
    geo: Geometry,
    has_backing: bool,
    v3: bool,
    may_unmap: bool,
}

impl ZeroPolicy {
    /// The decision for cluster bytes `[a, b)` currently mapped by `old`.
    fn decide(&self, old: Mapping, a: u64, b: u64) -> Decision {
        let reads_zero_already = !self.has_backing && matches!(old, Mapping::Unallocated { .. });
        if self.geo.extended_l2 {
            self.extended(old, a, b, reads_zero_already)
        } else if self.v3 {
            self.zero_flag(old, reads_zero_already)
        } else if !self.has_backing {
            // Version 2 has no zero flag: only deallocation reads as zeros.
            match old {
                Mapping::Unallocated { .. } => Decision::Skip,
                _ => Decision::Set {
                    new: Mapping::Unallocated { zero: 0 },
                    release: true,
                },
            }
        } else {
            Decision::WriteZeros
        }
    }

    /// Extended L2: the subclusters' zero bits.
    fn extended(&self, old: Mapping, a: u64, b: u64, reads_zero_already: bool) -> Decision {
        let gran = self.geo.subcluster_size();
        let full = a == 0 && b == self.geo.cluster_size();
        // Subcluster indices are below 32.
        let mask = Geometry::subcluster_mask((a / gran) as u32, ((b - 1) / gran) as u32);
        match old {
            _ if reads_zero_already => Decision::Skip,
            Mapping::Unallocated { zero } => Decision::Set {
                new: Mapping::Unallocated { zero: zero | mask },
                release: false,
            },
            Mapping::Data {
                host,
                copied: true,
                alloc,
                zero,
            } if !(full && self.may_unmap) => Decision::Set {
                new: Mapping::Data {
                    host,
                    copied: true,
                    alloc: alloc & !mask,
                    zero: zero | mask,
                },
                release: false,
            },
            _ if full => Decision::Set {
                new: Mapping::Unallocated { zero: u32::MAX },
                release: true,
            },
            _ => Decision::WriteZeros,
        }
    }

    /// Version 3, standard L2: the zero flag, keeping an owned cluster unless unmapping.
    fn zero_flag(&self, old: Mapping, reads_zero_already: bool) -> Decision {
        match old {
            _ if reads_zero_already => Decision::Skip,
            Mapping::Zero {
                host: HostOffset::ZERO,
                ..
            } => Decision::Skip,
            Mapping::Zero { copied: true, .. } if !self.may_unmap => Decision::Skip,
            Mapping::Data {
                host, copied: true, ..
            } if !self.may_unmap => Decision::Set {
                new: Mapping::Zero { host, copied: true },
                release: false,
            },
            _ => Decision::Set {
                new: Mapping::Zero {
                    host: HostOffset::ZERO,
                    copied: false,
                },
                release: true,
            },
        }
    }
}

/// Makes `[offset, offset+count)` read as zeros.
pub fn write_zeroes(img: &Image, offset: GuestOffset, count: u64, may_unmap: bool) -> Result<()> {
    write_zeroes_as(img, offset, count, may_unmap, img.has_backing())
}

/// [`write_zeroes`] deciding as if a backing file were open (`has_backing`) or not: a rebase
/// that adds a backing file zeroes unallocated clusters before the new one is open.
pub fn write_zeroes_as(
    img: &Image,
    offset: GuestOffset,
    count: u64,
    may_unmap: bool,
    has_backing: bool,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let policy = ZeroPolicy {
        geo: img.geo,
        has_backing,
        v3: img.version >= 3,
        may_unmap,
    };
    let end = offset + count;
    let gran = policy.geo.subcluster_size();
    // Unaligned head and tail (below the metadata granularity) are written as data.
    let mid_start = offset.align_up(gran);
    let mid_end = end.align_down(gran);
    if mid_start >= mid_end {
        return write_explicit_zeros(img, &[(offset, count)]);
    }
    let mut explicit = Vec::new();
    if offset < mid_start {
        explicit.push((offset, mid_start.since(offset)));
    }
    // A raw data file must read as the guest disk does: zeros first, then the metadata.
    img.zero_raw_data(mid_start, mid_end.since(mid_start))?;
    let mut decide = |old: Mapping, a: u64, b: u64| policy.decide(old, a, b);
    explicit.extend(update_clusters(img, mid_start, mid_end, &mut decide)?);
    if mid_end < end {
        explicit.push((mid_end, end.since(mid_end)));
    }
    write_explicit_zeros(img, &explicit)
}

/// Releases every cluster fully inside `[offset, offset+count)`, leaving what QEMU's guest
/// discard leaves: on version 3 a zero marker (zero flag, or all subclusters zero with extended
/// L2) wherever something was allocated or a backing file could show through, so that the
/// range keeps reading as zeros even if a backing file is attached later; on version 2, where
/// no zero marker exists, an unallocated entry. Clusters that already read as zeros from this
/// image alone (unallocated or plain zero, no backing file) stay as they are.
pub fn discard(img: &Image, offset: GuestOffset, count: u64) -> Result<()> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let start = offset.align_up(cs);
    let end = (offset + count).align_down(cs);
    if start >= end {
        return Ok(());
    }
    // A raw data file must read as the guest disk does: zeros first, then the metadata.
    if !img.unmap_data(start, end.since(start))? {
        img.zero_raw_data(start, end.since(start))?;
    }
    let has_backing = img.has_backing();
    let target = discarded_mapping(img.version, geo.extended_l2);
    let mut decide = |old: Mapping, _a: u64, _b: u64| -> Decision {
        if old == target || (!has_backing && !owns_host_space(old)) {
            Decision::Skip
        } else {
            Decision::Set {
                new: target,
                release: true,
            }
        }
    };
    let explicit = update_clusters(img, start, end, &mut decide)?;
    debug_assert!(explicit.is_empty());
    Ok(())
}

/// The entry a discarded cluster gets: a zero marker where the version has one.
fn discarded_mapping(version: u32, extended_l2: bool) -> Mapping {
    match (version >= 3, extended_l2) {
        (true, true) => Mapping::Unallocated { zero: u32::MAX },
        (true, false) => Mapping::Zero {
            host: HostOffset::ZERO,
            copied: false,
        },
        (false, _) => Mapping::Unallocated { zero: 0 },
    }
}

/// Whether the entry points at host space (data, compressed data or a preallocated zero
/// cluster): what QEMU calls an allocated cluster.
fn owns_host_space(m: Mapping) -> bool {
    match m {
        Mapping::Unallocated { .. } => false,
        Mapping::Zero { host, .. } => host != HostOffset::ZERO,
        _ => true,
    }
}
