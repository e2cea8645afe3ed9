//! Loading the bitmaps of an image: the directory and, for every bitmap not in use, its table
//! and data clusters, into memory. Bitmaps found in use are kept as inconsistent, without data
//! (as QEMU does).
//!
//! Everything read is bounded: the directory by the header parser (64 MiB), each table by
//! QEMU's constraints (512 MiB of bitmap data, so at most 1 Mi entries), and the memory all
//! loaded bitmaps take together by [`MAX_LOADED_BYTES`], so that a hostile image whose tables
//! all point at the same few clusters cannot make the engine allocate without limit.

use super::bits::DirtyBits;
use super::set::{Bm, OnDisk, State};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{self, BitmapEntry, TableEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::format::{Geometry, Header, HostOffset};
use crate::storage::HostFile;
use std::sync::Arc;

/// Most memory (bit chunks and chunk indexes) the loaded bitmaps of one image may take.
pub const MAX_LOADED_BYTES: u64 = 1 << 30;

/// Reads the directory the header points at (empty without a valid extension).
pub fn read_directory(file: &HostFile, header: &Header) -> Result<OnDisk> {
    let Some(ext) = header.bitmaps_in_use() else {
        return Ok(OnDisk::default());
    };
    // The header parser bounds directory_size (at most 64 MiB).
    let mut dir = vec![0u8; ext.directory_size as usize];
    let at = HostOffset::new(ext.directory_offset);
    file.read_zero_padded(&mut dir, at, "bitmap directory")?;
    let entries = bitmap::parse_directory(&dir, ext.nb_bitmaps, &header.geometry(), header.size)?;
    Ok(OnDisk {
        dir: Some((at, ext.directory_size)),
        entries,
    })
}

/// Loads every bitmap of the image described by `header`.
pub fn load(file: &HostFile, header: &Header) -> Result<State> {
    let disk = read_directory(file, header)?;
    let geo = header.geometry();
    let mut budget = 0u64;
    let mut list = Vec::with_capacity(disk.entries.len());
    let mut names = std::collections::HashSet::with_capacity(disk.entries.len());
    for e in &disk.entries {
        // Names identify bitmaps (and their clusters when stored or removed); QEMU cannot
        // create a second bitmap of the same name at load either.
        if !names.insert(e.name.as_slice()) {
            return Err(Error::corrupt(format!(
                "Bitmap already exists: {}",
                e.display_name()
            )));
        }
        let inconsistent = e.flags & FLAG_IN_USE != 0;
        let bits = if inconsistent {
            DirtyBits::new(0, e.granularity_bits, geo.cluster_bits)
        } else {
            load_bits(file, &geo, header.size, e, &mut budget)?
        };
        list.push(Bm {
            name: e.name.clone(),
            gbits: e.granularity_bits,
            enabled: e.flags & FLAG_AUTO != 0,
            inconsistent,
            bits: Arc::new(bits),
        });
    }
    Ok(State {
        list,
        disk,
        needs_store: false,
    })
}

fn charge(budget: &mut u64, bytes: u64, name: &str) -> Result<()> {
    *budget = budget.saturating_add(bytes);
    if *budget > MAX_LOADED_BYTES {
        return Err(Error::new(
            ErrorKind::NoMemory,
            format!(
                "loading bitmap '{name}': the image's bitmaps need more than {MAX_LOADED_BYTES} bytes of memory"
            ),
        ));
    }
    Ok(())
}

/// Reads one consistent bitmap's table and data clusters.
fn load_bits(
    file: &HostFile,
    geo: &Geometry,
    size: u64,
    e: &BitmapEntry,
    budget: &mut u64,
) -> Result<DirtyBits> {
    let name = e.display_name();
    let bits = DirtyBits::new(size, e.granularity_bits, geo.cluster_bits);
    charge(budget, bits.index_bytes(), &name)?;
    // parse_directory checked that the table covers the disk; entries past the chunks this
    // disk needs describe nothing.
    let n = (bits.chunk_count() as u64).min(u64::from(e.table_size));
    let table = read_table(file, HostOffset::new(e.table_offset), n)?;
    let cs = geo.cluster_size();
    let mut data = vec![0u8; cs as usize];
    for (c, &raw) in table.iter().enumerate() {
        let entry = TableEntry::decode(raw, geo).map_err(|err| {
            Error::corrupt(format!("bitmap '{name}': entry {c} of its table: {err}"))
        })?;
        match entry {
            TableEntry::Zero => {}
            TableEntry::Ones => bits.load_ones(c),
            TableEntry::Data(off) => {
                file.read_zero_padded(&mut data, HostOffset::new(off), "bitmap data")?;
                if bits.load_bytes(c, &data) {
                    charge(budget, cs, &name)?;
                }
            }
        }
    }
    Ok(bits)
}

/// Reads `n` entries of a bitmap table (`n` at most 2^27: QEMU's table limit, checked by the
/// directory parser).
pub fn read_table(file: &HostFile, at: HostOffset, n: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (n * 8) as usize];
    file.read_zero_padded(&mut raw, at, "bitmap table")?;
    Ok(crate::format::be::u64_table(&raw))
}
