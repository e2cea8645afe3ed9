//! oxcow_create(): C options -> [`crate::CreateOptions`] -> [`crate::create`].

use super::error::{call, einval, oxcow_error, CResult};
use super::types::*;
use crate::{BackingFormat, CompressionType, CreateOptions, Preallocation};
use std::ffi::{c_char, c_int, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Borrows a caller's C string as a path (any bytes but NUL are allowed).
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the returned reference.
pub(crate) unsafe fn c_path<'a>(p: *const c_char, what: &str) -> CResult<&'a Path> {
    if p.is_null() {
        return einval(format!("{what} is NULL"));
    }
    // SAFETY: non-NULL, NUL-terminated and live per the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return einval(format!("{what} is empty"));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// Borrows an optional C string as UTF-8 text.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the returned reference.
unsafe fn c_opt_str<'a>(p: *const c_char, what: &str) -> CResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, NUL-terminated and live per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    match s.to_str() {
        Ok(s) => Ok(Some(s)),
        Err(_) => einval(format!("{what} is not valid UTF-8")),
    }
}

/// Translates the C options into the Rust ones, validating everything the C layer owns
/// (flag bits, enum values, strings); the engine validates the geometry.
///
/// # Safety
/// The string pointers in `o` are NULL or valid NUL-terminated strings.
unsafe fn convert(o: &oxcow_create_options) -> CResult<CreateOptions> {
    super::check_flags(
        o.flags,
        OXCOW_CREATE_LAZY_REFCOUNTS | OXCOW_CREATE_EXTENDED_L2 | OXCOW_CREATE_DATA_FILE_RAW,
        "oxcow_create_options",
    )?;
    if o.reserved != 0 {
        return einval("oxcow_create_options.reserved must be 0");
    }
    let compression = match o.compression_type {
        OXCOW_COMPRESSION_DEFLATE => CompressionType::Deflate,
        OXCOW_COMPRESSION_ZSTD => CompressionType::Zstd,
        other => return einval(format!("unknown compression type {other}")),
    };
    let preallocation = match o.preallocation {
        OXCOW_PREALLOC_OFF => Preallocation::Off,
        OXCOW_PREALLOC_METADATA => Preallocation::Metadata,
        other => return einval(format!("unknown preallocation mode {other}")),
    };
    // SAFETY: forwarded from this function's contract.
    let backing_file = unsafe { c_opt_str(o.backing_file, "backing_file") }?;
    // SAFETY: forwarded from this function's contract.
    let backing_format = match unsafe { c_opt_str(o.backing_format, "backing_format") }? {
        None => None,
        Some(name) => match BackingFormat::from_name(name) {
            Some(f) => Some(f),
            None => {
                return einval(format!(
                    "unsupported backing format '{name}' (use \"qcow2\" or \"raw\")"
                ))
            }
        },
    };
    // SAFETY: forwarded from this function's contract (a version-2 field, defaulted to NULL
    // for version-1 callers by read_versions).
    let data_file = unsafe { c_opt_str(o.data_file, "data_file") }?;
    if backing_file == Some("") {
        return einval("backing_file is empty (use NULL for no backing file)");
    }
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    let d = CreateOptions::default();
    Ok(CreateOptions {
        cluster_size: or(o.cluster_size, d.cluster_size),
        version: or(o.version, d.version),
        refcount_bits: or(o.refcount_bits, d.refcount_bits),
        lazy_refcounts: o.flags & OXCOW_CREATE_LAZY_REFCOUNTS != 0,
        extended_l2: o.flags & OXCOW_CREATE_EXTENDED_L2 != 0,
        compression,
        backing_file: backing_file.map(str::to_owned),
        backing_format,
        preallocation,
        data_file: data_file.map(str::to_owned),
        data_file_raw: o.flags & OXCOW_CREATE_DATA_FILE_RAW != 0,
    })
}

/// Creates a new qcow2 image at `path` (replacing any existing file) with `virtual_size`
/// bytes of guest space, rounded up to a multiple of 512 like `qemu-img create` (read the
/// size back with oxcow_get_info()). `opts` may be NULL for the defaults (64 KiB clusters, version 3,
/// 16-bit refcounts, no backing file); otherwise it must have been initialised with
/// oxcow_create_options_init(). With a backing file, a `virtual_size` of 0 takes the backing
/// file's size.
///
/// Returns 0, or a negative errno: -EINVAL for a NULL/empty path, a short struct_size,
/// unknown flag bits or enum values, invalid geometry, or a backing file without a format;
/// -ENOTSUP, -ENOSPC, -EACCES, -EIO, ... from the file system. On failure `*err` receives
/// an error object when `err` is not NULL.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `opts` is NULL or points to an initialised
/// `oxcow_create_options` whose string fields are NULL or NUL-terminated; `err` is NULL or
/// valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_create(
    path: *const c_char,
    virtual_size: u64,
    opts: *const oxcow_create_options,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = || {
        // SAFETY: `path` is NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path, "path") }?;
        // SAFETY: `opts` is NULL or an initialised struct per the contract.
        let v1 = CREATE_OPTIONS_V1_SIZE as usize;
        let defaults = oxcow_create_options::defaults();
        // SAFETY: `opts` is NULL or an initialised struct per the contract.
        let sizes = [v1, std::mem::size_of::<oxcow_create_options>()];
        let o = unsafe { super::read_versions(opts, "oxcow_create_options", &sizes, defaults) }?
            .unwrap_or(defaults);
        // SAFETY: the strings in `o` are NULL or NUL-terminated per the contract.
        let ropts = unsafe { convert(&o) }?;
        crate::create(path, virtual_size, &ropts)
    };
    // SAFETY: `err` is NULL or writable per the contract.
    unsafe { call(None, err, body) }
}
