//! The seam between the protocol and the engine: [`Export`] describes what is served and
//! [`execute`] runs one validated request on the image and encodes its complete reply.
//!
//! Everything below the seam is the public `oxcow::Image` API, called synchronously from a
//! worker thread or the connection's reader thread; an asynchronous engine API can replace
//! these functions without touching negotiation or the transmission loop.

use std::sync::Arc;

use oxcow::{Image, ZeroFlags, EXTENT_ALLOCATED, EXTENT_COMPRESSED, EXTENT_DIRTY, EXTENT_ZERO};

use super::context::{Selected, BASE_ALLOCATION_ID, DIRTY_BITMAP_ID};
use super::proto::*;

/// Largest READ/WRITE payload served (qemu-nbd's limit): larger requests are refused.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// At most this many extents are returned per context in one BLOCK_STATUS reply.
pub const MAX_EXTENTS: usize = 1 << 16;

/// One export: the image and how it is served.
pub struct Export {
    /// The open image, shared by every connection and worker.
    pub image: Arc<Image>,
    /// Export name (`-x`).
    pub name: String,
    /// Description (`-D`), sent for NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
    pub description: String,
    /// Served read-only (`-r`, or the image could not be opened writable).
    pub read_only: bool,
    /// Bitmap exported as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmap: Option<String>,
    /// TRIM discards clusters (`--discard=unmap`); otherwise TRIM is accepted and ignored.
    pub discard: bool,
    /// WRITE_ZEROES is metadata-only (qcow2 v3 zero clusters); FAST_ZERO fails otherwise.
    pub fast_zero: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Every connection shares one image handle, so a
    /// flush on any connection covers writes completed on all of them; it is offered only
    /// when `-e` admits more than one client (like qemu-nbd), or clients such as nbdcopy
    /// would open connections the server does not accept yet.
    pub multi_conn: bool,
    /// The qcow2 backing chain below `image`, opened read-only (sharing) only to answer
    /// `base:allocation` for ranges the image leaves to its backing file, like qemu-nbd.
    pub backing: Vec<Image>,
    /// The image is served through the page cache without write-through (no `--cache=none`,
    /// `directsync` or `writethrough`): a small read or write then costs memory copies, not
    /// a wait for the disk, and may run on the connection's reader thread.
    pub cached_io: bool,
}

impl Export {
    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        f
    }

    /// The guest size in bytes.
    pub fn size(&self) -> u64 {
        self.image.virtual_size()
    }
}

/// How replies are framed on a connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framing {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The contexts selected for BLOCK_STATUS.
    pub contexts: Selected,
}

/// Runs one request that passed [`super::transmit::validate`] and returns the whole reply.
/// `payload` is the WRITE data (empty for other commands).
pub fn execute(ex: &Export, f: Framing, req: &Request, payload: &[u8]) -> Vec<u8> {
    if req.command == CMD_READ {
        let mut out = Vec::new();
        read(ex, f, req, &mut out);
        return out;
    }
    execute_other(ex, f, req, payload)
}

/// Like [`execute`], but appends the reply to `out` (a READ's data is read into it in place).
pub fn execute_into(ex: &Export, f: Framing, req: &Request, payload: &[u8], out: &mut Vec<u8>) {
    if req.command == CMD_READ {
        read(ex, f, req, out);
    } else {
        out.extend_from_slice(&execute_other(ex, f, req, payload));
    }
}

fn execute_other(ex: &Export, f: Framing, req: &Request, payload: &[u8]) -> Vec<u8> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, u64::from(req.length));
    let done = |r: oxcow::Result<()>| match r {
        Ok(()) => ok_reply(f, req.cookie),
        Err(e) => error_reply(f, req.cookie, wire_error(&e), &e.to_string()),
    };
    match req.command {
        CMD_WRITE => done(
            ex.image
                .write_at(payload, off)
                .and_then(|()| flush_if(ex, fua)),
        ),
        CMD_FLUSH => done(ex.image.flush()),
        CMD_TRIM if ex.discard && len > 0 => {
            done(ex.image.discard(off, len).and_then(|()| flush_if(ex, fua)))
        }
        CMD_TRIM | CMD_CACHE => done(Ok(())),
        CMD_WRITE_ZEROES => write_zeroes(ex, f, req),
        CMD_BLOCK_STATUS => block_status(ex, f, req),
        _ => error_reply(f, req.cookie, EINVAL, "unknown command"),
    }
}

fn flush_if(ex: &Export, fua: bool) -> oxcow::Result<()> {
    if fua {
        ex.image.flush()
    } else {
        Ok(())
    }
}

fn write_zeroes(ex: &Export, f: Framing, req: &Request) -> Vec<u8> {
    if req.flags & CMD_FLAG_FAST_ZERO != 0 && !ex.fast_zero {
        return error_reply(f, req.cookie, ENOTSUP, "zeroing would not be fast");
    }
    let flags = ZeroFlags {
        may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0 && ex.discard,
    };
    let (off, len) = (req.offset, u64::from(req.length));
    let r = if len == 0 {
        Ok(())
    } else {
        ex.image
            .write_zeroes(off, len, flags)
            .and_then(|()| flush_if(ex, req.flags & CMD_FLAG_FUA != 0))
    };
    match r {
        Ok(()) => ok_reply(f, req.cookie),
        Err(e) => error_reply(f, req.cookie, wire_error(&e), &e.to_string()),
    }
}

/// READ: appends one data chunk (or a simple reply followed by the data) to `out`. The data
/// is read in place behind its header so the reply leaves with the others in one write.
fn read(ex: &Export, f: Framing, req: &Request, out: &mut Vec<u8>) {
    let len = req.length as usize;
    if len == 0 {
        out.extend_from_slice(&ok_reply(f, req.cookie));
        return;
    }
    let head = if f.structured {
        CHUNK_HEADER_LEN + 8
    } else {
        16
    };
    let start = out.len();
    if out.capacity() == 0 {
        // A fresh zeroed allocation: large ones come as untouched zero pages, no memset.
        *out = vec![0u8; head + len];
    } else {
        out.resize(start + head + len, 0);
    }
    let reply = &mut out[start..];
    if let Err(e) = ex.image.read_at(&mut reply[head..], req.offset) {
        out.truncate(start);
        out.extend_from_slice(&error_reply(f, req.cookie, wire_error(&e), &e.to_string()));
        return;
    }
    if f.structured {
        let kind = REPLY_TYPE_OFFSET_DATA;
        chunk_header(reply, REPLY_FLAG_DONE, kind, req.cookie, (len + 8) as u32);
        reply[20..28].copy_from_slice(&req.offset.to_be_bytes());
    } else {
        reply[..16].copy_from_slice(&simple_reply(req.cookie, 0));
    }
}

/// BLOCK_STATUS: one chunk per selected context, the last one marked done.
fn block_status(ex: &Export, f: Framing, req: &Request) -> Vec<u8> {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
    if f.contexts.allocation {
        match extents(ex, req, one, None) {
            Ok(v) => chunks.push((BASE_ALLOCATION_ID, v)),
            Err(e) => return error_reply(f, req.cookie, wire_error(&e), &e.to_string()),
        }
    }
    if let (true, Some(b)) = (f.contexts.bitmap, ex.bitmap.as_deref()) {
        match extents(ex, req, one, Some(b)) {
            Ok(v) => chunks.push((DIRTY_BITMAP_ID, v)),
            Err(e) => return error_reply(f, req.cookie, wire_error(&e), &e.to_string()),
        }
    }
    let mut out = Vec::new();
    let n = chunks.len();
    for (i, (id, ext)) in chunks.into_iter().enumerate() {
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        let len = 4 + 8 * ext.len();
        let start = out.len();
        out.resize(start + CHUNK_HEADER_LEN, 0);
        let kind = REPLY_TYPE_BLOCK_STATUS;
        chunk_header(&mut out[start..], flags, kind, req.cookie, len as u32);
        out.extend_from_slice(&id.to_be_bytes());
        for (l, fl) in ext {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&fl.to_be_bytes());
        }
    }
    out
}

/// The extents of `[offset, offset+length)` in NBD terms, merged where the flags repeat, at
/// most [`MAX_EXTENTS`] (one with REQ_ONE).
fn extents(
    ex: &Export,
    req: &Request,
    one: bool,
    bitmap: Option<&str>,
) -> oxcow::Result<Vec<(u32, u32)>> {
    let end = req.offset + u64::from(req.length);
    let mut off = req.offset;
    let mut out: Vec<(u32, u32)> = Vec::new();
    while off < end {
        let e = match bitmap {
            None => chain_status(ex, off, end - off)?,
            Some(b) => ex.image.bitmap_status(b, off, end - off)?,
        };
        let len = e.length.clamp(1, end - off);
        let flags = match bitmap {
            None => allocation_flags(e.flags),
            Some(_) if e.flags & EXTENT_DIRTY != 0 => STATE_DIRTY,
            Some(_) => 0,
        };
        let full = out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len as u32,
            _ if full => break,
            _ => out.push((len as u32, flags)),
        }
        off += len;
        if one {
            break;
        }
    }
    Ok(out)
}

/// The status of `[off, off+len)` through the chain: the image's own, or for a range read from
/// the backing file, the first backing image's that holds it (beyond a shorter backing file,
/// zeros). Past the opened chain (e.g. a raw backing file) the range stays "from backing".
fn chain_status(ex: &Export, off: u64, len: u64) -> oxcow::Result<oxcow::Extent> {
    let mut e = ex.image.block_status(off, len)?;
    for img in &ex.backing {
        if e.flags & oxcow::EXTENT_BACKING == 0 {
            break;
        }
        let size = img.virtual_size();
        if off >= size {
            e.flags = EXTENT_ZERO;
            break;
        }
        let b = img.block_status(off, e.length.min(size - off))?;
        e = oxcow::Extent {
            length: b.length.min(e.length),
            ..b
        };
    }
    Ok(e)
}

/// base:allocation flags like qemu-nbd's: a hole unless this image holds data for the range
/// (ranges read from a backing file are reported as data), zero when known to read as zeros.
fn allocation_flags(f: u32) -> u32 {
    let data = f & EXTENT_ALLOCATED != 0 && f & EXTENT_ZERO == 0
        || f & EXTENT_COMPRESSED != 0
        || f & oxcow::EXTENT_BACKING != 0;
    let mut r = if data { 0 } else { STATE_HOLE };
    if f & EXTENT_ZERO != 0 {
        r |= STATE_ZERO;
    }
    r
}

/// The reply for a successful request without data.
pub fn ok_reply(f: Framing, cookie: u64) -> Vec<u8> {
    if f.structured {
        let mut h = vec![0u8; CHUNK_HEADER_LEN];
        chunk_header(&mut h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        h
    } else {
        simple_reply(cookie, 0).to_vec()
    }
}

/// An error reply: a simple reply, or an error chunk carrying `msg` (truncated to 4 KiB).
pub fn error_reply(f: Framing, cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    if !f.structured {
        return simple_reply(cookie, error).to_vec();
    }
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut h = vec![0u8; CHUNK_HEADER_LEN];
    let len = 6 + msg.len();
    chunk_header(
        &mut h,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len as u32,
    );
    h.extend_from_slice(&error.to_be_bytes());
    h.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    h.extend_from_slice(msg);
    h
}

/// The NBD error for an engine error (the wire has its own small errno set).
pub fn wire_error(e: &oxcow::Error) -> u32 {
    match e.errno() {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_flags_follow_qemu_nbd() {
        assert_eq!(allocation_flags(EXTENT_ALLOCATED), 0);
        assert_eq!(
            allocation_flags(EXTENT_ALLOCATED | EXTENT_ZERO),
            STATE_HOLE | STATE_ZERO
        );
        assert_eq!(allocation_flags(EXTENT_ZERO), STATE_HOLE | STATE_ZERO);
        assert_eq!(allocation_flags(oxcow::EXTENT_BACKING), 0);
    }
}
