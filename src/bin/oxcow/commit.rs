//! `oxcow commit`: qemu-img commit over the engine.
//!
//! `oxcow commit [-q] [-p] [-f qcow2] [-b BASE] [-d] FILE`, with qemu-img's syntax and
//! messages.

use crate::args::{opt, scan, Arg, CliError, CliResult};
use crate::progress::Progress;
use oxcow::{CommitOptions, Image, OpenOptions};
use std::cell::RefCell;
use std::path::PathBuf;

/// `oxcow commit --help`.
pub const HELP: &str = "\
Usage: oxcow commit [-q] [-p] [-f qcow2] [-b BASE] [-d] FILE
  Commit the changes recorded in FILE into its backing file, like qemu-img commit:
  data is copied, zero clusters become zeros, unallocated ranges are left alone; a
  backing file shorter than FILE is grown. Afterwards FILE is emptied (it reads through
  to the backing file), unless -d is given.
  -b BASE    commit into BASE, an image deeper in FILE's backing chain (implies -d: the
             images between FILE and BASE are left as they are)
  -d         do not empty FILE after the commit
  -p         show progress
  -q         quiet: do not print 'Image committed.'
  -f qcow2   the format of FILE (only qcow2)
Examples:
  oxcow commit overlay.qcow2
  oxcow commit -d -p overlay.qcow2
  oxcow commit -b base.qcow2 top.qcow2
";

/// Runs `oxcow commit ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let specs = [
        opt(&["-q", "--quiet"], false),
        opt(&["-p", "--progress"], false),
        opt(&["-d", "--drop"], false),
        opt(&["-f", "--format"], true),
        opt(&["-b", "--base"], true),
    ];
    let (mut quiet, mut progress, mut keep) = (false, false, false);
    let (mut base, mut file) = (None, None);
    for arg in scan("commit", args, &specs)? {
        match arg {
            Arg::Opt("-q", _) => quiet = true,
            Arg::Opt("-p", _) => progress = true,
            Arg::Opt("-d", _) => keep = true,
            Arg::Opt("-f", Some(fmt)) => crate::require_qcow2("commit", &fmt)?,
            Arg::Opt("-b", Some(b)) => base = Some(PathBuf::from(b)),
            Arg::Pos(p) if file.is_none() => file = Some(p),
            Arg::Pos(p) => {
                return Err(CliError::usage(format!(
                    "commit: unexpected argument '{p}'"
                )))
            }
            Arg::Opt(..) => {}
        }
    }
    let Some(file) = file else {
        return Err(CliError::usage("Expecting one image file name"));
    };
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = Image::open(&file, &opts)
        .map_err(|e| CliError::op(format!("Could not open '{file}': {e}")))?;
    // qemu-img shows no progress with -q.
    let shown = RefCell::new(Progress::new(progress && !quiet));
    let report = |done: u64, total: u64| shown.borrow_mut().update(done, total);
    img.commit(&CommitOptions {
        base,
        keep_top: keep,
        progress: Some(&report),
    })?;
    img.close()?;
    shown.borrow_mut().finish();
    if !quiet {
        outln!("Image committed.");
    }
    Ok(())
}
