//! Live resize: threads write and read whole clusters on both sides of the boundary while
//! another thread shrinks and grows the image. No request succeeds where the size in force
//! for its whole duration excludes it, none fails where the size included it throughout,
//! reads see only zeros or a complete cluster its writer wrote, and the final contents match
//! a model (a cluster past the small end is zero once a shrink completed after its last write).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const CS: u64 = 64 * KIB;
const SMALL: u64 = 8 * MIB;
const BIG: u64 = 12 * MIB;
/// Slots (clusters) used: the last 2 MiB below SMALL and everything up to BIG.
const FIRST: u64 = (SMALL - 2 * MIB) / CS;
const SLOTS: u64 = (BIG / CS) - FIRST;
const WRITERS: u64 = 3;
const EINVAL: i32 = 22;

/// Resize phase: 0 big, 1 shrinking, 2 small, 3 growing (mod 4); bumped at each transition.
struct Phase(AtomicU64);

impl Phase {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn pattern(slot: u64, seq: u64) -> Vec<u8> {
    let word = ((slot << 32) | seq).to_le_bytes();
    word.iter().copied().cycle().take(CS as usize).collect()
}

/// A cluster read back: zeros, or the (slot, seq) a complete write left.
fn decode(buf: &[u8], slot: u64) -> Option<u64> {
    if buf.iter().all(|&b| b == 0) {
        return None;
    }
    let word = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    assert_eq!(
        word >> 32,
        slot,
        "cluster of slot {slot} holds another slot's data"
    );
    let seq = word & 0xffff_ffff;
    assert!(
        buf == pattern(slot, seq),
        "slot {slot}: torn or foreign cluster"
    );
    Some(seq)
}

/// A cluster read while its writer may be overwriting it in place: zeros, or words that all
/// belong to `slot` (an overwrite racing the read may mix two of its writes, never another
/// slot's data or a freed cluster's).
fn check_racy(buf: &[u8], slot: u64) {
    if buf.iter().all(|&b| b == 0) {
        return;
    }
    for w in buf.chunks(8) {
        let word = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        assert_eq!(
            word >> 32,
            slot,
            "cluster of slot {slot} holds foreign data"
        );
    }
}

/// What a request that succeeded (`ok`) or failed may have done past SMALL, given the phases
/// seen before (`p0`) and after (`p1`) it.
fn check_outcome(ok: bool, past_small: bool, p0: u64, p1: u64, what: &str) {
    if !past_small {
        assert!(ok, "{what}: a request inside the small size failed");
    } else if p0 == p1 && p0 % 4 == 2 {
        assert!(
            !ok,
            "{what}: succeeded while the image was small throughout"
        );
    } else if p0 == p1 && p0 % 4 == 0 {
        assert!(ok, "{what}: failed while the image was big throughout");
    }
}

/// Per slot: seq of the last successful write and the phase right after it returned.
type Last = Arc<Mutex<Vec<Option<(u64, u64)>>>>;

fn writer(img: Arc<oxcow::Image>, phase: Arc<Phase>, stop: Arc<AtomicBool>, id: u64, last: Last) {
    let mut rng = Rng::new(100 + id);
    let mut seq = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let slot = FIRST + rng.below(SLOTS / WRITERS) * WRITERS + id;
        let off = slot * CS;
        let p0 = phase.now();
        let r = img.write_at(&pattern(slot, seq), off);
        let p1 = phase.now();
        if let Err(e) = &r {
            assert_eq!(e.errno(), EINVAL, "write error {e}");
        } else {
            last.lock().expect("model")[(slot - FIRST) as usize] = Some((seq, p1));
        }
        check_outcome(r.is_ok(), off >= SMALL, p0, p1, "write");
        seq += 1;
    }
}

fn reader(img: Arc<oxcow::Image>, phase: Arc<Phase>, stop: Arc<AtomicBool>, id: u64) -> u64 {
    let mut rng = Rng::new(200 + id);
    let mut reads = 0;
    while !stop.load(Ordering::Relaxed) {
        let slot = FIRST + rng.below(SLOTS - 3);
        let n = 1 + rng.below(3);
        let mut buf = vec![0u8; (n * CS) as usize];
        let p0 = phase.now();
        let r = img.read_at(&mut buf, slot * CS);
        let p1 = phase.now();
        if let Err(e) = &r {
            assert_eq!(e.errno(), EINVAL, "read error {e}");
        } else {
            for (i, c) in buf.chunks(CS as usize).enumerate() {
                check_racy(c, slot + i as u64);
            }
            reads += 1;
        }
        check_outcome(r.is_ok(), (slot + n) * CS > SMALL, p0, p1, "read");
    }
    reads
}

#[test]
fn requests_near_the_boundary_respect_the_size_in_force_while_it_changes() {
    let dir = TempDir::new("resize-live");
    let p = dir.join("live.qcow2");
    qemu_create(&p, BIG, "");
    let img = Arc::new(open_rw(&p));
    let phase = Arc::new(Phase(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let last: Last = Arc::new(Mutex::new(vec![None; SLOTS as usize]));
    let mut hs = Vec::new();
    for id in 0..WRITERS {
        let (i, ph, st, l) = (img.clone(), phase.clone(), stop.clone(), last.clone());
        hs.push(std::thread::spawn(move || writer(i, ph, st, id, l)));
    }
    let readers: Vec<_> = (0..2)
        .map(|id| {
            let (i, ph, st) = (img.clone(), phase.clone(), stop.clone());
            std::thread::spawn(move || reader(i, ph, st, id))
        })
        .collect();
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        phase.bump();
        img.resize(SMALL, true).expect("shrink");
        phase.bump();
        std::thread::sleep(std::time::Duration::from_millis(5));
        phase.bump();
        img.resize(BIG, false).expect("grow");
        phase.bump();
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().expect("writer");
    }
    let reads: u64 = readers.into_iter().map(|h| h.join().expect("reader")).sum();
    assert!(reads > 0, "no read succeeded");
    let final_phase = phase.now();
    let img = Arc::into_inner(img).expect("threads are done");
    let mut buf = vec![0u8; CS as usize];
    for (i, l) in last.lock().expect("model").iter().enumerate() {
        let slot = FIRST + i as u64;
        img.read_at(&mut buf, slot * CS).expect("final read");
        let got = decode(&buf, slot);
        let want = match *l {
            None => None,
            // A shrink that completed after the write returned dropped it.
            Some((_, p1)) if slot * CS >= SMALL && (p1 + 1..=final_phase).any(|k| k % 4 == 2) => {
                None
            }
            Some((seq, _)) => Some(seq),
        };
        assert_eq!(got, want, "slot {slot}");
    }
    img.close().expect("close");
    assert_check_clean(&p);
}
