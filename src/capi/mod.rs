//! The C ABI (see include/oxcow.h, generated from this module by build.rs with cbindgen).
//!
//! This module only adapts: null and argument checks, the panic boundary
//! ([`error::boundary`]), and the errno mapping ([`crate::Error::errno`], negated). All the
//! work is done by [`crate::Image`] and [`crate::create`].
//!
//! Conventions: functions return 0 or a negative errno; outputs are written only on success;
//! NULL handles and pointers give -EINVAL; `*err` is set only on failure and only when `err` is
//! not NULL; option structs smaller than their version-1 size and unknown flag bits give -EINVAL.

// The C names (oxcow_image, oxcow_info, ...) are the ABI; keep them as they are.
#![allow(non_camel_case_types)]

pub mod aio;
pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod create;
pub mod error;
pub mod image;
pub mod rebase;
pub mod resize;
pub mod snapshot;
pub mod types;
mod util;
pub mod version;

pub use aio::{
    oxcow_aio_callback, oxcow_aio_discard, oxcow_aio_flush, oxcow_aio_in_flight, oxcow_aio_options,
    oxcow_aio_options_init, oxcow_aio_poll, oxcow_aio_pread, oxcow_aio_preadv, oxcow_aio_pwrite,
    oxcow_aio_pwritev, oxcow_aio_queue, oxcow_aio_queue_backend, oxcow_aio_queue_fd,
    oxcow_aio_queue_free, oxcow_aio_queue_new, oxcow_aio_write_zeroes, OXCOW_AIO_BACKEND_IO_URING,
    OXCOW_AIO_BACKEND_THREADS, OXCOW_AIO_FORCE_THREADS,
};
pub use amend::{
    oxcow_amend, oxcow_amend_options, oxcow_amend_options_init, OXCOW_AMEND_LAZY_KEEP,
    OXCOW_AMEND_LAZY_OFF, OXCOW_AMEND_LAZY_ON,
};
pub use bitmap::{
    oxcow_bitmap_add, oxcow_bitmap_clear, oxcow_bitmap_disable, oxcow_bitmap_enable,
    oxcow_bitmap_info, oxcow_bitmap_list, oxcow_bitmap_merge, oxcow_bitmap_remove,
    oxcow_bitmap_status,
};
pub use check::oxcow_check;
pub use commit::{
    oxcow_commit, oxcow_commit_options, oxcow_commit_options_init, OXCOW_COMMIT_KEEP_TOP,
};
pub use create::oxcow_create;
pub use error::{oxcow_error, oxcow_error_errno, oxcow_error_free, oxcow_error_message};
pub use image::{
    oxcow_block_status, oxcow_close, oxcow_discard, oxcow_flush, oxcow_get_info, oxcow_image,
    oxcow_open, oxcow_pread, oxcow_preadv, oxcow_pwrite, oxcow_pwritev, oxcow_reopen,
    oxcow_set_event_callback, oxcow_set_overlap_check, oxcow_write_compressed, oxcow_write_zeroes,
};
pub use rebase::{oxcow_rebase, OXCOW_REBASE_UNSAFE};
pub use resize::{oxcow_resize, OXCOW_RESIZE_SHRINK};
pub use snapshot::{
    oxcow_snapshot_apply, oxcow_snapshot_create, oxcow_snapshot_delete, oxcow_snapshot_list,
};
pub use types::*;
pub use version::{oxcow_version_number, oxcow_version_string};

/// Writes `value` to `*p` inside the panic boundary; NULL is a no-op. Used by the `_init`
/// functions.
///
/// # Safety
/// `p` is NULL or valid (and aligned) for writing one `T`.
unsafe fn init_struct<T>(p: *mut T, value: T) {
    error::boundary(
        None,
        || {
            if !p.is_null() {
                // SAFETY: non-NULL, and the caller guarantees it is valid for one write;
                // write() neither reads nor drops the old (possibly uninitialised) contents.
                unsafe { p.write(value) }
            }
        },
        |_| (),
    )
}

/// Reads the version-1 prefix of a caller's option struct after checking `struct_size`.
/// NULL gives `None`.
///
/// # Safety
/// `p` is NULL or points to a readable `T` whose first field is a `u32` struct size; when that
/// size is at least `size_of::<T>()`, the whole `T` is readable.
unsafe fn read_options<T: Copy>(p: *const T, name: &str) -> error::CResult<Option<T>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: every option struct starts with `uint32_t struct_size`, readable per contract.
    let size = unsafe { p.cast::<u32>().read() };
    let need = std::mem::size_of::<T>();
    if (size as usize) < need {
        return error::einval(format!(
            "{name}.struct_size is {size}, smaller than the {need} bytes of version 1; \
             initialise the struct with its _init function"
        ));
    }
    // SAFETY: the caller's struct is at least as large as T (checked above) and aligned for T.
    Ok(Some(unsafe { p.read() }))
}

/// Checks the output struct's `struct_size` before it is written.
///
/// # Safety
/// `p` is non-NULL and points to a readable `u32` (the struct's first field).
unsafe fn check_out_size<T>(p: *const T, name: &str) -> error::CResult<()> {
    // SAFETY: forwarded from this function's contract.
    let size = unsafe { p.cast::<u32>().read() };
    let need = std::mem::size_of::<T>();
    if (size as usize) < need {
        return error::einval(format!(
            "{name}.struct_size is {size}, smaller than the {need} bytes of version 1; \
             initialise the struct with its _init function"
        ));
    }
    Ok(())
}

/// Rejects flag bits outside `known`.
fn check_flags(flags: u32, known: u32, what: &str) -> error::CResult<()> {
    let unknown = flags & !known;
    if unknown != 0 {
        return error::einval(format!("unknown {what} flag bits {unknown:#x}"));
    }
    Ok(())
}

/// Reads a caller's option struct of which versions up to `T` exist: `sizes` lists the size
/// of every version in increasing order (the first, version 1, is required; the last is
/// `size_of::<T>()`). Fields past what the caller's `struct_size` covers keep their values
/// from `defaults`; a size between versions counts as the smaller one. NULL gives `None`.
///
/// # Safety
/// `p` is NULL or points to a readable struct starting with a `u32` struct size, readable
/// for that many bytes (at most `size_of::<T>()` are read).
unsafe fn read_versions<T: Copy>(
    p: *const T,
    name: &str,
    sizes: &[usize],
    defaults: T,
) -> error::CResult<Option<T>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: every option struct starts with `uint32_t struct_size`, readable per contract.
    let size = unsafe { p.cast::<u32>().read() } as usize;
    let full = std::mem::size_of::<T>();
    let Some(&n) = sizes.iter().rev().find(|&&v| v <= size && v <= full) else {
        let v1 = sizes.first().copied().unwrap_or(full);
        return error::einval(format!(
            "{name}.struct_size is {size}, smaller than the {v1} bytes of version 1; \
             initialise the struct with its _init function"
        ));
    };
    // SAFETY: forwarded contract; `n` is a version boundary at most `size`.
    unsafe { read_prefix(p, n, defaults) }.map(Some)
}

/// Copies the first `n` bytes of the caller's struct over `defaults`.
///
/// # Safety
/// `p` is readable for `n <= size_of::<T>()` bytes.
unsafe fn read_prefix<T: Copy>(p: *const T, n: usize, defaults: T) -> error::CResult<T> {
    let mut out = defaults;
    // SAFETY: the caller's struct is readable for `size >= n` bytes; `out` is a T, writable
    // for `n <= size_of::<T>()` bytes; both are plain data and do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&raw mut out).cast::<u8>(), n);
    }
    Ok(out)
}
