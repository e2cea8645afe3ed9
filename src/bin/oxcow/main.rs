//! `oxcow`: a qemu-img-style command line over the oxcow engine.
//!
//! Thin by design: argument parsing and printing; all work is done by the library.

use oxcow::{
    BackingFormat, CompressionType, CreateOptions, Image, OpenOptions, Preallocation,
    EXTENT_ALLOCATED, EXTENT_BACKING, EXTENT_COMPRESSED, EXTENT_ZERO,
};
use std::process::ExitCode;

mod check;
#[allow(dead_code)] // used by convert and check as they gain -p
mod progress;

const USAGE: &str = "\
oxcow - qcow2 disk images without QEMU

Usage:
  oxcow create [-o OPTIONS] [-b BACKING -F FMT] FILE [SIZE]
      Create a qcow2 image. SIZE accepts suffixes k, M, G, T (powers of 1024).
      OPTIONS is a comma list like qemu-img's: cluster_size=64k, compat=0.10|1.1,
      refcount_bits=16, lazy_refcounts=on, extended_l2=on, compression_type=zlib|zstd,
      preallocation=off|metadata.
  oxcow info [--output human|json] [-U] FILE
      Describe an image.
  oxcow map [--output human|json] [-U] FILE
      Show which guest ranges are allocated, zero, or come from the backing file.
  oxcow convert [-O raw|qcow2] [-o OPTIONS] SRC DST
      Copy the guest contents of SRC (qcow2) into a new raw or qcow2 image DST.

Exit codes: 0 success, 1 error (the message says what and where).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(1);
    };
    let rest = &args[1..];
    let ok = |r: Result<(), String>| r.map(|()| 0u8);
    let result = match cmd.as_str() {
        "create" => ok(cmd_create(rest)),
        "info" => ok(cmd_info(rest)),
        "map" => ok(cmd_map(rest)),
        "convert" => ok(cmd_convert(rest)),
        "check" => check::run(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => Err(format!("unknown command '{other}' (see 'oxcow --help')")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("oxcow: {e}");
            ExitCode::from(1)
        }
    }
}

/// Parses sizes like 512, 64k, 10M, 2G, 1T (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        Some('b' | 'B') => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size '{s}'"))
}

fn apply_create_option(o: &mut CreateOptions, kv: &str) -> Result<(), String> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| format!("option '{kv}' is not key=value"))?;
    let on = |v: &str| match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("option {k} expects on/off, not '{v}'")),
    };
    match k {
        "cluster_size" => o.cluster_size = parse_size(v)? as u32,
        "compat" => {
            o.version = match v {
                "0.10" => 2,
                "1.1" | "v3" => 3,
                _ => return Err(format!("compat must be 0.10 or 1.1, not '{v}'")),
            }
        }
        "refcount_bits" => {
            o.refcount_bits = v.parse().map_err(|_| format!("bad refcount_bits '{v}'"))?
        }
        "lazy_refcounts" => o.lazy_refcounts = on(v)?,
        "extended_l2" => o.extended_l2 = on(v)?,
        "compression_type" => {
            o.compression = match v {
                "zlib" | "deflate" => CompressionType::Deflate,
                "zstd" => CompressionType::Zstd,
                _ => return Err(format!("unknown compression_type '{v}'")),
            }
        }
        "preallocation" => {
            o.preallocation = match v {
                "off" => Preallocation::Off,
                "metadata" => Preallocation::Metadata,
                _ => return Err(format!("preallocation must be off or metadata, not '{v}'")),
            }
        }
        "backing_file" => o.backing_file = Some(v.to_string()),
        "backing_fmt" => {
            o.backing_format = Some(
                BackingFormat::from_name(v)
                    .ok_or_else(|| format!("unknown backing format '{v}'"))?,
            )
        }
        _ => return Err(format!("unknown create option '{k}'")),
    }
    Ok(())
}

fn cmd_create(args: &[String]) -> Result<(), String> {
    let mut o = CreateOptions::default();
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "-f" => {
                let f = val("-f")?;
                if f != "qcow2" {
                    return Err(format!("oxcow creates qcow2 images only, not '{f}'"));
                }
            }
            "-o" => {
                for kv in val("-o")?.split(',') {
                    apply_create_option(&mut o, kv)?;
                }
            }
            "-b" => o.backing_file = Some(val("-b")?),
            "-F" => {
                let f = val("-F")?;
                o.backing_format = Some(
                    BackingFormat::from_name(&f)
                        .ok_or_else(|| format!("unknown backing format '{f}'"))?,
                );
            }
            _ => pos.push(a.clone()),
        }
    }
    let (file, size) = match pos.as_slice() {
        [f] => (f, 0),
        [f, s] => (f, parse_size(s)?),
        _ => return Err("create needs FILE [SIZE]".into()),
    };
    if size == 0 && o.backing_file.is_none() {
        return Err("create needs a SIZE (or a backing file to take it from)".into());
    }
    oxcow::create(file, size, &o).map_err(|e| e.to_string())?;
    println!(
        "Formatting '{file}', fmt=qcow2 size={size} cluster_size={}",
        o.cluster_size
    );
    Ok(())
}

struct Common {
    json: bool,
    force_share: bool,
    file: String,
}

fn parse_common(args: &[String]) -> Result<Common, String> {
    let mut c = Common {
        json: false,
        force_share: false,
        file: String::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--output" => match it.next().map(String::as_str) {
                Some("json") => c.json = true,
                Some("human") => c.json = false,
                other => return Err(format!("--output must be human or json, not {other:?}")),
            },
            "--output=json" => c.json = true,
            "--output=human" => c.json = false,
            "-U" | "--force-share" => c.force_share = true,
            "-f" => {
                it.next();
            }
            f if !f.starts_with('-') && c.file.is_empty() => c.file = f.to_string(),
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    if c.file.is_empty() {
        return Err("missing FILE".into());
    }
    Ok(c)
}

fn open_ro(file: &str, force_share: bool) -> Result<Image, String> {
    Image::open(
        file,
        &OpenOptions {
            force_share,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| e.to_string())
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn cmd_info(args: &[String]) -> Result<(), String> {
    let c = parse_common(args)?;
    let img = open_ro(&c.file, c.force_share)?;
    let i = img.info().map_err(|e| e.to_string())?;
    let compat = if i.version >= 3 { "1.1" } else { "0.10" };
    let ctype = match i.compression {
        CompressionType::Deflate => "zlib",
        CompressionType::Zstd => "zstd",
    };
    if c.json {
        let mut fields = vec![
            format!("\"virtual-size\": {}", i.virtual_size),
            format!("\"filename\": {}", json_str(&c.file)),
            format!("\"cluster-size\": {}", i.cluster_size),
            "\"format\": \"qcow2\"".to_string(),
            format!("\"actual-size\": {}", i.file_size),
            format!("\"dirty-flag\": {}", i.dirty),
        ];
        if let Some(b) = &i.backing_file {
            fields.push(format!("\"backing-filename\": {}", json_str(b)));
        }
        if let Some(f) = &i.backing_format {
            fields.push(format!("\"backing-filename-format\": {}", json_str(f)));
        }
        let mut data = vec![
            format!("\"compat\": \"{compat}\""),
            format!("\"compression-type\": \"{ctype}\""),
            format!("\"refcount-bits\": {}", i.refcount_bits),
            format!("\"corrupt\": {}", i.corrupt),
        ];
        if i.version >= 3 {
            data.push(format!("\"lazy-refcounts\": {}", i.lazy_refcounts));
            data.push(format!("\"extended-l2\": {}", i.extended_l2));
        }
        fields.push(format!(
            "\"format-specific\": {{\"type\": \"qcow2\", \"data\": {{{}}}}}",
            data.join(", ")
        ));
        println!("{{\n    {}\n}}", fields.join(",\n    "));
    } else {
        println!("image: {}", c.file);
        println!("file format: qcow2");
        println!("virtual size: {} bytes", i.virtual_size);
        println!("disk size: {} bytes", i.file_size);
        println!("cluster_size: {}", i.cluster_size);
        if let Some(b) = &i.backing_file {
            println!("backing file: {b}");
        }
        if let Some(f) = &i.backing_format {
            println!("backing file format: {f}");
        }
        if i.snapshot_count > 0 {
            println!("snapshots: {}", i.snapshot_count);
        }
        println!("Format specific information:");
        println!("    compat: {compat}");
        println!("    compression type: {ctype}");
        if i.version >= 3 {
            println!("    lazy refcounts: {}", i.lazy_refcounts);
        }
        println!("    refcount bits: {}", i.refcount_bits);
        println!("    corrupt: {}", i.corrupt);
        if i.version >= 3 {
            println!("    extended l2: {}", i.extended_l2);
        }
    }
    Ok(())
}

fn cmd_map(args: &[String]) -> Result<(), String> {
    let c = parse_common(args)?;
    let img = open_ro(&c.file, c.force_share)?;
    let size = img.virtual_size();
    let mut off = 0;
    let mut rows = Vec::new();
    while off < size {
        let e = img
            .block_status(off, size - off)
            .map_err(|e| e.to_string())?;
        if c.json {
            let data = e.flags & EXTENT_ALLOCATED != 0 && e.flags & EXTENT_ZERO == 0;
            let mut row = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.offset,
                e.length,
                if e.flags & EXTENT_BACKING != 0 { 1 } else { 0 },
                e.flags & (EXTENT_ALLOCATED | EXTENT_BACKING) != 0,
                e.flags & EXTENT_ZERO != 0,
                data,
                e.flags & EXTENT_COMPRESSED != 0
            );
            if data && e.flags & EXTENT_COMPRESSED == 0 {
                row.push_str(&format!(", \"offset\": {}", e.host_offset));
            }
            row.push_str(" }");
            rows.push(row);
        } else if e.flags & EXTENT_ALLOCATED != 0 && e.flags & EXTENT_ZERO == 0 {
            rows.push(format!(
                "{:<#18x} {:<#18x} {:<#18x} {}",
                e.offset, e.length, e.host_offset, c.file
            ));
        }
        off += e.length;
    }
    if c.json {
        println!("[{}]", rows.join(",\n"));
    } else {
        println!("{:<18} {:<18} {:<18} File", "Offset", "Length", "Mapped to");
        for r in rows {
            println!("{r}");
        }
    }
    Ok(())
}

fn cmd_convert(args: &[String]) -> Result<(), String> {
    let mut out_fmt = "raw".to_string();
    let mut o = CreateOptions::default();
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-O" => out_fmt = it.next().cloned().ok_or("-O needs a format")?,
            "-o" => {
                for kv in it.next().ok_or("-o needs options")?.split(',') {
                    apply_create_option(&mut o, kv)?;
                }
            }
            "-f" => {
                it.next();
            }
            _ => pos.push(a.clone()),
        }
    }
    let [src, dst] = pos.as_slice() else {
        return Err("convert needs SRC DST".into());
    };
    let img = open_ro(src, false)?;
    let size = img.virtual_size();
    let chunk = 4u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    match out_fmt.as_str() {
        "raw" => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(dst).map_err(|e| format!("creating {dst}: {e}"))?;
            f.set_len(size).map_err(|e| format!("sizing {dst}: {e}"))?;
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let e = img.block_status(off, n).map_err(|e| e.to_string())?;
                let n = e.length;
                let reads_zero = e.flags & EXTENT_ZERO != 0;
                if !reads_zero {
                    let b = &mut buf[..n as usize];
                    img.read_at(b, off).map_err(|e| e.to_string())?;
                    if b.iter().any(|&x| x != 0) {
                        f.write_all_at(b, off)
                            .map_err(|e| format!("writing {dst}: {e}"))?;
                    }
                }
                off += n;
            }
            f.sync_all().map_err(|e| format!("syncing {dst}: {e}"))?;
        }
        "qcow2" => {
            oxcow::create(dst, size, &o).map_err(|e| e.to_string())?;
            let out = Image::open(
                dst,
                &OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let b = &mut buf[..n as usize];
                img.read_at(b, off).map_err(|e| e.to_string())?;
                // Skip all-zero 64 KiB pieces so the copy stays sparse.
                for (i, piece) in b.chunks(65536).enumerate() {
                    if piece.iter().any(|&x| x != 0) {
                        out.write_at(piece, off + i as u64 * 65536)
                            .map_err(|e| e.to_string())?;
                    }
                }
                off += n;
            }
            out.close().map_err(|e| e.to_string())?;
        }
        other => {
            return Err(format!(
                "unsupported output format '{other}' (raw or qcow2)"
            ))
        }
    }
    Ok(())
}
