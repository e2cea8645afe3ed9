//! Persistent dirty bitmaps through the C ABI: add, remove, clear, enable, disable, merge,
//! list and the dirty-extent walk (oxcow_bitmap_status) that incremental backups are built on.
//! Everything is done by the engine ([`crate::Image::bitmap_add`] and friends); this file only
//! checks the C arguments and converts names and structs.

use super::error::{einval, oxcow_error, CResult};
use super::image::{oxcow_image, with_image};
use super::types::*;
use super::util::{c_str, copy_c_string, copy_list, with_c_str, write_extent};
use crate::{BitmapAddOptions, Image};
use std::ffi::{c_char, c_int};
use std::ptr;

/// oxcow_bitmap_add() flag: create the bitmap disabled (not recording guest writes), like
/// `qemu-img bitmap --add --disable`. A bit of its own, distinct from the OXCOW_BITMAP_*
/// state flags of oxcow_bitmap_info, so that passing a state flag to oxcow_bitmap_add() is
/// refused instead of silently meaning something else.
pub const OXCOW_BITMAP_DISABLED: u32 = 8u32;

/// oxcow_bitmap_info flag: the bitmap records guest writes now.
pub const OXCOW_BITMAP_ENABLED: u32 = 1u32;
/// oxcow_bitmap_info flag: the bitmap was found in use at open (its writer crashed or is
/// still running): it is not tracked and cannot be enabled, cleared, merged or walked
/// (-EBUSY); it can only be removed.
pub const OXCOW_BITMAP_INCONSISTENT: u32 = 2u32;
/// oxcow_bitmap_info flag: the bitmap carries QEMU's `auto` flag (it is enabled whenever the
/// image is opened read-write).
pub const OXCOW_BITMAP_AUTO: u32 = 4u32;

/// Size of oxcow_bitmap_info.name, including the terminating NUL (QEMU's names are at most
/// 1023 bytes).
pub const OXCOW_BITMAP_NAME_LEN: usize = 1024;

/// One persistent bitmap, as oxcow_bitmap_list() reports it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_bitmap_info {
    /// The bitmap's name, NUL-terminated.
    pub name: [c_char; OXCOW_BITMAP_NAME_LEN],
    /// Guest bytes covered by one bit of the bitmap (a power of two, 512 B to 2 GiB).
    pub granularity: u64,
    /// OXCOW_BITMAP_ENABLED / OXCOW_BITMAP_INCONSISTENT / OXCOW_BITMAP_AUTO.
    pub flags: u32,
    /// Always 0.
    pub reserved: u32,
}

// The engine's flag values are passed through unchanged; keep them in lockstep.
const _: () = assert!(
    crate::BITMAP_ENABLED == OXCOW_BITMAP_ENABLED
        && crate::BITMAP_INCONSISTENT == OXCOW_BITMAP_INCONSISTENT
        && crate::BITMAP_AUTO == OXCOW_BITMAP_AUTO
        && crate::EXTENT_DIRTY == OXCOW_EXTENT_DIRTY
        && OXCOW_BITMAP_DISABLED & (OXCOW_BITMAP_ENABLED | OXCOW_BITMAP_INCONSISTENT) == 0
        && OXCOW_BITMAP_DISABLED & OXCOW_BITMAP_AUTO == 0
);

/// Runs `f` on the image with the bitmap name `name` decoded by [`c_str`] (the engine checks
/// the rest of QEMU's name rules); the shape of every call that takes one name.
///
/// # Safety
/// As [`with_c_str`].
unsafe fn with_name(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
    f: impl FnOnce(&Image, &str) -> CResult<()>,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_c_str(img, name, "name", err, f) }
}

/// Adds an empty persistent bitmap `name` that records guest writes from now on (stored with
/// QEMU's `auto` flag), or with OXCOW_BITMAP_DISABLED one that does not record until
/// oxcow_bitmap_enable(). `granularity` is the guest bytes per bit, a power of two from 512 to
/// 2 GiB; 0 picks qemu-img's default (the cluster size clamped to 4 KiB..64 KiB).
///
/// Returns 0, or -EINVAL (NULL handle or name, name not UTF-8, empty or longer than 1023
/// bytes, bad granularity, unknown flag bits), -EEXIST (a bitmap of that name exists),
/// -EROFS (read-only handle), -ENOSPC (QEMU's count or directory-size limit reached, or no
/// space), -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_add(
    img: *mut oxcow_image,
    name: *const c_char,
    granularity: u64,
    flags: u32,
    err: *mut *mut oxcow_error,
) -> c_int {
    let f = |image: &Image, name: &str| {
        super::check_flags(flags, OXCOW_BITMAP_DISABLED, "bitmap_add")?;
        let opts = BitmapAddOptions {
            granularity,
            disabled: flags & OXCOW_BITMAP_DISABLED != 0,
        };
        image.bitmap_add(name, opts)
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { with_name(img, name, err, f) }
}

/// Removes bitmap `name` and frees its clusters; inconsistent bitmaps can be removed too.
///
/// Returns 0, or -EINVAL (NULL handle or name, name not UTF-8), -ENOENT (no such bitmap),
/// -EROFS, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_remove(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_name(img, name, err, |image, n| image.bitmap_remove(n)) }
}

/// Clears every bit of bitmap `name` (typically after a backup copied its dirty ranges).
///
/// Returns 0, or -EINVAL, -ENOENT, -EBUSY (inconsistent bitmap), -EROFS, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_clear(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_name(img, name, err, |image, n| image.bitmap_clear(n)) }
}

/// Makes bitmap `name` record guest writes (and stores it with QEMU's `auto` flag).
///
/// Returns 0, or -EINVAL, -ENOENT, -EBUSY (inconsistent bitmap), -EROFS, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_enable(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_name(img, name, err, |image, n| image.bitmap_enable(n)) }
}

/// Stops bitmap `name` from recording guest writes (freezes it, e.g. for a backup).
///
/// Returns 0, or -EINVAL, -ENOENT, -EBUSY (inconsistent bitmap), -EROFS, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_disable(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { with_name(img, name, err, |image, n| image.bitmap_disable(n)) }
}

/// Sets in bitmap `dst` every bit that is set in bitmap `src` of the same image (the
/// granularities may differ), like `qemu-img bitmap --merge SRC IMAGE DST`.
///
/// Returns 0, or -EINVAL (NULL handle or name, name not UTF-8), -ENOENT (either bitmap
/// missing), -EBUSY (either is inconsistent), -EROFS, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `dst` and `src` are NULL or NUL-terminated; `err` is NULL
/// or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_merge(
    img: *mut oxcow_image,
    dst: *const c_char,
    src: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: both are NULL or NUL-terminated per the contract.
        let (d, s) = unsafe { (c_str(dst, "dst")?, c_str(src, "src")?) };
        image.bitmap_merge(d, s)
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { with_image(img, err, body) }
}

/// The C form of one engine bitmap; -ERANGE when the name does not fit (a name that is not
/// UTF-8 on disk is decoded lossily and may grow).
fn to_c_info(b: &crate::BitmapInfo) -> CResult<oxcow_bitmap_info> {
    let mut r = oxcow_bitmap_info {
        name: [0; OXCOW_BITMAP_NAME_LEN],
        granularity: b.granularity,
        flags: b.flags,
        reserved: 0,
    };
    copy_c_string(&mut r.name, &b.name, "bitmap name", "oxcow_bitmap_info")?;
    Ok(r)
}

/// Lists the image's persistent bitmaps in directory order (read-only handles too): the first
/// `cap` of them are written to `out[0..cap)` and `*count` receives the total number, which
/// may exceed `cap`; call again with a larger array then. Pass NULL `out` and `cap` 0 to ask
/// for the count only.
///
/// Returns 0, or -EINVAL (NULL handle or count, NULL out with cap > 0), -ERANGE (a name longer
/// than oxcow_bitmap_info.name), -EIO, -ENOMEDIUM. Nothing is written on failure.
///
/// # Safety
/// `img` is NULL or a live handle; `out` is NULL or valid for writing `cap` entries; `count`
/// is NULL or valid for writing one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_list(
    img: *mut oxcow_image,
    out: *mut oxcow_bitmap_info,
    cap: usize,
    count: *mut usize,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `out` is NULL or valid for `cap` entries, `count` NULL or valid for one
        // `size_t`, per the contract.
        unsafe { copy_list(out, cap, count, || image.bitmaps(), to_c_info) }
    };
    // SAFETY: forwarded from this function's contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Describes bitmap `name` over the guest range starting at `offset`, like
/// oxcow_block_status(): `*out` receives one extent that starts at `offset` and extends as
/// far as the bitmap's state stays the same (at least 1 byte, at most `count`), with
/// OXCOW_EXTENT_DIRTY in `flags` when that range is dirty (`host_offset` is 0). Call again
/// from `offset + out->length` for the rest. Dirty ranges are whole granules, clipped to the
/// request and the virtual size.
///
/// Returns 0, or -EINVAL (NULL handle, name or out, name not UTF-8, count 0, range beyond the
/// virtual size), -ENOENT (no such bitmap), -EBUSY (inconsistent bitmap), -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `out` is NULL or valid
/// for writing one `oxcow_extent`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_bitmap_status(
    img: *mut oxcow_image,
    name: *const c_char,
    offset: u64,
    count: u64,
    out: *mut oxcow_extent,
) -> c_int {
    let f = |image: &Image, name: &str| {
        if out.is_null() {
            return einval("out is NULL");
        }
        if count == 0 {
            return einval("count is 0");
        }
        let e = image.bitmap_status(name, offset, count)?;
        // SAFETY: non-NULL (checked above) and valid for one extent per the contract.
        unsafe { write_extent(out, &e) };
        Ok(())
    };
    // SAFETY: forwarded from this function's contract; NULL `err`.
    unsafe { with_name(img, name, ptr::null_mut(), f) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The layout is ABI (ctests/test_bitmap.c pins the same values from C).
    #[test]
    fn bitmap_info_layout_is_stable() {
        assert_eq!(size_of::<oxcow_bitmap_info>(), 1040);
        assert_eq!(offset_of!(oxcow_bitmap_info, granularity), 1024);
        assert_eq!(offset_of!(oxcow_bitmap_info, flags), 1032);
    }

    #[test]
    fn long_names_do_not_fit() {
        let mut b = crate::BitmapInfo {
            name: "b".repeat(1023),
            granularity: 65536,
            flags: OXCOW_BITMAP_AUTO,
        };
        let c = to_c_info(&b).expect("1023 bytes fit");
        assert_eq!(c.name[1022], b'b' as c_char);
        assert_eq!(c.name[1023], 0);
        b.name.push('x');
        let e = to_c_info(&b).expect_err("1024 bytes do not fit");
        assert_eq!(e.errno(), libc::ERANGE);
    }
}
