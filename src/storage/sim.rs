//! A simulated host file for crash and fault-injection tests: an in-memory file that records
//! every write and every sync in a journal, so that a test can rebuild the file as a crash at
//! any point would have left it, and that can fail a chosen write with EIO.

use super::Backend;
use std::io;
use std::sync::Mutex;

/// One journal entry.
#[derive(Debug, Clone)]
pub enum Event {
    /// A completed write.
    Write(u64, Vec<u8>),
    /// A completed sync: everything before it is durable.
    Sync,
}

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    journal: Vec<Event>,
    writes: u64,
    fail_write: Option<u64>,
    /// `zero_range`/`punch_hole` report "unsupported", as on a file system without them.
    no_fallocate: bool,
}

/// The simulated file.
#[derive(Debug, Default)]
pub struct SimFile {
    state: Mutex<State>,
}

impl SimFile {
    /// A file holding `bytes`, all durable.
    pub fn new(bytes: Vec<u8>) -> SimFile {
        SimFile {
            state: Mutex::new(State {
                current: bytes,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `n`th write from now (0-based) fail with EIO, without changing the file.
    pub fn fail_write_after(&self, n: u64) {
        let mut s = self.lock();
        s.fail_write = Some(s.writes + n);
    }

    /// Makes `zero_range` and `punch_hole` report "unsupported" from now on.
    pub fn refuse_fallocate(&self) {
        self.lock().no_fallocate = true;
    }

    /// The journal so far.
    pub fn journal(&self) -> Vec<Event> {
        self.lock().journal.clone()
    }

    /// The contents as the process sees them now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
}

/// Applies a write to an in-memory file image.
pub fn apply(file: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    file[off as usize..end].copy_from_slice(data);
}

impl Backend for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.lock();
        let len = s.current.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = (len - offset).min(buf.len() as u64) as usize;
        buf[..n].copy_from_slice(&s.current[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        let seq = s.writes;
        s.writes += 1;
        if s.fail_write == Some(seq) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        apply(&mut s.current, offset, buf);
        s.journal.push(Event::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.lock().journal.push(Event::Sync);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().current.resize(len as usize, 0);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.punch_hole(offset, len)
    }

    /// Journaled as a write of zeros over the part of the range inside the file (the size is
    /// kept), so crash states reorder it like any write between two syncs; it counts as a
    /// write for fault injection.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut s = self.lock();
        if s.no_fallocate {
            return Ok(false);
        }
        let size = s.current.len() as u64;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(true);
        }
        let seq = s.writes;
        s.writes += 1;
        if s.fail_write == Some(seq) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let zeros = vec![0u8; (end - offset) as usize];
        apply(&mut s.current, offset, &zeros);
        s.journal.push(Event::Write(offset, zeros));
        Ok(true)
    }
}
