//! Internal snapshots: oxcow_snapshot_create/apply/delete/list, and the snapshot key of the
//! open options.

use super::error::{einval, oxcow_error, CResult};
use super::image::{oxcow_image, with_image};
use super::types::*;
use super::util::{c_str, copy_list, with_c_str};
use crate::format::snapshot::Snapshot;
use crate::Image;
use std::ffi::{c_char, c_int};

/// Borrows a caller's snapshot name or id: [`c_str`]'s checks, and empty keys give -EINVAL.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the returned reference.
unsafe fn c_key<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    // SAFETY: forwarded from this function's contract.
    let s = unsafe { c_str(p, what) }?;
    non_empty(s, what)
}

/// -EINVAL for an empty snapshot name or id (named `what`).
fn non_empty<'a>(s: &'a str, what: &str) -> CResult<&'a str> {
    match s {
        "" => einval(format!("{what} is empty")),
        s => Ok(s),
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
    let f = |image: &Image, name: &str| image.snapshot_create(non_empty(name, "name")?).map(drop);
    // SAFETY: `img` is NULL or live, `name` NULL or NUL-terminated, `err` NULL or writable,
    // per the contract.
    unsafe { with_c_str(img, name, "name", err, f) }
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
    let f = |image: &Image, key: &str| image.snapshot_apply(non_empty(key, "name_or_id")?);
    // SAFETY: `img` is NULL or live, `name_or_id` NULL or NUL-terminated, `err` NULL or writable,
    // per the contract.
    unsafe { with_c_str(img, name_or_id, "name_or_id", err, f) }
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
    let f = |image: &Image, key: &str| image.snapshot_delete(non_empty(key, "name_or_id")?);
    // SAFETY: `img` is NULL or live, `name_or_id` NULL or NUL-terminated, `err` NULL or writable,
    // per the contract.
    unsafe { with_c_str(img, name_or_id, "name_or_id", err, f) }
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
        let list = || Ok(image.snapshot_list());
        // SAFETY: `out` is NULL or writable for `cap` entries, `count` NULL or writable, per
        // the contract.
        unsafe { copy_list(out, cap, count, list, |s| Ok(to_c(s))) }
    };
    // SAFETY: `img` is NULL or live per the contract; no error object is requested.
    unsafe { with_image(img, std::ptr::null_mut(), body) }
}
