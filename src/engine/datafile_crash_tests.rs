//! Crash points of writes on images with an external data file. The image file and the data
//! file are simulated in memory with one journal for both, so that a crash state is a prefix
//! of everything written to either file, with each file's writes since its own last sync
//! kept or lost independently (a disk may reorder them). Every state must pass `qemu-img
//! check` with at worst leaks, keep every byte flushed before, and show each cluster a write
//! touched in its old or its new state; a raw data file must equal the guest disk wherever
//! the workload did not write since the last flush.

use super::crash_tests::{rw, Rng, Scratch};
use super::Image;
use crate::storage::sim::{apply, Event};
use crate::storage::{Backend, HostFile};
use crate::{CreateOptions, OpenOptions, ZeroFlags};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

const SIZE: u64 = 2 << 20;
const CS: u64 = 65536;

/// Both files and their common journal (file index, event).
#[derive(Default)]
struct Shared {
    files: [Vec<u8>; 2],
    journal: Vec<(usize, Event)>,
}

/// One of the two simulated files.
struct Part {
    id: usize,
    shared: Arc<Mutex<Shared>>,
}

impl Part {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Part {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.lock();
        let f = &s.files[self.id];
        if offset >= f.len() as u64 {
            return Ok(0);
        }
        let n = (f.len() - offset as usize).min(buf.len());
        buf[..n].copy_from_slice(&f[offset as usize..offset as usize + n]);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        apply(&mut s.files[self.id], offset, buf);
        s.journal
            .push((self.id, Event::Write(offset, buf.to_vec())));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.lock().journal.push((self.id, Event::Sync));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().files[self.id].len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.lock().files[self.id].resize(len as usize, 0);
        Ok(())
    }
}

/// The two files after `journal[..k]` on top of `base`: each file's writes before its last
/// sync in the prefix are durable; later ones are kept unless `lose(file, index)`.
fn state_at(
    base: &[Vec<u8>; 2],
    journal: &[(usize, Event)],
    k: usize,
    lose: &dyn Fn(usize, usize) -> bool,
) -> [Vec<u8>; 2] {
    let mut out = base.clone();
    for (id, f) in out.iter_mut().enumerate() {
        let last_sync = journal[..k]
            .iter()
            .rposition(|(i, e)| *i == id && matches!(e, Event::Sync))
            .map_or(0, |p| p + 1);
        for (n, (i, e)) in journal[..k].iter().enumerate() {
            if let (true, Event::Write(off, data)) = (*i == id, e) {
                if n < last_sync || !lose(id, n) {
                    apply(f, *off, data);
                }
            }
        }
    }
    out
}

/// One write of phase two: guest offset, length, and whether it writes zeros (unmapping)
/// rather than a pattern.
type Op = (u64, u64, bool);

/// Allocating writes (guest cluster 0 too, whose data-file offset is 0), a partial one that
/// copies on write, one over three clusters, an in-place overwrite, an unmapping zero write.
const OPS: [Op; 6] = [
    (0, CS, false),
    (5 * CS + 1000, 3000, false),
    (8 * CS, 3 * CS, false),
    (2 * CS, CS, false),
    (3 * CS, CS, true),
    (20 * CS + 4096, CS, false),
];

fn run_ops(img: &Image, guest: &mut [u8], rng: &mut Rng) {
    for &(off, len, zero) in &OPS {
        let r = off as usize..(off + len) as usize;
        if zero {
            img.write_zeroes(off, len, ZeroFlags { may_unmap: true })
                .expect("zero");
            guest[r].fill(0);
        } else {
            let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
            img.write_at(&buf, off).expect("write");
            guest[r].copy_from_slice(&buf);
        }
    }
}

/// Checks one crash state written to `img_path` / `data_path`.
fn check_state(img_path: &Path, data_path: &Path, files: &[Vec<u8>; 2], ctx: &Ctx, what: &str) {
    std::fs::write(img_path, &files[0]).expect("write image state");
    std::fs::write(data_path, &files[1]).expect("write data state");
    crate::engine::crash_tests::assert_qemu_check(img_path, &[0, 3], what);
    let img = Image::open(img_path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: open after crash: {e}"));
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{what}: read after crash: {e}"));
    for c in 0..SIZE / CS {
        let r = (c * CS) as usize..((c + 1) * CS) as usize;
        let ok = got[r.clone()] == ctx.old[r.clone()] || got[r.clone()] == ctx.new[r.clone()];
        assert!(ok, "{what}: guest cluster {c} is neither old nor new");
        let touched = OPS
            .iter()
            .any(|&(o, l, _)| o < r.end as u64 && r.start as u64 <= o + l);
        if ctx.raw && !touched {
            let d = &files[1];
            let raw = d
                .get(r.clone())
                .map_or(vec![0; CS as usize], <[u8]>::to_vec);
            assert_eq!(raw, got[r], "{what}: raw data file differs in cluster {c}");
        }
    }
}

/// Guest contents before and after phase two, and whether the data file is raw.
struct Ctx {
    old: Vec<u8>,
    new: Vec<u8>,
    raw: bool,
}

fn crash_points(tag: &str, raw: bool, seed: u64) {
    let dir = Scratch::new(tag);
    let img_path = dir.0.join("img.qcow2");
    let data_path = dir.0.join("img.data");
    let opts = CreateOptions {
        data_file: Some(data_path.display().to_string()),
        data_file_raw: raw,
        ..Default::default()
    };
    crate::create(&img_path, SIZE, &opts).expect("create");
    let shared = Arc::new(Mutex::new(Shared {
        files: [
            std::fs::read(&img_path).expect("read image"),
            std::fs::read(&data_path).expect("read data"),
        ],
        journal: Vec::new(),
    }));
    let part = |id| {
        Arc::new(Part {
            id,
            shared: Arc::clone(&shared),
        })
    };
    let file = HostFile::new(part(0), img_path.display().to_string());
    let data = HostFile::new(part(1), data_path.display().to_string());
    let img = Image::open_file_with(file, Some(data), &img_path, &rw(), 0).expect("open sim");
    let mut rng = Rng(seed);
    let mut guest = vec![0u8; SIZE as usize];
    // Phase one: clusters 2..4 hold data, then everything is durable. Clusters 0 and 8..10
    // are written and discarded first, so that (without data_file_raw) the data file still
    // holds stale bytes there: a crash that kept phase two's L2 entries but lost its data
    // would show them.
    let stale = vec![0x5au8; (11 * CS) as usize];
    img.write_at(&stale, 0).expect("stale data");
    img.discard(0, 11 * CS).expect("discard stale data");
    let first: Vec<u8> = (0..3 * CS).map(|i| (i as u8) | 0x80).collect();
    img.write_at(&first, 2 * CS).expect("phase one");
    guest[(2 * CS) as usize..(5 * CS) as usize].copy_from_slice(&first);
    img.flush().expect("flush 1");
    let (base, start) = {
        let s = shared.lock().expect("lock");
        (s.files.clone(), s.journal.len())
    };
    let old = guest.clone();
    run_ops(&img, &mut guest, &mut rng);
    img.flush().expect("flush 2");
    std::mem::forget(img); // the process "dies" here
    let journal = shared.lock().expect("lock").journal[start..].to_vec();
    let ctx = Ctx {
        old,
        new: guest,
        raw,
    };
    let mut states = 0;
    for k in 0..=journal.len() {
        let what = format!("{tag}: crash after {k}/{} entries", journal.len());
        let mask = rng.next();
        let variants: [&dyn Fn(usize, usize) -> bool; 4] =
            [&|_, _| false, &|_, _| true, &|id, _| id == 1, &|_, n| {
                mask >> (n % 64) & 1 == 1
            }];
        for (v, lose) in variants.iter().enumerate() {
            let files = state_at(&base, &journal, k, lose);
            check_state(&img_path, &data_path, &files, &ctx, &format!("{what} v{v}"));
            states += 1;
        }
    }
    assert!(states > 20, "{tag}: too few crash states ({states})");
}

#[test]
fn every_crash_point_of_writes_to_a_data_file_image_leaves_old_or_new_state() {
    crash_points("df-plain", false, 7);
}

#[test]
fn every_crash_point_of_writes_to_a_raw_data_file_image_keeps_it_raw() {
    crash_points("df-raw", true, 11);
}
