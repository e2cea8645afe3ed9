//! Writing bitmaps to disk, crash-safely, in QEMU's order: new clusters only, never an
//! in-place update of anything the header reaches.
//!
//! Every directory change (marking in use at open, storing at close, removing a bitmap) goes:
//! new tables and data clusters written; new directory written; refcounts written; sync; the
//! header extension pointed at the new directory; sync; only then the old directory, tables
//! and data are freed (through the deferred frees, so never reused before that is durable).
//! A crash before the header write leaves the old directory, whose bitmaps are in use while the
//! image is open read-write: QEMU and oxcow treat them as inconsistent. At worst the new
//! clusters leak.

use super::set::{OnDisk, State};
use crate::engine::meta::Meta;
use crate::error::Result;
use crate::format::bitmap::{
    serialize_directory, BitmapEntry, TableEntry, FLAG_AUTO, FLAG_IN_USE, TYPE_DIRTY_TRACKING,
};
use crate::format::header::{BitmapsExtension, Header, Purpose, AUTOCLEAR_BITMAPS};
use crate::format::HostOffset;
use crate::storage::{HostFile, MetaKind, WriteKind};

/// A host range to free once the new directory is durable, and the structure it held.
type Freed = (HostOffset, u64, MetaKind);

/// Writes `buf` into freshly allocated clusters and indexes them as `kind` in the overlap
/// guard. The clusters are new, so the guard (which still refuses any known metadata there)
/// lets the write through only if the allocator handed out truly free space.
fn write_new(file: &HostFile, m: &mut Meta, buf: &[u8], kind: MetaKind) -> Result<HostOffset> {
    let geo = m.header.geometry();
    let n = geo.clusters_for(buf.len() as u64).max(1);
    let at = m.rc.alloc(file, n)?;
    let mut padded = buf.to_vec();
    padded.resize((n * geo.cluster_size()) as usize, 0);
    file.write(&padded, at, WriteKind::Data)?;
    file.guard().insert(at.cluster(&geo).0, n, kind);
    Ok(at)
}

/// Points the header's bitmaps extension at `ext` (`None` drops it), with autoclear bit 0
/// set exactly when there is an extension, and syncs. The rest of cluster 0 is taken from
/// disk, so that bits the engine changed there (lazy refcounts' dirty bit) are kept.
pub fn write_extension(file: &HostFile, m: &mut Meta, ext: Option<BitmapsExtension>) -> Result<()> {
    let cs = m.header.cluster_size();
    let mut c0 = vec![0u8; cs as usize];
    file.read_zero_padded(&mut c0, HostOffset::ZERO, "image header")?;
    let mut h = Header::parse_for(&c0, Purpose::Check)?;
    h.bitmaps = ext;
    if ext.is_some() {
        h.autoclear_features |= AUTOCLEAR_BITMAPS;
    } else {
        h.autoclear_features &= !AUTOCLEAR_BITMAPS;
    }
    let bytes = h.to_cluster0()?;
    file.write(&bytes, HostOffset::ZERO, WriteKind::Header)?;
    file.sync()?;
    m.header.bitmaps = h.bitmaps;
    m.header.autoclear_features = h.autoclear_features;
    m.header.header_length = h.header_length;
    m.header.backing_file_offset = h.backing_file_offset;
    m.header.backing_file_size = h.backing_file_size;
    Ok(())
}

/// Makes `entries` the on-disk directory (an empty list drops the extension and autoclear
/// bit 0, as QEMU does when the last bitmap goes), then frees the old directory and `freed`.
pub fn replace_directory(
    file: &HostFile,
    m: &mut Meta,
    disk: &mut OnDisk,
    entries: Vec<BitmapEntry>,
    mut freed: Vec<Freed>,
) -> Result<()> {
    let ext = if entries.is_empty() {
        None
    } else {
        let bytes = serialize_directory(&entries)?;
        let at = write_new(file, m, &bytes, MetaKind::BitmapDirectory)?;
        Some(BitmapsExtension {
            nb_bitmaps: entries.len() as u32,
            directory_size: bytes.len() as u64,
            directory_offset: at.get(),
        })
    };
    // Everything the new directory reaches, and its refcounts, durable before the header.
    m.writeback(file)?;
    file.sync()?;
    write_extension(file, m, ext)?;
    if let Some((at, len)) = disk.dir {
        freed.push((at, len, MetaKind::BitmapDirectory));
    }
    let geo = m.header.geometry();
    for (at, len, kind) in freed {
        if len == 0 {
            continue;
        }
        file.guard()
            .remove(at.cluster(&geo).0, geo.clusters_for(len), kind);
        m.deferred_frees.push((at, len));
    }
    disk.dir = ext.map(|e| (HostOffset::new(e.directory_offset), e.directory_size));
    disk.entries = entries;
    Ok(())
}

/// The clusters of bitmap `e` on disk (its table and data clusters), for freeing. Entries
/// that do not decode are left alone (a leak, never a wrong free).
pub fn clusters_of(file: &HostFile, m: &Meta, e: &BitmapEntry) -> Result<Vec<Freed>> {
    let geo = m.header.geometry();
    let table_at = HostOffset::new(e.table_offset);
    let table = super::load::read_table(file, table_at, u64::from(e.table_size))?;
    let mut out: Vec<Freed> = table
        .into_iter()
        .filter_map(|raw| match TableEntry::decode(raw, &geo) {
            Ok(TableEntry::Data(off)) => Some((
                HostOffset::new(off),
                geo.cluster_size(),
                MetaKind::BitmapData,
            )),
            _ => None,
        })
        .collect();
    out.push((table_at, u64::from(e.table_size) * 8, MetaKind::BitmapTable));
    Ok(out)
}

/// Marks every consistent bitmap in use on disk (read-write open): from now on a crash leaves
/// them inconsistent. Returns whether there was any to mark.
pub fn mark_in_use(file: &HostFile, m: &mut Meta, s: &mut State) -> Result<bool> {
    if s.disk.entries.iter().all(|e| e.flags & FLAG_IN_USE != 0) {
        return Ok(false);
    }
    let entries = s
        .disk
        .entries
        .iter()
        .map(|e| BitmapEntry {
            flags: e.flags | FLAG_IN_USE,
            ..e.clone()
        })
        .collect();
    replace_directory(file, m, &mut s.disk, entries, Vec::new())?;
    Ok(true)
}

/// Stores every bitmap (close, reopen to read-only, drop): new tables and data clusters,
/// then the directory without the in-use flag, then the old clusters are freed. Inconsistent
/// bitmaps keep their on-disk entry unchanged.
pub fn store(file: &HostFile, m: &mut Meta, s: &mut State) -> Result<()> {
    if !s.needs_store {
        return Ok(());
    }
    let mut entries = Vec::with_capacity(s.list.len());
    let mut freed = Vec::new();
    // By name: up to 65535 bitmaps, so no quadratic search.
    let on_disk: std::collections::HashMap<&[u8], &BitmapEntry> = s
        .disk
        .entries
        .iter()
        .map(|e| (e.name.as_slice(), e))
        .collect();
    for b in &s.list {
        let old = on_disk.get(b.name.as_slice()).copied();
        if b.inconsistent {
            if let Some(e) = old {
                entries.push(e.clone());
            }
            continue;
        }
        if let Some(e) = old {
            freed.extend(clusters_of(file, m, e)?);
        }
        let (table_offset, table_size) = write_bits(file, m, &b.bits)?;
        entries.push(BitmapEntry {
            table_offset: table_offset.get(),
            table_size,
            flags: if b.enabled { FLAG_AUTO } else { 0 },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: b.gbits,
            name: b.name.clone(),
        });
    }
    replace_directory(file, m, &mut s.disk, entries, freed)?;
    s.needs_store = false;
    Ok(())
}

/// Writes one bitmap's data clusters (all-zero ones become entry 0, as QEMU stores them;
/// QEMU never writes entry 1, so neither does this) and its table. Returns the table.
fn write_bits(
    file: &HostFile,
    m: &mut Meta,
    bits: &super::bits::DirtyBits,
) -> Result<(HostOffset, u32)> {
    let n = bits.chunk_count().max(1);
    let mut table = vec![0u64; n];
    for (c, slot) in table.iter_mut().enumerate() {
        if let super::bits::ChunkImage::Bytes(b) = bits.chunk_image(c) {
            let at = write_new(file, m, &b, MetaKind::BitmapData)?;
            *slot = TableEntry::Data(at.get()).encode();
        }
    }
    let bytes = crate::format::be::u64_table_bytes(&table);
    let at = write_new(file, m, &bytes, MetaKind::BitmapTable)?;
    Ok((at, n as u32))
}
