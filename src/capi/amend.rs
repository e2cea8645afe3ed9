//! oxcow_amend(): `qemu-img amend -o` on a qcow2 file that nobody has open.

use super::create::c_path;
use super::error::{call, einval, oxcow_error, CResult};
use crate::AmendOptions;
use std::ffi::{c_char, c_int};

/// oxcow_amend_options.lazy_refcounts: keep the current setting.
pub const OXCOW_AMEND_LAZY_KEEP: u32 = 0;
/// oxcow_amend_options.lazy_refcounts: turn lazy refcounts off.
pub const OXCOW_AMEND_LAZY_OFF: u32 = 1;
/// oxcow_amend_options.lazy_refcounts: turn lazy refcounts on (version 3 only).
pub const OXCOW_AMEND_LAZY_ON: u32 = 2;

/// What oxcow_amend() changes. Initialise with oxcow_amend_options_init() (which keeps
/// everything), then set the fields to change. Zero in a field means "keep".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_amend_options {
    /// sizeof(oxcow_amend_options) as the caller knows it; set by the _init function.
    pub struct_size: u32,
    /// qcow2 version to convert to: 2 (compat=0.10) or 3 (compat=1.1); 0 keeps it.
    pub version: u32,
    /// Refcount width in bits: a power of two up to 64 (not 16: version 3); 0 keeps it.
    pub refcount_bits: u32,
    /// OXCOW_AMEND_LAZY_* value.
    pub lazy_refcounts: u32,
}

const AMEND_OPTIONS_V1_SIZE: u32 = std::mem::size_of::<oxcow_amend_options>() as u32;

/// Fills `*opts` with "change nothing" and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `opts` is NULL or points to writable memory for one `oxcow_amend_options`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_amend_options_init(opts: *mut oxcow_amend_options) {
    let keep = oxcow_amend_options {
        struct_size: AMEND_OPTIONS_V1_SIZE,
        version: 0,
        refcount_bits: 0,
        lazy_refcounts: OXCOW_AMEND_LAZY_KEEP,
    };
    // SAFETY: the caller guarantees `opts` is NULL or valid for writing one struct.
    unsafe { super::init_struct(opts, keep) }
}

fn convert(o: &oxcow_amend_options) -> CResult<AmendOptions> {
    let some = |v: u32| (v != 0).then_some(v);
    let lazy = match o.lazy_refcounts {
        OXCOW_AMEND_LAZY_KEEP => None,
        OXCOW_AMEND_LAZY_OFF => Some(false),
        OXCOW_AMEND_LAZY_ON => Some(true),
        other => return einval(format!("unknown lazy_refcounts value {other}")),
    };
    Ok(AmendOptions {
        version: some(o.version),
        refcount_bits: some(o.refcount_bits),
        lazy_refcounts: lazy,
        size: None,
    })
}

/// Changes format options of the qcow2 image at `path` like `qemu-img amend -o` (QEMU 10):
/// the version (compat 0.10 <-> 1.1), lazy refcounts and the refcount width. The image must
/// not be open anywhere (this call opens and locks it read-write; a dirty lazy-refcounts
/// image is repaired first). Each step is crash-safe: a crash leaves the image before or
/// after it, at worst with leaked clusters; the guest content never changes.
///
/// Returns 0, or -EINVAL (NULL/empty path or options, a short struct_size, unknown values,
/// QEMU's refusals: an unknown version, a width that is not a power of two up to 64, lazy
/// refcounts or a width other than 16 on version 2, a width too narrow for a refcount),
/// -ENOTSUP (a downgrade of an image with extended L2 entries, zstd-compressed clusters,
/// persistent bitmaps or shared zero-allocated clusters), -EAGAIN (the image is in use),
/// -EUCLEAN (a corrupt image), -ENOENT, -EIO, -ENOSPC.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `opts` is NULL or points to an initialised
/// `oxcow_amend_options`; `err` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_amend(
    path: *const c_char,
    opts: *const oxcow_amend_options,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = || {
        // SAFETY: `path` is NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path, "path") }?;
        // SAFETY: `opts` is NULL or an initialised struct per the contract.
        let Some(o) = unsafe { super::read_options(opts, "oxcow_amend_options") }? else {
            return einval("opts is NULL");
        };
        crate::amend(path, &convert(&o)?)
    };
    // SAFETY: `err` is NULL or writable per the contract.
    unsafe { call(None, err, body) }
}
