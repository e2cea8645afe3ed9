//! oxcow_check(): `qemu-img check` on an open handle.

use super::error::{einval, oxcow_error};
use super::image::{oxcow_image, with_image};
use super::types::*;
use crate::{CheckFix, CheckReport, Image};
use std::ffi::c_int;

/// Maps OXCOW_CHECK_FIX_* bits to a repair mode: ERRORS (alone or with LEAKS) repairs
/// everything, LEAKS alone only leaks, 0 nothing.
fn fix_mode(fix: u32) -> CheckFix {
    if fix & OXCOW_CHECK_FIX_ERRORS != 0 {
        CheckFix::All
    } else if fix & OXCOW_CHECK_FIX_LEAKS != 0 {
        CheckFix::Leaks
    } else {
        CheckFix::None
    }
}

/// The C view of a report.
fn to_c(r: &CheckReport) -> oxcow_check_result {
    oxcow_check_result {
        struct_size: CHECK_RESULT_V1_SIZE,
        reserved: 0,
        corruptions: r.corruptions,
        leaks: r.leaks,
        check_errors: r.check_errors,
        corruptions_fixed: r.corruptions_fixed,
        leaks_fixed: r.leaks_fixed,
        total_clusters: r.total_clusters,
        allocated_clusters: r.allocated_clusters,
        fragmented_clusters: r.fragmented_clusters,
        compressed_clusters: r.compressed_clusters,
        image_end_offset: r.image_end_offset,
    }
}

/// Checks the image's metadata consistency like `qemu-img check` and fills `*out`
/// (initialised with oxcow_check_result_init()) with qemu-img's counters.
///
/// `fix` is 0 (report only; nothing is written), OXCOW_CHECK_FIX_LEAKS (lower over-counted
/// refcounts, like `qemu-img check -r leaks`) or OXCOW_CHECK_FIX_ERRORS, alone or with LEAKS
/// (also raise under-counted refcounts, rebuild the refcount structure when needed, fix
/// COPIED flags and clear the dirty and corrupt bits once clean, like `-r all`). After a
/// repair that fixed something a second, plain check runs: the counters are the re-check's,
/// `corruptions_fixed`/`leaks_fixed` come from the repair.
///
/// The check waits for in-flight writes and holds the metadata lock, so other calls on the
/// handle wait for it. A result with `check_errors > 0` (for example "need to rebuild refcount
/// structures" under LEAKS alone) still returns 0: inspect the counters (qemu-img's exit codes
/// are 1 for check_errors, 2 for corruptions, 3 for leaks only). On success
/// `out->struct_size` is set to the bytes filled.
///
/// Returns 0, or -EINVAL (NULL handle or out, short struct_size, unknown fix bits), -EROFS (a
/// repair on a read-only handle), -ENOMEDIUM (fenced handle), -EIO and other I/O errors,
/// -ENOMEM (an image file too large to check), -EUCLEAN (the metadata could not be reloaded
/// after a repair; the handle is fenced).
///
/// # Safety
/// `img` is NULL or a live handle; `out` is NULL or points to an initialised
/// `oxcow_check_result`; `err` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn oxcow_check(
    img: *mut oxcow_image,
    fix: u32,
    out: *mut oxcow_check_result,
    err: *mut *mut oxcow_error,
) -> c_int {
    let body = |image: &Image| {
        if out.is_null() {
            return einval("out is NULL");
        }
        // SAFETY: non-NULL and initialised per the contract.
        unsafe { super::check_out_size(out, "oxcow_check_result") }?;
        super::check_flags(
            fix,
            OXCOW_CHECK_FIX_LEAKS | OXCOW_CHECK_FIX_ERRORS,
            "check fix",
        )?;
        let report = image.check(fix_mode(fix), None)?;
        // SAFETY: non-NULL, at least version-1 sized (checked above) and writable per the
        // contract.
        unsafe { out.write(to_c(&report)) };
        Ok(())
    };
    // SAFETY: `img` is NULL or live; `err` is NULL or writable, per the contract.
    unsafe { with_image(img, err, body) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_bits_map_to_modes() {
        assert_eq!(fix_mode(0), CheckFix::None);
        assert_eq!(fix_mode(OXCOW_CHECK_FIX_LEAKS), CheckFix::Leaks);
        assert_eq!(fix_mode(OXCOW_CHECK_FIX_ERRORS), CheckFix::All);
        assert_eq!(
            fix_mode(OXCOW_CHECK_FIX_LEAKS | OXCOW_CHECK_FIX_ERRORS),
            CheckFix::All
        );
    }
}
