//! The error type of the Rust API and its mapping to errno values for the C ABI.

use std::fmt;
use std::io;

/// Result alias used throughout oxcow.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure oxcow reports. Each variant maps to one negative errno in the C ABI
/// (see [`Error::errno`]) and carries a message naming what failed (field, offset, path).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The caller passed a bad argument or an out-of-range request (EINVAL).
    InvalidArgument(String),
    /// The file is not a qcow2 image at all (EINVAL): bad magic or too short.
    NotQcow2(String),
    /// The image uses a feature or version oxcow does not serve (ENOTSUP).
    Unsupported(String),
    /// The image's metadata is inconsistent or out of range (EUCLEAN).
    Corrupt(String),
    /// A write was attempted on a read-only image (EROFS).
    ReadOnly(String),
    /// The host file system ran out of space (ENOSPC); the image stays consistent.
    NoSpace(String),
    /// Another process holds the image in a conflicting mode (EAGAIN).
    Locked(String),
    /// The handle was fenced after a fatal inconsistency; no more I/O is accepted (ENOMEDIUM).
    Fenced(String),
    /// An allocation the request needs could not be satisfied (ENOMEM).
    NoMemory(String),
    /// A write or allocation was stopped because it would have overwritten metadata (or the
    /// engine met another runtime inconsistency); the image was marked corrupt and fenced (EIO).
    CorruptionPrevented(String),
    /// An operating-system I/O call failed.
    Io {
        /// What oxcow was doing, e.g. "reading L2 table at 0x50000 of a.qcow2".
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    /// Wraps an OS error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                Error::NoSpace(format!("{context}: {source}"))
            }
            _ => Error::Io { context, source },
        }
    }

    /// The positive errno value this error maps to (the C ABI returns its negation).
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) | Error::NotQcow2(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EUCLEAN,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Locked(_) => libc::EAGAIN,
            Error::Fenced(_) => libc::ENOMEDIUM,
            Error::NoMemory(_) => libc::ENOMEM,
            Error::CorruptionPrevented(_) => libc::EIO,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(e) if e > 0 => e,
                _ => libc::EIO,
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m)
            | Error::NotQcow2(m)
            | Error::Unsupported(m)
            | Error::Corrupt(m)
            | Error::ReadOnly(m)
            | Error::NoSpace(m)
            | Error::Locked(m)
            | Error::Fenced(m)
            | Error::NoMemory(m)
            | Error::CorruptionPrevented(m) => f.write_str(m),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Shorthand for `Err(Error::Corrupt(format!(...)))`.
macro_rules! corrupt {
    ($($arg:tt)*) => { Err($crate::error::Error::Corrupt(format!($($arg)*))) };
}
/// Shorthand for `Err(Error::Unsupported(format!(...)))`.
macro_rules! unsupported {
    ($($arg:tt)*) => { Err($crate::error::Error::Unsupported(format!($($arg)*))) };
}
/// Shorthand for `Err(Error::InvalidArgument(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::Error::InvalidArgument(format!($($arg)*))) };
}
pub(crate) use {corrupt, invalid, unsupported};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_from_the_os_becomes_no_space() {
        let e = Error::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, Error::NoSpace(_)));
        assert_eq!(e.errno(), libc::ENOSPC);
    }

    #[test]
    fn os_errors_keep_their_errno() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(e.errno(), libc::EBADF);
        let e = Error::io("reading", io::Error::other("x"));
        assert_eq!(e.errno(), libc::EIO);
    }
}
