//! Corruption handling at runtime: a prevented write or an inconsistency met during I/O marks
//! a writable image corrupt on disk, fences the handle and reports a structured event to the
//! caller's handler; a read-only image reports one non-fatal event and writes nothing.
//!
//! Events are queued where the problem is found (possibly with engine locks held) and
//! delivered at the API boundary, on the caller's thread, after every lock is released, so a
//! handler may call back into the image.

use super::Image;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::format::header::{layout, INCOMPAT_CORRUPT};
use crate::format::HostOffset;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A corruption event: what was prevented or found, where, and whether the image is now
/// fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionEvent {
    /// Human-readable description naming the structure, in the spirit of QEMU's messages.
    pub message: String,
    /// Host offset of the prevented write or of the inconsistent entry, when known.
    pub host_offset: Option<u64>,
    /// Size in bytes of the prevented write, when known.
    pub size: Option<u64>,
    /// True when the image was marked corrupt and fenced (writable images); false for the
    /// single report a read-only image gives.
    pub fatal: bool,
}

/// A caller's corruption-event handler. Called on the thread whose request found the
/// problem, with no oxcow lock held.
pub type EventHandler = Arc<dyn Fn(&CorruptionEvent) + Send + Sync>;

/// The corruption state of one handle and the events waiting for delivery.
#[derive(Default)]
pub struct Events {
    /// The first runtime corruption has been handled (marked, fenced, reported).
    handled: AtomicBool,
    /// The corrupt bit was set on disk by this handle.
    marked_corrupt: AtomicBool,
    /// The caller's corruption-event handler.
    handler: RwLock<Option<EventHandler>>,
    /// Events found but not yet delivered (delivery happens at the API boundary).
    pending: Mutex<Vec<CorruptionEvent>>,
}

impl Events {
    /// Whether this handle set the corrupt bit on disk.
    pub fn marked_corrupt(&self) -> bool {
        self.marked_corrupt.load(Ordering::Acquire)
    }

    /// Claims the handling of a corruption: true for the first caller only.
    fn claim_first(&self) -> bool {
        !self.handled.swap(true, Ordering::AcqRel)
    }

    /// Whether a corruption was handled (so events may be pending).
    fn any_handled(&self) -> bool {
        self.handled.load(Ordering::Acquire)
    }

    /// Queues a non-fatal notice (nothing was prevented and the handle stays usable), for
    /// the handler installed now or later.
    pub(super) fn notice(&self, message: String) {
        self.queue(CorruptionEvent {
            message,
            host_offset: None,
            size: None,
            fatal: false,
        });
    }

    fn queue(&self, ev: CorruptionEvent) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ev);
    }

    /// Hands every pending event to the handler (called with no engine lock held).
    fn deliver(&self) {
        let events = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if events.is_empty() {
            return;
        }
        let handler = self
            .handler
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = handler {
            for ev in &events {
                h(ev);
            }
        }
    }
}

impl Image {
    /// Installs (or with `None` removes) the handler that receives corruption events. Notices
    /// queued before a handler was installed (found at open, such as a stale bitmaps
    /// extension) are delivered to it now.
    pub fn set_event_handler(&self, handler: Option<EventHandler>) {
        *self
            .events
            .handler
            .write()
            .unwrap_or_else(|p| p.into_inner()) = handler;
        self.events.deliver();
    }

    /// Turns a runtime corruption (a prevented write, or an inconsistency such as an
    /// unaligned table offset found during I/O) into -EIO and its consequences: on a writable
    /// image the corrupt bit is set on disk and the handle fenced; the event is queued for
    /// delivery. Other errors pass through. Idempotent: only the first corruption acts.
    pub(super) fn on_error(&self, e: Error) -> Error {
        if !matches!(
            e.kind(),
            ErrorKind::CorruptionPrevented | ErrorKind::Corrupt
        ) {
            return e;
        }
        let e = e
            .with_file(self.path.display().to_string())
            .into_kind(ErrorKind::CorruptionPrevented);
        if !self.events.claim_first() {
            // Already handled (this error on its way out, or a later one): no second mark,
            // no second event.
            return e;
        }
        let hit = self.file.guard().take_hit();
        let host_offset = e.host_offset().or(hit.as_ref().map(|h| h.offset));
        let size = hit.as_ref().map(|h| h.size);
        if self.is_read_only() {
            // QEMU reports once and suppresses further events; the image is left alone.
            self.events.queue(CorruptionEvent {
                message: format!("{e}; further non-fatal corruption events will be suppressed"),
                host_offset,
                size,
                fatal: false,
            });
            return e;
        }
        self.fence();
        // Version 2 has no corrupt bit: bytes 72-79 there belong to header extensions or the
        // backing file name, so like QEMU the image is fenced in memory only.
        let note = if !layout::INCOMPATIBLE_FEATURES.exists_in(self.version) {
            "the corruption could not be recorded on disk (a version 2 image has no corrupt bit)"
        } else {
            match self.mark_corrupt_on_disk() {
                Ok(()) => "the image was marked corrupt",
                Err(_) => "marking the image corrupt failed too",
            }
        };
        let message = format!(
            "{}; {note} and no further writes are accepted (repair with 'oxcow check -r all')",
            e.message()
        );
        let e = e.with_message(message);
        self.events.queue(CorruptionEvent {
            message: e.to_string(),
            host_offset,
            size,
            fatal: true,
        });
        e
    }

    /// Sets incompatible bit 1 on disk, starting from the word on disk so that no other bit
    /// changes, and syncs.
    fn mark_corrupt_on_disk(&self) -> crate::Result<()> {
        let field = layout::INCOMPATIBLE_FEATURES;
        let mut word = [0u8; 8];
        self.file.read_zero_padded(
            &mut word,
            HostOffset::new(field.offset as u64),
            "image header",
        )?;
        let bits = u64::from_be_bytes(word) | INCOMPAT_CORRUPT;
        self.file
            .write_header_fields(&field.update(self.version, bits)?)?;
        self.file.sync()?;
        self.events.marked_corrupt.store(true, Ordering::Release);
        Ok(())
    }

    /// The API boundary: maps a runtime corruption to its consequences and delivers queued
    /// events. Must be called with no engine lock held.
    pub(super) fn finish<T>(&self, r: crate::Result<T>) -> crate::Result<T> {
        // Events are only ever queued by a failing request: successful requests skip the
        // queue's mutex entirely.
        if r.is_ok() && !self.events.any_handled() {
            return r;
        }
        let r = r.map_err(|e| self.on_error(e));
        self.events.deliver();
        r
    }
}
