//! `oxcow`: a qemu-img-style command line over the oxcow engine.
//!
//! Thin by design: argument parsing and printing; all image work is done by the library.
//! Every subcommand answers `--help` with its options and examples, rejects unknown options,
//! and exits 0 on success and 1 on any error (like qemu-img), with a message on stderr.

use std::process::ExitCode;

#[macro_use]
mod out;

mod amend;
mod args;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compress_pipe;
mod convert;
mod create;
mod info;
mod json;
mod map;
mod measure;
mod nbd;
mod progress;
mod rebase;
mod resize;
mod snapshot;

use args::{CliError, CliResult};

const USAGE: &str = "\
oxcow - qcow2 disk images without QEMU

Usage: oxcow COMMAND [OPTIONS] ...

Commands:
  create    create a qcow2 image (optionally over a backing file)
  info      describe an image (human or --output json, like qemu-img info)
  map       show where each guest range comes from (like qemu-img map)
  measure   size a new image would need (like qemu-img measure)
  convert   copy an image to a new qcow2 or raw image, optionally compressed
  check     check an image's metadata, optionally repair it
  resize    grow or shrink an image (like qemu-img resize)
  commit    commit an overlay into its backing file (like qemu-img commit)
  rebase    change or remove the backing file (like qemu-img rebase)
  amend     change compat, lazy_refcounts or refcount_bits (like qemu-img amend)
  snapshot  list, create, apply or delete internal snapshots (like qemu-img snapshot)
  bench     measure I/O throughput through the engine (like qemu-img bench)
  bitmap    add, remove, clear, enable, disable or merge persistent dirty bitmaps
  nbd       serve an image over NBD (like qemu-nbd)

Run 'oxcow COMMAND --help' for the options of a command and examples.
Sizes accept suffixes k, M, G, T (powers of 1024): 64k, 512M, 10G.

Exit codes: 0 success, 1 error (the message on stderr says what and where);
'check' follows qemu-img check (0 clean, 2 corruptions, 3 leaks, ...).
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(1);
    };
    let rest = &argv[1..];
    let wants_help = rest.iter().any(|a| a == "-h" || a == "--help");
    let help = match cmd.as_str() {
        "create" => Some(create::HELP),
        "info" => Some(info::HELP),
        "map" => Some(map::HELP),
        "measure" => Some(measure::HELP),
        "convert" => Some(convert::HELP),
        "bench" => Some(bench::HELP),
        "resize" => Some(resize::HELP),
        "commit" => Some(commit::HELP),
        "rebase" => Some(rebase::HELP),
        "amend" => Some(amend::HELP),
        "snapshot" => Some(snapshot::HELP),
        "bitmap" => Some(bitmap::HELP),
        "nbd" => Some(nbd::HELP),
        _ => None,
    };
    if let (true, Some(h)) = (wants_help, help) {
        out!("{h}");
        return ExitCode::SUCCESS;
    }
    let result: CliResult<u8> = match cmd.as_str() {
        "create" => create::run(rest).map(|()| 0),
        "info" => info::run(rest).map(|()| 0),
        "map" => map::run(rest).map(|()| 0),
        "measure" => measure::run(rest).map(|()| 0),
        "convert" => convert::run(rest).map(|()| 0),
        "bench" => bench::run(rest).map(|()| 0),
        "resize" => resize::run(rest).map(|()| 0),
        "commit" => commit::run(rest).map(|()| 0),
        "rebase" => rebase::run(rest).map(|()| 0),
        "amend" => amend::run(rest).map(|()| 0),
        "snapshot" => snapshot::run(rest).map(|()| 0),
        "bitmap" => bitmap::run(rest).map(|()| 0),
        "nbd" => nbd::run(rest).map(|()| 0),
        "check" => check::run(rest).map_err(CliError::op),
        "-h" | "--help" | "help" => {
            out!("{USAGE}");
            Ok(0)
        }
        "-V" | "--version" | "version" => {
            outln!("oxcow version {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(CliError::usage(format!(
            "unknown command '{other}' (commands: create, info, map, measure, convert, check, resize, commit, rebase, amend, bench, snapshot, bitmap, nbd)"
        ))),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("oxcow: {e}");
            if e.usage {
                let hint = if help.is_some() {
                    format!("Try 'oxcow {cmd} --help'.")
                } else {
                    "Try 'oxcow --help'.".to_string()
                };
                eprintln!("{hint}");
            }
            ExitCode::from(1)
        }
    }
}

/// Rejects any image format other than qcow2 for commands that only read qcow2.
fn require_qcow2(cmd: &str, fmt: &str) -> CliResult<()> {
    if fmt == "qcow2" {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "{cmd}: only qcow2 images are supported, not '{fmt}'"
        )))
    }
}

/// Parses `--output human|json`; true for JSON.
fn parse_output(cmd: &str, v: &str) -> CliResult<bool> {
    match v {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => Err(CliError::usage(format!(
            "{cmd}: --output must be human or json, not '{v}'"
        ))),
    }
}

/// The format of `image`'s backing file `next`: the one `image` records, always; otherwise
/// guessed from `next`'s first bytes like qemu-img, unless `no_probe` forbids guessing.
fn backing_format(
    image: &str,
    recorded: Option<&str>,
    next: &str,
    no_probe: bool,
) -> CliResult<&'static str> {
    match recorded {
        Some("qcow2") => Ok("qcow2"),
        Some("raw") | Some("file") => Ok("raw"),
        Some(other) => Err(CliError::op(format!(
            "'{image}': backing file format '{other}' is not supported"
        ))),
        None if no_probe => Err(CliError::op(format!(
            "'{image}': the format of backing file '{next}' is not recorded and --no-probe forbids guessing it"
        ))),
        None => convert::probe(next),
    }
}

/// The path qemu-img calls full-backing-filename: a relative backing name is relative to the
/// directory of the image that names it; an absolute one (or a protocol name) is kept as is.
fn resolve_backing(image: &str, backing: &str) -> String {
    if backing.starts_with('/') || backing.contains(':') {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}{backing}", &image[..=i]),
        None => backing.to_string(),
    }
}
