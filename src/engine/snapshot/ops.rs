//! The bodies of create, apply and delete (see the module documentation for their write
//! order). Called with writers quiesced and the metadata mutex held.

use super::super::meta::Meta;
use super::super::Image;
use super::{table, tree, Snapshots};
use crate::error::{unsupported, Error, ErrorKind, Result};
use crate::format::entry::L1Entry;
use crate::format::header::{layout, MAX_SNAPSHOTS};
use crate::format::snapshot::Snapshot;
use crate::format::HostOffset;
use crate::storage::WriteKind;

/// Refuses a snapshot whose table entry is damaged (QEMU validates the L1 table first too).
pub(super) fn check_usable_entry(img: &Image, s: &Snapshot) -> Result<()> {
    match s.l1_problem(img.geo.cluster_size()) {
        Some(p) => Err(Error::corrupt(format!(
            "{}: cannot use snapshot: {p}",
            img.path.display()
        ))),
        None => Ok(()),
    }
}

/// What apply supports: an intact entry for the current virtual size (the caller resized the
/// image to the snapshot's first) whose L1 table fits the active one.
pub(super) fn check_applicable(img: &Image, s: &Snapshot) -> Result<()> {
    check_usable_entry(img, s)?;
    let disk = s.disk_size.unwrap_or(img.virtual_size());
    if disk != img.virtual_size() {
        return unsupported!(
            "snapshot '{}' has a disk size of {disk} bytes and the image {} bytes (it was resized meanwhile)",
            s.name,
            img.virtual_size()
        );
    }
    if s.l1_size as usize > img.view.l1_len() {
        return unsupported!(
            "snapshot '{}' has a larger L1 table ({} entries) than the image ({}): growing the L1 table is not supported yet",
            s.name,
            s.l1_size,
            img.view.l1_len()
        );
    }
    Ok(())
}

/// The numeric value QEMU reads from an id (`strtoul`: the leading decimal digits after
/// blanks, 0 when there are none, saturating).
fn id_value(id: &str) -> u64 {
    id.trim_start()
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0u64, |v, d| {
            v.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        })
}

/// The next id QEMU would give: one more than the largest numeric id.
fn next_id(list: &[Snapshot]) -> String {
    let max = list.iter().map(|s| id_value(&s.id)).max().unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// The creation time as qemu-img records it (microsecond resolution).
fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // The on-disk field is 32 bits wide, like QEMU's.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

/// Runs `f` with the snapshots withdrawn from the overlap guard, and puts back the ones
/// that exist afterwards whatever the outcome.
fn unguarded<T>(
    img: &Image,
    m: &mut Meta,
    snaps: &mut Snapshots,
    f: impl FnOnce(&mut Meta, &mut Snapshots) -> Result<T>,
) -> Result<T> {
    m.writeback(&img.file)?;
    table::unindex(img, &snaps.list)?;
    let r = f(m, snaps);
    let g = table::reindex(img, &snaps.list);
    let r = r?;
    g.map(|()| r)
}

/// Creates a snapshot of the active state named `name`.
pub(super) fn create(
    img: &Image,
    m: &mut Meta,
    snaps: &mut Snapshots,
    name: &str,
) -> Result<Snapshot> {
    if snaps.list.len() >= MAX_SNAPSHOTS as usize {
        return Err(Error::new(ErrorKind::NoSpace, "too many snapshots"));
    }
    unguarded(img, m, snaps, |m, snaps| {
        let file = &img.file;
        let l1 = img.view.l1_words(0, img.view.l1_len());
        // The copy keeps the entries as they are, COPIED flags included, as QEMU's does.
        let l1_off = if l1.is_empty() {
            HostOffset::ZERO
        } else {
            let off =
                m.rc.alloc(file, img.geo.clusters_for(l1.len() as u64 * 8))?;
            file.write(
                &crate::format::be::u64_table_bytes(&l1),
                off,
                WriteKind::Data,
            )?;
            off
        };
        if let Err(e) = share_tree(img, m, &l1) {
            // Nothing points at the copy: give it back and restore the flags.
            let first = l1_off.cluster(&img.geo).0;
            for c in first..first + img.geo.clusters_for(l1.len() as u64 * 8) {
                let _ = m.rc.update(file, crate::format::HostCluster(c), -1);
            }
            let _ = tree::fix_copied(img, m).and_then(|()| m.writeback(file));
            return Err(e);
        }
        let s = Snapshot::new(
            &next_id(&snaps.list),
            name,
            (l1_off.get(), l1.len() as u32),
            now(),
            img.virtual_size(),
        );
        let mut list = snaps.list.clone();
        list.push(s.clone());
        table::replace(img, m, snaps, list)?;
        m.writeback(file)?;
        Ok(s)
    })
}

/// Clears COPIED in the active tree, then adds the snapshot's reference to everything in
/// it, each step durable (all references or none are added).
fn share_tree(img: &Image, m: &mut Meta, l1: &[u64]) -> Result<()> {
    tree::clear_copied(img, m, l1, true)?;
    m.writeback(&img.file)?;
    tree::add_refs(img, m, l1)?;
    m.writeback(&img.file)
}

/// Makes snapshot `s` (validated) the active state.
pub(super) fn apply(img: &Image, m: &mut Meta, snaps: &mut Snapshots, s: &Snapshot) -> Result<()> {
    unguarded(img, m, snaps, |m, _| {
        let file = &img.file;
        let len = img.view.l1_len();
        if len == 0 {
            return Ok(()); // a disk of size 0: nothing is mapped either way
        }
        let old = img.view.l1_words(0, len);
        let old_off = HostOffset::new(m.header.l1_table_offset);
        let mut new = table::read_l1(img, s, len)?;
        tree::clear_copied(img, m, &new, false)?;
        m.writeback(file)?;
        tree::add_refs(img, m, &new)?;
        // Every table of the new tree is shared with the snapshot now.
        for e in &mut new {
            *e = L1Entry(*e).with_copied(false).0;
        }
        let new_off = m.rc.alloc(file, img.geo.clusters_for(len as u64 * 8))?;
        m.writeback(file)?;
        file.write(
            &crate::format::be::u64_table_bytes(&new),
            new_off,
            WriteKind::Data,
        )?;
        file.sync()?;
        let update = layout::L1_TABLE_OFFSET.update(m.header.version, new_off.get())?;
        table::switch_header(img, &update)?;
        m.replace_active_l1(new_off, &new);
        table::move_active(img, old_off, &old, new_off);
        m.deferred_frees.push((
            old_off,
            img.geo.clusters_for(len as u64 * 8) * img.geo.cluster_size(),
        ));
        tree::drop_refs(img, m, &old)?;
        m.writeback(file)?;
        tree::fix_copied(img, m)?;
        m.writeback(file)
    })
}

/// Deletes snapshot number `i` (validated).
pub(super) fn delete(img: &Image, m: &mut Meta, snaps: &mut Snapshots, i: usize) -> Result<()> {
    unguarded(img, m, snaps, |m, snaps| {
        let file = &img.file;
        let s = snaps.list[i].clone();
        let l1 = table::read_l1(img, &s, s.l1_size as usize)?;
        let mut list = snaps.list.clone();
        list.remove(i);
        table::replace(img, m, snaps, list)?;
        // From here on a failure leaks clusters, nothing worse.
        tree::drop_refs(img, m, &l1)?;
        if s.l1_size > 0 {
            let bytes = img.geo.clusters_for(u64::from(s.l1_size) * 8) * img.geo.cluster_size();
            m.deferred_frees
                .push((HostOffset::new(s.l1_table_offset), bytes));
        }
        m.writeback(file)?;
        tree::fix_copied(img, m)?;
        m.writeback(file)
    })
}

#[cfg(test)]
mod tests {
    use super::id_value;

    #[test]
    fn ids_are_read_like_strtoul() {
        assert_eq!(id_value("12"), 12);
        assert_eq!(id_value(" 7abc"), 7);
        assert_eq!(id_value("abc"), 0);
        assert_eq!(id_value(""), 0);
    }
}
