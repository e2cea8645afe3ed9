//! `oxcow bitmap` (qemu-img bitmap's syntax, messages and exit codes), the dirty-extent
//! listing behind `oxcow map --bitmap NAME`, and the bitmap copy of `oxcow convert --bitmaps`.
//! All the work is done by the library's bitmap API; this module parses and words messages the
//! way qemu-img does.

use crate::args::{opt, parse_size, scan, Arg, CliError, CliResult, OptSpec};
use oxcow::{
    BitmapAddOptions, BitmapInfo, CorruptionEvent, Error, ErrorKind, Image, OpenOptions,
    BITMAP_AUTO, BITMAP_INCONSISTENT, EXTENT_DIRTY,
};
use std::sync::Arc;

/// `oxcow bitmap --help`.
pub const HELP: &str = "\
Usage: oxcow bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
                    [-f qcow2] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY]
                    FILENAME BITMAP

Change the persistent dirty bitmap BITMAP of the qcow2 image FILENAME, like 'qemu-img bitmap'.
Several operations may be given; they are applied in order, and the first that fails stops the
command (the earlier ones stay done).

Operations:
  --add               create BITMAP, recording future writes (with --disable: not recording)
  --remove            remove BITMAP (inconsistent bitmaps too)
  --clear             clear every bit of BITMAP
  --enable            start recording writes to BITMAP
  --disable           stop recording writes to BITMAP
  --merge SOURCE      set in BITMAP every bit set in bitmap SOURCE

Options:
  -g, --granularity SIZE     bytes per bit for --add: a power of two from 512 to 2G
                             (default: the cluster size clamped to 4k..64k)
  -b, --source-file FILE     take --merge's SOURCE from the image FILE
  -F, --source-format FMT    format of -b's FILE (qcow2 or raw; default: probed)
  -f, --format FMT           format of FILENAME; only qcow2 is accepted
  -h, --help                 this text

Examples:
  oxcow bitmap --add disk.qcow2 backup
  oxcow bitmap --add -g 1M --disable disk.qcow2 frozen
  oxcow bitmap --merge backup --clear disk.qcow2 frozen
  oxcow bitmap --merge b -b other.qcow2 disk.qcow2 b
  oxcow map --bitmap backup --output json disk.qcow2   # the dirty ranges
";

const SPECS: &[OptSpec] = &[
    opt(&["--add"], false),
    opt(&["--remove"], false),
    opt(&["--clear"], false),
    opt(&["--enable"], false),
    opt(&["--disable"], false),
    opt(&["--merge"], true),
    opt(&["-g", "--granularity"], true),
    opt(&["-b", "--source-file"], true),
    opt(&["-F", "--source-format"], true),
    opt(&["-f", "--format"], true),
];

/// One operation of the command line, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    /// qemu-img's name of the operation in its messages.
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// A parsed `oxcow bitmap` command line.
#[derive(Debug)]
struct Request {
    ops: Vec<Op>,
    granularity: u64,
    source_file: Option<String>,
    source_fmt: Option<String>,
    file: String,
    bitmap: String,
}

/// Parses the command line, refusing what qemu-img refuses, in qemu-img's order.
fn parse(args: &[String]) -> CliResult<Request> {
    let mut ops = Vec::new();
    let (mut granularity, mut has_g) = (0u64, false);
    let (mut source_file, mut source_fmt) = (None, None);
    let mut pos = Vec::new();
    for a in scan("bitmap", args, SPECS)? {
        match a {
            Arg::Opt("--add", _) => ops.push(Op::Add),
            Arg::Opt("--remove", _) => ops.push(Op::Remove),
            Arg::Opt("--clear", _) => ops.push(Op::Clear),
            Arg::Opt("--enable", _) => ops.push(Op::Enable),
            Arg::Opt("--disable", _) => ops.push(Op::Disable),
            Arg::Opt("--merge", Some(s)) => ops.push(Op::Merge(s)),
            Arg::Opt("-g", Some(v)) => {
                granularity = parse_size(&v)
                    .map_err(|_| CliError::op(format!("Invalid granularity specified: '{v}'.")))?;
                has_g = true;
            }
            Arg::Opt("-b", Some(v)) => source_file = Some(v),
            Arg::Opt("-F", Some(v)) => source_fmt = Some(v),
            Arg::Opt("-f", Some(f)) => crate::require_qcow2("bitmap", &f)?,
            Arg::Pos(p) => pos.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let usage = |m: &str| Err(CliError::op(m));
    if ops.is_empty() {
        return usage(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        );
    }
    if has_g && !ops.contains(&Op::Add) {
        return usage("granularity only supported with --add");
    }
    if source_fmt.is_some() && source_file.is_none() {
        return usage("-F only supported with -b");
    }
    if source_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return usage("Merge bitmap source file only supported with --merge");
    }
    let [file, bitmap] = pos.as_slice() else {
        return usage("Expecting filename and bitmap name");
    };
    Ok(Request {
        ops,
        granularity,
        source_file,
        source_fmt,
        file: file.clone(),
        bitmap: bitmap.clone(),
    })
}

/// Opens `file` as qcow2, worded like qemu-img's open failures. A read-write open prints the
/// library's non-fatal events as warnings, as qemu-img does (e.g. the hint about a bitmaps
/// extension that a program without bitmap support left stale).
fn open(file: &str, writable: bool, force_share: bool) -> CliResult<Image> {
    let opts = OpenOptions {
        writable,
        force_share,
        no_backing: true,
        ..OpenOptions::default()
    };
    let img = Image::open(file, &opts)
        .map_err(|e| CliError::op(format!("Could not open '{file}': {e}")))?;
    if writable {
        let warn = |ev: &CorruptionEvent| {
            if !ev.fatal {
                eprintln!("oxcow: warning: {}", ev.message);
            }
        };
        img.set_event_handler(Some(Arc::new(warn)));
    }
    Ok(img)
}

/// Where `--merge` takes its source bitmaps from.
enum MergeSource {
    /// The image being changed.
    Same,
    /// Another qcow2 image (`-b`), opened read-only.
    Other(Box<Image>),
    /// A raw `-b` file: it has no bitmaps.
    Raw,
}

/// Runs `oxcow bitmap ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let req = parse(args)?;
    let img = open(&req.file, true, false)?;
    let source = match &req.source_file {
        None => MergeSource::Same,
        Some(f) => {
            let fmt = match &req.source_fmt {
                Some(f) => f.clone(),
                None => crate::convert::probe(f)?.to_string(),
            };
            match fmt.as_str() {
                "qcow2" => MergeSource::Other(Box::new(open(f, false, false)?)),
                "raw" | "file" => MergeSource::Raw,
                other => {
                    return Err(CliError::op(format!(
                        "Could not open '{f}': image format '{other}' is not supported"
                    )))
                }
            }
        }
    };
    for op in &req.ops {
        if let Err(e) = apply(&img, &source, op, &req) {
            let why = reason(&img, &source, op, &req, &e);
            // Keep what the earlier operations did: close the image properly.
            let _ = img.close();
            return Err(CliError::op(format!(
                "Operation {} on bitmap {} failed: {why}",
                op.name(),
                req.bitmap
            )));
        }
    }
    img.close()
        .map_err(|e| CliError::op(format!("closing '{}': {e}", req.file)))
}

/// Applies one operation.
fn apply(img: &Image, source: &MergeSource, op: &Op, req: &Request) -> oxcow::Result<()> {
    let name = req.bitmap.as_str();
    match op {
        Op::Add => {
            // Created recording, as qemu-img does; `--add --disable` is two operations.
            let opts = BitmapAddOptions {
                granularity: req.granularity,
                disabled: false,
            };
            img.bitmap_add(name, opts)
        }
        Op::Remove => img.bitmap_remove(name),
        Op::Clear => img.bitmap_clear(name),
        Op::Enable => img.bitmap_enable(name),
        Op::Disable => img.bitmap_disable(name),
        Op::Merge(src) => match source {
            MergeSource::Same => img.bitmap_merge(name, src),
            MergeSource::Other(other) => img.bitmap_merge_from(name, other, src),
            MergeSource::Raw => Err(Error::new(
                ErrorKind::NotFound,
                format!("Dirty bitmap '{src}' not found"),
            )),
        },
    }
}

/// The state of bitmap `name` in `img`: `None` when absent, else whether it is inconsistent.
fn state(img: &Image, name: &str) -> Option<bool> {
    let list = img.bitmaps().ok()?;
    let b = list.iter().find(|b| b.name == name)?;
    Some(b.flags & BITMAP_INCONSISTENT != 0)
}

/// qemu-img's wording for a failed operation: it names the bitmap at fault (for a merge, the
/// destination is checked before the source, as in QEMU).
fn reason(img: &Image, source: &MergeSource, op: &Op, req: &Request, e: &Error) -> String {
    let name = req.bitmap.as_str();
    let culprit = |want_busy: bool| -> String {
        let Op::Merge(src) = op else {
            return name.to_string();
        };
        let dst_ok = match state(img, name) {
            None => false,
            Some(busy) => !(want_busy && busy),
        };
        if !dst_ok {
            return name.to_string();
        }
        src.clone()
    };
    if let (Op::Merge(_), MergeSource::Other(other)) = (op, source) {
        let (d, s) = (img.virtual_size(), other.virtual_size());
        if d != s && e.kind() == ErrorKind::InvalidArgument {
            return format!(
                "Bitmaps are of different sizes (destination size is {d}, source size is {s}) \
                 and can't be merged"
            );
        }
    }
    match e.kind() {
        ErrorKind::Exists => format!("Bitmap already exists: {name}"),
        ErrorKind::NotFound => format!("Dirty bitmap '{}' not found", culprit(false)),
        ErrorKind::Busy => format!(
            "Bitmap '{}' is inconsistent and cannot be used\n\
             Try block-dirty-bitmap-remove to delete this bitmap from disk",
            culprit(true)
        ),
        ErrorKind::InvalidArgument if *op == Op::Add => add_reason(req, e),
        ErrorKind::Unsupported if *op == Op::Add => format!(
            "Can't make bitmap '{name}' persistent in '{}': {}",
            req.file,
            e.message()
        ),
        _ => e.to_string(),
    }
}

/// qemu-img's wording for an `--add` the library refused as invalid.
fn add_reason(req: &Request, e: &Error) -> String {
    let g = req.granularity;
    let name = &req.bitmap;
    if g != 0 && (!g.is_power_of_two() || !(512..=1 << 31).contains(&g)) {
        "Granularity must be power of 2 and at least 512".to_string()
    } else if name.is_empty() {
        "Bitmap name cannot be empty".to_string()
    } else if name.len() > 1023 {
        format!(
            "Can't make bitmap '{name}' persistent in '{}': Name length exceeds maximum \
             (1023 characters)",
            req.file
        )
    } else {
        e.to_string()
    }
}

/// `oxcow map --bitmap NAME`: the ranges of `[start, start + max_len)` of `file` that are dirty
/// in bitmap `name`. Human output lists the dirty ranges (hex, like `qemu-img map`); JSON lists
/// every range with `start`, `length` and `dirty`, clean ones too, contiguous ones merged.
pub fn map_dirty(
    file: &str,
    name: &str,
    start: u64,
    max_len: u64,
    json: bool,
    force_share: bool,
) -> CliResult<()> {
    let img = crate::info::open_layer(file, force_share)?;
    let size = img.virtual_size();
    let start = start.min(size);
    let end = start.saturating_add(max_len).min(size);
    let rows = dirty_rows(&img, name, start, end)
        .map_err(|e| CliError::op(format!("bitmap '{name}' of '{file}': {e}")))?;
    if json {
        let lines: Vec<String> = rows
            .iter()
            .map(|&(s, l, d)| format!("{{ \"start\": {s}, \"length\": {l}, \"dirty\": {d}}}"))
            .collect();
        outln!("[{}]", lines.join(",\n"));
    } else {
        outln!("{:<16}Length", "Offset");
        for &(s, l, _) in rows.iter().filter(|r| r.2) {
            outln!(
                "{}{}",
                crate::map::hex16(s),
                crate::map::hex16(l).trim_end()
            );
        }
    }
    Ok(())
}

/// `(start, length, dirty)` rows over `[start, end)`, adjacent rows of one state merged.
fn dirty_rows(
    img: &Image,
    name: &str,
    start: u64,
    end: u64,
) -> oxcow::Result<Vec<(u64, u64, bool)>> {
    let mut rows: Vec<(u64, u64, bool)> = Vec::new();
    let mut off = start;
    while off < end {
        let e = img.bitmap_status(name, off, end - off)?;
        // The library promises at least one byte; never loop forever if it did not.
        let len = e.length.clamp(1, end - off);
        let dirty = e.flags & EXTENT_DIRTY != 0;
        match rows.last_mut() {
            Some(last) if last.2 == dirty => last.1 += len,
            _ => rows.push((off, len, dirty)),
        }
        off += len;
    }
    Ok(rows)
}

/// The bitmaps `convert --bitmaps` copies from `src` (`None`: SRC is raw), checked before DST
/// is created: refused like qemu-img for a raw SRC or an inconsistent bitmap (skipped with a
/// warning under `--skip-broken-bitmaps`).
pub fn convert_plan(src: Option<&Image>, skip_broken: bool) -> CliResult<Vec<BitmapInfo>> {
    let Some(src) = src else {
        return Err(CliError::op("Source lacks bitmap support"));
    };
    let mut plan = src.bitmaps()?;
    // qemu-img meets the bitmaps last to first here: report (or skip) them in that order, and
    // copy the rest in directory order, which is the order qemu-img's copy ends up with.
    for b in plan.iter().rev() {
        if b.flags & BITMAP_INCONSISTENT == 0 {
            continue;
        }
        if !skip_broken {
            return Err(CliError::op(format!(
                "Cannot copy inconsistent bitmap '{}'\n\
                 Try --skip-broken-bitmaps, or use 'oxcow bitmap --remove' to delete it",
                b.name
            )));
        }
        eprintln!("oxcow: warning: Skipping inconsistent bitmap '{}'", b.name);
    }
    plan.retain(|b| b.flags & BITMAP_INCONSISTENT == 0);
    Ok(plan)
}

/// Refuses `convert --bitmaps` into a format without bitmaps (raw, or qcow2 version 2). Like
/// qemu-img, this is found once DST has been created (and DST stays).
pub fn convert_target_check(out_fmt: &str, version: u32) -> CliResult<()> {
    if out_fmt == "qcow2" && version >= 3 {
        return Ok(());
    }
    Err(CliError::op(format!(
        "Format driver '{out_fmt}' does not support bitmaps"
    )))
}

/// Recreates the planned bitmaps in `dst` (same names, granularities and `auto` flags) and
/// merges each source bitmap's dirty set in. Runs after the data copy, so the copy's own writes
/// do not show up in them.
pub fn convert_copy(src: &Image, dst: &Image, plan: &[BitmapInfo]) -> CliResult<()> {
    for b in plan {
        let opts = BitmapAddOptions {
            granularity: b.granularity,
            disabled: b.flags & BITMAP_AUTO == 0,
        };
        dst.bitmap_add(&b.name, opts)
            .and_then(|()| dst.bitmap_merge_from(&b.name, src, &b.name))
            .map_err(|e| CliError::op(format!("copying bitmap '{}': {e}", b.name)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn err(a: &[&str]) -> String {
        parse(&v(a)).expect_err("must be refused").message
    }

    #[test]
    fn operations_keep_their_order() {
        let r = parse(&v(&[
            "--add",
            "-g",
            "4k",
            "--disable",
            "--merge",
            "s",
            "--clear",
            "f",
            "b",
        ]))
        .unwrap();
        assert_eq!(
            r.ops,
            vec![Op::Add, Op::Disable, Op::Merge("s".into()), Op::Clear]
        );
        assert_eq!(r.granularity, 4096);
        assert_eq!((r.file.as_str(), r.bitmap.as_str()), ("f", "b"));
    }

    #[test]
    fn refusals_are_worded_like_qemu_img() {
        assert_eq!(
            err(&["f", "b"]),
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        );
        assert_eq!(
            err(&["-g", "4k", "--clear", "f", "b"]),
            "granularity only supported with --add"
        );
        assert_eq!(
            err(&["-F", "qcow2", "--clear", "f", "b"]),
            "-F only supported with -b"
        );
        assert_eq!(
            err(&["-b", "s", "--clear", "f", "b"]),
            "Merge bitmap source file only supported with --merge"
        );
        assert_eq!(err(&["--add", "f"]), "Expecting filename and bitmap name");
        assert_eq!(
            err(&["--add", "f", "b", "c"]),
            "Expecting filename and bitmap name"
        );
        assert_eq!(
            err(&["--add", "-g", "abc", "f", "b"]),
            "Invalid granularity specified: 'abc'."
        );
    }
}
