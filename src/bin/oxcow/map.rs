//! `oxcow map`: `qemu-img map` over [`oxcow::Image::block_status`], walking the backing chain
//! layer by layer so that `depth` and the backing file's host offsets are reported like qemu-img.

use crate::args::{opt, parse_size, scan, Arg, CliError, CliResult, OptSpec};
use oxcow::{Image, EXTENT_ALLOCATED, EXTENT_COMPRESSED, EXTENT_ZERO};

/// `oxcow map --help`.
pub const HELP: &str = "\
Usage: oxcow map [-f qcow2] [--output human|json] [-U] [-s START] [-l LENGTH] [--no-probe] FILE
       oxcow map --bitmap NAME [--output human|json] [-U] [-s START] [-l LENGTH] FILE

Show where each guest range of FILE comes from: this image's data, zero clusters, compressed
clusters, or some image of the backing chain ('depth' counts layers below FILE).

Human output lists the ranges stored as plain data with their host offset and file, like
qemu-img. JSON output lists every range with start, length, depth, present, zero, data,
compressed and, for uncompressed data, offset (host offset in the file at that depth).

Options:
  -f FMT                 image format; only qcow2 is accepted
  --output FMT           'human' (default) or 'json'
  -U, --force-share      open even if another process holds the image
  --no-probe             never guess a backing file's format: refuse one the image does not
                         record (use it for untrusted images)
  -s, --start-offset N   first guest byte to map (sizes like 1G accepted)
  -l, --max-length N     map at most N bytes
  --bitmap NAME          list the ranges dirty in persistent bitmap NAME instead: human
                         output shows the dirty ranges (Offset, Length in hex), JSON lists
                         every range as {start, length, dirty}
  -h, --help             this text

Examples:
  oxcow map disk.qcow2
  oxcow map --output json overlay.qcow2
  oxcow map --output json -s 1G -l 64M disk.qcow2
  oxcow map --bitmap backup --output json disk.qcow2
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["--output"], true),
    opt(&["-U", "--force-share"], false),
    opt(&["-s", "--start-offset"], true),
    opt(&["-l", "--max-length"], true),
    opt(&["--no-probe"], false),
    opt(&["--bitmap"], true),
];

/// One image of the chain, opened on its own (without its backing file) so its own allocation
/// status can be asked for.
pub(crate) enum Layer {
    Qcow2 {
        img: Box<Image>,
        name: String,
    },
    /// Raw backing file: every byte is "allocated" there, at the same offset.
    Raw {
        name: String,
        size: u64,
    },
}

impl Layer {
    pub(crate) fn name(&self) -> &str {
        match self {
            Layer::Qcow2 { name, .. } | Layer::Raw { name, .. } => name,
        }
    }
    pub(crate) fn size(&self) -> u64 {
        match self {
            Layer::Qcow2 { img, .. } => img.virtual_size(),
            Layer::Raw { size, .. } => *size,
        }
    }
}

/// One row of the map, as qemu-img prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Index of the chain layer the range comes from (0 = the image itself).
    pub depth: usize,
    /// Some layer of the chain determines the contents.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the data in the layer's file, when it is stored uncompressed.
    pub offset: Option<u64>,
}

impl Row {
    /// Whether `next` continues this row (same status, contiguous in guest and host space).
    fn merges(&self, next: &Row) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

pub(crate) fn open_chain(file: &str, force_share: bool, no_probe: bool) -> CliResult<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut name = file.to_string();
    let mut raw = false;
    // A chain longer than this is a loop (qemu-img refuses chains deeper than its own limit).
    for _ in 0..1024 {
        if raw {
            let size = std::fs::metadata(&name)
                .map_err(|e| CliError::op(format!("could not open backing file '{name}': {e}")))?
                .len();
            layers.push(Layer::Raw { name, size });
            return Ok(layers);
        }
        let img = crate::info::open_layer(&name, force_share)?;
        let info = img.info()?;
        let next = info
            .backing_file
            .as_deref()
            .map(|b| crate::resolve_backing(&name, b));
        if let Some(n) = &next {
            raw =
                crate::backing_format(&name, info.backing_format.as_deref(), n, no_probe)? == "raw";
        }
        layers.push(Layer::Qcow2 {
            img: Box::new(img),
            name,
        });
        match next {
            Some(n) => name = n,
            None => return Ok(layers),
        }
    }
    Err(CliError::op(format!(
        "backing chain of '{file}' is too deep (a loop?)"
    )))
}

/// Status of `[off, off+len)` found by walking down the chain: the first layer that allocates
/// the start decides the row; the row ends where any consulted layer's status changes.
fn row_at(layers: &[Layer], off: u64, len: u64) -> CliResult<Row> {
    let mut len = len;
    // The deepest layer consulted: an unallocated range is reported at that depth.
    let mut bottom = 0;
    for (depth, layer) in layers.iter().enumerate() {
        if off >= layer.size() {
            // Past the end of a shorter backing file the guest reads zeros; the chain ends
            // there for this range (qemu-img reports it at the depth above).
            break;
        }
        bottom = depth;
        len = len.min(layer.size() - off);
        match layer {
            Layer::Raw { .. } => {
                return Ok(Row {
                    start: off,
                    length: len,
                    depth,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: false,
                    offset: Some(off),
                })
            }
            Layer::Qcow2 { img, .. } => {
                let e = img.block_status(off, len)?;
                len = e.length;
                if e.flags & EXTENT_ALLOCATED != 0 {
                    let zero = e.flags & EXTENT_ZERO != 0;
                    let compressed = e.flags & EXTENT_COMPRESSED != 0;
                    return Ok(Row {
                        start: off,
                        length: len,
                        depth,
                        present: true,
                        zero,
                        data: !zero,
                        compressed,
                        offset: (!zero && !compressed).then_some(e.host_offset),
                    });
                }
            }
        }
    }
    Ok(Row {
        start: off,
        length: len,
        depth: bottom,
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
    })
}

/// Maps `[start, end)` of the chain into merged rows.
pub(crate) fn map_rows(layers: &[Layer], start: u64, end: u64) -> CliResult<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    let mut off = start;
    while off < end {
        let r = row_at(layers, off, end - off)?;
        off += r.length;
        match rows.last_mut() {
            Some(last) if last.merges(&r) => last.length += r.length,
            _ => rows.push(r),
        }
    }
    Ok(rows)
}

/// `%#-16x` as C prints it: zero has no 0x prefix.
pub(crate) fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Runs `oxcow map ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let mut json = false;
    let mut force_share = false;
    let mut start = 0u64;
    let mut max_len = u64::MAX;
    let mut no_probe = false;
    let mut bitmap = None;
    let mut files = Vec::new();
    for a in scan("map", args, SPECS)? {
        match a {
            Arg::Opt("-f", Some(f)) => crate::require_qcow2("map", &f)?,
            Arg::Opt("--output", Some(o)) => json = crate::parse_output("map", &o)?,
            Arg::Opt("-U", _) => force_share = true,
            Arg::Opt("-s", Some(v)) => start = parse_size(&v)?,
            Arg::Opt("-l", Some(v)) => max_len = parse_size(&v)?,
            Arg::Opt("--no-probe", _) => no_probe = true,
            Arg::Opt("--bitmap", Some(b)) => bitmap = Some(b),
            Arg::Pos(p) => files.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let [file] = files.as_slice() else {
        return Err(CliError::usage("map needs exactly one FILE"));
    };
    if let Some(b) = bitmap {
        return crate::bitmap::map_dirty(file, &b, start, max_len, json, force_share);
    }
    let layers = open_chain(file, force_share, no_probe)?;
    let size = layers[0].size();
    let start = start.min(size);
    let end = start.saturating_add(max_len).min(size);
    let rows = map_rows(&layers, start, end)?;
    if json {
        let lines: Vec<String> = rows
            .iter()
            .map(|r| {
                let mut s = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    r.start, r.length, r.depth, r.present, r.zero, r.data, r.compressed
                );
                if let Some(o) = r.offset {
                    s.push_str(&format!(", \"offset\": {o}"));
                }
                s.push('}');
                s
            })
            .collect();
        outln!("[{}]", lines.join(",\n"));
    } else {
        outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for r in rows.iter().filter(|r| r.data) {
            if r.compressed {
                // The human format has no column for a compressed location; qemu-img stops
                // here with this message and exit code 1, and so does oxcow (use --output json).
                return Err(CliError::op(
                    "File contains external, encrypted or compressed clusters.",
                ));
            }
            if let Some(o) = r.offset {
                outln!(
                    "{}{}{}{}",
                    hex16(r.start),
                    hex16(r.length),
                    hex16(o),
                    layers[r.depth].name()
                );
            }
        }
    }
    Ok(())
}
