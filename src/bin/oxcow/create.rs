//! `oxcow create`: `qemu-img create -f qcow2` over [`oxcow::create`].

use crate::args::{opt, parse_bool, parse_size, scan, Arg, CliError, CliResult, OptSpec};
use oxcow::{BackingFormat, CompressionType, CreateOptions, Preallocation};

/// `oxcow create --help`.
pub const HELP: &str = "\
Usage: oxcow create [-f qcow2] [-o OPTIONS] [-b BACKING -F FMT] [-q] FILE [SIZE]

Create a qcow2 image of SIZE bytes (suffixes k, M, G, T: powers of 1024). With a backing file,
SIZE may be left out and the backing file's size is used.

Options:
  -f FMT        image format; only qcow2 is created
  -o OPTIONS    comma-separated key=value list, as in qemu-img:
                  cluster_size=64k        512 to 2M, a power of two
                  compat=1.1|0.10         qcow2 version 3 (default) or 2
                  refcount_bits=16        1, 2, 4, 8, 16, 32 or 64
                  lazy_refcounts=on|off   defer refcount updates (v3)
                  extended_l2=on|off      32 subclusters per cluster (v3, cluster >= 16k)
                  compression_type=zlib|zstd
                  preallocation=off|metadata
                  backing_file=NAME, backing_fmt=qcow2|raw
                  data_file=NAME          guest data in this file (v3; relative to the
                                          current directory, created or truncated)
                  data_file_raw=on|off    keep the data file a raw image of the disk
                'help' lists these options
  -b BACKING    backing file name, stored as given (relative names resolve next to FILE)
  -F FMT        backing file format: qcow2 or raw (required with -b)
  -q            quiet: do not print the 'Formatting' line
  -h, --help    this text

Examples:
  oxcow create disk.qcow2 10G
  oxcow create -o cluster_size=2M,lazy_refcounts=on big.qcow2 1T
  oxcow create -b base.qcow2 -F qcow2 overlay.qcow2
  oxcow create -o data_file=disk.raw,data_file_raw=on disk.qcow2 10G
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["-o", "--options"], true),
    opt(&["-b", "--backing"], true),
    opt(&["-F", "--backing-format"], true),
    opt(&["-q", "--quiet"], false),
    opt(&["-u"], false),
];

/// Applies one `key=value` of a qemu-img style `-o` list to `o`.
pub fn apply_create_option(o: &mut CreateOptions, kv: &str) -> CliResult<()> {
    let (k, v) = kv.split_once('=').ok_or_else(|| {
        CliError::usage(format!(
            "option '{kv}' is not key=value (try -o help for the list)"
        ))
    })?;
    match k {
        "cluster_size" => {
            let cs = parse_size(v)?;
            o.cluster_size = u32::try_from(cs)
                .map_err(|_| CliError::usage(format!("cluster_size {v} is too large")))?;
        }
        "compat" => {
            o.version = match v {
                "0.10" | "v2" => 2,
                "1.1" | "v3" => 3,
                _ => {
                    return Err(CliError::usage(format!(
                        "compat must be 0.10 or 1.1, not '{v}'"
                    )))
                }
            }
        }
        "refcount_bits" => {
            o.refcount_bits = v
                .parse()
                .map_err(|_| CliError::usage(format!("bad refcount_bits '{v}'")))?
        }
        "lazy_refcounts" => o.lazy_refcounts = parse_bool(k, v)?,
        "extended_l2" => o.extended_l2 = parse_bool(k, v)?,
        "compression_type" => {
            o.compression = match v {
                "zlib" | "deflate" => CompressionType::Deflate,
                "zstd" => CompressionType::Zstd,
                _ => {
                    return Err(CliError::usage(format!(
                        "compression_type must be zlib or zstd, not '{v}'"
                    )))
                }
            }
        }
        "preallocation" => {
            o.preallocation = match v {
                "off" => Preallocation::Off,
                "metadata" => Preallocation::Metadata,
                _ => {
                    return Err(CliError::usage(format!(
                        "preallocation must be off or metadata, not '{v}' (falloc and full are not supported)"
                    )))
                }
            }
        }
        "backing_file" => o.backing_file = Some(v.to_string()),
        "backing_fmt" => o.backing_format = Some(backing_format(v)?),
        "data_file" => o.data_file = Some(v.to_string()),
        "data_file_raw" => o.data_file_raw = parse_bool(k, v)?,
        "size" => {}
        _ => {
            return Err(CliError::usage(format!(
                "unknown create option '{k}' (try -o help for the list)"
            )))
        }
    }
    Ok(())
}

/// Applies a whole `-o` list; `help` is answered by printing the option list.
pub fn apply_create_options(o: &mut CreateOptions, list: &str) -> CliResult<bool> {
    if list == "help" || list == "?" {
        let start = HELP.find("  -o OPTIONS").unwrap_or(0);
        let end = HELP.find("  -b BACKING").unwrap_or(HELP.len());
        out!("Supported qcow2 options:\n{}", &HELP[start..end]);
        return Ok(true);
    }
    for kv in list.split(',').filter(|s| !s.is_empty()) {
        apply_create_option(o, kv)?;
    }
    Ok(false)
}

fn backing_format(f: &str) -> CliResult<BackingFormat> {
    BackingFormat::from_name(f)
        .ok_or_else(|| CliError::usage(format!("unknown backing format '{f}' (qcow2 or raw)")))
}

/// The `Formatting ...` line qemu-img prints, with the options that apply.
pub fn formatting_line(file: &str, size: u64, o: &CreateOptions) -> String {
    let mut s = format!(
        "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={size}",
        o.cluster_size,
        if o.extended_l2 { "on" } else { "off" },
        match o.compression {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    );
    if let Some(b) = &o.backing_file {
        s.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = o.backing_format {
        s.push_str(&format!(" backing_fmt={}", f.name()));
    }
    if o.version == 2 {
        s.push_str(" compat=0.10");
    }
    if let Some(d) = &o.data_file {
        s.push_str(&format!(" data_file={d}"));
    }
    if o.data_file_raw {
        s.push_str(" data_file_raw=on");
    }
    if o.preallocation == Preallocation::Metadata {
        s.push_str(" preallocation=metadata");
    }
    s.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        if o.lazy_refcounts { "on" } else { "off" },
        o.refcount_bits
    ));
    s
}

/// qemu-img echoes `data_file_raw=off` when it was given explicitly: insert it after the
/// data file name in `line` when one of the `-o` lists named it.
fn echo_explicit_raw_off(line: String, lists: &[String], o: &CreateOptions) -> String {
    let given = lists
        .iter()
        .flat_map(|l| l.split(','))
        .any(|kv| kv.starts_with("data_file_raw="));
    match &o.data_file {
        Some(d) if given && !o.data_file_raw => {
            let at = format!(" data_file={d}");
            line.replacen(&at, &format!("{at} data_file_raw=off"), 1)
        }
        _ => line,
    }
}

/// Runs `oxcow create ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let mut o = CreateOptions::default();
    let mut quiet = false;
    let mut pos = Vec::new();
    let mut lists = Vec::new();
    for a in scan("create", args, SPECS)? {
        match a {
            Arg::Opt("-f", Some(f)) => crate::require_qcow2("create", &f)?,
            Arg::Opt("-o", Some(l)) => {
                if apply_create_options(&mut o, &l)? {
                    return Ok(());
                }
                lists.push(l);
            }
            Arg::Opt("-b", Some(b)) => o.backing_file = Some(b),
            Arg::Opt("-F", Some(f)) => o.backing_format = Some(backing_format(&f)?),
            Arg::Opt("-q", _) => quiet = true,
            // qemu-img's -u skips opening the backing file; oxcow never opens it at create.
            Arg::Opt("-u", _) => {}
            Arg::Pos(p) => pos.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let (file, size) = match pos.as_slice() {
        [f] => (f, 0),
        [f, s] => (f, parse_size(s)?),
        _ => return Err(CliError::usage("create needs FILE [SIZE]")),
    };
    if o.backing_file.is_some() && o.backing_format.is_none() {
        return Err(CliError::usage(
            "a backing file needs its format too (-F qcow2 or -F raw)",
        ));
    }
    if size == 0 && o.backing_file.is_none() {
        return Err(CliError::usage(
            "create needs a SIZE (or a backing file to take it from)",
        ));
    }
    oxcow::create(file, size, &o).map_err(|e| CliError::op(format!("{file}: {e}")))?;
    if !quiet {
        let size = if size == 0 {
            oxcow::Image::open(
                file,
                &oxcow::OpenOptions {
                    no_backing: true,
                    force_share: true,
                    ..Default::default()
                },
            )
            .map(|i| i.virtual_size())
            .unwrap_or(0)
        } else {
            size
        };
        let line = formatting_line(file, size, &o);
        outln!("{}", echo_explicit_raw_off(line, &lists, &o));
    }
    Ok(())
}
