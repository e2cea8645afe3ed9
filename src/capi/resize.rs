//! oxcow_resize(): `qemu-img resize` on a live handle.

use super::error::oxcow_error;
use super::image::{oxcow_image, with_image};
use crate::Image;
use std::ffi::c_int;

/// oxcow_resize() flag: allow a new size smaller than the current one (like
/// `qemu-img resize --shrink`); the data past the new end is deleted.
pub const OXCOW_RESIZE_SHRINK: u32 = 1u32;

/// Changes the virtual size of a read-write handle to `new_size` bytes while other threads
/// may keep doing I/O on it, like `qemu-img resize` (QEMU 10).
///
/// `new_size` must be a multiple of 512. Growing makes the new area read as zeros (also over a
/// backing file longer than the old size) and relocates the L1 table when it is too small;
/// shrinking needs OXCOW_RESIZE_SHRINK and drops this image's references to every cluster past
/// the new end (clusters shared with internal snapshots stay theirs). Data inside the new size
/// is unchanged. Each step is crash-safe: a crash leaves the old or the new size, at worst
/// with leaked clusters.
///
/// Writers are held back only while the mapping changes; readers are never blocked. A request
/// in flight at the old size either completes or fails with -EINVAL, and no request reads or
/// writes past the size in force when it was checked. Concurrent resizes are serialised.
///
/// Returns 0, or -EINVAL (NULL handle, unknown flags, a smaller size without
/// OXCOW_RESIZE_SHRINK, a size that is not a multiple of 512, or one whose L1 table would pass
/// QEMU's 32 MiB limit), -EROFS (read-only handle), -ENOTSUP (a version-2 image growing over
/// a longer backing file, which QEMU refuses too), -EBUSY (a persistent bitmap left
/// inconsistent by a crash, as QEMU refuses; consistent bitmaps are resized with the image),
/// -ENOMEDIUM (fenced handle), -EIO, -ENOSPC.
///
/// # Safety
/// `img` is NULL or a live handle; `err` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_resize(
    img: *mut oxcow_image,
    new_size: u64,
    flags: u32,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        super::check_flags(flags, OXCOW_RESIZE_SHRINK, "resize")?;
        image.resize(new_size, flags & OXCOW_RESIZE_SHRINK != 0)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}
