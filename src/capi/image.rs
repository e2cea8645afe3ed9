//! The image handle and every call on it: open, close, I/O, zero/discard, flush, info, block
//! status, reopen, the overlap-check mode and the corruption-event callback (oxcow_check
//! lives in check.rs).

use super::create::c_path;
use super::error::{call, einval, oxcow_error, CResult};
use super::types::*;
use super::util::{copy_c_string, write_extent};
use crate::{CorruptionEvent, EventHandler, Image, OpenOptions, OverlapCheck, ZeroFlags};
use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The most buffers one vectored call accepts (Linux's IOV_MAX / UIO_MAXIOV).
const IOV_MAX: c_int = 1024;

/// All open flags this library knows.
const OPEN_FLAGS: u32 = OXCOW_OPEN_RDWR
    | OXCOW_OPEN_NO_BACKING
    | OXCOW_OPEN_FORCE_SHARE
    | OXCOW_OPEN_DIRECT
    | OXCOW_OPEN_WRITETHROUGH
    | OXCOW_OPEN_KEEP_READ_ONLY
    | OXCOW_OPEN_NO_PROBE
    | OXCOW_OPEN_DISCARD_UNMAP;

/// The engine's options for OXCOW_OPEN_* `flags` (already checked against OPEN_FLAGS).
fn options_from_flags(flags: u32) -> OpenOptions {
    OpenOptions {
        writable: flags & OXCOW_OPEN_RDWR != 0,
        no_backing: flags & OXCOW_OPEN_NO_BACKING != 0,
        no_probe: flags & OXCOW_OPEN_NO_PROBE != 0,
        force_share: flags & OXCOW_OPEN_FORCE_SHARE != 0,
        direct: flags & OXCOW_OPEN_DIRECT != 0,
        writethrough: flags & OXCOW_OPEN_WRITETHROUGH != 0,
        keep_read_only: flags & OXCOW_OPEN_KEEP_READ_ONLY != 0,
        discard_unmap: flags & OXCOW_OPEN_DISCARD_UNMAP != 0,
        overlap_check: OverlapCheck::All,
        snapshot: None,
        ..OpenOptions::default()
    }
}

/// The engine's overlap-check mode for an OXCOW_OVERLAP_* value.
fn overlap_mode(v: u32) -> CResult<OverlapCheck> {
    Ok(match v {
        OXCOW_OVERLAP_DEFAULT | OXCOW_OVERLAP_ALL => OverlapCheck::All,
        OXCOW_OVERLAP_NONE => OverlapCheck::None,
        OXCOW_OVERLAP_CONSTANT => OverlapCheck::Constant,
        OXCOW_OVERLAP_CACHED => OverlapCheck::Cached,
        other => return einval(format!("unknown overlap-check mode {other}")),
    })
}

/// An open image (opaque). Created by oxcow_open(), destroyed by oxcow_close(). Any number of
/// threads may use one handle at once, except that oxcow_close() must not race other calls.
pub struct oxcow_image {
    inner: Image,
    /// Asynchronous queues on this handle not yet freed: oxcow_close() refuses while any is.
    pub(super) queues: AtomicUsize,
}

/// Resolves a caller's handle to the image (`None` for NULL), before the panic boundary so
/// that a panic can fence it.
///
/// # Safety
/// `img` is NULL or a live handle from oxcow_open() that stays open for `'a`.
pub(super) unsafe fn resolve<'a>(img: *const oxcow_image) -> Option<&'a Image> {
    // SAFETY: NULL or a live handle per the contract; only shared access is created, which is
    // sound because Image is Sync and every method takes &self.
    unsafe { img.as_ref() }.map(|h| &h.inner)
}

/// Runs `f` on the image inside the panic boundary; NULL handles give -EINVAL.
///
/// # Safety
/// `img` is NULL or a live handle; `err` is NULL or valid for writing one pointer.
pub(super) unsafe fn with_image(
    img: *const oxcow_image,
    err: *mut *mut oxcow_error,
    f: impl FnOnce(&Image) -> CResult<()>,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    let image = unsafe { resolve(img) };
    // SAFETY: forwarded from this function's contract.
    unsafe {
        call(image, err, || match image {
            Some(image) => f(image),
            None => einval("image handle is NULL"),
        })
    }
}

/// Checks that `count` bytes can form one Rust slice.
pub(super) fn check_len(count: usize) -> CResult<()> {
    if count > isize::MAX as usize {
        return einval(format!("buffer of {count} bytes is too large"));
    }
    Ok(())
}

/// Checks an iovec array's count and pointer; returns it as a slice (empty for 0 entries).
///
/// # Safety
/// When `iovcnt` is in range and `iov` is not NULL, `iov` points to `iovcnt` readable iovecs
/// that outlive `'a`.
pub(super) unsafe fn iov_slice<'a>(
    iov: *const libc::iovec,
    iovcnt: c_int,
) -> CResult<&'a [libc::iovec]> {
    if !(0..=IOV_MAX).contains(&iovcnt) {
        return einval(format!("iovcnt {iovcnt} is outside 0..={IOV_MAX}"));
    }
    if iovcnt == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return einval("iov is NULL");
    }
    // SAFETY: non-NULL, 0 < iovcnt <= IOV_MAX, and readable for iovcnt entries per contract.
    Ok(unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) })
}

/// Checks each iovec (NULL base only with length 0) and the total length.
pub(super) fn check_iov(iov: &[libc::iovec]) -> CResult<()> {
    let mut total: usize = 0;
    for (i, v) in iov.iter().enumerate() {
        if v.iov_base.is_null() && v.iov_len > 0 {
            return einval(format!(
                "iov[{i}].iov_base is NULL with iov_len {}",
                v.iov_len
            ));
        }
        total = match total.checked_add(v.iov_len) {
            Some(t) => t,
            None => return einval("total iovec length overflows"),
        };
        check_len(total)?;
    }
    Ok(())
}

/// The engine's idle-clean setting for oxcow_open_options.cache_clean_interval (seconds; 0 =
/// default, OXCOW_CACHE_CLEAN_NEVER = never).
fn clean_interval(secs: u64) -> Option<std::time::Duration> {
    match secs {
        0 => None,
        OXCOW_CACHE_CLEAN_NEVER => Some(std::time::Duration::ZERO),
        s => Some(std::time::Duration::from_secs(s)),
    }
}

/// Opens the image at `path`. `flags` is a combination of OXCOW_OPEN_* (without
/// OXCOW_OPEN_RDWR the image is read-only and no byte is ever written to any file). `opts` may
/// be NULL; otherwise it must have been initialised with oxcow_open_options_init(). On success
/// `*out` receives the new handle, to be released with oxcow_close().
///
/// Returns 0, or a negative errno: -EINVAL (NULL path or out, unknown flag bits, short
/// struct_size, not a qcow2 file, RDWR with FORCE_SHARE), -ENOENT/-EACCES (file), -ENOTSUP
/// (unsupported feature or version; with OXCOW_OPEN_NO_PROBE, a backing format that is not
/// recorded), -EUCLEAN (corrupt image), -EAGAIN (locked by another
/// process), -EIO. `*out` is untouched on failure; `*err` receives an error object on failure
/// when `err` is not NULL.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `opts` is NULL or an initialised `oxcow_open_options`;
/// `out` is NULL or valid for writing one pointer; `err` is NULL or valid for writing one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_open(
    path: *const c_char,
    flags: u32,
    opts: *const oxcow_open_options,
    out: *mut *mut oxcow_image,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = || {
        // SAFETY: `path` is NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path, "path") }?;
        if out.is_null() {
            return einval("out is NULL");
        }
        super::check_flags(flags, OPEN_FLAGS, "open")?;
        // SAFETY: `opts` is NULL or an initialised struct per the contract.
        let mut ropts = options_from_flags(flags);
        let versions = [
            OPEN_OPTIONS_V1_SIZE as usize,
            OPEN_OPTIONS_V2_SIZE as usize,
            OPEN_OPTIONS_V3_SIZE as usize,
            OPEN_OPTIONS_V4_SIZE as usize,
        ];
        let defaults = oxcow_open_options::defaults();
        // SAFETY: `opts` is NULL or an initialised struct per the contract.
        if let Some(o) =
            unsafe { super::read_versions(opts, "oxcow_open_options", &versions, defaults) }?
        {
            ropts.overlap_check = overlap_mode(o.overlap_check)?;
            ropts.l2_cache_size = o.cache_size;
            ropts.refcount_cache_size = o.refcount_cache_size;
            ropts.l2_slice_size = o.l2_slice_size;
            ropts.cache_clean_interval = clean_interval(o.cache_clean_interval);
            // SAFETY: NULL or NUL-terminated per the contract (version 2 field).
            ropts.snapshot = unsafe { super::snapshot::c_key_opt(o.snapshot) }?;
        }
        if flags & OXCOW_OPEN_KEEP_READ_ONLY != 0 && flags & OXCOW_OPEN_RDWR != 0 {
            return einval("OXCOW_OPEN_KEEP_READ_ONLY is for read-only opens");
        }
        let image = Image::open(path, &ropts)?;
        let handle = Box::into_raw(Box::new(oxcow_image {
            inner: image,
            queues: AtomicUsize::new(0),
        }));
        // SAFETY: `out` is non-NULL (checked) and writable per the contract.
        unsafe { out.write(handle) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable per the contract.
    unsafe { call(None, err, body) }
}

/// Flushes and closes the image and frees the handle. The handle is freed even when the flush
/// fails (the error is returned). NULL is a no-op returning 0. While an asynchronous queue
/// created on the handle is not yet freed (oxcow_aio_queue_free()), returns -EBUSY and
/// changes nothing: the handle stays open and usable.
///
/// # Safety
/// `img` is NULL or a live handle from oxcow_open() that no other thread is using; it must not
/// be used after this call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_close(img: *mut oxcow_image) -> c_int {
    if img.is_null() {
        return 0;
    }
    // SAFETY: a live handle per the contract (non-NULL, checked); shared access only.
    if unsafe { &*img }.queues.load(Ordering::Acquire) > 0 {
        return -libc::EBUSY;
    }
    // SAFETY: `img` came from Box::into_raw in oxcow_open and is closed only once, with no
    // concurrent users, per the contract.
    let handle = unsafe { Box::from_raw(img) };
    // SAFETY: NULL `err`. A panic inside close() drops (frees) the image while unwinding.
    unsafe { call(None, ptr::null_mut(), move || handle.inner.close()) }
}

/// Reads `count` bytes of guest data at `offset` into `buf`. Zero-length reads succeed (`buf`
/// may then be NULL).
///
/// Returns 0, or -EINVAL (NULL handle, NULL buf with count > 0, range beyond the virtual
/// size), -EIO, -EUCLEAN, -ENOMEDIUM (handle fenced).
///
/// # Safety
/// `img` is NULL or a live handle; `buf` is NULL or valid for writing `count` bytes and is not
/// accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_pread(
    img: *mut oxcow_image,
    buf: *mut c_void,
    count: usize,
    offset: u64,
) -> c_int {
    let body = |image: &Image| {
        check_len(count)?;
        let slice: &mut [u8] = if count == 0 {
            &mut []
        } else if buf.is_null() {
            return einval("buf is NULL");
        } else {
            // SAFETY: non-NULL, count <= isize::MAX, writable and unaliased per contract.
            unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), count) }
        };
        image.read_at(slice, offset)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// The caller's input buffer as a slice: empty for `count` 0 (`buf` may then be NULL),
/// -EINVAL for a NULL `buf` otherwise or a `count` beyond isize::MAX.
///
/// # Safety
/// `buf` is NULL or valid for reading `count` bytes, not modified while the slice lives.
pub(super) unsafe fn input_slice<'a>(buf: *const c_void, count: usize) -> CResult<&'a [u8]> {
    check_len(count)?;
    if count == 0 {
        return Ok(&[]);
    }
    if buf.is_null() {
        return einval("buf is NULL");
    }
    // SAFETY: non-NULL, count <= isize::MAX, readable and unmodified per the contract.
    Ok(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), count) })
}

/// Writes `count` bytes from `buf` at guest `offset`. Zero-length writes succeed (`buf` may
/// then be NULL) on a writable handle.
///
/// Returns 0, or -EINVAL (NULL handle, NULL buf with count > 0, range beyond the virtual
/// size; nothing is written), -EROFS (read-only handle), -ENOSPC, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `buf` is NULL or valid for reading `count` bytes, not
/// modified during the call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_pwrite(
    img: *mut oxcow_image,
    buf: *const c_void,
    count: usize,
    offset: u64,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `buf` is NULL or readable for `count` bytes per the contract.
        let slice = unsafe { input_slice(buf, count) }?;
        image.write_at(slice, offset)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Reads guest data at `offset` into `iovcnt` buffers, filled in order. `iovcnt` 0 is a
/// zero-length read (`iov` may then be NULL).
///
/// Returns 0, or -EINVAL (NULL handle, iovcnt < 0 or > 1024, NULL iov with iovcnt > 0, an
/// entry with NULL iov_base and non-zero iov_len, range beyond the virtual size), -EIO, ...
///
/// # Safety
/// `img` is NULL or a live handle; `iov` is NULL or points to `iovcnt` readable iovecs, each
/// naming memory writable for iov_len bytes; the buffers do not overlap each other and are not
/// accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_preadv(
    img: *mut oxcow_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `iov` is NULL or readable for `iovcnt` entries per the contract.
        let iov = unsafe { iov_slice(iov, iovcnt) }?;
        check_iov(iov)?;
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(iov.len());
        for v in iov {
            bufs.push(if v.iov_len == 0 {
                &mut []
            } else {
                // SAFETY: non-NULL (check_iov), total <= isize::MAX, writable and not
                // overlapping any other buffer per the contract.
                unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }
            });
        }
        image.read_vectored_at(&mut bufs, offset)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Writes `iovcnt` buffers, in order, at guest `offset`. `iovcnt` 0 is a zero-length write
/// (`iov` may then be NULL).
///
/// Returns 0, or -EINVAL (as for oxcow_preadv(); nothing is written), -EROFS, -ENOSPC, -EIO,
/// ...
///
/// # Safety
/// `img` is NULL or a live handle; `iov` is NULL or points to `iovcnt` readable iovecs, each
/// naming memory readable for iov_len bytes and not modified during the call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_pwritev(
    img: *mut oxcow_image,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `iov` is NULL or readable for `iovcnt` entries per the contract.
        let iov = unsafe { iov_slice(iov, iovcnt) }?;
        check_iov(iov)?;
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(iov.len());
        for v in iov {
            bufs.push(if v.iov_len == 0 {
                &[]
            } else {
                // SAFETY: non-NULL (check_iov), total <= isize::MAX, readable and
                // unmodified per the contract.
                unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) }
            });
        }
        image.write_vectored_at(&bufs, offset)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Writes one whole guest cluster compressed (zlib or zstd, the image's compression type), as
/// backup and conversion tools do: `offset` must be cluster-aligned and `count` exactly the
/// cluster size, except for the last cluster of a disk whose size is not a multiple of it,
/// where `count` covers the rest of the disk. Data that does not compress is stored
/// uncompressed. Several compressed clusters share host clusters, like QEMU packs them.
///
/// Returns 0, or -EINVAL (NULL handle, NULL buf, misaligned offset or wrong count; nothing is
/// written), -EROFS, -ENOSPC, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `buf` is NULL or valid for reading `count` bytes, not
/// modified during the call.
#[no_mangle]
pub unsafe extern "C" fn oxcow_write_compressed(
    img: *mut oxcow_image,
    buf: *const c_void,
    count: usize,
    offset: u64,
) -> c_int {
    let body = |image: &Image| {
        // SAFETY: `buf` is NULL or readable for `count` bytes per the contract.
        let slice = unsafe { input_slice(buf, count) }?;
        image.write_compressed(slice, offset)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Makes `[offset, offset + count)` read as zeros. `flags` is 0 or OXCOW_ZERO_MAY_UNMAP (the
/// clusters may then be deallocated; otherwise fully covered allocated clusters stay
/// allocated).
///
/// Returns 0, or -EINVAL (NULL handle, unknown flag bits, range beyond the virtual size),
/// -EROFS, -ENOSPC, -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn oxcow_write_zeroes(
    img: *mut oxcow_image,
    offset: u64,
    count: u64,
    flags: u32,
) -> c_int {
    let body = |image: &Image| {
        super::check_flags(flags, OXCOW_ZERO_MAY_UNMAP, "write_zeroes")?;
        let zf = ZeroFlags {
            may_unmap: flags & OXCOW_ZERO_MAY_UNMAP != 0,
        };
        image.write_zeroes(offset, count, zf)
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Releases the clusters fully inside `[offset, offset + count)`; they then read as zeros
/// (in version-2 images with a backing file: as the backing data). Partial clusters at the
/// edges are left unchanged.
///
/// Returns 0, or -EINVAL (NULL handle, range beyond the virtual size), -EROFS, -EIO,
/// -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn oxcow_discard(img: *mut oxcow_image, offset: u64, count: u64) -> c_int {
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), |image| image.discard(offset, count)) }
}

/// Makes every write that completed before this call durable. A no-op on read-only handles.
///
/// Returns 0, or -EINVAL (NULL handle), -EIO, -ENOSPC, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn oxcow_flush(img: *mut oxcow_image) -> c_int {
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), |image| image.flush()) }
}

/// Changes the open flags of a live handle without closing it (QEMU's reopen): `flags` are
/// the complete new OXCOW_OPEN_* set. Switching OXCOW_OPEN_RDWR off flushes everything and
/// drops the write locks; switching it on takes the write locks and re-validates the image.
/// OXCOW_OPEN_WRITETHROUGH, OXCOW_OPEN_DISCARD_UNMAP and (read-only) OXCOW_OPEN_FORCE_SHARE
/// may change too;
/// OXCOW_OPEN_DIRECT and OXCOW_OPEN_NO_BACKING must stay as they were. OXCOW_OPEN_NO_PROBE
/// is accepted and has no effect (the backing chain is not reopened). The path must still
/// name the file that was opened.
///
/// Waits for in-flight writes (reads continue) and may be called while other threads do I/O.
/// A failed reopen changes nothing: the handle keeps its descriptor, locks, caches and mode.
///
/// Returns 0, or -EINVAL (NULL handle, unknown flags, DIRECT/NO_BACKING changed, RDWR with
/// FORCE_SHARE or KEEP_READ_ONLY), -EAGAIN (another process uses the image), -EROFS (handle
/// opened with OXCOW_OPEN_KEEP_READ_ONLY or FORCE_SHARE asked for RDWR), -ESTALE (the path
/// names another file now), -EUCLEAN (image corrupt or dirty), -EIO, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `err` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_reopen(
    img: *mut oxcow_image,
    flags: u32,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        super::check_flags(flags, OPEN_FLAGS, "open")?;
        if flags & OXCOW_OPEN_KEEP_READ_ONLY != 0 && flags & OXCOW_OPEN_RDWR != 0 {
            return einval("OXCOW_OPEN_KEEP_READ_ONLY is for read-only handles");
        }
        let mut opts = options_from_flags(flags);
        opts.overlap_check = image.overlap_check();
        image.reopen(&opts)
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}

/// Fills `*out` (initialised with oxcow_info_init()) with static facts about the image: sizes,
/// version, refcount width, compression type, OXCOW_INFO_* flags, snapshot count, backing file
/// name and format. On success `out->struct_size` is set to the number of bytes filled.
///
/// Returns 0, or -EINVAL (NULL handle or out, short struct_size), -ERANGE (backing name too
/// long for the struct), -EIO.
///
/// # Safety
/// `img` is NULL or a live handle; `out` is NULL or points to an initialised `oxcow_info`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_get_info(img: *mut oxcow_image, out: *mut oxcow_info) -> c_int {
    let body = |image: &Image| {
        if out.is_null() {
            return einval("out is NULL");
        }
        // SAFETY: non-NULL and initialised per the contract.
        unsafe { super::check_out_size(out, "oxcow_info") }?;
        let i = image.info()?;
        let mut r = oxcow_info::empty();
        r.cluster_size = i.cluster_size;
        r.virtual_size = i.virtual_size;
        r.file_size = i.file_size;
        r.version = i.version;
        r.refcount_bits = i.refcount_bits;
        r.compression_type = match i.compression {
            crate::CompressionType::Deflate => OXCOW_COMPRESSION_DEFLATE,
            crate::CompressionType::Zstd => OXCOW_COMPRESSION_ZSTD,
        };
        let bit = |on: bool, f: u32| if on { f } else { 0 };
        r.flags = bit(i.extended_l2, OXCOW_INFO_EXTENDED_L2)
            | bit(i.lazy_refcounts, OXCOW_INFO_LAZY_REFCOUNTS)
            | bit(i.dirty, OXCOW_INFO_DIRTY)
            | bit(i.corrupt, OXCOW_INFO_CORRUPT)
            | bit(i.read_only, OXCOW_INFO_READ_ONLY)
            | bit(i.backing_file.is_some(), OXCOW_INFO_HAS_BACKING);
        r.snapshot_count = i.snapshot_count;
        if let Some(b) = &i.backing_file {
            copy_c_string(&mut r.backing_file, b, "backing file name", "oxcow_info")?;
        }
        if let Some(f) = &i.backing_format {
            copy_c_string(&mut r.backing_format, f, "backing format", "oxcow_info")?;
        }
        // SAFETY: non-NULL, and at least INFO_V1_SIZE bytes writable (checked above).
        unsafe { out.write(r) };
        Ok(())
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// Describes the allocation status of the guest range starting at `offset`: `*out` receives
/// one extent that starts at `offset` and extends as far as the status stays the same (at
/// least 1 byte, at most `count`). Call again from `offset + out->length` for the rest.
///
/// Returns 0, or -EINVAL (NULL handle or out, count 0, range beyond the virtual size), -EIO,
/// -EUCLEAN, -ENOMEDIUM.
///
/// # Safety
/// `img` is NULL or a live handle; `out` is NULL or valid for writing one `oxcow_extent`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_block_status(
    img: *mut oxcow_image,
    offset: u64,
    count: u64,
    out: *mut oxcow_extent,
) -> c_int {
    let body = |image: &Image| {
        if out.is_null() {
            return einval("out is NULL");
        }
        let e = image.block_status(offset, count)?;
        // SAFETY: non-NULL (checked above) and valid for one extent per the contract.
        unsafe { write_extent(out, &e) };
        Ok(())
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

// The engine's extent flags are passed through unchanged; keep the values in lockstep.
const _: () = assert!(
    crate::EXTENT_ALLOCATED == OXCOW_EXTENT_ALLOCATED
        && crate::EXTENT_ZERO == OXCOW_EXTENT_ZERO
        && crate::EXTENT_BACKING == OXCOW_EXTENT_BACKING
        && crate::EXTENT_COMPRESSED == OXCOW_EXTENT_COMPRESSED
);

/// Selects which metadata structures the overlap guard protects from writes (OXCOW_OVERLAP_*;
/// takes effect for the next request). Like QEMU's `overlap-check` option; the default
/// (OXCOW_OVERLAP_ALL) costs nothing measurable thanks to the index.
///
/// Returns 0, or -EINVAL (NULL handle, unknown mode), -ENOMEDIUM (fenced handle).
///
/// # Safety
/// `img` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn oxcow_set_overlap_check(img: *mut oxcow_image, mode: u32) -> c_int {
    let body = |image: &Image| {
        let m = overlap_mode(mode)?;
        image.set_overlap_check(m);
        Ok(())
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}

/// The caller's callback and its opaque pointer, callable from any thread.
struct EventSink {
    cb: unsafe extern "C" fn(*mut c_void, *const oxcow_event),
    opaque: *mut c_void,
}

// SAFETY: the contract of oxcow_set_event_callback() makes the callback and its opaque
// pointer usable from any thread; oxcow only passes them back to the callback.
unsafe impl Send for EventSink {}
// SAFETY: as above; the sink is never mutated after creation.
unsafe impl Sync for EventSink {}

impl EventSink {
    fn deliver(&self, ev: &CorruptionEvent) {
        // Interior NUL bytes cannot occur in our messages; replace them defensively.
        let msg = CString::new(ev.message.replace('\0', " ")).unwrap_or_default();
        let mut flags = if ev.fatal { OXCOW_EVENT_FATAL } else { 0 };
        if ev.host_offset.is_some() {
            flags |= OXCOW_EVENT_HAS_LOCATION;
        }
        let c = oxcow_event {
            struct_size: std::mem::size_of::<oxcow_event>() as u32,
            flags,
            host_offset: ev.host_offset.unwrap_or(0),
            size: ev.size.unwrap_or(0),
            message: msg.as_ptr(),
        };
        // SAFETY: the caller registered `cb` for exactly this call shape; `c` and `msg` live
        // across the call, as the contract promises.
        unsafe { (self.cb)(self.opaque, &c) };
    }
}

/// Registers `cb` to receive corruption events of this image (NULL removes it): a prevented
/// write on metadata or an inconsistency met during I/O. On a writable image the event is
/// fatal (OXCOW_EVENT_FATAL): the image was marked corrupt and the handle fenced. A read-only
/// image reports the first such problem once, non-fatally. `cb` runs on the thread whose
/// request found the problem, after oxcow released its locks, before that request returns;
/// `opaque` is passed through unchanged.
///
/// Returns 0, or -EINVAL (NULL handle).
///
/// # Safety
/// `img` is NULL or a live handle; `cb`, when not NULL, must be safe to call from any thread
/// with `opaque` until it is replaced or the image is closed.
#[no_mangle]
pub unsafe extern "C" fn oxcow_set_event_callback(
    img: *mut oxcow_image,
    cb: oxcow_event_fn,
    opaque: *mut c_void,
) -> c_int {
    let body = |image: &Image| {
        let handler: Option<EventHandler> = cb.map(|cb| {
            let sink = EventSink { cb, opaque };
            Arc::new(move |ev: &CorruptionEvent| sink.deliver(ev)) as EventHandler
        });
        image.set_event_handler(handler);
        Ok(())
    };
    // SAFETY: `img` is NULL or live per the contract; NULL `err`.
    unsafe { with_image(img, ptr::null_mut(), body) }
}
