//! The bitmaps across a handle's life: loaded at open (and marked in use before the first
//! guest write can happen on a read-write handle), stored at close, reopen to read-only and a
//! clean drop.

use super::set::State;
use crate::engine::meta::Meta;
use crate::engine::Image;
use crate::error::Result;
use crate::storage::HostFile;

/// What QEMU prints when it finds a stale bitmaps extension (autoclear bit 0 clear: a program
/// without bitmap support wrote the image), with the oxcow command next to QEMU's.
pub const STALE_HINT: &str = "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent. Some clusters may be leaked, run 'qemu-img check -r' (or 'oxcow check -r leaks') on the image file to fix.";

/// Loads the bitmaps for a new handle. On a read-write handle, first drops a stale extension
/// from the header (its clusters become leaks; the hint is returned for the caller's event),
/// then marks every consistent bitmap in use on disk, durably, before returning.
pub fn open(
    file: &HostFile,
    m: &mut Meta,
    writable: bool,
) -> Result<(State, Option<&'static str>)> {
    let mut hint = None;
    if writable && m.header.bitmaps.is_some() && m.header.bitmaps_in_use().is_none() {
        super::store::write_extension(file, m, None)?;
        hint = Some(STALE_HINT);
    }
    let mut state = super::load::load(file, &m.header)?;
    if writable {
        state.needs_store = super::store::mark_in_use(file, m, &mut state)?;
    }
    Ok((state, hint))
}

impl Image {
    /// Stores the bitmaps if they changed since open (close, reopen to read-only, drop).
    /// Called with writers quiesced and the metadata lock held.
    pub(crate) fn store_bitmaps(&self, m: &mut Meta) -> Result<()> {
        let mut s = self.bitmaps.lock();
        super::store::store(&self.file, m, &mut s)
    }

    /// After the bitmaps were stored but the handle stays writable (a reopen to read-only
    /// failed after the store): marks them in use again. If that fails too, the handle is
    /// fenced, so that no write can make a stored bitmap stale.
    pub(crate) fn remark_bitmaps(&self, m: &mut Meta) {
        let mut s = self.bitmaps.lock();
        match super::store::mark_in_use(&self.file, m, &mut s) {
            Ok(marked) => s.needs_store |= marked,
            Err(_) => self.fence.fence(),
        }
    }

    /// After a reopen to read-write reloaded the metadata: loads the bitmaps again from disk
    /// and marks them in use (returns the stale-extension hint, if any).
    pub(crate) fn reload_bitmaps(&self, m: &mut Meta) -> Result<Option<&'static str>> {
        let (state, hint) = open(&self.file, m, true)?;
        self.bitmaps.install(state);
        Ok(hint)
    }
}
