//! Internal snapshots: oxcow_snapshot_create/apply/delete/list, and the snapshot key of the
//! open options.

use super::error::{einval, oxcow_error, CResult};
use super::image::{oxcow_image, with_image};
use super::types::*;
use crate::format::snapshot::Snapshot;
use crate::Image;
use std::ffi::{c_char, c_int, CStr};

/// Borrows a caller's snapshot name or id (non-empty UTF-8).
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the returned reference.
unsafe fn c_key<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return einval(format!("{what} is NULL"));
    }
    // SAFETY: non-NULL, NUL-terminated and live per the caller's contract.
    match unsafe { CStr::from_ptr(p) }.to_str() {
        Ok("") => einval(format!("{what} is empty")),
        Ok(s) => Ok(s),
        Err(_) => einval(format!("{what} is not valid UTF-8")),
    }
}

/// The optional snapshot key of oxcow_open_options (NULL: none).
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
pub(super) unsafe fn c_key_opt(p: *const c_char) -> CResult<Option<String>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { c_key(p, "oxcow_open_options.snapshot") }.map(|s| Some(s.to_string()))
}

/// Copies `s` into a fixed C array, cut to fit (at a byte boundary, like QEMU's listing)
/// and NUL-terminated.
fn copy_cut(dst: &mut [c_char], s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(dst.len() - 1);
    for (d, &c) in dst.iter_mut().zip(&b[..n]) {
        *d = c as c_char;
    }
    dst[n] = 0;
}

/// The C view of one snapshot.
fn to_c(s: &Snapshot) -> oxcow_snapshot_info {
    let mut r = oxcow_snapshot_info {
        id: [0; OXCOW_SNAPSHOT_ID_LEN],
        name: [0; OXCOW_SNAPSHOT_NAME_LEN],
        date_sec: s.date_sec,
        date_nsec: s.date_nsec,
        vm_clock_nsec: s.vm_clock_nsec,
        vm_state_size: s.vm_state_size,
        disk_size: s.disk_size.unwrap_or(0),
        icount: s.icount.unwrap_or(u64::MAX),
        flags: 0,
        reserved: 0,
    };
    copy_cut(&mut r.id, &s.id);
    copy_cut(&mut r.name, &s.name);
    if s.disk_size.is_some() {
        r.flags |= OXCOW_SNAPSHOT_HAS_DISK_SIZE;
    }
    if s.icount.is_some() {
        r.flags |= OXCOW_SNAPSHOT_HAS_ICOUNT;
    }
    r
}

/// Creates an internal snapshot of the current disk state named `name`, like `qemu-img
/// snapshot -c`: the next free numeric id, the current time, no VM state. Names need not be
/// unique. Writers on other threads wait while the snapshot is taken; readers go on.
///
/// Returns 0, or -EINVAL (NULL handle or name, empty or over 255 bytes, not UTF-8, or a
/// refcount that cannot take another reference, e.g. 1-bit refcounts), -EROFS (read-only
/// handle), -ENOSPC (65536 snapshots), -ENOMEDIUM (fenced handle), -EIO.
///
/// # Safety
/// `img` is NULL or a live handle; `name` is NULL or NUL-terminated; `err` is NULL or valid
/// for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_snapshot_create(
    img: *mut oxcow_image,
    name: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let name = unsafe { c_key(name, "name") }?;
        image.snapshot_create(name).map(drop)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}

/// Reverts the disk to the snapshot whose id, else whose name, is `name_or_id`, like
/// `qemu-img snapshot -a`. Reads racing the switch see the old or the new contents.
///
/// Returns 0, or -EINVAL (NULL handle or key), -EROFS, -ENOENT (no such snapshot), -EBUSY
/// (the image has persistent bitmaps, which QEMU refuses too), -EUCLEAN (the snapshot's table entry is damaged; nothing changed), -ENOTSUP (the snapshot's
/// L1 table is longer than the image's). A snapshot of another disk size resizes the image to
/// it first, as QEMU does. -ENOMEDIUM, -EIO.
///
/// # Safety
/// As oxcow_snapshot_create().
#[no_mangle]
pub unsafe extern "C" fn oxcow_snapshot_apply(
    img: *mut oxcow_image,
    name_or_id: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let key = unsafe { c_key(name_or_id, "name_or_id") }?;
        image.snapshot_apply(key)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}

/// Deletes the snapshot whose id, else whose name, is `name_or_id`, like `qemu-img snapshot
/// -d`; clusters only it used are freed.
///
/// Returns 0, or -EINVAL, -EROFS, -ENOENT, -EUCLEAN (damaged entry; nothing changed),
/// -ENOMEDIUM, -EIO.
///
/// # Safety
/// As oxcow_snapshot_create().
#[no_mangle]
pub unsafe extern "C" fn oxcow_snapshot_delete(
    img: *mut oxcow_image,
    name_or_id: *const c_char,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let key = unsafe { c_key(name_or_id, "name_or_id") }?;
        image.snapshot_delete(key)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}

/// Lists the internal snapshots in table order: the first `min(cap, total)` are written to
/// `out[0..]` and `*count` receives the total, so a caller can size its array with a first
/// call with `cap` 0 (then `out` may be NULL) and retry when `*count > cap`.
///
/// Returns 0, or -EINVAL (NULL handle or count, NULL out with cap > 0), -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `out` is NULL or writable for `cap` entries; `count` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_snapshot_list(
    img: *mut oxcow_image,
    out: *mut oxcow_snapshot_info,
    cap: usize,
    count: *mut usize,
) -> c_int {
    let body = |image: &Image| {
        if count.is_null() {
            return einval("count is NULL");
        }
        if out.is_null() && cap > 0 {
            return einval("out is NULL with a non-zero cap");
        }
        let list = image.snapshot_list();
        for (i, s) in list.iter().take(cap).enumerate() {
            // SAFETY: i < cap and `out` is writable for `cap` entries per the contract.
            unsafe { out.add(i).write(to_c(s)) };
        }
        // SAFETY: non-NULL (checked) and writable per the contract.
        unsafe { count.write(list.len()) };
        Ok(())
    };
    // SAFETY: `img` is NULL or live per the contract; no error object is requested.
    unsafe { with_image(img, std::ptr::null_mut(), body) }
}
