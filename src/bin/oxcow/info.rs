//! `oxcow info`: what `qemu-img info` prints, human or JSON, from the library's facts.

use crate::args::opt;
use crate::args::{human_size, scan, Arg, CliError, CliResult, OptSpec};
use crate::json::Obj;
use oxcow::format::{bitmap, snapshot as snap};
use oxcow::{CompressionType, Image, ImageInfo, OpenOptions};
use std::os::unix::fs::MetadataExt;

/// `oxcow info --help`.
pub const HELP: &str = "\
Usage: oxcow info [-f qcow2] [--output human|json] [-U] [--backing-chain] [--no-probe] FILE

Describe a qcow2 image the way 'qemu-img info' does: virtual size, space used on the host,
cluster size, backing file, internal snapshots and the qcow2 header features.

Options:
  -f FMT              image format; only qcow2 is accepted
  --output FMT        'human' (default) or 'json' (same keys and value types as qemu-img)
  -U, --force-share   open even if another process (e.g. a running VM) holds the image
  --backing-chain     also describe every image of the backing chain
  --no-probe          never guess a backing file's format: refuse one the image does not
                      record (use it for untrusted images)
  -h, --help          this text

Examples:
  oxcow info disk.qcow2
  oxcow info --output json disk.qcow2 | jq '.\"virtual-size\"'
  oxcow info -U --backing-chain overlay.qcow2
";

const SPECS: &[OptSpec] = &[
    opt(&["-f", "--format"], true),
    opt(&["--output"], true),
    opt(&["-U", "--force-share"], false),
    opt(&["--backing-chain"], false),
    opt(&["--no-probe"], false),
];

/// Everything printed for one image of the chain.
struct Described {
    filename: String,
    info: ImageInfo,
    actual_size: u64,
    file_length: u64,
    full_backing: Option<String>,
    snapshots: Vec<snap::Snapshot>,
    bitmaps: Vec<bitmap::BitmapEntry>,
}

/// Runs `oxcow info ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let mut json = false;
    let mut force_share = false;
    let mut chain = false;
    let mut no_probe = false;
    let mut files = Vec::new();
    for a in scan("info", args, SPECS)? {
        match a {
            Arg::Opt("-f", Some(f)) => crate::require_qcow2("info", &f)?,
            Arg::Opt("--output", Some(o)) => json = crate::parse_output("info", &o)?,
            Arg::Opt("-U", _) => force_share = true,
            Arg::Opt("--backing-chain", _) => chain = true,
            Arg::Opt("--no-probe", _) => no_probe = true,
            Arg::Pos(p) => files.push(p),
            Arg::Opt(..) => unreachable!("every spec is handled"),
        }
    }
    let [file] = files.as_slice() else {
        return Err(CliError::usage("info needs exactly one FILE"));
    };
    let mut list = vec![describe(file, force_share)?];
    while chain && list.len() < 1024 {
        let Some(next) = list.last().and_then(|d| d.full_backing.clone()) else {
            break;
        };
        let Some(last) = list.last() else { break };
        let recorded = last.info.backing_format.as_deref();
        if crate::backing_format(&last.filename, recorded, &next, no_probe)? == "raw" {
            // The library reads raw backing files but does not describe them as images.
            break;
        }
        list.push(describe(&next, true)?);
    }
    if json {
        let objs: Vec<String> = list.iter().map(|d| to_json(d).render(1)).collect();
        if chain {
            outln!("[\n    {}\n]", objs.join(",\n    "));
        } else {
            outln!("{}", to_json(&list[0]).render(0));
        }
    } else {
        for (i, d) in list.iter().enumerate() {
            if i > 0 {
                outln!();
            }
            print_human(d);
        }
    }
    Ok(())
}

/// Opens `file` alone (read-only, without its backing chain), as info and map inspect each
/// image of a chain; the error names the file like qemu-img's.
pub(crate) fn open_layer(file: &str, force_share: bool) -> CliResult<Image> {
    open_with(file, force_share, false)
}

fn open_with(file: &str, force_share: bool, no_data_file: bool) -> CliResult<Image> {
    Image::open(
        file,
        &OpenOptions {
            force_share,
            no_backing: true,
            no_data_file,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| CliError::op(format!("could not open '{file}': {e}")))
}

/// Opens `file` read-only and gathers what qemu-img would print about it.
fn describe(file: &str, force_share: bool) -> CliResult<Described> {
    // Metadata only, like qemu-img info: a missing data file does not hide the header.
    let img = open_with(file, force_share, true)?;
    let info = img.info()?;
    let snapshots = img.snapshots().to_vec();
    let bitmaps = img
        .bitmap_directory()
        .map_err(|e| CliError::op(format!("{file}: {e}")))?;
    drop(img);
    let meta = std::fs::metadata(file).map_err(|e| CliError::op(format!("{file}: {e}")))?;
    let full_backing = info
        .backing_file
        .as_deref()
        .map(|b| crate::resolve_backing(file, b));
    Ok(Described {
        filename: file.to_string(),
        // qemu-img reports allocated host blocks, not the file length.
        actual_size: meta.blocks() * 512,
        // qemu-img reports the file length in whole 512-byte sectors.
        file_length: meta.len().div_ceil(512) * 512,
        info,
        full_backing,
        snapshots,
        bitmaps,
    })
}

/// qemu-img's names of a bitmap's flags.
fn bitmap_flags(b: &bitmap::BitmapEntry) -> Vec<String> {
    let mut f = Vec::new();
    if b.flags & bitmap::FLAG_IN_USE != 0 {
        f.push("in-use".to_string());
    }
    if b.flags & bitmap::FLAG_AUTO != 0 {
        f.push("auto".to_string());
    }
    f
}

fn compat(i: &ImageInfo) -> &'static str {
    if i.version >= 3 {
        "1.1"
    } else {
        "0.10"
    }
}

fn ctype(i: &ImageInfo) -> &'static str {
    match i.compression {
        CompressionType::Deflate => "zlib",
        CompressionType::Zstd => "zstd",
    }
}

/// The JSON object `qemu-img info --output=json` prints, keys in qemu-img's order.
fn to_json(d: &Described) -> Obj {
    let i = &d.info;
    let mut file_child = Obj::new();
    file_child.list("children", Vec::new());
    file_child.num("virtual-size", d.file_length);
    file_child.str("filename", &d.filename);
    file_child.str("format", "file");
    file_child.num("actual-size", d.actual_size);
    let mut fs = Obj::new();
    fs.str("type", "file");
    fs.obj("data", Obj::new());
    file_child.obj("format-specific", fs);
    file_child.bool("dirty-flag", false);
    let mut child = Obj::new();
    child.str("name", "file");
    child.obj("info", file_child);

    let mut o = Obj::new();
    o.list("children", vec![child]);
    if !d.snapshots.is_empty() {
        let snaps = d
            .snapshots
            .iter()
            .map(|s| {
                let mut j = Obj::new();
                if let Some(ic) = s.icount {
                    j.num("icount", ic);
                }
                j.num("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                j.str("name", &s.name);
                j.num("date-sec", s.date_sec as u64);
                j.num("date-nsec", s.date_nsec as u64);
                j.num("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                j.str("id", &s.id);
                j.num("vm-state-size", s.vm_state_size);
                j
            })
            .collect();
        o.list("snapshots", snaps);
    }
    if let Some(f) = &i.backing_format {
        o.str("backing-filename-format", f);
    }
    o.num("virtual-size", i.virtual_size);
    o.str("filename", &d.filename);
    o.num("cluster-size", i.cluster_size as u64);
    o.str("format", "qcow2");
    o.num("actual-size", d.actual_size);
    let mut data = Obj::new();
    data.str("compat", compat(i));
    data.str("compression-type", ctype(i));
    if i.version >= 3 {
        data.bool("lazy-refcounts", i.lazy_refcounts);
    }
    if !d.bitmaps.is_empty() {
        let list = d
            .bitmaps
            .iter()
            .map(|b| {
                let mut j = Obj::new();
                j.strs("flags", bitmap_flags(b));
                j.str("name", &b.display_name());
                j.num("granularity", 1u64 << b.granularity_bits);
                j
            })
            .collect();
        data.list("bitmaps", list);
    }
    data.num("refcount-bits", i.refcount_bits as u64);
    if let Some(f) = &i.data_file {
        data.str("data-file", f);
        data.bool("data-file-raw", i.data_file_raw);
    }
    if i.version >= 3 {
        data.bool("corrupt", i.corrupt);
        data.bool("extended-l2", i.extended_l2);
    }
    let mut spec = Obj::new();
    spec.str("type", "qcow2");
    spec.obj("data", data);
    o.obj("format-specific", spec);
    if let Some(full) = &d.full_backing {
        o.str("full-backing-filename", full);
    }
    if let Some(b) = &i.backing_file {
        o.str("backing-filename", b);
    }
    o.bool("dirty-flag", i.dirty);
    o
}

/// Formats a guest clock value as qemu-img does: hours:minutes:seconds.milliseconds.
fn vm_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for a Unix time (qemu-img uses local time; oxcow avoids the C
/// time zone machinery, so on hosts with TZ=UTC both agree).
fn utc_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian), by 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The "Snapshot list:" table of `qemu-img info` and `qemu-img snapshot -l`.
pub fn print_snapshot_list(snapshots: &[snap::Snapshot]) {
    outln!("Snapshot list:");
    outln!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID",
        "TAG",
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    );
    for s in snapshots {
        outln!(
            "{:<7} {:<16} {:>8} {} {:>15} {:>10}",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            utc_date(s.date_sec as u64),
            vm_clock(s.vm_clock_nsec),
            s.icount.map(|v| v.to_string()).unwrap_or_default()
        );
    }
}

fn print_human(d: &Described) {
    let i = &d.info;
    outln!("image: {}", d.filename);
    outln!("file format: qcow2");
    outln!(
        "virtual size: {} ({} bytes)",
        human_size(i.virtual_size),
        i.virtual_size
    );
    outln!("disk size: {}", human_size(d.actual_size));
    outln!("cluster_size: {}", i.cluster_size);
    if let Some(b) = &i.backing_file {
        match &d.full_backing {
            Some(full) if full != b => outln!("backing file: {b} (actual path: {full})"),
            _ => outln!("backing file: {b}"),
        }
    }
    if let Some(f) = &i.backing_format {
        outln!("backing file format: {f}");
    }
    if i.dirty {
        outln!("cleanly shut down: no");
    }
    if !d.snapshots.is_empty() {
        print_snapshot_list(&d.snapshots);
    }
    outln!("Format specific information:");
    outln!("    compat: {}", compat(i));
    outln!("    compression type: {}", ctype(i));
    if i.version >= 3 {
        outln!("    lazy refcounts: {}", i.lazy_refcounts);
    }
    if !d.bitmaps.is_empty() {
        outln!("    bitmaps:");
        for (n, b) in d.bitmaps.iter().enumerate() {
            outln!("        [{n}]:");
            outln!("            flags:");
            for (k, f) in bitmap_flags(b).iter().enumerate() {
                outln!("                [{k}]: {f}");
            }
            outln!("            name: {}", b.display_name());
            outln!("            granularity: {}", 1u64 << b.granularity_bits);
        }
    }
    outln!("    refcount bits: {}", i.refcount_bits);
    if let Some(f) = &i.data_file {
        outln!("    data file: {f}");
        outln!("    data file raw: {}", i.data_file_raw);
    }
    if i.version >= 3 {
        outln!("    corrupt: {}", i.corrupt);
        outln!("    extended l2: {}", i.extended_l2);
    }
    outln!("Child node '/file':");
    outln!("    filename: {}", d.filename);
    outln!("    protocol type: file");
    outln!(
        "    file length: {} ({} bytes)",
        human_size(d.file_length),
        d.file_length
    );
    outln!("    disk size: {}", human_size(d.actual_size));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_clocks() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_795_898_961), "2026-11-28 20:49:21");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(vm_clock(3_723_004_000_000), "0001:02:03.004");
    }
}
