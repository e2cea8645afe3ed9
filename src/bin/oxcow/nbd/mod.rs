//! `oxcow nbd`: serve an image over NBD, like `qemu-nbd`.
//!
//! This module tree is also the example of embedding oxcow in a server: it uses only the
//! library's public API (`Image::open`, `read_at`, `write_at`, `write_zeroes`, `discard`,
//! `flush`, `block_status`, `bitmap_status`, `close`). Layout: `proto` (wire constants and
//! structures), `negotiate` (handshake and options), `context` (metadata contexts),
//! `transmit` (the request loop: small page-cache requests inline with batched replies, the
//! rest on a worker pool), `exec` (one request on the image: the seam an asynchronous engine
//! API would replace), `server` (listeners, connections, stop), `stream` (Unix/TCP sockets)
//! and `sys` (signals, fork: the only unsafe code).

mod context;
mod exec;
mod negotiate;
mod proto;
mod server;
mod stream;
mod sys;
mod transmit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oxcow::{Image, OpenOptions};

use crate::args::{opt, parse_num, scan, Arg, CliError, CliResult};

pub const HELP: &str = "\
Usage: oxcow nbd [OPTIONS] FILE

Serve a qcow2 image over NBD (fixed-newstyle, structured replies, block status), with
qemu-nbd's options. Requests of one client run concurrently on the image.

Options:
  -r, --read-only          export read-only
  -x, --export-name NAME   export name (default: the empty string)
  -D, --description TEXT   export description
  -k, --socket PATH        listen on a Unix socket
  -b, --bind ADDR          TCP address to listen on (default 127.0.0.1)
  -p, --port PORT          TCP port (default 10809)
  -e, --shared N           serve up to N clients at once (default 1)
  -t, --persistent         keep running after the last client disconnects
  -B, --bitmap NAME        export bitmap NAME as metadata context qemu:dirty-bitmap:NAME
  -l, --load-snapshot ID   export internal snapshot ID (or name), read-only
  -f, --format FMT         image format (qcow2)
  -n, --nocache            same as --cache=none
      --cache MODE         none, directsync, writethrough, writeback (default), unsafe
      --aio MODE           threads, native or io_uring (accepted; I/O uses threads)
      --discard MODE       ignore (default) or unmap: TRIM and zero writes free clusters
      --handshake-limit N  seconds a client has to finish the handshake (default 10)
      --fork               run in the background once the server listens
      --pid-file PATH      write the server's process id to PATH

SIGTERM, SIGINT or SIGHUP stop the server gracefully: requests already received complete,
then the image is flushed and closed (bitmaps stored, locks released).

Examples:
  oxcow nbd -k /tmp/disk.sock -t disk.qcow2
  qemu-img map -f raw nbd+unix:///?socket=/tmp/disk.sock
  oxcow nbd -r -B backup-1 -x disk -p 10810 --fork --pid-file nbd.pid disk.qcow2
";

/// Everything the command line asks for.
#[derive(Default)]
struct Config {
    file: String,
    read_only: bool,
    name: String,
    description: String,
    socket: Option<PathBuf>,
    bind: Option<String>,
    port: Option<u16>,
    shared: usize,
    persistent: bool,
    bitmap: Option<String>,
    snapshot: Option<String>,
    cache: String,
    discard: bool,
    handshake_limit: u64,
    fork: bool,
    pid_file: Option<PathBuf>,
}

/// Runs `oxcow nbd`.
pub fn run(args: &[String]) -> CliResult<()> {
    let cfg = parse(args)?;
    // Fork first, while the process has a single thread; the child reports back.
    let ready = if cfg.fork {
        Some(sys::fork_daemon().map_err(|e| CliError::op(format!("fork: {e}")))?)
    } else {
        None
    };
    match start(&cfg) {
        Ok((listener, export)) => {
            if let Some(r) = ready {
                r.ok();
            }
            serve(listener, export, &cfg)
        }
        Err(e) => match ready {
            // The waiting parent prints the message and exits 1.
            Some(r) => {
                r.fail(&e.message);
                std::process::exit(1)
            }
            None => Err(e),
        },
    }
}

fn parse(args: &[String]) -> CliResult<Config> {
    let specs = [
        opt(&["-r", "--read-only"], false),
        opt(&["-x", "--export-name"], true),
        opt(&["-D", "--description"], true),
        opt(&["-k", "--socket"], true),
        opt(&["-b", "--bind"], true),
        opt(&["-p", "--port"], true),
        opt(&["-e", "--shared"], true),
        opt(&["-t", "--persistent"], false),
        opt(&["-B", "--bitmap"], true),
        opt(&["-l", "--load-snapshot"], true),
        opt(&["-f", "--format"], true),
        opt(&["-n", "--nocache"], false),
        opt(&["--cache"], true),
        opt(&["--aio"], true),
        opt(&["--discard"], true),
        opt(&["--handshake-limit"], true),
        opt(&["--fork"], false),
        opt(&["--pid-file"], true),
    ];
    let mut c = Config {
        shared: 1,
        handshake_limit: 10,
        cache: "writeback".into(),
        ..Config::default()
    };
    for a in scan("nbd", args, &specs)? {
        apply(&mut c, a)?;
    }
    if c.file.is_empty() {
        return Err(CliError::usage("nbd: expecting one image file name"));
    }
    if c.socket.is_some() && (c.bind.is_some() || c.port.is_some()) {
        return Err(CliError::usage("nbd: -k cannot be used with -b or -p"));
    }
    Ok(c)
}

fn apply(c: &mut Config, a: Arg) -> CliResult<()> {
    match a {
        Arg::Opt("-r", _) => c.read_only = true,
        Arg::Opt("-x", Some(v)) => c.name = v,
        Arg::Opt("-D", Some(v)) => c.description = v,
        Arg::Opt("-k", Some(v)) => c.socket = Some(PathBuf::from(v)),
        Arg::Opt("-b", Some(v)) => c.bind = Some(v),
        Arg::Opt("-p", Some(v)) => c.port = Some(small_num("port", &v, 65535)? as u16),
        Arg::Opt("-e", Some(v)) => c.shared = small_num("shared", &v, 1024)?.max(1) as usize,
        Arg::Opt("-t", _) => c.persistent = true,
        Arg::Opt("-B", Some(v)) => c.bitmap = Some(v),
        Arg::Opt("-l", Some(v)) => c.snapshot = Some(v),
        Arg::Opt("-f", Some(v)) => crate::require_qcow2("nbd", &v)?,
        Arg::Opt("-n", _) => c.cache = "none".into(),
        Arg::Opt("--cache", Some(v)) => c.cache = cache_mode(v)?,
        Arg::Opt("--aio", Some(v)) => aio_mode(&v)?,
        Arg::Opt("--discard", Some(v)) => c.discard = discard_mode(&v)?,
        Arg::Opt("--handshake-limit", Some(v)) => {
            c.handshake_limit = small_num("handshake-limit", &v, 86400)?.max(1)
        }
        Arg::Opt("--fork", _) => c.fork = true,
        Arg::Opt("--pid-file", Some(v)) => c.pid_file = Some(PathBuf::from(v)),
        Arg::Pos(p) if c.file.is_empty() => c.file = p,
        Arg::Pos(p) => return Err(CliError::usage(format!("nbd: unexpected argument '{p}'"))),
        Arg::Opt(..) => {}
    }
    Ok(())
}

fn small_num(what: &str, v: &str, max: u64) -> CliResult<u64> {
    let n = parse_num(what, v)?;
    if n > max {
        return Err(CliError::usage(format!("nbd: invalid {what} '{v}'")));
    }
    Ok(n)
}

fn cache_mode(v: String) -> CliResult<String> {
    match v.as_str() {
        "none" | "off" | "directsync" | "writethrough" | "writeback" | "unsafe" => Ok(v),
        _ => Err(CliError::usage(format!("nbd: invalid cache mode '{v}'"))),
    }
}

fn aio_mode(v: &str) -> CliResult<()> {
    match v {
        "threads" | "native" | "io_uring" => Ok(()),
        _ => Err(CliError::usage(format!("nbd: invalid aio mode '{v}'"))),
    }
}

fn discard_mode(v: &str) -> CliResult<bool> {
    match v {
        "ignore" | "off" => Ok(false),
        "unmap" | "on" => Ok(true),
        _ => Err(CliError::usage(format!("nbd: invalid discard mode '{v}'"))),
    }
}

/// Opens the image and binds the listening socket.
fn start(c: &Config) -> CliResult<(server::Listener, Arc<exec::Export>)> {
    let export = open_export(c)?;
    let listener = match &c.socket {
        Some(p) => server::Listener::unix(p.clone()),
        None => server::Listener::tcp(
            c.bind.as_deref().unwrap_or("127.0.0.1"),
            c.port.unwrap_or(10809),
        ),
    }
    .map_err(|e| CliError::op(format!("Failed to listen: {e}")))?;
    if let Some(p) = &c.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| {
            CliError::op(format!("Failed to write pid file '{}': {e}", p.display()))
        })?;
    }
    sys::install_stop_handlers().map_err(|e| CliError::op(format!("signals: {e}")))?;
    Ok((listener, Arc::new(export)))
}

fn open_export(c: &Config) -> CliResult<exec::Export> {
    let read_only = c.read_only || c.snapshot.is_some();
    let opts = OpenOptions {
        writable: !read_only,
        direct: matches!(c.cache.as_str(), "none" | "off" | "directsync"),
        writethrough: matches!(c.cache.as_str(), "writethrough" | "directsync"),
        discard_unmap: c.discard,
        snapshot: c.snapshot.clone(),
        ..OpenOptions::default()
    };
    let image = Image::open(&c.file, &opts)
        .map_err(|e| CliError::op(format!("Failed to blk_new_open '{}': {e}", c.file)))?;
    if let Some(b) = &c.bitmap {
        if !image.bitmaps()?.iter().any(|i| &i.name == b) {
            return Err(CliError::op(format!("Bitmap '{b}' is not found")));
        }
    }
    let info = image.info()?;
    let fast_zero = info.version >= 3;
    let backing = open_chain(&c.file, info);
    Ok(exec::Export {
        image: Arc::new(image),
        name: c.name.clone(),
        description: c.description.clone(),
        read_only,
        bitmap: c.bitmap.clone(),
        discard: c.discard,
        fast_zero,
        multi_conn: c.shared > 1,
        backing,
        cached_io: !opts.direct && !opts.writethrough,
    })
}

/// Deepest backing chain opened for block status.
const MAX_CHAIN: usize = 16;

/// Opens the qcow2 images below `file` read-only, sharing them with the image's own handle,
/// for block status through the chain. Stops quietly at a raw or unopenable backing file:
/// its ranges are then reported as data, which is always safe.
fn open_chain(file: &str, mut info: oxcow::ImageInfo) -> Vec<Image> {
    let mut chain = Vec::new();
    let mut path = file.to_string();
    while chain.len() < MAX_CHAIN {
        let Some(b) = info.backing_file.as_deref() else {
            break;
        };
        if !matches!(info.backing_format.as_deref(), None | Some("qcow2")) {
            break;
        }
        path = crate::resolve_backing(&path, b);
        let opts = OpenOptions {
            force_share: true,
            no_probe: info.backing_format.is_none(),
            ..OpenOptions::default()
        };
        let Ok(img) = Image::open(&path, &opts) else {
            break;
        };
        let Ok(next) = img.info() else { break };
        chain.push(img);
        info = next;
    }
    chain
}

/// Serves until stopped, then closes the image cleanly.
fn serve(l: server::Listener, ex: Arc<exec::Export>, c: &Config) -> CliResult<()> {
    let policy = server::Policy {
        shared: c.shared,
        persistent: c.persistent,
        handshake_limit: Duration::from_secs(c.handshake_limit),
    };
    let served = server::serve(&l, &ex, &policy);
    drop(l);
    let closed = match Arc::try_unwrap(ex) {
        Ok(ex) => match Arc::try_unwrap(ex.image) {
            Ok(img) => img.close().map_err(CliError::from),
            Err(img) => img.flush().map_err(CliError::from),
        },
        Err(ex) => ex.image.flush().map_err(CliError::from),
    };
    if let Some(p) = &c.pid_file {
        let _ = std::fs::remove_file(p);
    }
    served.map_err(|e| CliError::op(format!("nbd: {e}")))?;
    closed
}
