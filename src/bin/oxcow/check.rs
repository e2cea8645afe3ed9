//! `oxcow check`: qemu-img check over the engine.
//!
//! `oxcow check [-r leaks|all] [--output human|json] [-U] [-p] [-q] [-f qcow2] FILE`.
//! Diagnostics go to stderr, the summary to stdout, exit codes are qemu-img's: 0 clean,
//! 1 check not completed, 2 corruptions, 3 leaks only.

use crate::args::json_str;
use crate::progress::Progress;
use oxcow::{CheckFix, CheckReport, Image};

const HELP: &str = "\
Usage: oxcow check [-r leaks|all] [--output human|json] [-U] [-p] [-q] [-f qcow2] FILE
  Check a qcow2 image for consistency, like qemu-img check.
  -r leaks   repair leaked clusters only
  -r all     repair leaks and corruptions (rebuilds the refcount structure if needed)
  -U         force share: check an image another process has open (read-only checks)
  -p         show progress
  -q         quiet: no summary in human output
Exit codes: 0 clean, 1 check failed, 2 corruptions found, 3 only leaks found.
";

#[derive(PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

/// What `oxcow check` was asked to do.
struct CheckArgs<'a> {
    fix: CheckFix,
    output: Output,
    force_share: bool,
    show_progress: bool,
    quiet: bool,
    file: &'a str,
}

/// Runs `oxcow check ARGS`; returns the process exit code.
pub fn run(args: &[String]) -> Result<u8, String> {
    let Some(a) = parse(args)? else {
        return Ok(0); // --help
    };
    let mut progress = Progress::new(a.show_progress && a.output == Output::Human && !a.quiet);
    let mut cb = |done: u64, total: u64| progress.update(done, total);
    let result = Image::check_path(a.file, a.fix, a.force_share, Some(&mut cb));
    progress.finish();
    let report = result.map_err(|e| format!("Check failed: {e}"))?;
    print_report(&report, &a);
    if report.check_errors > 0 {
        eprintln!("oxcow: Check failed");
    }
    Ok(report.exit_code())
}

/// Prints the report the way qemu-img check does: repair and check messages on stderr, the
/// summary (or JSON) on stdout.
fn print_report(report: &CheckReport, a: &CheckArgs) {
    for m in &report.repair_messages {
        eprintln!("{m}");
    }
    if report.rechecked && a.output == Output::Human && !a.quiet {
        out!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            report.leaks_fixed, report.corruptions_fixed
        );
    }
    for m in &report.messages {
        eprintln!("{m}");
    }
    match a.output {
        Output::Human if !a.quiet => out!("{}", human(report)),
        Output::Human => {}
        Output::Json => out!("{}", json(report, a.file)),
    }
}

/// The arguments, or `None` after printing --help.
fn parse(args: &[String]) -> Result<Option<CheckArgs<'_>>, String> {
    let mut fix = CheckFix::None;
    let mut output = Output::Human;
    let mut force_share = false;
    let mut show_progress = false;
    let mut quiet = false;
    let mut file: Option<&str> = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = |name: &str| -> Result<String, String> {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("check: {name} needs a value"))
        };
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a, None),
        };
        match flag {
            "-h" | "--help" => {
                out!("{HELP}");
                return Ok(None);
            }
            "-r" | "--repair" => {
                let v = match inline {
                    Some(v) => v,
                    None => value("-r")?,
                };
                fix = match v.as_str() {
                    "leaks" => CheckFix::Leaks,
                    "all" => CheckFix::All,
                    _ => return Err(format!("check: invalid -r value '{v}' (leaks or all)")),
                };
            }
            "--output" => {
                let v = match inline {
                    Some(v) => v,
                    None => value("--output")?,
                };
                output = match v.as_str() {
                    "human" => Output::Human,
                    "json" => Output::Json,
                    _ => return Err(format!("check: --output must be human or json, not '{v}'")),
                };
            }
            "-f" => {
                let v = value("-f")?;
                if v != "qcow2" {
                    return Err(format!("check: unsupported format '{v}' (only qcow2)"));
                }
            }
            "-U" | "--force-share" => force_share = true,
            "-p" => show_progress = true,
            "-q" => quiet = true,
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!(
                    "check: unknown option '{s}' (see 'oxcow check --help')"
                ))
            }
            s => {
                if file.is_some() {
                    return Err(format!("check: unexpected argument '{s}'"));
                }
                file = Some(s);
            }
        }
        i += 1;
    }
    let Some(file) = file else {
        return Err("check: expecting a filename".into());
    };
    if force_share && fix != CheckFix::None {
        return Err("check: -U (force share) can only be used for read-only checks".into());
    }
    Ok(Some(CheckArgs {
        fix,
        output,
        force_share,
        show_progress,
        quiet,
        file,
    }))
}

/// qemu-img's human summary.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's JSON `ImageCheck`: filename, format and check-errors always, the other
/// counters only when non-zero.
fn json(r: &CheckReport, file: &str) -> String {
    let mut fields: Vec<(&str, String)> = Vec::new();
    let mut num = |k: &'static str, v: u64, always: bool| {
        if always || v != 0 {
            fields.push((k, v.to_string()));
        }
    };
    num("image-end-offset", r.image_end_offset, false);
    num("total-clusters", r.total_clusters, false);
    num("check-errors", r.check_errors, true);
    num("allocated-clusters", r.allocated_clusters, false);
    num("fragmented-clusters", r.fragmented_clusters, false);
    num("compressed-clusters", r.compressed_clusters, false);
    num("corruptions", r.corruptions, false);
    num("leaks", r.leaks, false);
    num("corruptions-fixed", r.corruptions_fixed, false);
    num("leaks-fixed", r.leaks_fixed, false);
    fields.push(("filename", json_str(file)));
    fields.push(("format", json_str("qcow2")));
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("    \"{k}\": {v}"))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}
