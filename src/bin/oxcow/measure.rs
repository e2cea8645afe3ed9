//! `oxcow measure`: how large a new image would be (`qemu-img measure`), for a virtual size or
//! for a copy of an existing image. The arithmetic is `oxcow::format::measure`; this file
//! parses the command line and finds which clusters of the input hold data.

use crate::args::{opt, parse_size, scan, Arg, CliError, CliResult, OptSpec};
use crate::map::{Layer, Row};
use oxcow::format::measure::{
    measure_qcow2, measure_raw, MeasureBitmap, MeasureOptions, MeasurePrealloc, Measurement,
};
use oxcow::{Image, OpenOptions};

/// `oxcow measure --help`.
pub const HELP: &str = "\
Usage: oxcow measure [--output human|json] [-O qcow2|raw] [-o OPTIONS] --size SIZE
       oxcow measure [--output human|json] [-O qcow2|raw] [-o OPTIONS] [-f qcow2|raw]
                     [-l SNAPSHOT] [-U] FILE

Print the size a new image of format -O (raw by default, like qemu-img) would need: for a
virtual size (--size), or for a copy of FILE's guest contents (its backing chain included),
as 'qemu-img measure' prints it. 'required size' counts the clusters that hold data,
'fully allocated size' every cluster; 'bitmaps size' (qcow2 v3 output of a qcow2 v3 FILE)
is what copying FILE's persistent bitmaps adds.

Options:
  --output FMT     'human' (default) or 'json'
  --size SIZE      virtual size to measure for (suffixes k, M, G, T, P); not with FILE
  -O FMT           format of the new image: raw (default) or qcow2
  -o OPTIONS       qcow2 creation options: cluster_size=, compat=0.10|1.1, refcount_bits=,
                   extended_l2=on|off, preallocation=off|metadata|falloc|full,
                   backing_file= (then every cluster counts as required), backing_fmt=,
                   lazy_refcounts=, compression_type=, size=
  -f FMT           format of FILE: qcow2 or raw (default: probed from its first bytes)
  -l SNAPSHOT      measure internal snapshot SNAPSHOT of FILE (snapshot.id=ID,
                   snapshot.name=NAME, or a bare id or name)
  -U, --force-share  open FILE even if another process holds it
  -h, --help       this text

Examples:
  oxcow measure -O qcow2 --size 1T
  oxcow measure -O qcow2 -o cluster_size=2M,preallocation=full --size 100G
  oxcow measure --output json -O qcow2 disk.raw
";

const SPECS: &[OptSpec] = &[
    opt(&["--output"], true),
    opt(&["--size"], true),
    opt(&["-O"], true),
    opt(&["-o", "--options"], true),
    opt(&["-f", "--format"], true),
    opt(&["-l"], true),
    opt(&["-U", "--force-share"], false),
];

/// The new image's options that matter to its size, as parsed from `-o`.
struct Target {
    opts: MeasureOptions,
    version: u32,
    backing: bool,
    size: Option<u64>,
}

/// What `oxcow measure` was asked to do.
struct Request {
    json: bool,
    size: Option<u64>,
    out_fmt: String,
    options: Vec<String>,
    in_fmt: Option<String>,
    snapshot: Option<crate::snapshot::Selector>,
    force_share: bool,
    file: Option<String>,
}

/// Runs `oxcow measure ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let req = parse(args)?;
    let m = match req.out_fmt.as_str() {
        "qcow2" => measure_qcow2_target(&req)?,
        "raw" => measure_raw_target(&req)?,
        other => {
            return Err(CliError::op(format!(
                "unsupported output format '{other}' (qcow2 or raw)"
            )))
        }
    };
    out!("{}", render(&m, req.json));
    Ok(())
}

fn parse(args: &[String]) -> CliResult<Request> {
    let mut req = Request {
        json: false,
        size: None,
        out_fmt: "raw".to_string(),
        options: Vec::new(),
        in_fmt: None,
        snapshot: None,
        force_share: false,
        file: None,
    };
    let mut pos = Vec::new();
    for a in scan("measure", args, SPECS)? {
        match a {
            Arg::Opt("--output", Some(v)) => req.json = crate::parse_output("measure", &v)?,
            Arg::Opt("--size", Some(v)) => req.size = Some(parse_virtual_size(&v)?),
            Arg::Opt("-O", Some(v)) => req.out_fmt = v,
            Arg::Opt("-o", Some(v)) => req.options.push(v),
            Arg::Opt("-f", Some(v)) => req.in_fmt = Some(v),
            Arg::Opt("-l", Some(v)) => req.snapshot = Some(crate::snapshot::Selector::parse(&v)?),
            Arg::Opt("-U", _) => req.force_share = true,
            Arg::Pos(p) => pos.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    if pos.len() > 1 {
        return Err(CliError::usage("measure takes at most one FILE"));
    }
    req.file = pos.pop();
    match (&req.file, req.size) {
        (Some(_), Some(_)) => Err(CliError::op(
            "--size N cannot be used together with a filename.",
        )),
        (None, None) => Err(CliError::op(
            "Either --size N or one filename must be specified.",
        )),
        (None, Some(_)) if req.snapshot.is_some() => Err(CliError::op(
            "--size N cannot be used together with a snapshot.",
        )),
        _ => Ok(req),
    }
}

/// `--size`: qemu-img's bounds and message.
fn parse_virtual_size(v: &str) -> CliResult<u64> {
    // qemu-img also takes exbibytes, which the shared size parser stops short of.
    let parsed = match v.strip_suffix(['e', 'E']) {
        Some(n) => n
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << 60))
            .ok_or_else(|| CliError::op("bad size")),
        None => parse_size(v),
    };
    match parsed {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        _ => Err(CliError::op(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        )),
    }
}

/// Parses the `-o` lists for a qcow2 target, with qemu-img's checks and messages.
fn qcow2_target(lists: &[String]) -> CliResult<Target> {
    let mut kv: Vec<(String, String)> = Vec::new();
    for list in lists {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "on"));
            kv.push((k.to_string(), v.to_string()));
        }
    }
    let get = |k: &str| kv.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    for (k, _) in &kv {
        const KNOWN: &[&str] = &[
            "size",
            "compat",
            "backing_file",
            "backing_fmt",
            "encryption",
            "cluster_size",
            "preallocation",
            "lazy_refcounts",
            "refcount_bits",
            "extended_l2",
            "compression_type",
            "data_file",
            "data_file_raw",
        ];
        if !KNOWN.contains(&k.as_str()) {
            return Err(CliError::op(format!(
                "Invalid parameter '{k}'\nInvalid options for file format 'qcow2'"
            )));
        }
    }
    let extended_l2 = match get("extended_l2").map(String::as_str) {
        None | Some("off") | Some("false") => false,
        Some("on") | Some("true") => true,
        Some(v) => {
            return Err(CliError::op(format!(
                "Parameter 'extended_l2' expects 'on' or 'off', not '{v}'"
            )))
        }
    };
    let cluster_size = cluster_size(get("cluster_size").map(String::as_str), extended_l2)?;
    let version = match get("compat").map(String::as_str) {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) => return Err(CliError::op(format!("Invalid parameter '{v}'"))),
    };
    let refcount_bits = refcount_bits(get("refcount_bits").map(String::as_str), version)?;
    let prealloc = match get("preallocation").map(String::as_str) {
        None | Some("off") => MeasurePrealloc::Off,
        Some("metadata") => MeasurePrealloc::Metadata,
        Some("falloc") | Some("full") => MeasurePrealloc::Full,
        Some(v) => return Err(CliError::op(format!("Invalid parameter '{v}'"))),
    };
    let size = match get("size") {
        Some(v) => Some(parse_virtual_size(v)?),
        None => None,
    };
    Ok(Target {
        opts: MeasureOptions {
            cluster_size,
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2,
            prealloc,
        },
        version,
        backing: get("backing_file").is_some(),
        size,
    })
}

fn cluster_size(v: Option<&str>, extended_l2: bool) -> CliResult<u64> {
    let cs = match v {
        None => 65536,
        Some(v) => parse_size(v).map_err(|_| {
            CliError::op("Parameter 'cluster_size' expects a non-negative number below 2^64")
        })?,
    };
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(CliError::op(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cs < 16384 {
        return Err(CliError::op(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    Ok(cs)
}

fn refcount_bits(v: Option<&str>, version: u32) -> CliResult<u64> {
    let bits = match v {
        None => 16,
        Some(v) => v.parse::<u64>().map_err(|_| {
            CliError::op("Parameter 'refcount_bits' expects a non-negative number below 2^64")
        })?,
    };
    if !bits.is_power_of_two() || bits > 64 {
        return Err(CliError::op(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && bits != 16 {
        return Err(CliError::op(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    Ok(bits)
}

fn measure_qcow2_target(req: &Request) -> CliResult<Measurement> {
    let t = qcow2_target(&req.options)?;
    let Some(file) = &req.file else {
        // `--size` wins over `-o size=`.
        let size = req.size.or(t.size).unwrap_or(0);
        t.opts
            .check_size(size)
            .map_err(|e| CliError::op(e.message()))?;
        return Ok(measure_qcow2(size, None, &t.opts, None));
    };
    let input = Input::open(req, file)?;
    let size = input.size();
    let data = if t.backing {
        // qemu-img cannot know what the new backing file shares: every cluster counts.
        size.div_ceil(t.opts.cluster_size) * t.opts.cluster_size
    } else {
        input.data_clusters(t.opts.cluster_size)? * t.opts.cluster_size
    };
    let bitmaps = if t.version >= 3 {
        input.bitmaps()?
    } else {
        None
    };
    Ok(measure_qcow2(size, Some(data), &t.opts, bitmaps.as_deref()))
}

fn measure_raw_target(req: &Request) -> CliResult<Measurement> {
    for list in &req.options {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let k = item.split_once('=').map_or(item, |(k, _)| k);
            if k != "size" && k != "preallocation" {
                return Err(CliError::op(format!(
                    "Invalid parameter '{k}'\nInvalid options for file format 'raw'"
                )));
            }
        }
    }
    match &req.file {
        Some(file) => Ok(measure_raw(Input::open(req, file)?.size(), true)),
        None => Ok(measure_raw(req.size.unwrap_or(0), false)),
    }
}

/// The input image: a qcow2 chain (layers as `oxcow map` walks them) or a raw file.
enum Input {
    Qcow2 { layers: Vec<Layer> },
    Raw { file: std::fs::File, size: u64 },
}

impl Input {
    fn open(req: &Request, file: &str) -> CliResult<Input> {
        let fmt = match &req.in_fmt {
            Some(f) => f.clone(),
            None => crate::convert::probe(file)?.to_string(),
        };
        let open_err = |e: String| CliError::op(format!("Could not open '{file}': {e}"));
        match fmt.as_str() {
            "qcow2" => Ok(Input::Qcow2 {
                layers: open_layers(req, file)?,
            }),
            "raw" if req.snapshot.is_some() => Err(CliError::op(
                "measure: a raw FILE has no snapshots (-l needs a qcow2 FILE)",
            )),
            "raw" => {
                let f = std::fs::File::open(file).map_err(|e| open_err(e.to_string()))?;
                let len = f.metadata().map_err(|e| open_err(e.to_string()))?.len();
                // QEMU sees a raw file in whole sectors: a partial last sector counts.
                let size = len.div_ceil(512).saturating_mul(512);
                Ok(Input::Raw { file: f, size })
            }
            other => Err(CliError::op(format!(
                "unsupported input format '{other}' (qcow2 or raw)"
            ))),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Input::Qcow2 { layers } => layers.first().map_or(0, Layer::size),
            Input::Raw { size, .. } => *size,
        }
    }

    /// Clusters of `cs` bytes that hold data somewhere in the chain (zero and unallocated
    /// ranges count for nothing), as qemu-img counts them.
    fn data_clusters(&self, cs: u64) -> CliResult<u64> {
        let mut ranges = Vec::new();
        match self {
            Input::Qcow2 { layers } => {
                let rows: Vec<Row> = crate::map::map_rows(layers, 0, self.size())?;
                ranges.extend(
                    rows.iter()
                        .filter(|r| r.present && r.data)
                        .map(|r| (r.start, r.length)),
                );
            }
            Input::Raw { file, size } => {
                ranges = oxcow::storage::extents::data_ranges(file, *size)
                    .map_err(|e| CliError::op(format!("reading the allocation of FILE: {e}")))?;
            }
        }
        Ok(count_clusters(&ranges, cs))
    }

    /// The persistent bitmaps of a qcow2 v3 input; `None` when qemu-img prints no bitmaps
    /// line (raw or v2 input).
    fn bitmaps(&self) -> CliResult<Option<Vec<MeasureBitmap>>> {
        let Input::Qcow2 { layers } = self else {
            return Ok(None);
        };
        let Some(Layer::Qcow2 { img, .. }) = layers.first() else {
            return Ok(None);
        };
        if img.info()?.version < 3 {
            return Ok(None);
        }
        let list = img.bitmaps()?;
        Ok(Some(
            list.iter()
                .map(|b| MeasureBitmap {
                    name_len: b.name.len() as u64,
                    granularity: b.granularity,
                })
                .collect(),
        ))
    }
}

/// The chain under `file`: the top opened alone (at `-l SNAPSHOT` if given), then its
/// backing chain as `oxcow map` opens it.
fn open_layers(req: &Request, file: &str) -> CliResult<Vec<Layer>> {
    let open = |snapshot: Option<String>| {
        Image::open(
            file,
            &OpenOptions {
                force_share: req.force_share,
                no_backing: true,
                snapshot,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| CliError::op(format!("Could not open '{file}': {e}")))
    };
    let mut img = open(None)?;
    if let Some(sel) = &req.snapshot {
        let id = sel.resolve(&img)?;
        drop(img);
        img = open(Some(id))?;
    }
    let info = img.info()?;
    let mut layers = vec![Layer::Qcow2 {
        img: Box::new(img),
        name: file.to_string(),
    }];
    if let Some(b) = info.backing_file.as_deref() {
        let next = crate::resolve_backing(file, b);
        let fmt = crate::backing_format(file, info.backing_format.as_deref(), &next, false)?;
        if fmt == "raw" {
            let size = std::fs::metadata(&next)
                .map_err(|e| CliError::op(format!("could not open backing file '{next}': {e}")))?
                .len();
            layers.push(Layer::Raw { name: next, size });
        } else {
            layers.extend(crate::map::open_chain(&next, req.force_share, false)?);
        }
    }
    Ok(layers)
}

/// Clusters of `cs` bytes touched by `ranges`, each counted once.
fn count_clusters(ranges: &[(u64, u64)], cs: u64) -> u64 {
    let mut count = 0u64;
    let mut next_free = 0u64; // first cluster index not yet counted
    for &(start, len) in ranges {
        if len == 0 {
            continue;
        }
        let first = (start / cs).max(next_free);
        let end = (start + len).div_ceil(cs);
        if end > first {
            count += end - first;
            next_free = end;
        }
    }
    count
}

/// qemu-img's human or JSON text.
fn render(m: &Measurement, json: bool) -> String {
    if json {
        let mut s = String::from("{\n");
        if let Some(b) = m.bitmaps {
            s.push_str(&format!("    \"bitmaps\": {b},\n"));
        }
        s.push_str(&format!(
            "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
            m.required, m.fully_allocated
        ));
        return s;
    }
    let mut s = format!(
        "required size: {}\nfully allocated size: {}\n",
        m.required, m.fully_allocated
    );
    if let Some(b) = m.bitmaps {
        s.push_str(&format!("bitmaps size: {b}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::count_clusters;

    #[test]
    fn clusters_touched_count_once() {
        assert_eq!(count_clusters(&[(0, 4096), (8192, 4096)], 65536), 1);
        assert_eq!(count_clusters(&[(65535, 2)], 65536), 2);
        assert_eq!(count_clusters(&[(0, 1 << 20), (1 << 20, 1)], 65536), 17);
        assert_eq!(count_clusters(&[], 65536), 0);
    }
}
