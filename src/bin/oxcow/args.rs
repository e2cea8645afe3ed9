//! Command-line plumbing shared by the subcommands: a strict option scanner (unknown options are
//! errors, never silently ignored), size parsing, JSON string quoting and qemu-style size text.

use std::fmt;

/// A subcommand failure: the message and the process exit code it maps to.
///
/// qemu-img exits 1 for both bad usage and failed operations; oxcow does the same so scripts
/// written against qemu-img keep working. Usage errors add a hint pointing at `--help`.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong, naming the file/option/offset involved.
    pub message: String,
    /// Whether this is a command-line mistake (prints the `--help` hint).
    pub usage: bool,
}

impl CliError {
    /// A command-line mistake (unknown option, missing value, bad number).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            usage: true,
        }
    }

    /// A failure while doing the work (I/O error, bad image, ...).
    pub fn op(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            usage: false,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<oxcow::Error> for CliError {
    fn from(e: oxcow::Error) -> CliError {
        CliError::op(e.to_string())
    }
}

/// Result type of the subcommands.
pub type CliResult<T> = Result<T, CliError>;

/// One item of a command line: an option (with its value when it takes one) or a positional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// An option, by its canonical spelling (e.g. `-f`, `--output`), and its value if any.
    Opt(&'static str, Option<String>),
    /// A positional argument.
    Pos(String),
}

/// Describes one accepted option: its spellings and whether it takes a value.
pub struct OptSpec {
    /// Every spelling (`-U`, `--force-share`); the first is the canonical name reported.
    pub names: &'static [&'static str],
    /// The option consumes a value (`-f qcow2`, `-fqcow2`, `--output=json`, `--output json`).
    pub takes_value: bool,
}

/// Shorthand for an [`OptSpec`] table entry.
pub const fn opt(names: &'static [&'static str], takes_value: bool) -> OptSpec {
    OptSpec { names, takes_value }
}

/// Splits `args` by `specs`. Unknown options are rejected so that a typo never silently changes
/// what a command does; `--` ends option parsing (for file names starting with '-').
pub fn scan(cmd: &str, args: &[String], specs: &[OptSpec]) -> CliResult<Vec<Arg>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    let mut only_pos = false;
    while let Some(a) = it.next() {
        if only_pos || a == "-" || !a.starts_with('-') {
            out.push(Arg::Pos(a.clone()));
            continue;
        }
        if a == "--" {
            only_pos = true;
            continue;
        }
        let mut found = None;
        for s in specs {
            for &n in s.names {
                if a == n {
                    found = Some((s, n, None));
                } else if s.takes_value {
                    if n.starts_with("--") {
                        if let Some(v) = a.strip_prefix(n).and_then(|r| r.strip_prefix('=')) {
                            found = Some((s, n, Some(v.to_string())));
                        }
                    } else if n.len() == 2 && a.len() > 2 && a.starts_with(n) {
                        // Short option with the value glued on: -fqcow2, -c1000.
                        found = Some((s, n, Some(a[2..].to_string())));
                    }
                }
                if found.is_some() {
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        let Some((spec, _, glued)) = found else {
            return Err(CliError::usage(format!("{cmd}: unknown option '{a}'")));
        };
        let canon = spec.names[0];
        let value = if spec.takes_value {
            match glued {
                Some(v) => Some(v),
                None => Some(it.next().cloned().ok_or_else(|| {
                    CliError::usage(format!("{cmd}: option '{a}' needs a value"))
                })?),
            }
        } else {
            None
        };
        out.push(Arg::Opt(canon, value));
    }
    Ok(out)
}

/// Parses sizes like 512, 64k, 10M, 2G, 1T (binary multiples, qemu-img style; 'b' = bytes).
/// Fractions are accepted with a suffix (1.5G) as qemu-img does.
pub fn parse_size(s: &str) -> CliResult<u64> {
    let t = s.trim();
    let bad = || {
        CliError::usage(format!(
            "invalid size '{s}' (use e.g. 4096, 64k, 512M, 10G)"
        ))
    };
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        Some('p' | 'P') => (&t[..t.len() - 1], 1 << 50),
        Some('b' | 'B') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    // A fraction only makes sense with a unit; the result must be a whole number of bytes.
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    if mult == 1 || !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 || v.fract() != 0.0 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Parses a plain non-negative integer option value.
pub fn parse_num(what: &str, s: &str) -> CliResult<u64> {
    s.trim()
        .parse()
        .map_err(|_| CliError::usage(format!("{what} must be a non-negative integer, not '{s}'")))
}

/// Parses on/off style booleans the way qemu-img's -o does.
pub fn parse_bool(what: &str, v: &str) -> CliResult<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(CliError::usage(format!(
            "option {what} expects on or off, not '{v}'"
        ))),
    }
}

/// Quotes a string for JSON output.
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Formats a byte count the way qemu-img's human output does: the largest binary unit that keeps
/// the number below 1000, three significant digits, trailing zeros dropped ("392 KiB", "1.5 GiB").
pub fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && (v as f64) >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let x = v as f64 / (1u64 << (10 * i)) as f64;
    // Three significant digits: the number of decimals depends on the magnitude.
    let decimals = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else if x >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{x:.decimals$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(401408), "392 KiB");
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(1000), "0.977 KiB");
    }

    #[test]
    fn scanning() {
        let specs = [opt(&["-f"], true), opt(&["-U", "--force-share"], false)];
        let specs2 = [opt(&["--output"], true)];
        let a = scan("t", &v(&["-fqcow2", "--force-share", "x"]), &specs).unwrap();
        assert_eq!(
            a,
            vec![
                Arg::Opt("-f", Some("qcow2".into())),
                Arg::Opt("-U", None),
                Arg::Pos("x".into())
            ]
        );
        assert!(scan("t", &v(&["-z"]), &specs).is_err());
        assert!(scan("t", &v(&["-f"]), &specs).is_err());
        let a = scan("t", &v(&["--output=json", "--", "-x"]), &specs2).unwrap();
        assert_eq!(
            a,
            vec![
                Arg::Opt("--output", Some("json".into())),
                Arg::Pos("-x".into())
            ]
        );
    }
}
