//! oxcow_rebase(): `qemu-img rebase` on a live handle.

use super::error::{einval, oxcow_error};
use super::image::{oxcow_image, with_image};
use super::util::c_str;
use crate::Image;
use std::ffi::{c_char, c_int};

/// oxcow_rebase() flag: unsafe mode (like `qemu-img rebase -u`): only the backing file name
/// and format in the header change; the guest-visible content may change.
pub const OXCOW_REBASE_UNSAFE: u32 = 1u32;

/// Changes the backing file of a read-write handle while other threads may keep doing I/O
/// on it, like `qemu-img rebase` (QEMU 10).
///
/// `backing` is the name stored in the header (a relative name is relative to the image's
/// directory); NULL or "" removes the backing file. `backing_format` ("qcow2" or "raw"; in
/// unsafe mode any format name QEMU knows) is required with a backing file and ignored
/// without one.
///
/// Safe mode (no flag): the guest-visible content does not change. The new backing file is
/// opened first; wherever this image is unallocated and the old and new chains differ, the
/// old content is copied into this image (per subcluster, as qemu-img does), then the header
/// is switched in one write and the handle reads through the new chain. Writers are held back
/// only one extent at a time; readers are never blocked. With OXCOW_REBASE_UNSAFE only the
/// header changes (the new backing file is opened for the handle unless it was opened with
/// OXCOW_OPEN_NO_BACKING). A crash leaves the old chain (with copies that read the same) or
/// the new one. Concurrent rebases and resizes are serialised.
///
/// Returns 0, or -EINVAL (NULL handle, unknown flags, a backing file without a format, a
/// format name QEMU does not know, a name over 1023 bytes or not UTF-8), -ENOTSUP (safe mode
/// with a format oxcow cannot read, or on a handle opened without its backing chain),
/// -ENOSPC (the name does not fit in the header cluster; nothing changed), -ENOENT and other
/// errors opening the new backing file (nothing changed), -EAGAIN (the new backing file is
/// locked by a writer), -EROFS (read-only handle), -ENOMEDIUM (fenced handle), -EIO.
///
/// # Safety
/// `img` is NULL or a live handle; `backing` and `backing_format` are NULL or NUL-terminated
/// strings live for the call; `err` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_rebase(
    img: *mut oxcow_image,
    backing: *const c_char,
    backing_format: *const c_char,
    flags: u32,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        super::check_flags(flags, OXCOW_REBASE_UNSAFE, "rebase")?;
        let name = if backing.is_null() {
            ""
        } else {
            // SAFETY: non-NULL and NUL-terminated, live for the call per the contract.
            unsafe { c_str(backing, "backing") }?
        };
        let target = if name.is_empty() {
            None
        } else if backing_format.is_null() {
            return einval("backing_format is NULL: the backing format must be specified");
        } else {
            // SAFETY: non-NULL and NUL-terminated, live for the call per the contract.
            let fmt = unsafe { c_str(backing_format, "backing_format") }?;
            Some((name, fmt))
        };
        image.rebase(target, flags & OXCOW_REBASE_UNSAFE != 0)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}
