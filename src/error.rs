//! The error type of the Rust API and its mapping to errno values for the C ABI.
//!
//! An [`Error`] is a kind (which decides the errno), a message in QEMU's words, and the
//! context it was found in: the image file, the on-disk structure and host offset it concerns,
//! and the error that caused it. Callers (and the corruption-event path) match on those fields,
//! never on the text.

use crate::format::MetaKind;
use std::fmt;
use std::io;

/// Result alias used throughout oxcow.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, as far as a caller needs to decide what to do. Each kind maps to one
/// errno (see [`Error::errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed a bad argument or an out-of-range request (EINVAL).
    InvalidArgument,
    /// The file is not a qcow2 image at all (EINVAL): bad magic or too short.
    NotQcow2,
    /// The image uses a feature or version oxcow does not serve (ENOTSUP).
    Unsupported,
    /// The image's metadata is inconsistent or out of range (EUCLEAN).
    Corrupt,
    /// A write was attempted on a read-only image (EROFS).
    ReadOnly,
    /// The host file system ran out of space (ENOSPC); the image stays consistent.
    NoSpace,
    /// Another process holds the image in a conflicting mode (EAGAIN).
    Locked,
    /// The handle was fenced after a fatal inconsistency; no more I/O is accepted (ENOMEDIUM).
    Fenced,
    /// An allocation the request needs could not be satisfied (ENOMEM).
    NoMemory,
    /// A write or allocation was stopped because it would have overwritten metadata (or the
    /// engine met another runtime inconsistency); the image was marked corrupt and fenced (EIO).
    CorruptionPrevented,
    /// An operating-system call failed; the errno is the OS error's (EIO when it has none).
    Io,
    /// A named object (bitmap, snapshot) to be created already exists (EEXIST).
    Exists,
    /// A named object (bitmap, snapshot) does not exist (ENOENT).
    NotFound,
    /// The object is in a state that forbids the operation, e.g. an inconsistent bitmap (EBUSY).
    Busy,
}

/// Every failure oxcow reports: a kind, a message naming what failed, and its context.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    file: Option<String>,
    structure: Option<MetaKind>,
    host_offset: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` described by `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            file: None,
            structure: None,
            host_offset: None,
            source: None,
        }))
    }

    /// Wraps an OS error with a description of what was being done. ENOSPC, EDQUOT and EFBIG
    /// become [`ErrorKind::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error::new(kind, context).with_source(source)
    }

    /// [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Names the image file the error concerns (kept if one is named already: the innermost
    /// file is the one that holds the problem, e.g. a backing file).
    pub fn with_file(mut self, file: impl Into<String>) -> Error {
        if self.0.file.is_none() {
            self.0.file = Some(file.into());
        }
        self
    }

    /// Names the on-disk structure and host offset the error concerns.
    pub fn with_structure(mut self, structure: MetaKind, host_offset: Option<u64>) -> Error {
        self.0.structure = Some(structure);
        self.0.host_offset = host_offset;
        self
    }

    /// Records the error that caused this one.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        self.0.source = Some(source.into());
        self
    }

    /// The same error as another kind (e.g. an inconsistency found during I/O that the
    /// corruption path turns into [`ErrorKind::CorruptionPrevented`]), context kept.
    pub fn into_kind(mut self, kind: ErrorKind) -> Error {
        self.0.kind = kind;
        self
    }

    /// Replaces the message, context kept.
    pub fn with_message(mut self, message: impl Into<String>) -> Error {
        self.0.message = message.into();
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The description, without the file name or the cause.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The image file the error concerns, when known.
    pub fn file(&self) -> Option<&str> {
        self.0.file.as_deref()
    }

    /// The on-disk structure the error concerns, when known.
    pub fn structure(&self) -> Option<MetaKind> {
        self.0.structure
    }

    /// The host offset the error concerns, when known.
    pub fn host_offset(&self) -> Option<u64> {
        self.0.host_offset
    }

    /// The positive errno value this error maps to (the C ABI returns its negation).
    pub fn errno(&self) -> i32 {
        match self.0.kind {
            ErrorKind::InvalidArgument | ErrorKind::NotQcow2 => libc::EINVAL,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::Corrupt => libc::EUCLEAN,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Locked => libc::EAGAIN,
            ErrorKind::Fenced => libc::ENOMEDIUM,
            ErrorKind::NoMemory => libc::ENOMEM,
            ErrorKind::CorruptionPrevented => libc::EIO,
            ErrorKind::Io => self.os_errno().unwrap_or(libc::EIO),
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Busy => libc::EBUSY,
        }
    }

    /// The errno of the OS error at the root of the chain, if there is one.
    fn os_errno(&self) -> Option<i32> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return io.raw_os_error().filter(|&n| n > 0);
            }
            if let Some(inner) = e.downcast_ref::<Error>() {
                return inner.os_errno();
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for Error {
    /// `file: message: cause`, each part when present: as precise as the old strings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.0.file {
            // OS errors' contexts usually name the file already ("writing ... of a.qcow2").
            if !self.0.message.contains(file.as_str()) {
                write!(f, "{file}: ")?;
            }
        }
        f.write_str(&self.0.message)?;
        if let Some(s) = &self.0.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind)
            .field("message", &self.0.message);
        if let Some(file) = &self.0.file {
            d.field("file", file);
        }
        if let Some(s) = self.0.structure {
            d.field("structure", &s);
        }
        if let Some(o) = self.0.host_offset {
            d.field("host_offset", &format_args!("{o:#x}"));
        }
        if let Some(s) = &self.0.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for `Err(Error::corrupt(format!(...)))`.
macro_rules! corrupt {
    ($($arg:tt)*) => { Err($crate::error::Error::corrupt(format!($($arg)*))) };
}
/// Shorthand for `Err(Error::unsupported(format!(...)))`.
macro_rules! unsupported {
    ($($arg:tt)*) => { Err($crate::error::Error::unsupported(format!($($arg)*))) };
}
/// Shorthand for `Err(Error::invalid(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::Error::invalid(format!($($arg)*))) };
}
pub(crate) use {corrupt, invalid, unsupported};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_from_the_os_becomes_no_space() {
        let e = Error::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
    }

    #[test]
    fn os_errors_keep_their_errno_through_the_chain() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(e.errno(), libc::EBADF);
        let wrapped = Error::new(ErrorKind::Io, "opening backing file b.qcow2").with_source(e);
        assert_eq!(wrapped.errno(), libc::EBADF);
        let e = Error::io("reading", io::Error::other("x"));
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn context_is_fields_and_the_message_reads_as_before() {
        let e = Error::corrupt("L2 table offset invalid")
            .with_structure(MetaKind::ActiveL2, Some(0x50200))
            .with_file("a.qcow2")
            .with_file("outer.qcow2");
        assert_eq!(e.file(), Some("a.qcow2"), "the innermost file is kept");
        assert_eq!(e.structure(), Some(MetaKind::ActiveL2));
        assert_eq!(e.host_offset(), Some(0x50200));
        assert_eq!(e.to_string(), "a.qcow2: L2 table offset invalid");
        let io = Error::io("reading L2 table", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(
            io.to_string(),
            "reading L2 table: Input/output error (os error 5)"
        );
    }
}
