//! How large a new image must be (`qemu-img measure`): the host bytes a qcow2 image needs for
//! a given virtual size, creation options and amount of guest data, computed exactly as
//! qemu-img 10 computes them, so the numbers match to the byte.
//!
//! Pure arithmetic: the caller finds which guest clusters of the input hold data.

use crate::error::{invalid, Result};

/// Largest L1 table QEMU accepts, in bytes (`QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Bytes of a bitmap directory entry before its name (`Qcow2BitmapDirEntry`).
const BITMAP_DIR_ENTRY_BYTES: u64 = 24;

/// Preallocation modes `qemu-img measure` distinguishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MeasurePrealloc {
    /// `off`: only data clusters that hold data are required.
    #[default]
    Off,
    /// `metadata`: the same numbers as `off` (metadata is always counted).
    Metadata,
    /// `falloc` or `full`: every data cluster is required.
    Full,
}

/// The new image's creation options that change its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureOptions {
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Extended L2 entries (16 bytes each instead of 8).
    pub extended_l2: bool,
    /// Preallocation mode.
    pub prealloc: MeasurePrealloc,
}

/// One persistent bitmap of the input image, as the size of its copy is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureBitmap {
    /// Length of the bitmap's name in bytes.
    pub name_len: u64,
    /// Guest bytes per bit (a power of two).
    pub granularity: u64,
}

/// What `qemu-img measure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the given data ("required size").
    pub required: u64,
    /// Bytes the new image takes once every cluster is allocated ("fully allocated size").
    pub fully_allocated: u64,
    /// Bytes for copies of the input's persistent bitmaps ("bitmaps size"), when qemu-img
    /// prints the line (qcow2 v3 output of a qcow2 v3 input).
    pub bitmaps: Option<u64>,
}

impl MeasureOptions {
    fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Fails like qemu-img when an image of `size` bytes would need an L1 table larger than
    /// QEMU accepts ("The image size is too large").
    pub fn check_size(&self, size: u64) -> Result<()> {
        let cs = self.cluster_size;
        let clusters = size.div_ceil(cs);
        let l2_tables = clusters.div_ceil(cs / self.l2_entry_bytes());
        if l2_tables.saturating_mul(8) > MAX_L1_BYTES {
            return invalid!("The image size is too large (try using a larger cluster size)");
        }
        Ok(())
    }
}

/// Refcount table and block bytes needed to count `clusters` clusters plus themselves: the
/// fixed point where adding the refcount structures needs no more of them (QEMU's
/// `qcow2_refcount_metadata_size` without the generous increase).
pub fn refcount_metadata_bytes(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
    // Bound: n grows monotonically and converges within a handful of rounds (each round adds
    // at most 1/per_block of the previous growth); 64 rounds is far more than any size needs.
    for _ in 0..64 {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// Host bytes of a fully allocated image of `size` guest bytes: header, L2 tables, L1
/// table, refcount structures and every data cluster (QEMU's `qcow2_calc_prealloc_size`).
pub fn fully_allocated_bytes(size: u64, o: &MeasureOptions) -> u64 {
    let cs = o.cluster_size;
    let aligned = size.div_ceil(cs) * cs;
    let l2e = o.l2_entry_bytes();
    let mut meta = cs; // header
    let l2_entries = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += l2_entries * l2e;
    let l1_entries = (l2_entries * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_bytes((meta + aligned) / cs, cs, o.refcount_order);
    meta + aligned
}

/// Bytes the copies of `bitmaps` (each covering `size` guest bytes) take: every bitmap fully
/// allocated, its table, and the directory, each rounded to whole clusters.
pub fn bitmaps_bytes(size: u64, cluster_size: u64, bitmaps: &[MeasureBitmap]) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in bitmaps {
        let bits = size.div_ceil(b.granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total += clusters * cluster_size;
        total += (clusters * 8).div_ceil(cluster_size) * cluster_size;
        dir += (BITMAP_DIR_ENTRY_BYTES + b.name_len).div_ceil(8) * 8;
    }
    total + dir.div_ceil(cluster_size) * cluster_size
}

/// The measurement for a qcow2 image of `size` guest bytes. `data` is the guest bytes that
/// must be stored: whole clusters (of `o.cluster_size`) that hold data in the input, or the
/// whole disk when the new image gets a backing file (qemu-img cannot know what it shares);
/// `None` when there is no input (`--size`). `bitmaps` is `Some` when the line is printed.
pub fn measure_qcow2(
    size: u64,
    data: Option<u64>,
    o: &MeasureOptions,
    bitmaps: Option<&[MeasureBitmap]>,
) -> Measurement {
    let cs = o.cluster_size;
    let aligned = size.div_ceil(cs) * cs;
    let mut required = data.unwrap_or(0);
    if o.prealloc == MeasurePrealloc::Full {
        required = aligned;
    }
    let fully_allocated = fully_allocated_bytes(size, o);
    Measurement {
        required: fully_allocated - aligned + required,
        fully_allocated,
        bitmaps: bitmaps.map(|b| bitmaps_bytes(size, cs, b)),
    }
}

/// The measurement for a raw image: its length is the virtual size (rounded up to whole
/// sectors when there is no input), whatever holds data.
pub fn measure_raw(size: u64, from_input: bool) -> Measurement {
    let required = if from_input {
        size
    } else {
        size.div_ceil(512) * 512
    };
    Measurement {
        required,
        fully_allocated: required,
        bitmaps: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(cs: u64) -> MeasureOptions {
        MeasureOptions {
            cluster_size: cs,
            refcount_order: 4,
            extended_l2: false,
            prealloc: MeasurePrealloc::Off,
        }
    }

    // Expected values are qemu-img 10's output for the same arguments.
    #[test]
    fn empty_sizes_match_qemu_img() {
        let m = measure_qcow2(1 << 30, None, &opts(65536), None);
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        let m = measure_qcow2(1000, None, &opts(65536), None);
        assert_eq!((m.required, m.fully_allocated), (327680, 393216));
        let m = measure_qcow2(1 << 50, None, &opts(65536), None);
        assert_eq!(
            (m.required, m.fully_allocated),
            (171825102848, 1126071731945472)
        );
    }

    #[test]
    fn data_and_bitmaps_match_qemu_img() {
        let bm = [MeasureBitmap {
            name_len: 3,
            granularity: 65536,
        }];
        let m = measure_qcow2(64 << 20, Some(1 << 20), &opts(65536), Some(&bm));
        assert_eq!(m.required, 1376256);
        assert_eq!(m.fully_allocated, 67436544);
        assert_eq!(m.bitmaps, Some(196608));
    }

    #[test]
    fn full_preallocation_requires_every_cluster() {
        let o = MeasureOptions {
            cluster_size: 2 << 20,
            refcount_order: 6,
            extended_l2: true,
            prealloc: MeasurePrealloc::Full,
        };
        let m = measure_qcow2(1 << 30, None, &o, None);
        assert_eq!((m.required, m.fully_allocated), (1084227584, 1084227584));
    }

    #[test]
    fn too_large_for_the_l1_limit_is_refused() {
        assert!(opts(65536).check_size(1 << 60).is_err());
        assert!(opts(65536).check_size(1 << 50).is_ok());
        assert!(opts(512).check_size(1 << 40).is_err());
    }

    #[test]
    fn refcount_fixed_point_counts_itself() {
        // One block counts up to 32768 clusters at 16 bits, including itself and the table.
        assert_eq!(refcount_metadata_bytes(32766, 65536, 4), 2 * 65536);
        assert_eq!(refcount_metadata_bytes(32767, 65536, 4), 3 * 65536);
    }
}
