//! A file that was deliberately not opened: the external data file of a metadata-only open
//! (`OpenOptions::no_data_file`). Every access fails, so guest data can never be mistaken for
//! zeros or written somewhere else.

use super::Backend;
use std::io;

/// A [`Backend`] whose every operation fails with an error naming why the file is absent.
pub struct Absent {
    why: String,
}

impl Absent {
    /// An absent file; `why` is the message every access fails with.
    pub fn new(why: impl Into<String>) -> Absent {
        Absent { why: why.into() }
    }

    fn fail<T>(&self) -> io::Result<T> {
        Err(io::Error::other(self.why.clone()))
    }
}

impl Backend for Absent {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        self.fail()
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        self.fail()
    }
    fn sync(&self) -> io::Result<()> {
        self.fail()
    }
    fn len(&self) -> io::Result<u64> {
        self.fail()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.fail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_access_fails_with_the_reason() {
        let a = Absent::new("not opened");
        let mut buf = [0u8; 4];
        let e = a.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.to_string(), "not opened");
        assert!(a.write_at(&buf, 0).is_err());
        assert!(a.sync().is_err());
        assert!(a.len().is_err());
        assert!(a.set_len(0).is_err());
    }
}
