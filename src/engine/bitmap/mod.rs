//! Persistent dirty bitmaps (the qcow2 bitmaps extension, QEMU-compatible): loaded at a
//! read-write open, marked in use on disk before guest data can change, updated by every
//! guest write, stored back at close, reopen to read-only and a clean drop.
//!
//! This file holds the public API (the C ABI, Go binding and CLI are written against it);
//! [`bits`] is one in-memory bitmap, [`set`] the image's bitmaps and the write-path tracking,
//! [`load`] and [`store`] the on-disk side, [`api`] the control operations.

pub(crate) mod api;
pub(crate) mod bits;
#[cfg(test)]
mod crash_tests;
pub(crate) mod lifecycle;
pub(crate) mod load;
pub(crate) mod set;
pub(crate) mod store;

use super::Image;
use crate::error::Result;
use crate::options::Extent;

/// [`BitmapInfo::flags`]: the bitmap records guest writes now.
pub const BITMAP_ENABLED: u32 = 1;
/// [`BitmapInfo::flags`]: the bitmap was found in use at open (its writer crashed or is still
/// running): it is not tracked, cannot be enabled or merged, only removed.
pub const BITMAP_INCONSISTENT: u32 = 2;
/// [`BitmapInfo::flags`]: the bitmap is (or, for an inconsistent one, was) stored with QEMU's
/// `auto` flag: it is enabled whenever the image is opened read-write.
pub const BITMAP_AUTO: u32 = 4;

/// One persistent bitmap, as [`Image::bitmaps`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name (lossily decoded when the image holds a name that is not UTF-8).
    pub name: String,
    /// Guest bytes covered by one bit: a power of two from 512 B to 2 GiB.
    pub granularity: u64,
    /// `BITMAP_*` flags.
    pub flags: u32,
}

/// Options of [`Image::bitmap_add`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapAddOptions {
    /// Guest bytes per bit; 0 picks the default `qemu-img bitmap --add` picks.
    pub granularity: u64,
    /// Create the bitmap disabled (not recording), like `qemu-img bitmap --add --disable`.
    pub disabled: bool,
}

impl Image {
    /// The image's persistent bitmaps, in directory order. Works on read-only handles too.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        self.bitmap_list()
    }

    /// Adds an empty persistent bitmap named `name`. Errors: `Exists` when the name is taken,
    /// `InvalidArgument` for a bad name or granularity, `ReadOnly`, `NoSpace` when the
    /// directory would exceed QEMU's limits.
    pub fn bitmap_add(&self, name: &str, opts: BitmapAddOptions) -> Result<()> {
        self.bitmap_add_impl(name, opts)
    }

    /// Removes bitmap `name` (inconsistent ones too) and frees its clusters. `NotFound` when
    /// there is no such bitmap.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_remove_impl(name)
    }

    /// Clears every bit of bitmap `name`. `Busy` for an inconsistent bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_control(name, api::Control::Clear)
    }

    /// Makes bitmap `name` record guest writes (stored with the `auto` flag). `Busy` for an
    /// inconsistent bitmap.
    pub fn bitmap_enable(&self, name: &str) -> Result<()> {
        self.bitmap_control(name, api::Control::Enable)
    }

    /// Stops bitmap `name` from recording guest writes. `Busy` for an inconsistent bitmap.
    pub fn bitmap_disable(&self, name: &str) -> Result<()> {
        self.bitmap_control(name, api::Control::Disable)
    }

    /// Sets in bitmap `dst` every bit set in bitmap `src` of this image (granularities may
    /// differ, as in QEMU). `Busy` when either is inconsistent.
    pub fn bitmap_merge(&self, dst: &str, src: &str) -> Result<()> {
        self.bitmap_merge_from(dst, self, src)
    }

    /// Like [`Image::bitmap_merge`] with the source bitmap taken from `src_image` (which may be
    /// read-only), for `qemu-img bitmap --merge SRC -b SRC_FILE` and `convert --bitmaps`.
    /// Both images must have the same virtual size.
    pub fn bitmap_merge_from(&self, dst: &str, src_image: &Image, src: &str) -> Result<()> {
        self.bitmap_merge_impl(dst, src_image, src)
    }

    /// Dirty status of bitmap `name` from guest `offset`: an extent starting at `offset`, at
    /// most `count` bytes long, over which the bitmap's state stays the same, with
    /// `EXTENT_DIRTY` set when that range is dirty (`host_offset` is 0). `Busy` for an
    /// inconsistent bitmap.
    pub fn bitmap_status(&self, name: &str, offset: u64, count: u64) -> Result<Extent> {
        self.bitmap_status_impl(name, offset, count)
    }
}
