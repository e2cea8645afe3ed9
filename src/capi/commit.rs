//! oxcow_commit(): `qemu-img commit` on a live handle.

use super::error::oxcow_error;
use super::image::{oxcow_image, with_image};
use super::util::c_str;
use crate::{CommitOptions, Image};
use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;

/// oxcow_commit_options.flags: keep the top's data after the commit (`qemu-img commit -d`);
/// without it the top is emptied, as qemu-img does by default.
pub const OXCOW_COMMIT_KEEP_TOP: u32 = 1u32;

/// Parameters of oxcow_commit(). Initialise with oxcow_commit_options_init(), then change the
/// fields you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_commit_options {
    /// sizeof(oxcow_commit_options) as the caller knows it; set by the _init function.
    pub struct_size: u32,
    /// OXCOW_COMMIT_* flags.
    pub flags: u32,
    /// The backing file to commit into, by file name (as the chain names it, or any path to
    /// the same file), or NULL for the direct backing file. Naming a base keeps the top, as
    /// `qemu-img commit -b` implies `-d`. Must be valid UTF-8.
    pub base: *const c_char,
    /// Called now and then on the calling thread with the bytes done and the total, or NULL.
    pub progress: Option<unsafe extern "C" fn(opaque: *mut c_void, done: u64, total: u64)>,
    /// Passed back to `progress` unchanged.
    pub progress_opaque: *mut c_void,
}

impl oxcow_commit_options {
    fn defaults() -> oxcow_commit_options {
        oxcow_commit_options {
            struct_size: std::mem::size_of::<oxcow_commit_options>() as u32,
            flags: 0,
            base: std::ptr::null(),
            progress: None,
            progress_opaque: std::ptr::null_mut(),
        }
    }
}

/// Fills `*opts` with the defaults (direct backing file, top emptied, no progress callback)
/// and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `opts` is NULL or points to writable memory for one `oxcow_commit_options`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_commit_options_init(opts: *mut oxcow_commit_options) {
    // SAFETY: the caller guarantees `opts` is NULL or valid for writing one struct.
    unsafe { super::init_struct(opts, oxcow_commit_options::defaults()) }
}

/// Commits the image into a backing file like `qemu-img commit` (QEMU 10), on a live
/// read-write handle: the base (`opts->base`, NULL = the direct backing file) is reopened
/// read-write through the same transactional reopen as oxcow_reopen() (same file by device
/// and inode, QEMU-compatible locks moved without a gap), grown when shorter than the image,
/// filled with what the image (and the images between) hold (data copied, zero clusters
/// written as zeros, unallocated ranges left alone; never zeros where the base reads zeros
/// already), flushed and reopened read-only. Then, unless OXCOW_COMMIT_KEEP_TOP or a named
/// base, the image is emptied so that it reads through to the base. `opts` may be NULL (the
/// defaults).
///
/// Other threads may keep reading and writing the image meanwhile: their writes go to the
/// image and stay visible (before the image is emptied, writers are held back while the
/// ranges they wrote during the copy are copied again).
///
/// Returns 0, or -EINVAL (NULL handle, short struct_size, unknown flags, no backing file,
/// base not in the chain), -EROFS (read-only handle), -EAGAIN (another process uses the
/// base), -ESTALE (the base's path names another file now), -ENOMEDIUM (fenced handle),
/// -EIO, -ENOSPC. On error both files are consistent, the image reads as before on its old
/// chain, and the call may be retried.
///
/// # Safety
/// `img` is NULL or a live handle; `opts` is NULL or points to an initialised
/// `oxcow_commit_options` whose `base` is NULL or a NUL-terminated string; `err` is NULL or
/// valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_commit(
    img: *mut oxcow_image,
    opts: *const oxcow_commit_options,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: NULL or initialised per the contract.
        let o = unsafe { super::read_options(opts, "oxcow_commit_options") }?
            .unwrap_or_else(oxcow_commit_options::defaults);
        super::check_flags(o.flags, OXCOW_COMMIT_KEEP_TOP, "commit")?;
        let base = if o.base.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated per the contract.
            Some(PathBuf::from(unsafe { c_str(o.base, "base") }?))
        };
        let report = |done: u64, total: u64| {
            if let Some(cb) = o.progress {
                // SAFETY: the caller's callback, called on this thread with its own opaque
                // pointer, as the contract of oxcow_commit_options promises.
                unsafe { cb(o.progress_opaque, done, total) }
            }
        };
        image.commit(&CommitOptions {
            base,
            keep_top: o.flags & OXCOW_COMMIT_KEEP_TOP != 0,
            progress: Some(&report),
        })
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}
