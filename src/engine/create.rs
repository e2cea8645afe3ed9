//! Creating new images, laid out the way `qemu-img create` lays them out: header, refcount
//! table, refcount block(s), L1 table.

use super::Image;
use crate::error::{invalid, Error, Result};
use crate::format::be::u64_table_bytes;
use crate::format::header::{self, Header};
use crate::format::refcount;
use crate::format::Geometry;
use crate::format::{HostCluster, HostOffset};
use crate::options::{CompressionType, CreateOptions, OpenOptions, Preallocation};
use crate::storage::{Backend, PosixFile};
use std::path::Path;

fn validate(virtual_size: u64, o: &CreateOptions) -> Result<Geometry> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return invalid!(
            "cluster size must be a power of two between 512 and 2097152 bytes, not {cs}"
        );
    }
    if o.version != 2 && o.version != 3 {
        return invalid!("qcow2 version must be 2 or 3, not {}", o.version);
    }
    let rb = o.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return invalid!("refcount width must be a power of two up to 64, not {rb}");
    }
    if o.version == 2 {
        if rb != 16 {
            return invalid!(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version 3)"
            );
        }
        if o.lazy_refcounts {
            return invalid!(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            );
        }
        if o.extended_l2 {
            return invalid!(
                "Extended L2 entries are only supported with compatibility level 1.1 and above"
            );
        }
        if o.compression == CompressionType::Zstd {
            return invalid!("zstd compression requires compatibility level 1.1 or above");
        }
    }
    if o.extended_l2 && cs < 16384 {
        return invalid!("Extended L2 entries need a cluster size of at least 16 KiB, not {cs}");
    }
    match (&o.backing_file, o.backing_format) {
        (Some(_), None) => return invalid!("Use of backing file requires explicit backing format"),
        (None, Some(_)) => return invalid!("backing format given without a backing file"),
        _ => {}
    }
    validate_data_file(o)?;
    if o.backing_file.is_some() && o.preallocation != Preallocation::Off {
        return invalid!(
            "Backing file and preallocation can only be used at the same time if preallocation=off"
        );
    }
    let geo = Geometry {
        cluster_bits: cs.trailing_zeros(),
        extended_l2: o.extended_l2,
        refcount_order: rb.trailing_zeros(),
        external_data: false,
    };
    let l1 = geo.l1_entries_for(virtual_size);
    if l1 * 8 > header::MAX_L1_BYTES || l1 > i32::MAX as u64 / 8 {
        return invalid!(
            "Image is too big for a {cs}-byte cluster size (L1 table would need {l1} entries)"
        );
    }
    Ok(geo)
}

/// Creates a new image at `path` (replacing any file there) with the given virtual size,
/// rounded up to a multiple of 512 bytes like `qemu-img create` (QEMU sees disks in whole
/// sectors). A size of 0 with a backing file takes the backing file's size.
pub fn create(path: impl AsRef<Path>, virtual_size: u64, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let size = sector_rounded(effective_size(path, virtual_size, opts)?)?;
    let geo = validate(size, opts)?;
    let layout = Layout::for_image(&geo, size);
    let cluster0 = new_header(&geo, &layout, size, opts).to_cluster0()?;
    // Refuse to write something we would not accept ourselves.
    Header::parse(&cluster0)?;
    write_image(path, &geo, &layout, &cluster0)?;
    if let Some(d) = &opts.data_file {
        super::datafile::create_data_file(d, size)?;
    }
    if opts.preallocation == Preallocation::Metadata || opts.data_file_raw {
        preallocate_metadata(path, size)?;
    }
    Ok(())
}

/// The requested size, or the backing file's when 0 is asked for with a backing file.
fn effective_size(path: &Path, virtual_size: u64, opts: &CreateOptions) -> Result<u64> {
    let (0, Some(b)) = (virtual_size, &opts.backing_file) else {
        return Ok(virtual_size);
    };
    let p = super::backing::resolve(path, b.as_bytes());
    let f = opts
        .backing_format
        .ok_or_else(|| Error::invalid("Use of backing file requires explicit backing format"))?;
    Ok(match f {
        crate::BackingFormat::Qcow2 => Image::open(&p, &OpenOptions::default())?.virtual_size(),
        crate::BackingFormat::Raw => std::fs::metadata(&p)
            .map_err(|e| Error::io(format!("opening backing file {}", p.display()), e))?
            .len(),
    })
}

/// qemu-img rounds the size up to whole 512-byte sectors; QEMU would not see a tail.
fn sector_rounded(size: u64) -> Result<u64> {
    size.checked_add(511)
        .map(|s| s & !511)
        .ok_or_else(|| Error::invalid(format!("virtual size {size} is too large")))
}

/// Where the metadata of a fresh image goes: header, refcount table, refcount blocks, L1
/// table, one after the other.
struct Layout {
    rt_clusters: u64,
    blocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
}

impl Layout {
    /// Grows the refcount structures until they cover all the metadata, themselves included.
    fn for_image(geo: &Geometry, size: u64) -> Layout {
        let l1_entries = geo.l1_entries_for(size);
        let l1_clusters = geo.clusters_for(l1_entries * 8);
        let per_block = geo.refblock_entries();
        let (mut rt_clusters, mut blocks) = (1u64, 1u64);
        // Converges in a few rounds: each round at most adds the blocks and table clusters
        // that the previous round's growth needs, a vanishing fraction of the total.
        loop {
            let total = 1 + rt_clusters + blocks + l1_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_rt = geo.clusters_for(need_blocks * 8).max(1);
            if need_blocks == blocks && need_rt == rt_clusters {
                break;
            }
            blocks = need_blocks;
            rt_clusters = need_rt;
        }
        Layout {
            rt_clusters,
            blocks,
            l1_entries,
            l1_clusters,
        }
    }

    fn rt_offset(&self, geo: &Geometry) -> HostOffset {
        HostCluster(1).offset(geo)
    }

    fn blocks_offset(&self, geo: &Geometry) -> HostOffset {
        HostCluster(1 + self.rt_clusters).offset(geo)
    }

    fn l1_offset(&self, geo: &Geometry) -> HostOffset {
        HostCluster(1 + self.rt_clusters + self.blocks).offset(geo)
    }

    /// Clusters in use: all the metadata.
    fn total_clusters(&self) -> u64 {
        1 + self.rt_clusters + self.blocks + self.l1_clusters
    }
}

/// The header `qemu-img create` would write for these options.
fn new_header(geo: &Geometry, layout: &Layout, size: u64, opts: &CreateOptions) -> Header {
    let mut h = Header {
        version: opts.version,
        cluster_bits: geo.cluster_bits,
        size,
        // validate() bounded the L1 table to 32 MiB and the refcount table follows from it.
        l1_size: layout.l1_entries as u32,
        l1_table_offset: layout.l1_offset(geo).get(),
        refcount_table_offset: layout.rt_offset(geo).get(),
        refcount_table_clusters: layout.rt_clusters as u32,
        refcount_order: geo.refcount_order,
        backing_file: opts.backing_file.as_ref().map(|b| b.as_bytes().to_vec()),
        backing_format: opts.backing_format.map(|f| f.name().to_string()),
        ..Header::default()
    };
    if opts.version == 3 {
        if opts.extended_l2 {
            h.incompatible_features |= header::INCOMPAT_EXTL2;
        }
        if opts.compression == CompressionType::Zstd {
            h.incompatible_features |= header::INCOMPAT_COMPRESSION;
            h.compression_type = 1;
        }
        if opts.lazy_refcounts {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if geo.cluster_size() > 4096 {
            h.feature_names = Header::qemu_feature_table();
        }
        if let Some(d) = &opts.data_file {
            h.incompatible_features |= header::INCOMPAT_DATA_FILE;
            h.data_file = Some(d.as_bytes().to_vec());
            if opts.data_file_raw {
                h.autoclear_features |= header::AUTOCLEAR_DATA_FILE_RAW;
            }
        }
    }
    h
}

/// qemu-img's rules for `data_file` and `data_file_raw`, in its words.
fn validate_data_file(o: &CreateOptions) -> Result<()> {
    match &o.data_file {
        None if o.data_file_raw => invalid!("data-file-raw requires data-file"),
        Some(d) if d.is_empty() => invalid!("data-file name is empty"),
        Some(_) if o.version < 3 => invalid!(
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        ),
        Some(_) if o.data_file_raw && o.backing_file.is_some() => {
            invalid!("Backing file and data-file-raw cannot be used at the same time")
        }
        _ => Ok(()),
    }
}

/// Writes the header, the refcount structures (counting every metadata cluster) and an empty
/// L1 table to a new file, and syncs it.
fn write_image(path: &Path, geo: &Geometry, layout: &Layout, cluster0: &[u8]) -> Result<()> {
    let cs = geo.cluster_size();
    let name = path.display().to_string();
    let file = PosixFile::create(path).map_err(|e| Error::io(format!("creating {name}"), e))?;
    let w = |buf: &[u8], off: HostOffset| {
        file.write_at(buf, off.get())
            .map_err(|e| Error::io(format!("writing {name} at {off:#x}"), e))
    };
    w(cluster0, HostOffset::ZERO)?;
    let blocks_off = layout.blocks_offset(geo);
    let mut rt = vec![0u64; geo.u64_per_cluster() as usize * layout.rt_clusters as usize];
    for (b, entry) in rt.iter_mut().take(layout.blocks as usize).enumerate() {
        *entry = (blocks_off + b as u64 * cs).get();
    }
    w(&u64_table_bytes(&rt), layout.rt_offset(geo))?;
    let per_block = geo.refblock_entries();
    for b in 0..layout.blocks {
        let mut block = vec![0u8; cs as usize];
        let first = b * per_block;
        let counted = layout.total_clusters().saturating_sub(first).min(per_block);
        for i in 0..counted as usize {
            refcount::set(&mut block, geo.refcount_order, i, 1);
        }
        w(&block, blocks_off + b * cs)?;
    }
    if layout.l1_clusters > 0 {
        let l1 = vec![0u8; (layout.l1_clusters * cs) as usize];
        w(&l1, layout.l1_offset(geo))?;
    }
    file.sync()
        .map_err(|e| Error::io(format!("syncing {name}"), e))
}

/// Allocates every L2 table and data cluster of a fresh image; the data reads as zeros
/// because the file is extended sparsely past the last cluster.
fn preallocate_metadata(path: &Path, size: u64) -> Result<()> {
    let img = Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )?;
    let geo = img.geo;
    let entries = geo.l2_entries();
    let cs = geo.cluster_size();
    let mut end = HostOffset::ZERO;
    {
        let mut m = img.lock_meta();
        let total_clusters = geo.clusters_for(size);
        let mut first = 0;
        let mut l1 = 0;
        while first < total_clusters {
            let table = m.l2_for_write(&img.file, l1)?;
            let n = (total_clusters - first).min(entries);
            // An external data file maps every cluster at its guest offset, unrefcounted.
            let data = if geo.external_data {
                HostOffset::new(first * cs)
            } else {
                let d = m.rc.alloc(&img.file, n)?;
                end = end.max(d + n * cs);
                d
            };
            for i in 0..n {
                let mapping = if geo.external_data {
                    let guest = crate::format::GuestOffset::new((first + i) * cs);
                    super::datafile::raw_mapping(&geo, guest)
                } else {
                    crate::format::entry::Mapping::Data {
                        host: data + i * cs,
                        copied: true,
                        alloc: u32::MAX,
                        zero: 0,
                    }
                };
                m.set_mapping(&img.file, table, i as usize, mapping)?;
            }
            first += n;
            l1 += 1;
        }
        m.writeback(&img.file)?;
    }
    // The data clusters are never written: extend the file (sparsely) so that they exist.
    if end.get() > img.file.len()? {
        img.file.set_len(end.get())?;
    }
    img.close()
}
