//! The asynchronous completion API: a queue per event-loop thread, requests submitted with a
//! callback that runs on the caller's thread inside oxcow_aio_poll(), and an eventfd that is
//! readable while completions wait (see README, "Asynchronous I/O").

use super::error::{boundary, call, einval, oxcow_error, CResult};
use super::image::{check_iov, input_slice, iov_slice, oxcow_image, resolve};
use crate::engine::aio::{AioBackend, AioBuf, AioOp, AioOptions, AioQueue};
use crate::{Error, Image, ZeroFlags};
use std::ffi::{c_int, c_void};
use std::ops::Deref;
use std::ptr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// oxcow_aio_options.flags: use the worker-pool backend even where io_uring is available
/// (the environment variable OXCOW_AIO_BACKEND=threads does the same).
pub const OXCOW_AIO_FORCE_THREADS: u32 = 1;
/// oxcow_aio_queue_backend(): requests run on a pool of worker threads.
pub const OXCOW_AIO_BACKEND_THREADS: c_int = 1;
/// oxcow_aio_queue_backend(): the hot path's host I/O goes through io_uring.
pub const OXCOW_AIO_BACKEND_IO_URING: c_int = 2;

/// Parameters of oxcow_aio_queue_new(). Initialise with oxcow_aio_options_init(), then
/// change the fields to set. Zero in `depth` or `workers` takes the default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_aio_options {
    /// sizeof(oxcow_aio_options) as the caller knows it; set by the _init function.
    pub struct_size: u32,
    /// Most requests in flight (submitted, callback not yet run): 1 to 65536, 0 = 128.
    /// A submission beyond it fails with -EBUSY.
    pub depth: u32,
    /// Worker threads for the requests the worker pool runs: 1 to 64, 0 = 4.
    pub workers: u32,
    /// OXCOW_AIO_* flags.
    pub flags: u32,
}

const AIO_OPTIONS_V1_SIZE: u32 = std::mem::size_of::<oxcow_aio_options>() as u32;

/// Receives one completion, on the thread that called oxcow_aio_poll(): `opaque` and the
/// `cookie` of the submission, `result` 0 or a negative errno, and when `result` is negative
/// an error object with the message (valid only during the callback; NULL on success). The
/// request's buffers belong to the caller again when the callback runs. The callback may
/// submit new requests on the same queue; it must not free the queue.
pub type oxcow_aio_callback = Option<
    unsafe extern "C" fn(opaque: *mut c_void, cookie: u64, result: c_int, err: *const oxcow_error),
>;

/// The image as the queue's workers reach it: the C handle, which the caller keeps open
/// until the queue is freed (oxcow_aio_queue_new()'s contract).
struct ImageRef(*const Image);

// SAFETY: Image is Send + Sync; the pointer stays valid for the queue's life per contract.
unsafe impl Send for ImageRef {}
// SAFETY: as above; only shared references are created.
unsafe impl Sync for ImageRef {}

impl Deref for ImageRef {
    type Target = Image;
    fn deref(&self) -> &Image {
        // SAFETY: non-NULL (checked in oxcow_aio_queue_new) and alive while the queue lives.
        unsafe { &*self.0 }
    }
}

/// A caller's buffer, owned by the request until its callback ran.
struct CBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the submit contract hands the memory to the request until its callback ran; only
// the one worker running the request touches it meanwhile.
unsafe impl Send for CBuf {}

impl AioBuf for CBuf {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: non-NULL for len > 0 (checked at submit), len <= isize::MAX, readable and
        // unmodified until the callback ran per the submit contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as above, and writable and unaliased for read requests per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// The caller's callback and opaque pointer for one request.
struct Callback {
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
}

// SAFETY: the callback and opaque pointer travel with the request through the workers but
// are only used on the thread that calls oxcow_aio_poll().
unsafe impl Send for Callback {}

/// An asynchronous I/O queue on one image (opaque). Use it from one thread at a time (it is
/// the event loop's object); several queues may share an image.
pub struct oxcow_aio_queue {
    q: AioQueue<ImageRef, CBuf, Callback>,
    /// The handle whose count of live queues this queue holds (see oxcow_close()).
    owner: *const oxcow_image,
}

/// Resolves a queue pointer (None for NULL).
///
/// # Safety
/// `q` is NULL or a live queue from oxcow_aio_queue_new().
unsafe fn queue<'a>(q: *const oxcow_aio_queue) -> Option<&'a oxcow_aio_queue> {
    // SAFETY: NULL or live per the contract; the queue is used through shared references.
    unsafe { q.as_ref() }
}

/// Fills `*opts` with the defaults and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `opts` is NULL or points to writable memory for one `oxcow_aio_options`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_options_init(opts: *mut oxcow_aio_options) {
    let v = oxcow_aio_options {
        struct_size: AIO_OPTIONS_V1_SIZE,
        depth: 0,
        workers: 0,
        flags: 0,
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { super::init_struct(opts, v) }
}

/// Creates an asynchronous I/O queue on `img`; `opts` may be NULL (defaults). On success
/// `*out` receives the queue, to be released with oxcow_aio_queue_free() before `img` is
/// closed (oxcow_close() returns -EBUSY while a queue on it lives). The queue is the object
/// of one event-loop thread: its calls must not race each other (other threads may keep
/// using `img` with the synchronous calls or their own queues).
///
/// Returns 0, or -EINVAL (NULL handle or out, short struct_size, unknown flags, depth or
/// workers out of range), -EIO/-EMFILE (eventfd or thread creation failed).
///
/// # Safety
/// `img` is NULL or a live handle that stays open until the queue is freed; `opts` is NULL
/// or initialised; `out` and `err` are NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_queue_new(
    img: *mut oxcow_image,
    opts: *const oxcow_aio_options,
    out: *mut *mut oxcow_aio_queue,
    err: *mut *mut oxcow_error,
) -> c_int {
    // SAFETY: NULL or live per the contract.
    let image = unsafe { resolve(img) };
    let body = || {
        // SAFETY: NULL or a live handle per the contract (checked with `image` below).
        let owner = unsafe { img.as_ref() };
        let (Some(image), Some(owner)) = (image, owner) else {
            return einval("image handle is NULL");
        };
        if out.is_null() {
            return einval("out is NULL");
        }
        // SAFETY: NULL or an initialised struct per the contract.
        let o = unsafe { super::read_options(opts, "oxcow_aio_options") }?;
        let o = o.unwrap_or(oxcow_aio_options {
            struct_size: AIO_OPTIONS_V1_SIZE,
            depth: 0,
            workers: 0,
            flags: 0,
        });
        super::check_flags(o.flags, OXCOW_AIO_FORCE_THREADS, "aio")?;
        let ropts = AioOptions {
            depth: o.depth,
            workers: o.workers,
            force_threads: o.flags & OXCOW_AIO_FORCE_THREADS != 0,
        };
        let q = AioQueue::new(ImageRef(image as *const Image), &ropts)?;
        owner.queues.fetch_add(1, Ordering::AcqRel);
        let handle = Box::into_raw(Box::new(oxcow_aio_queue { q, owner: img }));
        // SAFETY: `out` is non-NULL (checked) and writable per the contract.
        unsafe { out.write(handle) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable per the contract.
    unsafe { call(image, err, body) }
}

/// Waits for every request in flight to finish, then frees the queue. Callbacks of requests
/// not yet polled are NOT called (their buffers belong to the caller again when this
/// returns). NULL is a no-op. (A process killed with io_uring writes in flight frees nothing:
/// the kernel tears its rings down after it died, and until then, a few milliseconds, the
/// image's lock still reads as held; a supervisor reopening the image retries briefly.)
///
/// # Safety
/// `q` is NULL or a live queue, not used after this call nor from inside its callbacks.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_queue_free(q: *mut oxcow_aio_queue) {
    if q.is_null() {
        return;
    }
    // SAFETY: from Box::into_raw in oxcow_aio_queue_new, freed once per the contract.
    let q = unsafe { Box::from_raw(q) };
    let owner = q.owner;
    boundary(None, move || drop(q), |_| ());
    // SAFETY: the handle outlives its queues (oxcow_close() refuses while this one lives).
    unsafe { &*owner }.queues.fetch_sub(1, Ordering::AcqRel);
}

/// The queue's eventfd: readable while completions wait for oxcow_aio_poll()
/// (level-triggered; polling them all makes it unreadable again). Owned by the queue: do
/// not close it. Returns the descriptor, or -EINVAL for a NULL queue.
///
/// # Safety
/// `q` is NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_queue_fd(q: *const oxcow_aio_queue) -> c_int {
    // SAFETY: forwarded from the contract.
    match unsafe { queue(q) } {
        Some(q) => q.q.fd(),
        None => -libc::EINVAL,
    }
}

/// Which backend runs the queue's requests: OXCOW_AIO_BACKEND_IO_URING or
/// OXCOW_AIO_BACKEND_THREADS (io_uring unavailable: old kernel, seccomp, disabled by
/// sysctl, or forced). -EINVAL for a NULL queue.
///
/// # Safety
/// `q` is NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_queue_backend(q: *const oxcow_aio_queue) -> c_int {
    // SAFETY: forwarded from the contract.
    match unsafe { queue(q) }.map(|q| q.q.backend()) {
        Some(AioBackend::Threads) => OXCOW_AIO_BACKEND_THREADS,
        Some(AioBackend::IoUring) => OXCOW_AIO_BACKEND_IO_URING,
        None => -libc::EINVAL,
    }
}

/// Requests submitted whose callback has not run yet, or -EINVAL for a NULL queue.
///
/// # Safety
/// `q` is NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_in_flight(q: *const oxcow_aio_queue) -> c_int {
    // SAFETY: forwarded from the contract.
    match unsafe { queue(q) } {
        Some(q) => c_int::try_from(q.q.in_flight()).unwrap_or(c_int::MAX),
        None => -libc::EINVAL,
    }
}

/// Submits `op` on `q` with its callback; writes the cookie to `*cookie_out` (when not
/// NULL). Shared by every oxcow_aio_* submission.
///
/// # Safety
/// `q` is NULL or a live queue; `cookie_out` is NULL or writable.
unsafe fn submit(
    q: *const oxcow_aio_queue,
    op: impl FnOnce() -> CResult<AioOp<CBuf>>,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: forwarded from the contract.
    let q = unsafe { queue(q) };
    let body = || {
        let Some(q) = q else {
            return einval("queue is NULL");
        };
        let cookie =
            q.q.submit(op()?, Callback { cb, opaque })
                .map_err(|(e, _, _)| e)?;
        if !cookie_out.is_null() {
            // SAFETY: non-NULL and writable per the contract.
            unsafe { cookie_out.write(cookie) };
        }
        Ok(())
    };
    // SAFETY: NULL err.
    unsafe { call(q.map(|q| q.q.image()), ptr::null_mut(), body) }
}

/// The caller's buffer as one request buffer (checks as oxcow_pread()).
///
/// # Safety
/// `buf` is NULL or valid for `count` bytes.
unsafe fn one_buf(buf: *const c_void, count: usize) -> CResult<Vec<CBuf>> {
    // SAFETY: forwarded; only the checks of input_slice are wanted here.
    let s = unsafe { input_slice(buf, count) }?;
    Ok(vec![CBuf {
        ptr: s.as_ptr().cast_mut(),
        len: count,
    }])
}

/// The caller's iovecs as request buffers (copied: only the memory they name must stay).
///
/// # Safety
/// `iov` is NULL or points to `iovcnt` readable iovecs.
unsafe fn iov_bufs(iov: *const libc::iovec, iovcnt: c_int) -> CResult<Vec<CBuf>> {
    // SAFETY: forwarded from the contract.
    let iov = unsafe { iov_slice(iov, iovcnt) }?;
    check_iov(iov)?;
    Ok(iov
        .iter()
        .map(|v| CBuf {
            ptr: v.iov_base.cast::<u8>(),
            len: v.iov_len,
        })
        .collect())
}

/// Submits a read of `count` bytes at guest `offset` into `buf`. Returns at once: 0 (the
/// request is queued; `*cookie_out`, when not NULL, receives its cookie, and `cb`, when not
/// NULL, will run with `opaque` inside a later oxcow_aio_poll()) or a negative errno (nothing
/// queued, no callback): -EINVAL (NULL queue, NULL buf with count > 0, range beyond the
/// virtual size), -EBUSY (the queue holds `depth` requests: poll first). Errors of the I/O
/// itself (-EIO, -EUCLEAN, -ENOMEDIUM, ...) arrive in the callback.
///
/// # Safety
/// `q` is NULL or a live queue; `buf` is NULL or writable for `count` bytes and belongs to
/// the request until its callback ran (or oxcow_aio_queue_free() returned); `cookie_out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_pread(
    q: *mut oxcow_aio_queue,
    buf: *mut c_void,
    count: usize,
    offset: u64,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: `buf` is NULL or valid for `count` bytes per the contract.
    let op = || {
        Ok(AioOp::Read {
            bufs: unsafe { one_buf(buf, count) }?,
            offset,
        })
    };
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits a write of `count` bytes from `buf` at guest `offset`; as oxcow_aio_pread(), and
/// -EROFS at once on a read-only handle.
///
/// # Safety
/// As oxcow_aio_pread(), with `buf` readable and unmodified until the callback ran.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_pwrite(
    q: *mut oxcow_aio_queue,
    buf: *const c_void,
    count: usize,
    offset: u64,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: `buf` is NULL or valid for `count` bytes per the contract.
    let op = || {
        Ok(AioOp::Write {
            bufs: unsafe { one_buf(buf, count) }?,
            offset,
        })
    };
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits a vectored read (as oxcow_preadv(); -EINVAL for the same iovec errors). The
/// iovec array is copied: only the memory it names belongs to the request.
///
/// # Safety
/// `q` is NULL or a live queue; `iov` is NULL or points to `iovcnt` readable iovecs naming
/// writable, non-overlapping memory that belongs to the request until its callback ran;
/// `cookie_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_preadv(
    q: *mut oxcow_aio_queue,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: `iov` is NULL or readable for `iovcnt` entries per the contract.
    let op = || {
        Ok(AioOp::Read {
            bufs: unsafe { iov_bufs(iov, iovcnt) }?,
            offset,
        })
    };
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits a vectored write (as oxcow_pwritev()); -EROFS at once on a read-only handle.
///
/// # Safety
/// As oxcow_aio_preadv(), with the memory readable and unmodified until the callback ran.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_pwritev(
    q: *mut oxcow_aio_queue,
    iov: *const libc::iovec,
    iovcnt: c_int,
    offset: u64,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: `iov` is NULL or readable for `iovcnt` entries per the contract.
    let op = || {
        Ok(AioOp::Write {
            bufs: unsafe { iov_bufs(iov, iovcnt) }?,
            offset,
        })
    };
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits oxcow_write_zeroes(offset, count, flags) (flags: OXCOW_ZERO_MAY_UNMAP); errors at
/// once as oxcow_aio_pwrite(), plus -EINVAL for unknown flags.
///
/// # Safety
/// `q` is NULL or a live queue; `cookie_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_write_zeroes(
    q: *mut oxcow_aio_queue,
    offset: u64,
    count: u64,
    flags: u32,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    let op = || {
        super::check_flags(flags, super::types::OXCOW_ZERO_MAY_UNMAP, "write_zeroes")?;
        Ok(AioOp::WriteZeroes {
            offset,
            count,
            flags: ZeroFlags {
                may_unmap: flags & super::types::OXCOW_ZERO_MAY_UNMAP != 0,
            },
        })
    };
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits oxcow_discard(offset, count); errors at once as oxcow_aio_pwrite().
///
/// # Safety
/// `q` is NULL or a live queue; `cookie_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_discard(
    q: *mut oxcow_aio_queue,
    offset: u64,
    count: u64,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    let op = || Ok(AioOp::Discard { offset, count });
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, op, cb, opaque, cookie_out) }
}

/// Submits a flush: it makes durable every write whose callback ran before it was
/// submitted (requests in flight are not ordered against each other, as in io_uring and
/// NBD). A no-op on read-only handles. Errors at once: -EINVAL (NULL queue), -EBUSY.
///
/// # Safety
/// `q` is NULL or a live queue; `cookie_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_flush(
    q: *mut oxcow_aio_queue,
    cb: oxcow_aio_callback,
    opaque: *mut c_void,
    cookie_out: *mut u64,
) -> c_int {
    // SAFETY: forwarded from the contract.
    unsafe { submit(q, || Ok(AioOp::Flush), cb, opaque, cookie_out) }
}

/// Collects up to `max` completions (0: all that are ready) and runs their callbacks on
/// this thread, in completion order (requests the callbacks submit are handed to the
/// kernel together after the last callback). Waits for the first up to `timeout_ms`
/// milliseconds (-1: as long as requests are in flight; 0: not at all); returns at once
/// when nothing is in flight. Returns the number of requests completed (0 on timeout), or -EINVAL (NULL
/// queue, timeout_ms below -1).
///
/// # Safety
/// `q` is NULL or a live queue not used by another thread during the call; the callbacks
/// must be safe to call with their opaque pointers.
#[no_mangle]
pub unsafe extern "C" fn oxcow_aio_poll(
    q: *mut oxcow_aio_queue,
    max: u32,
    timeout_ms: c_int,
) -> c_int {
    // SAFETY: forwarded from the contract.
    let Some(q) = (unsafe { queue(q) }) else {
        return -libc::EINVAL;
    };
    let timeout = match timeout_ms {
        -1 => None,
        t if t >= 0 => Some(Duration::from_millis(t as u64)),
        _ => return -libc::EINVAL,
    };
    let max = if max == 0 { usize::MAX } else { max as usize };
    let image = q.q.image();
    boundary(
        Some(image),
        || {
            let done = q.q.poll(max, timeout);
            let n = done.len();
            // Requests the callbacks submit go to the kernel together when they all ran.
            let plug = q.q.plug();
            for c in done {
                deliver(c.cookie, &c.result, &c.user);
            }
            drop(plug);
            c_int::try_from(n).unwrap_or(c_int::MAX)
        },
        |_| -libc::EIO,
    )
}

/// Runs one request's callback (nothing when it is NULL).
fn deliver(cookie: u64, result: &Result<(), Error>, user: &Callback) {
    let Some(cb) = user.cb else {
        return;
    };
    match result {
        // SAFETY: the caller registered `cb` for this call shape with this opaque pointer.
        Ok(()) => unsafe { cb(user.opaque, cookie, 0, ptr::null()) },
        Err(e) => {
            let err = oxcow_error::from_error(e);
            // SAFETY: as above; `err` lives across the call, as the contract promises.
            unsafe { cb(user.opaque, cookie, -err.errno(), &err) }
        }
    }
}
