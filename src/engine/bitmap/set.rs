//! The image's set of persistent bitmaps: the control state (names, flags, where each lives on
//! disk) under a mutex, and the list of recording bitmaps that the write path reads.
//!
//! Tracking costs one atomic load when no bitmap records, and otherwise a read of a sharded
//! lock (per-thread shard: no cache line shared by all writers) and one `fetch_or` per touched
//! word. The recording list only changes with writers quiesced (control operations hold
//! `Image::quiesce`, which closes the write gate), so no write can slip between a bitmap's
//! enable and its first bit.

use super::bits::DirtyBits;
use crate::format::bitmap::BitmapEntry;
use crate::format::HostOffset;
use crossbeam_utils::sync::ShardedLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One bitmap as the engine holds it.
#[derive(Debug)]
pub struct Bm {
    /// The name, as bytes (the format does not require UTF-8).
    pub name: Vec<u8>,
    /// Guest bytes per bit, as a power of two.
    pub gbits: u8,
    /// Records guest writes now (stored with the `auto` flag).
    pub enabled: bool,
    /// Found in use at open: not tracked, kept on disk as it was, only removable.
    pub inconsistent: bool,
    /// The bits (empty and unused for an inconsistent bitmap).
    pub bits: Arc<DirtyBits>,
}

/// What the bitmap directory on disk holds right now (as written or loaded by this handle).
#[derive(Debug, Clone, Default)]
pub struct OnDisk {
    /// Directory location and size; `None` when the image has no (valid) bitmaps extension.
    pub dir: Option<(HostOffset, u64)>,
    /// The directory's entries.
    pub entries: Vec<BitmapEntry>,
}

/// Control state, under [`Bitmaps::state`].
#[derive(Debug, Default)]
pub struct State {
    /// The bitmaps, in directory order (new ones last).
    pub list: Vec<Bm>,
    /// The directory on disk.
    pub disk: OnDisk,
    /// The on-disk state differs from memory (bitmaps marked in use, or added): the next
    /// close, reopen to read-only or drop stores them.
    pub needs_store: bool,
}

impl State {
    /// The bitmap named `name`.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.list.iter().position(|b| b.name == name)
    }
}

/// The bitmaps of one image.
#[derive(Default)]
pub struct Bitmaps {
    /// Whether any bitmap records (the write path's only cost when none does).
    any: AtomicBool,
    /// The recording bitmaps.
    recording: ShardedLock<Vec<Arc<DirtyBits>>>,
    state: Mutex<State>,
    /// Trackers that are not persistent bitmaps (a commit's record of the writes it must
    /// copy again); recorded like enabled bitmaps. Lock order: `state` before this one.
    transient: Mutex<Vec<Arc<DirtyBits>>>,
}

impl Bitmaps {
    /// Marks the granules of `[off, off + len)` dirty in every recording bitmap. Called by
    /// every guest-visible write before it changes data.
    #[inline]
    pub fn mark(&self, off: u64, len: u64) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let list = self.recording.read().unwrap_or_else(|p| p.into_inner());
        for b in list.iter() {
            b.set_range(off, len);
        }
    }

    /// The control state. Lock order: the metadata mutex (when needed) before this one.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the recording list from `state`; callers hold writers quiesced (or are the
    /// only user, at open).
    pub fn publish(&self, state: &State) {
        let list: Vec<Arc<DirtyBits>> = state
            .list
            .iter()
            .filter(|b| b.enabled && !b.inconsistent)
            .map(|b| Arc::clone(&b.bits))
            .chain(self.transient_list().iter().cloned())
            .collect();
        let any = !list.is_empty();
        *self.recording.write().unwrap_or_else(|p| p.into_inner()) = list;
        self.any.store(any, Ordering::Release);
    }

    fn transient_list(&self) -> MutexGuard<'_, Vec<Arc<DirtyBits>>> {
        self.transient.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records every later guest write in `bits` too, until [`Self::untrack`]; callers hold
    /// writers quiesced so that no write slips between the call and its first bit.
    pub fn track(&self, bits: Arc<DirtyBits>) {
        let s = self.lock();
        self.transient_list().push(bits);
        self.publish(&s);
    }

    /// Stops recording into `bits` (see [`Self::track`]).
    pub fn untrack(&self, bits: &Arc<DirtyBits>) {
        let s = self.lock();
        self.transient_list().retain(|b| !Arc::ptr_eq(b, bits));
        self.publish(&s);
    }

    /// Replaces the whole state (open, reopen) and publishes it.
    pub fn install(&self, state: State) {
        let mut s = self.lock();
        *s = state;
        self.publish(&s);
    }

    /// The name of the first inconsistent bitmap, if any (a resize refuses them, as QEMU's).
    pub fn first_inconsistent(&self) -> Option<String> {
        let s = self.lock();
        let b = s.list.iter().find(|b| b.inconsistent)?;
        Some(String::from_utf8_lossy(&b.name).into_owned())
    }

    /// Adapts every bitmap to a new disk size (for resize; callers hold writers quiesced):
    /// bits past a shrunk end are dropped, a grown disk is clean past the old end.
    pub fn resize(&self, new_size: u64) {
        let mut s = self.lock();
        for b in s.list.iter_mut().filter(|b| !b.inconsistent) {
            b.bits = Arc::new(b.bits.resized(new_size));
        }
        // The tables on disk describe the old size: store them again at close.
        s.needs_store |= s.list.iter().any(|b| !b.inconsistent);
        self.publish(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn with_one(enabled: bool) -> Bitmaps {
        let b = Bitmaps::default();
        b.install(State {
            list: vec![Bm {
                name: b"b".to_vec(),
                gbits: 16,
                enabled,
                inconsistent: false,
                bits: Arc::new(DirtyBits::new(1 << 30, 16, 16)),
            }],
            ..State::default()
        });
        b
    }

    #[test]
    fn only_recording_bitmaps_are_marked() {
        let on = with_one(true);
        on.mark(70_000, 1);
        assert!(on.lock().list[0].bits.get(1));
        let off = with_one(false);
        off.mark(70_000, 1);
        assert!(!off.lock().list[0].bits.get(1));
    }

    /// The write path's cost of tracking, per 4 KiB write: `cargo test --release --lib
    /// mark_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, run by hand"]
    fn mark_cost() {
        for enabled in [false, true] {
            let b = with_one(enabled);
            let n = 20_000_000u64;
            let t0 = Instant::now();
            for i in 0..n {
                b.mark((i * 4096) % (1 << 30), 4096);
            }
            let ns = t0.elapsed().as_nanos() as f64 / n as f64;
            println!("one bitmap, enabled={enabled}: {ns:.1} ns per 4 KiB mark");
        }
    }
}
