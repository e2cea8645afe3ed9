//! Transactional reopen: switch an open image between read-only and read-write (and change
//! writethrough / force-share) without closing it.
//!
//! The switch happens with every mutating request drained (the write gate is held
//! exclusively) and moves the QEMU-compatible locks with the access mode. A failed reopen
//! changes nothing: the descriptor, the locks, the caches and the mode stay as they were.

use super::meta::Meta;
use super::{
    clear_autoclear, lock_mode, read_header, refuse_unwritable, repair_if_dirty, snapshot, Image,
};
use crate::error::ErrorKind;
use crate::error::{invalid, Error, Result};
use crate::options::OpenOptions;
use crate::storage::LockMode;
use std::sync::Arc;

impl Image {
    /// Reopens the image with new options, like QEMU's reopen:
    ///
    /// * read-write -> read-only: flushes everything, then drops the write locks;
    /// * read-only -> read-write: takes the write locks (-EAGAIN while another process uses
    ///   the image), re-reads and re-validates the header (a corrupt or dirty image is
    ///   refused) and reloads the metadata;
    /// * `writethrough`, `overlap_check` and `force_share` (read-only only) may change too.
    ///
    /// The file must still be the one opened: if its path now names another file (renamed or
    /// replaced), the reopen fails with ESTALE. `direct` and `no_backing` cannot change
    /// (-EINVAL). An image opened with `keep_read_only` refuses read-write (-EROFS), and so
    /// does a force-share open (its caches may have missed other writers' changes).
    ///
    /// Waits for in-flight writes and blocks new ones while it runs; reads continue. On error
    /// the image is exactly as before the call.
    pub fn reopen(&self, opts: &OpenOptions) -> Result<()> {
        self.check_usable()?;
        if opts.force_share && opts.writable {
            return invalid!("force-share can only be used with read-only images");
        }
        if opts.direct != self.mode.direct {
            return invalid!("O_DIRECT cannot be changed by a reopen; open the image again");
        }
        if opts.no_backing != self.mode.no_backing {
            return invalid!("the backing chain cannot be attached or detached by a reopen");
        }
        let name = self.path.display().to_string();
        let was_read_only = self.is_read_only();
        if opts.writable && was_read_only {
            if self.mode.keep_read_only {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!("{name}: opened with keep-read-only; it cannot be reopened read-write"),
                ));
            }
            if self.mode.force_share() {
                return Err(Error::new(ErrorKind::ReadOnly, format!(
                    "{name}: a force-share open may have missed other writers' changes; open the image again to write"
                )));
            }
        }
        let _gate = self.quiesce();
        let mut m = self.lock_meta();
        let old_mode = self.current_lock_mode();
        let new_mode = lock_mode(opts);
        match (was_read_only, opts.writable) {
            (false, false) => {
                // Everything written so far becomes durable (and a lazy-refcounts image clean)
                // before write access goes away; the bitmaps are stored (no longer in use).
                self.store_bitmaps(&mut m)?;
                let r = m
                    .writeback_and_mark_clean(&self.file)
                    .and_then(|()| self.file.reopen(false, new_mode))
                    .and_then(|()| self.reopen_data_file(false, new_mode));
                if let Err(e) = r {
                    // Still writable: the stored bitmaps must be in use again first.
                    self.remark_bitmaps(&mut m);
                    return Err(e);
                }
            }
            (true, true) => {
                self.file.reopen(true, new_mode)?;
                if let Err(e) = self.reopen_data_file(true, new_mode) {
                    let _ = self.file.reopen(false, old_mode);
                    return Err(e);
                }
                if let Err(e) = self.prepare_for_writing(&mut m, &name) {
                    // Back to the read-only description and locks; the metadata in memory
                    // was not replaced.
                    let _ = self.file.reopen(false, old_mode);
                    let _ = self.reopen_data_file(false, old_mode);
                    return Err(e);
                }
            }
            (true, false) if new_mode != old_mode => {
                self.file.reopen(false, new_mode)?;
                self.reopen_data_file(false, new_mode)?;
            }
            _ => {}
        }
        self.mode.switch(opts);
        m.rc.set_punch_freed(opts.writable && opts.discard_unmap);
        self.file.guard().set_mode(opts.overlap_check);
        Ok(())
    }

    fn current_lock_mode(&self) -> LockMode {
        if !self.is_read_only() {
            LockMode::ReadWrite
        } else if self.mode.force_share() {
            LockMode::ForceShare
        } else {
            LockMode::ReadOnly
        }
    }

    /// Re-validates the image for write access on the read-write descriptor and reloads the
    /// metadata from disk. Replaces `*m` only when everything succeeded.
    fn prepare_for_writing(&self, m: &mut Meta, name: &str) -> Result<()> {
        let mut header = read_header(&self.file, name)?;
        if header.size != self.virtual_size() || header.geometry() != self.geo {
            return Err(Error::corrupt(format!(
                "{name}: the image header changed while it was open read-only"
            )));
        }
        repair_if_dirty(&self.file, &mut header, name)?;
        refuse_unwritable(&header, name)?;
        let (snapshots, table_len) = snapshot::read_table(&self.file, &header)?;
        if snapshots != self.snapshots() {
            return Err(Error::corrupt(format!(
                "{name}: the snapshot table changed while the image was open read-only"
            )));
        }
        let fresh = Meta::load(
            &self.file,
            header.clone(),
            &snapshots,
            table_len,
            Arc::clone(&self.view),
        )?;
        clear_autoclear(&self.file, &mut header)?;
        *m = fresh;
        m.data = self.external_data().cloned();
        m.header = header;
        m.enable_lazy_refcounts();
        // Bitmaps in use on disk before the first write can happen on this handle.
        if let Some(hint) = self.reload_bitmaps(m)? {
            self.events.notice(format!("{name}: {hint}"));
        }
        Ok(())
    }
}
