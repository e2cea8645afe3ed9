//! The error object of the C ABI, the errno mapping and the panic boundary.

use crate::{Error, Image};
use std::any::Any;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// An error: a positive errno and a human-readable message naming what failed. Created by the
/// library on failure when the caller passes a non-NULL `oxcow_error **err`; read it with
/// oxcow_error_message() / oxcow_error_errno() and free it with oxcow_error_free().
pub struct oxcow_error {
    errno: c_int,
    message: CString,
}

impl oxcow_error {
    fn new(errno: c_int, message: &str) -> oxcow_error {
        // Interior NULs would truncate the C string; make them visible instead.
        let message = CString::new(message.replace('\0', "\\0"))
            .unwrap_or_else(|_| CString::from(c"(unprintable error message)"));
        oxcow_error { errno, message }
    }
}

impl oxcow_error {
    /// The error object for an engine error (errno 0 or less reads as EIO), for callers
    /// that pass it to a callback instead of through `oxcow_error **`.
    pub(crate) fn from_error(e: &Error) -> oxcow_error {
        let errno = e.errno();
        oxcow_error::new(if errno > 0 { errno } else { libc::EIO }, &e.to_string())
    }

    /// The positive errno.
    pub(crate) fn errno(&self) -> c_int {
        self.errno
    }
}

/// The result type of the bodies of the exports.
pub(crate) type CResult<T> = Result<T, Error>;

/// Shorthand for an `Error::InvalidArgument` result.
pub(crate) fn einval<T>(msg: impl Into<String>) -> CResult<T> {
    Err(Error::invalid(msg.into()))
}

/// The message of a panic payload, for the error object.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Stores a new error object in `*err` when `err` is not NULL.
///
/// # Safety
/// `err` is NULL or valid for writing one pointer.
unsafe fn set_error(err: *mut *mut oxcow_error, errno: c_int, message: &str) {
    if err.is_null() {
        return;
    }
    let obj = Box::into_raw(Box::new(oxcow_error::new(errno, message)));
    // SAFETY: `err` is non-NULL and the caller guarantees it is valid for one pointer write.
    unsafe { err.write(obj) };
}

/// The panic boundary every export runs in. Runs `f`; a panic is caught (it never unwinds
/// into C), fences `img` when there is one so that no further writes happen, and is turned
/// into a value by `on_panic`, which receives the panic message.
pub(crate) fn boundary<T>(
    img: Option<&Image>,
    f: impl FnOnce() -> T,
    on_panic: impl FnOnce(String) -> T,
) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            if let Some(img) = img {
                img.fence();
            }
            on_panic(panic_message(payload.as_ref()))
        }
    }
}

/// Runs `f` inside [`boundary`] and turns its result into the C return code: 0 on success, the
/// negated errno on failure. On failure (including a panic, reported as -EIO) an error object
/// is stored in `*err` when `err` is not NULL.
///
/// `img` names the image to fence on panic; it is resolved by the caller before `f` runs.
///
/// # Safety
/// `err` is NULL or valid for writing one pointer.
pub(crate) unsafe fn call(
    img: Option<&Image>,
    err: *mut *mut oxcow_error,
    f: impl FnOnce() -> CResult<()>,
) -> c_int {
    let outcome = boundary(
        img,
        || f().map_err(|e| (e.errno(), e.to_string())),
        |msg| {
            let fenced = if img.is_some() {
                "; the image was fenced"
            } else {
                ""
            };
            Err((
                libc::EIO,
                format!("internal error: oxcow panicked ({msg}){fenced}"),
            ))
        },
    );
    let (errno, message) = match outcome {
        Ok(()) => return 0,
        Err(e) => e,
    };
    // An errno of 0 or less would read as success to the caller; never let that happen.
    let errno = if errno > 0 { errno } else { libc::EIO };
    // SAFETY: forwarded from this function's contract.
    unsafe { set_error(err, errno, &message) };
    -errno
}

/// Returns the error's message as a NUL-terminated string, valid until oxcow_error_free().
/// A NULL `err` returns the static string "no error".
///
/// # Safety
/// `err` is NULL or a pointer returned through an `oxcow_error **` argument and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn oxcow_error_message(err: *const oxcow_error) -> *const c_char {
    boundary(
        None,
        || {
            // SAFETY: the caller guarantees `err` is NULL or a live error object.
            match unsafe { err.as_ref() } {
                Some(e) => e.message.as_ptr(),
                None => c"no error".as_ptr(),
            }
        },
        |_| c"internal error".as_ptr(),
    )
}

/// Returns the error's errno as a positive number (the failing call returned its negation).
/// A NULL `err` returns 0.
///
/// # Safety
/// `err` is NULL or a pointer returned through an `oxcow_error **` argument and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn oxcow_error_errno(err: *const oxcow_error) -> c_int {
    boundary(
        None,
        || {
            // SAFETY: the caller guarantees `err` is NULL or a live error object.
            unsafe { err.as_ref() }.map_or(0, |e| e.errno)
        },
        |_| libc::EIO,
    )
}

/// Frees an error object. NULL is a no-op.
///
/// # Safety
/// `err` is NULL or a pointer returned through an `oxcow_error **` argument and not yet freed;
/// it must not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn oxcow_error_free(err: *mut oxcow_error) {
    boundary(
        None,
        || {
            if !err.is_null() {
                // SAFETY: `err` came from Box::into_raw in set_error and is freed only once.
                drop(unsafe { Box::from_raw(err) });
            }
        },
        |_| (),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, OpenOptions};
    use std::ffi::CStr;
    use std::ptr;

    fn scratch_image(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("oxcow-capi-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("img.qcow2");
        crate::create(&path, 1 << 20, &CreateOptions::default()).expect("create");
        path
    }

    #[test]
    fn a_panic_becomes_eio_and_fences_the_image() {
        let path = scratch_image("panic");
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let img = Image::open(&path, &opts).expect("open");
        let mut err: *mut oxcow_error = ptr::null_mut();
        // SAFETY: `err` is a valid place for one pointer.
        let rc = unsafe { call(Some(&img), &mut err, || panic!("boom at 0x1234")) };
        assert_eq!(rc, -libc::EIO);
        assert!(!err.is_null());
        // SAFETY: `err` was just produced by `call` and is freed below.
        let (errno, msg) = unsafe {
            (
                oxcow_error_errno(err),
                CStr::from_ptr(oxcow_error_message(err))
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        assert_eq!(errno, libc::EIO);
        assert!(msg.contains("boom at 0x1234"), "{msg}");
        // SAFETY: freed exactly once.
        unsafe { oxcow_error_free(err) };
        // No more writes (or reads) are accepted.
        let e = img.write_at(&[1u8; 512], 0).expect_err("fenced");
        assert_eq!(e.errno(), libc::ENOMEDIUM);
        drop(img);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn errors_map_to_negative_errno_and_success_leaves_err_alone() {
        let mut err: *mut oxcow_error = ptr::null_mut();
        // SAFETY: `err` is a valid place for one pointer.
        let rc = unsafe { call(None, &mut err, || einval("bad thing")) };
        assert_eq!(rc, -libc::EINVAL);
        // SAFETY: produced by `call`, freed once.
        unsafe {
            assert_eq!(oxcow_error_errno(err), libc::EINVAL);
            assert_eq!(
                CStr::from_ptr(oxcow_error_message(err)).to_bytes(),
                b"bad thing"
            );
            oxcow_error_free(err);
        }
        let mut err: *mut oxcow_error = ptr::null_mut();
        // SAFETY: `err` is a valid place for one pointer.
        let rc = unsafe { call(None, &mut err, || Ok(())) };
        assert_eq!(rc, 0);
        assert!(err.is_null());
        // A NULL err is fine on failure.
        // SAFETY: NULL `err` is allowed.
        let rc = unsafe { call(None, ptr::null_mut(), || einval("x")) };
        assert_eq!(rc, -libc::EINVAL);
    }

    #[test]
    fn interior_nul_in_a_message_is_kept_visible() {
        let e = oxcow_error::new(libc::EIO, "a\0b");
        assert_eq!(e.message.to_bytes(), b"a\\0b");
    }
}
