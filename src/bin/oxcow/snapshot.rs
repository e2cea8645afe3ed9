//! `oxcow snapshot`: list, create, apply and delete internal snapshots, with qemu-img
//! snapshot's syntax, output and messages.

use crate::args::opt;
use crate::args::{scan, Arg, CliError, CliResult, OptSpec};
use oxcow::{ErrorKind, Image, OpenOptions};

/// `oxcow snapshot --help`.
pub const HELP: &str = "\
Usage: oxcow snapshot [-f qcow2] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] [-U] [-q] FILE

List or manipulate the internal snapshots of a qcow2 image, like 'qemu-img snapshot'.

Operation, one of:
  -l, --list              list the snapshots (the default)
  -c, --create SNAPSHOT   create a snapshot named SNAPSHOT of the current disk state
  -a, --apply SNAPSHOT    revert the disk to SNAPSHOT (an id, else a name)
  -d, --delete SNAPSHOT   delete the snapshot named SNAPSHOT

Options:
  -f FMT              image format; only qcow2 is accepted
  -U, --force-share   list even if another process holds the image (listing only)
  -q, --quiet         quiet operation
  -h, --help          this text

Examples:
  oxcow snapshot -c before-upgrade disk.qcow2
  oxcow snapshot -l disk.qcow2
  oxcow snapshot -a before-upgrade disk.qcow2
  oxcow snapshot -d before-upgrade disk.qcow2
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["-l", "--list"], false),
    opt(&["-c", "--create"], true),
    opt(&["-a", "--apply"], true),
    opt(&["-d", "--delete"], true),
    opt(&["-U", "--force-share"], false),
    opt(&["-q", "--quiet"], false),
];

/// The requested operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

struct Args {
    op: Op,
    force_share: bool,
    file: String,
}

fn parse(args: &[String]) -> CliResult<Args> {
    let mut op: Option<Op> = None;
    let mut force_share = false;
    let mut files = Vec::new();
    let mix = || CliError::usage("Cannot mix '-l', '-a', '-c', '-d'");
    for a in scan("snapshot", args, SPECS)? {
        let next = match a {
            Arg::Opt("-f", Some(f)) => {
                crate::require_qcow2("snapshot", &f)?;
                None
            }
            Arg::Opt("-l", _) => Some(Op::List),
            Arg::Opt("-c", Some(n)) => Some(Op::Create(n)),
            Arg::Opt("-a", Some(n)) => Some(Op::Apply(n)),
            Arg::Opt("-d", Some(n)) => Some(Op::Delete(n)),
            Arg::Opt("-U", _) => {
                force_share = true;
                None
            }
            Arg::Opt(..) => None, // -q: nothing is printed on success anyway
            Arg::Pos(p) => {
                files.push(p);
                None
            }
        };
        if let Some(n) = next {
            if op.is_some() {
                return Err(mix());
            }
            op = Some(n);
        }
    }
    let [file] = <[String; 1]>::try_from(files)
        .map_err(|_| CliError::usage("Expecting one image file name"))?;
    Ok(Args {
        op: op.unwrap_or(Op::List),
        force_share,
        file,
    })
}

/// Runs `oxcow snapshot ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let a = parse(args)?;
    let writable = a.op != Op::List;
    if writable && a.force_share {
        return Err(CliError::op(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.file
        )));
    }
    let img = Image::open(
        &a.file,
        &OpenOptions {
            writable,
            force_share: a.force_share,
            // qemu-img snapshot -d gives the clusters it frees back to the file system
            // (QEMU's pass-discard-snapshot defaults to on).
            discard_unmap: matches!(a.op, Op::Delete(_)),
            ..OpenOptions::default()
        },
    )
    .map_err(|e| CliError::op(format!("Could not open '{}': {e}", a.file)))?;
    match &a.op {
        Op::List => {
            let list = img.snapshot_list();
            if !list.is_empty() {
                crate::info::print_snapshot_list(&list);
            }
        }
        Op::Create(n) => {
            img.snapshot_create(n)
                .map_err(|e| CliError::op(format!("Could not create snapshot '{n}': {e}")))?;
        }
        Op::Apply(n) => img.snapshot_apply(n).map_err(|e| {
            let why = match e.kind() {
                ErrorKind::NotFound => {
                    "Failed to load snapshot: No such file or directory".to_string()
                }
                _ => e.to_string(),
            };
            CliError::op(format!("Could not apply snapshot '{n}': {why}"))
        })?,
        Op::Delete(n) => delete(&img, n)?,
    }
    img.close()
        .map_err(|e| CliError::op(format!("{}: {e}", a.file)))
}

/// `-d NAME`: qemu-img looks the snapshot up by name only, then deletes it by its id.
fn delete(img: &Image, name: &str) -> CliResult<()> {
    let Some(s) = img.snapshot_list().into_iter().find(|s| s.name == name) else {
        return Err(CliError::op(format!(
            "Could not delete snapshot '{name}': snapshot not found"
        )));
    };
    img.snapshot_delete(&s.id)
        .map_err(|e| CliError::op(format!("Could not delete snapshot '{name}': {e}")))
}

/// Which snapshot `convert -l` (or `-s`) reads: `snapshot.id=ID`, `snapshot.name=NAME` (both
/// must match when both are given), or a bare id-or-name, as qemu-img parses `-l`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    id: Option<String>,
    name: Option<String>,
    either: Option<String>,
}

impl Selector {
    /// Parses a `-l` argument.
    pub fn parse(arg: &str) -> CliResult<Selector> {
        if !arg.starts_with("snapshot.") {
            return Ok(Selector::bare(arg));
        }
        let mut s = Selector::default();
        for part in arg.split(',') {
            let bad = || {
                CliError::usage(format!(
                    "Invalid parameter '{}'\nFailed in parsing snapshot param '{arg}'",
                    part.split('=').next().unwrap_or(part)
                ))
            };
            match part.split_once('=') {
                Some(("snapshot.id", v)) => s.id = Some(v.to_string()),
                Some(("snapshot.name", v)) => s.name = Some(v.to_string()),
                _ => return Err(bad()),
            }
        }
        Ok(s)
    }

    /// A bare id-or-name (`-s NAME`, `-l NAME`).
    pub fn bare(key: &str) -> Selector {
        Selector {
            either: Some(key.to_string()),
            ..Selector::default()
        }
    }

    /// The id of the selected snapshot of `img`.
    pub fn resolve(&self, img: &Image) -> CliResult<String> {
        let list = img.snapshot_list();
        let found = match &self.either {
            Some(k) => list
                .iter()
                .find(|s| &s.id == k)
                .or_else(|| list.iter().find(|s| &s.name == k)),
            None => list.iter().find(|s| {
                self.id.as_ref().is_none_or(|i| &s.id == i)
                    && self.name.as_ref().is_none_or(|n| &s.name == n)
            }),
        };
        found
            .map(|s| s.id.clone())
            .ok_or_else(|| CliError::op("Failed to load snapshot: Can't find snapshot"))
    }
}
