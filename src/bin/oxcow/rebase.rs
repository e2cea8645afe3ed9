//! `oxcow rebase`: qemu-img rebase over the engine.
//!
//! `oxcow rebase [-q] [-p] [-u] [-f qcow2] [-b BACKING] [-F FMT] FILE`, with qemu-img's syntax
//! and messages. `-b ""` (or `-u` without `-b`) removes the backing file.

use crate::args::{opt, scan, Arg, CliError, CliResult};
use oxcow::{Image, OpenOptions};

/// `oxcow rebase --help`.
pub const HELP: &str = "\
Usage: oxcow rebase [-q] [-p] [-u] [-f qcow2] [-b BACKING] [-F BACKING_FMT] FILE
  Change the backing file of FILE, like qemu-img rebase.
  Safe mode (default): the guest-visible content of FILE does not change. The old and
  the new backing chains are compared wherever FILE is unallocated, and where they
  differ the old content is copied into FILE first. Both chains must be readable.
  -b BACKING  the new backing file (relative names are relative to FILE's directory);
              -b \"\" removes the backing file (safe mode copies its content into FILE)
  -F FMT      the new backing file's format (qcow2 or raw; required with a backing file)
  -u          unsafe mode: only the header changes; the content is not compared, and the
              old and new backing files need not exist (use it to fix a moved file).
              Without -b it removes the backing file.
  -f qcow2    the format of FILE (only qcow2)
  -p          accepted for compatibility (no progress is shown)
  -q          quiet
Examples:
  oxcow rebase -b base2.qcow2 -F qcow2 top.qcow2
  oxcow rebase -u -b /new/place/base.qcow2 -F qcow2 top.qcow2
  oxcow rebase -b \"\" top.qcow2
";

/// What `oxcow rebase` was asked to do.
struct RebaseArgs {
    file: String,
    backing: Option<String>,
    format: Option<String>,
    unsafe_mode: bool,
}

/// Runs `oxcow rebase ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let a = parse(args)?;
    // `-b ""` and `-u` without `-b` both remove the backing file.
    let name = a.backing.clone().filter(|b| !b.is_empty());
    let target = match (&name, &a.format) {
        (None, _) => None,
        (Some(n), Some(f)) => Some((n.as_str(), f.as_str())),
        (Some(n), None) => {
            return Err(CliError::op(format!(
                "Could not change the backing file to '{n}': backing format must be specified"
            )))
        }
    };
    if let Some(f) = &a.format {
        if !oxcow::is_known_backing_format(f) {
            return Err(CliError::op(format!("Invalid format name: '{f}'")));
        }
    }
    let opts = OpenOptions {
        writable: true,
        // An unsafe rebase changes the header only: the old chain need not open.
        no_backing: a.unsafe_mode,
        ..Default::default()
    };
    let img = Image::open(&a.file, &opts)
        .map_err(|e| CliError::op(format!("Could not open '{}': {e}", a.file)))?;
    img.rebase(target, a.unsafe_mode).map_err(|e| {
        let m = e.to_string();
        if m.starts_with("Could not open new backing file") {
            CliError::op(m)
        } else {
            let to = name.as_deref().unwrap_or("");
            CliError::op(format!("Could not change the backing file to '{to}': {m}"))
        }
    })?;
    img.close()?;
    Ok(())
}

/// The arguments, checked as qemu-img checks them.
fn parse(args: &[String]) -> CliResult<RebaseArgs> {
    let specs = [
        opt(&["-q", "--quiet"], false),
        opt(&["-p", "--progress"], false),
        opt(&["-u", "--unsafe"], false),
        opt(&["-f", "--format"], true),
        opt(&["-b", "--backing"], true),
        opt(&["-F", "--backing-format"], true),
    ];
    let (mut backing, mut format, mut unsafe_mode, mut file) = (None, None, false, None);
    for arg in scan("rebase", args, &specs)? {
        match arg {
            Arg::Opt("-u", _) => unsafe_mode = true,
            Arg::Opt("-f", Some(fmt)) => crate::require_qcow2("rebase", &fmt)?,
            Arg::Opt("-b", Some(b)) => backing = Some(b),
            Arg::Opt("-F", Some(f)) => format = Some(f),
            Arg::Pos(p) if file.is_none() => file = Some(p),
            Arg::Pos(p) => {
                return Err(CliError::usage(format!(
                    "rebase: unexpected argument '{p}'"
                )))
            }
            Arg::Opt(..) => {}
        }
    }
    let Some(file) = file else {
        return Err(CliError::usage("Expecting one image file name"));
    };
    if backing.is_none() && !unsafe_mode {
        return Err(CliError::usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    Ok(RebaseArgs {
        file,
        backing,
        format,
        unsafe_mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_backing_file_or_unsafe_mode_is_required() {
        let e = parse(&args(&["top.qcow2"])).err().unwrap();
        assert!(e.message.contains("Must specify backing file"), "{e}");
        let a = parse(&args(&["-u", "top.qcow2"])).unwrap();
        assert!(a.unsafe_mode && a.backing.is_none());
        let a = parse(&args(&["-b", "", "top.qcow2"])).unwrap();
        assert_eq!(a.backing.as_deref(), Some(""));
    }
}
