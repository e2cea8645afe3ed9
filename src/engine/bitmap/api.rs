//! The bitmap control operations on a live handle. Each one that changes which bitmaps record,
//! or what they hold, runs with writers quiesced (the write gate held exclusively) only for
//! its own duration; reads go on. Names, limits and messages follow QEMU's.

use super::bits::DirtyBits;
use super::set::{Bm, State};
use super::{BitmapAddOptions, BitmapInfo, BITMAP_AUTO, BITMAP_ENABLED, BITMAP_INCONSISTENT};
use crate::engine::Image;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{
    entry_len, GRANULARITY_BITS, MAX_BITMAPS, MAX_DIRECTORY_BYTES, MAX_NAME_LEN,
    MAX_NEW_BITMAP_BITS,
};
use crate::options::{Extent, EXTENT_DIRTY};
use std::sync::Arc;

/// The control operations that act on one bitmap's bits or flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Clear every bit.
    Clear,
    /// Start recording guest writes.
    Enable,
    /// Stop recording guest writes.
    Disable,
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Dirty bitmap '{name}' not found"),
    )
}

/// The error for using inconsistent bitmap `name`.
pub(crate) fn busy(name: &str) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used (it was in use when the image was last closed); remove it"
        ),
    )
}

/// The default granularity of `qemu-img bitmap --add`: the cluster size, within 4 KiB..64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// Validates a granularity (0 = default) and returns it as a power of two.
fn granularity_bits(g: u64, cluster_size: u64) -> Result<u8> {
    let g = if g == 0 {
        default_granularity(cluster_size)
    } else {
        g
    };
    if !g.is_power_of_two() {
        return Err(Error::invalid("Granularity must be power of 2"));
    }
    let bits = g.trailing_zeros() as u8;
    if bits < *GRANULARITY_BITS.start() {
        return Err(Error::invalid("Granularity is under minimum (512 bytes)"));
    }
    if bits > *GRANULARITY_BITS.end() {
        return Err(Error::invalid(
            "Granularity exceeds maximum (2147483648 bytes)",
        ));
    }
    Ok(bits)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("Bitmap name cannot be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "Bitmap name too long: the limit is {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

/// QEMU's limits on one more persistent bitmap: count and directory size.
fn check_room(s: &State, name: &str) -> Result<()> {
    if s.list.len() >= MAX_BITMAPS as usize {
        return Err(Error::new(
            ErrorKind::NoSpace,
            "Maximum number of persistent bitmaps is already reached",
        ));
    }
    let dir: u64 = s
        .list
        .iter()
        .map(|b| entry_len(b.name.len()) as u64)
        .sum::<u64>()
        + entry_len(name.len()) as u64;
    if dir > MAX_DIRECTORY_BYTES {
        return Err(Error::new(
            ErrorKind::NoSpace,
            "Not enough space in the bitmap directory",
        ));
    }
    Ok(())
}

impl Image {
    pub(super) fn bitmap_list(&self) -> Result<Vec<BitmapInfo>> {
        let s = self.bitmaps.lock();
        Ok(s.list
            .iter()
            .map(|b| {
                let mut flags = 0;
                if b.enabled {
                    flags |= BITMAP_AUTO;
                    if !b.inconsistent {
                        flags |= BITMAP_ENABLED;
                    }
                }
                if b.inconsistent {
                    flags |= BITMAP_INCONSISTENT;
                }
                BitmapInfo {
                    name: String::from_utf8_lossy(&b.name).into_owned(),
                    granularity: 1u64 << b.gbits,
                    flags,
                }
            })
            .collect())
    }

    pub(super) fn bitmap_add_impl(&self, name: &str, opts: BitmapAddOptions) -> Result<()> {
        self.check_writable()?;
        check_name(name)?;
        if self.version < 3 {
            return Err(Error::unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        let gbits = granularity_bits(opts.granularity, self.geo.cluster_size())?;
        if self.virtual_size().div_ceil(1u64 << gbits) > MAX_NEW_BITMAP_BITS {
            return Err(Error::invalid(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        let _gate = self.quiesce();
        let mut s = self.bitmaps.lock();
        if s.find(name.as_bytes()).is_some() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!("Bitmap already exists: {name}"),
            ));
        }
        check_room(&s, name)?;
        s.list.push(Bm {
            name: name.as_bytes().to_vec(),
            gbits,
            enabled: !opts.disabled,
            inconsistent: false,
            bits: Arc::new(DirtyBits::new(
                self.virtual_size(),
                gbits,
                self.geo.cluster_bits,
            )),
        });
        // Like QEMU, a new bitmap reaches the disk when the bitmaps are stored (close,
        // reopen to read-only, drop): until then a crash simply loses it.
        s.needs_store = true;
        self.bitmaps.publish(&s);
        Ok(())
    }

    pub(super) fn bitmap_remove_impl(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let _gate = self.quiesce();
        let mut m = self.lock_meta();
        let mut s = self.bitmaps.lock();
        let i = s.find(name.as_bytes()).ok_or_else(|| not_found(name))?;
        // On disk first (a new directory without it, durable), then its clusters are freed:
        // a crash leaves it either listed as before or gone, with at worst leaks.
        let pos = s
            .disk
            .entries
            .iter()
            .position(|e| e.name == name.as_bytes());
        if let Some(pos) = pos {
            let freed = super::store::clusters_of(&self.file, &m, &s.disk.entries[pos])?;
            let mut entries = s.disk.entries.clone();
            entries.remove(pos);
            let st = &mut *s;
            super::store::replace_directory(&self.file, &mut m, &mut st.disk, entries, freed)?;
        }
        s.list.remove(i);
        self.bitmaps.publish(&s);
        Ok(())
    }

    pub(super) fn bitmap_control(&self, name: &str, op: Control) -> Result<()> {
        self.check_writable()?;
        let _gate = self.quiesce();
        let mut s = self.bitmaps.lock();
        let i = s.find(name.as_bytes()).ok_or_else(|| not_found(name))?;
        if s.list[i].inconsistent {
            return Err(busy(name));
        }
        let b = &mut s.list[i];
        match op {
            Control::Clear => {
                b.bits = Arc::new(DirtyBits::new(
                    self.virtual_size(),
                    b.gbits,
                    self.geo.cluster_bits,
                ))
            }
            Control::Enable => b.enabled = true,
            Control::Disable => b.enabled = false,
        }
        s.needs_store = true;
        self.bitmaps.publish(&s);
        Ok(())
    }

    pub(super) fn bitmap_merge_impl(&self, dst: &str, src_image: &Image, src: &str) -> Result<()> {
        self.check_writable()?;
        if src_image.virtual_size() != self.virtual_size() {
            return Err(Error::invalid(format!(
                "Bitmap '{src}' covers {} bytes, bitmap '{dst}' {}: bitmaps of different sizes cannot be merged",
                src_image.virtual_size(), self.virtual_size()
            )));
        }
        let same = std::ptr::eq(self, src_image);
        // The source's bits are taken before this image is quiesced (lock order: never two
        // images' state at once). For another image, a write racing with the merge may or
        // may not be included, as with QEMU.
        let src_bits = if same {
            None
        } else {
            Some(src_image.bitmap_bits(src)?)
        };
        let _gate = self.quiesce();
        let mut s = self.bitmaps.lock();
        let d = s.find(dst.as_bytes()).ok_or_else(|| not_found(dst))?;
        let src_bits = match src_bits {
            Some(b) => b,
            None => {
                let i = s.find(src.as_bytes()).ok_or_else(|| not_found(src))?;
                if s.list[i].inconsistent {
                    return Err(busy(src));
                }
                Arc::clone(&s.list[i].bits)
            }
        };
        if s.list[d].inconsistent {
            return Err(busy(dst));
        }
        s.list[d].bits.merge_from(&src_bits);
        s.needs_store = true;
        Ok(())
    }

    /// The bits of consistent bitmap `name`.
    fn bitmap_bits(&self, name: &str) -> Result<Arc<DirtyBits>> {
        let s = self.bitmaps.lock();
        let i = s.find(name.as_bytes()).ok_or_else(|| not_found(name))?;
        if s.list[i].inconsistent {
            return Err(busy(name));
        }
        Ok(Arc::clone(&s.list[i].bits))
    }

    pub(super) fn bitmap_status_impl(&self, name: &str, offset: u64, count: u64) -> Result<Extent> {
        self.check_usable()?;
        self.check_range(offset, count)?;
        if count == 0 {
            return Err(Error::invalid("bitmap_status of 0 bytes"));
        }
        let bits = self.bitmap_bits(name)?;
        let g = bits.granularity_bits();
        let end = offset + count;
        let first = offset >> g;
        let dirty = bits.get(first);
        let last_bit = (end - 1) >> g;
        let change = bits.next_change(first, last_bit + 1, dirty);
        let stop = (change << g).clamp(offset + 1, end);
        Ok(Extent {
            offset,
            length: stop - offset,
            flags: if dirty { EXTENT_DIRTY } else { 0 },
            host_offset: 0,
        })
    }
}
