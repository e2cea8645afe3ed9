//! `oxcow amend`: qemu-img amend over the engine (offline).
//!
//! `oxcow amend [-q] [-p] [-f qcow2] -o OPTIONS FILE`, with qemu-img's syntax and messages.

use crate::args::{opt, parse_bool, scan, Arg, CliError, CliResult};
use oxcow::AmendOptions;

/// `oxcow amend --help`.
pub const HELP: &str = "\
Usage: oxcow amend [-q] [-p] [-f qcow2] -o OPTIONS FILE
  Change format options of a qcow2 image that no other program has open, like
  qemu-img amend. OPTIONS is a comma-separated list (-o may be repeated):
  compat=0.10|1.1          the qcow2 version (v2 or v3). A downgrade expands zero clusters
                           and needs refcount_bits=16; features version 2 cannot hold
                           (extended L2, bitmaps, ...) refuse it
  lazy_refcounts=on|off    postpone refcount updates (version 3 only)
  refcount_bits=N          refcount width: 1, 2, 4, 8, 16, 32 or 64 (not 16: version 3
                           only); the refcount structures are rewritten crash-safely
  size=SIZE                new virtual size (a multiple of 512; smaller shrinks, as
                           qemu-img amend does)
  -o help                  list these options
  backing_file and backing_fmt cannot be amended (as in qemu-img 10): use 'oxcow rebase'.
  -f qcow2  the image format (only qcow2)
  -p, -q    accepted for compatibility (no progress is shown)
Examples:
  oxcow amend -o compat=0.10 disk.qcow2
  oxcow amend -o refcount_bits=64,lazy_refcounts=on disk.qcow2
";

/// `oxcow amend -o help`.
const OPTIONS_HELP: &str = "\
Amend options for 'qcow2':
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Runs `oxcow amend ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let specs = [
        opt(&["-q", "--quiet"], false),
        opt(&["-p", "--progress"], false),
        opt(&["--force"], false),
        opt(&["-f", "--format"], true),
        opt(&["-o", "--options"], true),
    ];
    let (mut options, mut file) = (Vec::new(), None);
    for arg in scan("amend", args, &specs)? {
        match arg {
            Arg::Opt("-f", Some(fmt)) => crate::require_qcow2("amend", &fmt)?,
            Arg::Opt("-o", Some(o)) => options.push(o),
            Arg::Pos(p) if file.is_none() => file = Some(p),
            Arg::Pos(p) => {
                return Err(CliError::usage(format!("amend: unexpected argument '{p}'")))
            }
            Arg::Opt(..) => {}
        }
    }
    if options
        .iter()
        .any(|o| o.split(',').any(|kv| kv == "help" || kv == "?"))
    {
        out!("{OPTIONS_HELP}");
        return Ok(());
    }
    if options.is_empty() {
        return Err(CliError::usage("Must specify options (-o)"));
    }
    let Some(file) = file else {
        return Err(CliError::usage("Expecting one image file name"));
    };
    let opts = parse_options(&options.join(","))?;
    oxcow::amend(std::path::Path::new(&file), &opts).map_err(|e| CliError::op(e.message()))
}

/// Parses qemu-img's `key=value,...` amend options for qcow2, with its messages.
fn parse_options(list: &str) -> CliResult<AmendOptions> {
    let mut o = AmendOptions::default();
    for kv in list.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "compat" => {
                o.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(CliError::op(format!("Unknown compatibility level {v}"))),
                })
            }
            "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(k, v)?),
            "refcount_bits" => {
                o.refcount_bits = Some(v.parse().map_err(|_| {
                    CliError::op(
                        "Parameter 'refcount_bits' expects a non-negative number below 2^64",
                    )
                })?)
            }
            "backing_file" | "backing_fmt" => {
                return Err(CliError::op(
                    "Cannot amend the backing file\nYou can use 'oxcow rebase' instead.",
                ))
            }
            "size" => {
                o.size = Some(crate::args::parse_size(v).map_err(|_| {
                    CliError::op(
                        "Parameter 'size' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively.",
                    )
                })?)
            }
            "data_file" | "data_file_raw" => {
                return Err(CliError::op(format!(
                    "Amending '{k}' is not supported by oxcow"
                )))
            }
            "cluster_size" | "preallocation" | "extended_l2" | "compression_type"
            | "encryption" | "encrypt.format" | "nocow" => {
                return Err(CliError::op(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )))
            }
            _ => return Err(CliError::op(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_like_qemu_img() {
        let o = parse_options("compat=v2,lazy_refcounts=off,refcount_bits=16").unwrap();
        assert_eq!(o.version, Some(2));
        assert_eq!(o.lazy_refcounts, Some(false));
        assert_eq!(o.refcount_bits, Some(16));
        assert!(parse_options("compat=2").is_err());
        assert!(parse_options("foo=1").is_err());
        assert!(parse_options("backing_file=x").is_err());
    }
}
