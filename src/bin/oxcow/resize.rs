//! `oxcow resize`: qemu-img resize over the engine.
//!
//! `oxcow resize [--shrink] [-q] [-f qcow2] [--preallocation off] FILE [+|-]SIZE`, with
//! qemu-img's syntax (the size is the last argument, so `-1G` needs no `--`) and messages.

use crate::args::{opt, scan, Arg, CliError, CliResult};
use oxcow::{Image, OpenOptions};

/// `oxcow resize --help`.
pub const HELP: &str = "\
Usage: oxcow resize [--shrink] [-q] [-f qcow2] [--preallocation off] FILE [+|-]SIZE[bkKMGTPE]
  Resize a qcow2 image to SIZE bytes, or grow/shrink it by SIZE with a leading + or -,
  like qemu-img resize. The new size must be a multiple of 512. The grown area reads as
  zeros (also over a longer backing file).
  --shrink   allow a new size smaller than the current one: the data past the new end
             is deleted
  -q         quiet: do not print 'Image resized.'
  -f qcow2   the image format (only qcow2)
  --preallocation off
             the only preallocation mode supported for the new area
Examples:
  oxcow resize disk.qcow2 20G
  oxcow resize disk.qcow2 +10G
  oxcow resize --shrink disk.qcow2 -1G
";

/// What `oxcow resize` was asked to do.
struct ResizeArgs {
    file: String,
    /// The SIZE argument as given.
    size: String,
    shrink: bool,
    quiet: bool,
}

/// Runs `oxcow resize ARGS`.
pub fn run(args: &[String]) -> CliResult<()> {
    let a = parse(args)?;
    let (sign, amount) = parse_size_arg(&a.size)?;
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let img = Image::open(&a.file, &opts)
        .map_err(|e| CliError::op(format!("Could not open '{}': {e}", a.file)))?;
    let current = img.virtual_size();
    let total = match sign {
        0 => i128::from(amount),
        _ => i128::from(current) + i128::from(sign) * i128::from(amount),
    };
    // qemu-img computes the size as a signed 64-bit number.
    if total <= 0 || total > i128::from(i64::MAX) {
        return Err(CliError::op("New image size must be positive"));
    }
    let total = total as u64;
    if total < current && !a.shrink {
        return Err(CliError::op(
            "Use the --shrink option to perform a shrink operation.\n\
             oxcow: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no \
             important data there.",
        ));
    }
    img.resize(total, a.shrink)?;
    img.close()?;
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(())
}

/// The arguments. The size is taken from the end before the options are scanned, as
/// qemu-img does, so that a negative size is not read as an option.
fn parse(args: &[String]) -> CliResult<ResizeArgs> {
    let Some((size, rest)) = args.split_last() else {
        return Err(CliError::usage("Expecting image file name and size"));
    };
    let specs = [
        opt(&["--shrink"], false),
        opt(&["-q", "--quiet"], false),
        opt(&["-f", "--format"], true),
        opt(&["--preallocation"], true),
    ];
    let (mut shrink, mut quiet, mut file) = (false, false, None);
    for arg in scan("resize", rest, &specs)? {
        match arg {
            Arg::Opt("--shrink", _) => shrink = true,
            Arg::Opt("-q", _) => quiet = true,
            Arg::Opt("-f", Some(fmt)) => crate::require_qcow2("resize", &fmt)?,
            Arg::Opt("--preallocation", Some(p)) if p == "off" => {}
            Arg::Opt("--preallocation", Some(p)) => {
                return Err(CliError::usage(format!(
                    "resize: preallocation mode '{p}' is not supported (only 'off')"
                )))
            }
            Arg::Pos(p) if file.is_none() => file = Some(p),
            Arg::Pos(p) => {
                return Err(CliError::usage(format!(
                    "resize: unexpected argument '{p}'"
                )))
            }
            Arg::Opt(..) => {}
        }
    }
    let Some(file) = file else {
        return Err(CliError::usage("Expecting image file name and size"));
    };
    Ok(ResizeArgs {
        file,
        size: size.clone(),
        shrink,
        quiet,
    })
}

/// Splits `[+|-]SIZE[bkKMGTPE]` into a sign (0 absolute, 1 grow by, -1 shrink by) and an
/// amount, with qemu-img's message for a bad size.
fn parse_size_arg(s: &str) -> CliResult<(i8, u64)> {
    let (sign, body) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => (0, s),
    };
    let bad = || {
        CliError::op(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    };
    let amount = match body.strip_suffix(['e', 'E']) {
        Some(n) => n
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << 60))
            .ok_or_else(bad)?,
        None => crate::args::parse_size(body).map_err(|_| bad())?,
    };
    Ok((sign, amount))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size_arg("1G").unwrap(), (0, 1 << 30));
        assert_eq!(parse_size_arg("+64k").unwrap(), (1, 65536));
        assert_eq!(parse_size_arg("-1.5K").unwrap(), (-1, 1536));
        assert_eq!(parse_size_arg("9E").unwrap(), (0, 9 << 60));
        assert!(parse_size_arg("abc").is_err());
        assert!(parse_size_arg("").is_err());
        assert!(parse_size_arg("20E").is_err());
    }

    #[test]
    fn the_size_is_the_last_argument_even_when_negative() {
        let v: Vec<String> = ["--shrink", "a.qcow2", "-1G"].map(String::from).into();
        let a = parse(&v).unwrap();
        assert!(a.shrink);
        assert_eq!((a.file.as_str(), a.size.as_str()), ("a.qcow2", "-1G"));
        let v: Vec<String> = ["a.qcow2"].map(String::from).into();
        assert!(parse(&v).is_err());
    }
}
