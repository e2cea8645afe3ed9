//! Argument and output helpers shared by the C calls: borrowing a caller's string argument,
//! copying a list into a caller's array, filling an extent and a fixed-size name field.

use super::error::{einval, oxcow_error, CResult};
use super::image::{oxcow_image, with_image};
use super::types::oxcow_extent;
use crate::{Error, Extent, Image};
use std::ffi::{c_char, c_int, CStr};

/// Borrows a caller's string argument as UTF-8: NULL and text that is not UTF-8 give -EINVAL
/// (naming the argument `what`); the callee checks the rest.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the returned reference.
pub(super) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return einval(format!("{what} is NULL"));
    }
    // SAFETY: non-NULL, NUL-terminated and live per the caller's contract.
    match unsafe { CStr::from_ptr(p) }.to_str() {
        Ok(s) => Ok(s),
        Err(_) => einval(format!("{what} is not valid UTF-8")),
    }
}

/// Runs `f` on the image with the string argument `p` (named `what`) decoded by [`c_str`]
/// inside the panic boundary; the shape of every call that takes one name.
///
/// # Safety
/// `img` is NULL or a live handle; `p` is NULL or NUL-terminated and live for the call; `err`
/// is NULL or valid for writing one pointer.
pub(super) unsafe fn with_c_str(
    img: *mut oxcow_image,
    p: *const c_char,
    what: &str,
    err: *mut *mut oxcow_error,
    f: impl FnOnce(&Image, &str) -> CResult<()>,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `p` is NULL or NUL-terminated and live per the contract.
        let s = unsafe { c_str(p, what) }?;
        f(image, s)
    };
    // SAFETY: `img` and `err` are forwarded from this function's contract.
    unsafe { with_image(img, err, body) }
}

/// The list calls' protocol: checks `count` (non-NULL) and `out` (non-NULL unless `cap` is 0),
/// then converts the first `min(cap, list.len())` items of `list()` with `conv`, writes them
/// to `out[0..]` and the total to `*count`. Nothing is written when any step fails.
///
/// # Safety
/// `out` is NULL or valid for writing `cap` items; `count` is NULL or valid for writing one
/// `usize`.
pub(super) unsafe fn copy_list<T, U>(
    out: *mut U,
    cap: usize,
    count: *mut usize,
    list: impl FnOnce() -> CResult<Vec<T>>,
    conv: impl Fn(&T) -> CResult<U>,
) -> CResult<()> {
    if count.is_null() {
        return einval("count is NULL");
    }
    if out.is_null() && cap > 0 {
        return einval(format!("out is NULL with cap {cap}"));
    }
    let list = list()?;
    let items = list
        .iter()
        .take(cap)
        .map(conv)
        .collect::<CResult<Vec<U>>>()?;
    for (i, item) in items.into_iter().enumerate() {
        // SAFETY: i < cap, and `out` is valid for writing `cap` items per the contract (it is
        // non-NULL here: cap > 0 since an item exists, and NULL with cap > 0 was refused).
        unsafe { out.add(i).write(item) };
    }
    // SAFETY: non-NULL (checked above) and valid for writing per the contract.
    unsafe { count.write(list.len()) };
    Ok(())
}

/// Writes the C form of the engine extent `e` to `*out` (flags pass through unchanged).
///
/// # Safety
/// `out` is non-NULL, aligned and valid for writing one `oxcow_extent`.
pub(super) unsafe fn write_extent(out: *mut oxcow_extent, e: &Extent) {
    let r = oxcow_extent {
        offset: e.offset,
        length: e.length,
        host_offset: e.host_offset,
        flags: e.flags,
        reserved: 0,
    };
    // SAFETY: non-NULL and valid for one write per the contract.
    unsafe { out.write(r) };
}

/// Copies `s` into the fixed C char array `dst` of struct `owner`, NUL-terminated; -ERANGE
/// (naming `what` and `owner`) when it does not fit or holds a NUL.
pub(super) fn copy_c_string(dst: &mut [c_char], s: &str, what: &str, owner: &str) -> CResult<()> {
    let b = s.as_bytes();
    if b.len() >= dst.len() || b.contains(&0) {
        return Err(Error::io(
            format!("{what} ({} bytes) does not fit in {owner}", b.len()),
            std::io::Error::from_raw_os_error(libc::ERANGE),
        ));
    }
    for (d, &c) in dst.iter_mut().zip(b) {
        *d = c as c_char;
    }
    dst[b.len()] = 0;
    Ok(())
}
