//! `qemu-img check` semantics: rebuild every cluster's reference count from the image's
//! structures, compare with the on-disk refcounts, report and (optionally) repair.
//!
//! Runs with I/O quiesced: the image's metadata lock is held for the whole check, cached
//! metadata is written back first, and after a repair the in-memory metadata is reloaded.
//!
//! The work itself runs on the host file and a header only ([`walk`] computes the references,
//! [`fix`] compares and repairs), so that [`Image::check_path`] can check and repair images
//! the engine would refuse to open read-write (dirty or corrupt ones).

mod fix;
mod refs;
mod snapfix;
mod walk;

use super::meta::Meta;
use super::{parse_header_cluster, Image};
use crate::error::{Error, Result};
use crate::format::header::{layout, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW};
use crate::format::Header;
use crate::storage::{HostFile, LockMode, PosixFile};
use std::path::Path;
use std::sync::Arc;

/// What a check may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckFix {
    /// Report only; never writes.
    #[default]
    None,
    /// Lower over-counted refcounts (leaks) only, like `qemu-img check -r leaks`.
    Leaks,
    /// Also raise under-counted refcounts, rebuild the refcount structure when needed, fix
    /// COPIED flags and clear the dirty and corrupt bits once clean, like `-r all`.
    All,
}

/// The outcome of a check, with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found and not fixed (refcount too low, bad entries, COPIED mismatches).
    pub corruptions: u64,
    /// Leaked clusters found and not fixed (refcount too high).
    pub leaks: u64,
    /// Errors that prevented checking part of the image (I/O errors, unreadable tables).
    pub check_errors: u64,
    /// Corruptions repaired by this call.
    pub corruptions_fixed: u64,
    /// Leaks repaired by this call.
    pub leaks_fixed: u64,
    /// Offset just past the last host cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor in the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Per-item diagnostics in `qemu-img check`'s wording, in the order found. After a
    /// repair these are the diagnostics of the re-check.
    pub messages: Vec<String>,
    /// Whether the repair pass fixed something and a second, plain check ran afterwards
    /// (qemu-img's "Double checking the fixed image now..."); the counters are the re-check's
    /// except `corruptions_fixed` and `leaks_fixed`.
    pub rechecked: bool,
    /// Diagnostics of the repair pass when `rechecked` ("Repairing ..." lines and the like).
    pub repair_messages: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code for this report: 0 clean, 1 check errors, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

impl Image {
    /// Checks the image's metadata like `qemu-img check` and repairs what `fix` allows.
    /// `progress`, when given, is called with (done, total) units of work now and then.
    /// Repairs need a writable image (-EROFS otherwise). Waits for in-flight I/O; other
    /// calls wait for the check.
    pub fn check(
        &self,
        fix: CheckFix,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<CheckReport> {
        if fix == CheckFix::None {
            self.check_usable()?;
        } else {
            self.check_writable()?;
        }
        // Quiesce writers: in-place overwrites do not take the metadata mutex, and a repair
        // must not change COPIED flags or free clusters under a running write. Reads go on.
        let _gate = self.quiesce();
        let mut m = self.lock_meta();
        // Allocated-but-unlinked clusters would look like leaks: let those writers finish.
        // New claims are made under the metadata mutex, so none starts once we hold it idle.
        while self.inflight.claims() > 0 {
            drop(m);
            self.inflight.wait_idle();
            m = self.lock_meta();
        }
        if !self.is_read_only() {
            m.writeback(&self.file)?;
        }
        let header = m.header.clone();
        let (result, wrote) = check_file(&self.file, header, fix, progress);
        if wrote {
            // The repair changed metadata under the engine: start again from the disk.
            let reloaded = parse_header_cluster(&self.file).and_then(|h| {
                let (snaps, len) = super::snapshot::read_table(&self.file, &h)?;
                let fresh = Meta::load(&self.file, h, &snaps, len, Arc::clone(&self.view))?;
                // The repair may have rewritten the snapshot table.
                *self.snapshots.write().unwrap_or_else(|p| p.into_inner()) =
                    super::snapshot::Snapshots {
                        list: snaps,
                        table_len: len,
                    };
                Ok(fresh)
            });
            match reloaded {
                Ok(fresh) => *m = fresh,
                Err(e) => {
                    self.fence.fence();
                    return Err(Error::corrupt(format!(
                        "{}: reloading the metadata after the repair failed: {e}",
                        self.path.display()
                    )));
                }
            }
        }
        result
    }

    /// Checks the image file at `path` without opening it as an [`Image`], like
    /// `qemu-img check [-r leaks|all] [-U]`. With a repair (`fix` other than
    /// [`CheckFix::None`]) the file is opened read-write even when its dirty or corrupt bit is
    /// set (clearing them is part of the repair) and unknown autoclear bits are cleared; the
    /// bitmaps autoclear bit is kept because a check never changes guest data. Without a
    /// repair nothing is written. `force_share` (read-only checks only) ignores other
    /// writers' locks.
    pub fn check_path(
        path: impl AsRef<Path>,
        fix: CheckFix,
        force_share: bool,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<CheckReport> {
        let path = path.as_ref();
        let writable = fix != CheckFix::None;
        if writable && force_share {
            return Err(Error::invalid(
                "force-share can only be used with read-only images",
            ));
        }
        let name = path.display().to_string();
        let mut posix = PosixFile::open(path, writable, false)
            .map_err(|e| Error::io(format!("opening {name}"), e))?;
        let mode = if writable {
            LockMode::ReadWrite
        } else if force_share {
            LockMode::ForceShare
        } else {
            LockMode::ReadOnly
        };
        posix.lock(&name, mode)?;
        let file = HostFile::new(Arc::new(posix), name.clone());
        // Parsed as QEMU's check mode does: a refcount table of 0 clusters is accepted (and
        // rebuilt by a full repair).
        let mut header = parse_header_cluster(&file).map_err(|e| e.with_file(&name))?;
        // QEMU's check opens (and locks) the data file too, and fails without it. Held until
        // the check ends; data clusters have no refcounts, so nothing is read from it.
        let opts = crate::OpenOptions {
            writable,
            force_share,
            ..crate::OpenOptions::default()
        };
        let _data = super::datafile::open(&header, &name, &opts)?;
        // Known bits stay: bitmaps (the repair keeps them) and a raw data file (untouched).
        let known = AUTOCLEAR_BITMAPS | (header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW);
        let unknown_autoclear = header.autoclear_features & !known;
        if writable && unknown_autoclear != 0 {
            let keep = header.autoclear_features & known;
            file.write_header_fields(&layout::AUTOCLEAR_FEATURES.update(header.version, keep)?)?;
            file.sync()?;
            header.autoclear_features = keep;
        }
        check_file(&file, header, fix, progress).0
    }
}

/// Checks (and repairs) the image in `file` described by `header`. Returns the report and
/// whether anything was written (also when the check then failed).
pub(super) fn check_file(
    file: &HostFile,
    header: Header,
    fix: CheckFix,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> (Result<CheckReport>, bool) {
    let mut noop = |_: u64, _: u64| {};
    let progress: &mut dyn FnMut(u64, u64) = match progress {
        Some(p) => p,
        None => &mut noop,
    };
    let mut wrote = false;
    let first = one_pass(file, header, fix, &mut *progress, &mut wrote);
    let mut first = match first {
        Ok(r) => r,
        Err(e) => return (Err(e), wrote),
    };
    if fix == CheckFix::None || (first.corruptions_fixed == 0 && first.leaks_fixed == 0) {
        return (Ok(first), wrote);
    }
    // Double check the fixed image with a plain pass over what is now on disk.
    let again = parse_header_cluster(file)
        .and_then(|h| one_pass(file, h, CheckFix::None, progress, &mut wrote));
    match again {
        Ok(mut r) => {
            r.corruptions_fixed = first.corruptions_fixed;
            r.leaks_fixed = first.leaks_fixed;
            r.rechecked = true;
            r.repair_messages = std::mem::take(&mut first.messages);
            (Ok(r), wrote)
        }
        Err(e) => (Err(e), wrote),
    }
}

/// One check pass. A snapshot table that cannot be read ends the check with a check error;
/// entries QEMU's repair fixes (incomplete v3 extra data, excess extra data) are counted as
/// corruptions and, with [`CheckFix::All`], fixed by rewriting the table after the refcount
/// repair, as `qemu-img check -r all` does.
fn one_pass(
    file: &HostFile,
    header: Header,
    fix: CheckFix,
    progress: &mut dyn FnMut(u64, u64),
    wrote: &mut bool,
) -> Result<CheckReport> {
    let repair = fix == CheckFix::All;
    let table = match super::snapshot::read_table_for_check(file, &header, repair) {
        Ok(t) => t,
        Err(e) => {
            return Ok(CheckReport {
                check_errors: 1,
                messages: vec![format!("ERROR failed to read the snapshot table: {e}")],
                ..CheckReport::default()
            })
        }
    };
    if table.unreadable {
        return Ok(CheckReport {
            check_errors: 1,
            messages: table.messages,
            ..CheckReport::default()
        });
    }
    let mut msgs = table.messages;
    if header.bitmaps.is_some() && header.bitmaps_in_use().is_none() {
        // QEMU's open warns about a stale bitmaps extension; its clusters are leaks here.
        msgs.push(format!("Warning: {}", super::bitmap::lifecycle::STALE_HINT));
    }
    let mut snapshot_corruptions = table.extra_data_dropped + u64::from(table.overhanging > 0);
    for (i, s) in table.snapshots.iter().enumerate() {
        if s.is_incomplete(header.version) {
            let what = if repair { "Repairing" } else { "ERROR" };
            msgs.push(format!("{what} snapshot table entry {i} is incomplete"));
            snapshot_corruptions += 1;
        }
    }
    let mut c = walk::Checker::new(file, header, table.snapshots, table.len, progress);
    c.msgs = msgs;
    c.snapshot_corruptions = snapshot_corruptions;
    let r = c.run(fix);
    *wrote |= c.wrote;
    let mut r = r?;
    r.corruptions += snapshot_corruptions;
    if repair && snapshot_corruptions > 0 {
        match c.rewrite_snapshot_table() {
            Ok(()) => {
                r.corruptions -= snapshot_corruptions;
                r.corruptions_fixed += snapshot_corruptions;
                // The dirty and corrupt bits go only once the table is sound on disk.
                if r.check_errors == 0 && r.corruptions == 0 {
                    if let Err(e) = c.mark_clean() {
                        r.check_errors += 1;
                        c.msg(format!("ERROR failed to mark the image clean: {e}"));
                    }
                }
            }
            Err(e) => {
                r.check_errors += 1;
                c.msg(format!("ERROR failed to update the snapshot table: {e}"));
            }
        }
        *wrote |= c.wrote;
    }
    r.messages = std::mem::take(&mut c.msgs);
    Ok(r)
}
