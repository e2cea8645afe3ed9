//! Fixed-newstyle handshake and option haggling, up to the start of transmission.
//!
//! Bounded against hostile clients: option data above [`MAX_OPTION_LEN`] is read into a fixed
//! buffer and dropped, names above [`MAX_NAME_LEN`] are refused, at most [`MAX_OPTIONS`]
//! options are accepted, and the caller bounds the time the whole handshake may take.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::context::{self, BASE_ALLOCATION_ID, DIRTY_BITMAP_ID};
use super::exec::{Export, Framing, MAX_PAYLOAD};
use super::proto::*;
use super::stream::drop_bytes;

/// Longest option payload read into memory.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest export name (the protocol's own limit).
pub const MAX_NAME_LEN: usize = 4096;
/// Options accepted on one connection before it is closed.
pub const MAX_OPTIONS: usize = 1024;

/// How a handshake ended.
pub enum End {
    /// NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded: transmission starts with this framing.
    Transmit(Framing),
    /// The client aborted, or broke the protocol in a way that ends the connection.
    Close,
}

/// Runs the server side of the handshake on a fresh connection.
pub fn negotiate(
    r: &mut impl Read,
    w: &mut impl Write,
    ex: &Export,
    deadline: Instant,
) -> io::Result<End> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    let cflags = u32::from_be_bytes(b);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(End::Close);
    }
    let mut h = Haggle {
        ex,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        framing: Framing::default(),
    };
    for _ in 0..MAX_OPTIONS {
        if Instant::now() > deadline {
            return Ok(End::Close);
        }
        if let Some(end) = h.option(r, w)? {
            return Ok(end);
        }
    }
    Ok(End::Close)
}

struct Haggle<'a> {
    ex: &'a Export,
    no_zeroes: bool,
    framing: Framing,
}

impl Haggle<'_> {
    /// Handles one option; `Some` when the handshake is over.
    fn option(&mut self, r: &mut impl Read, w: &mut impl Write) -> io::Result<Option<End>> {
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        if be64(&head[0..8]) != IHAVEOPT {
            return Ok(Some(End::Close));
        }
        let (opt, len) = (be32(&head[8..12]), be32(&head[12..16]));
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME {
                return Ok(Some(End::Close));
            }
            drop_bytes(r, u64::from(len))?;
            return reply(w, opt, REP_ERR_TOO_BIG, b"option too long").map(|()| None);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => self.export_name(w, &data),
            OPT_ABORT => {
                let _ = reply(w, opt, REP_ACK, b"");
                Ok(Some(End::Close))
            }
            OPT_LIST => self.list(w, &data).map(|()| None),
            OPT_STARTTLS => reply(w, opt, REP_ERR_POLICY, b"TLS not configured").map(|()| None),
            OPT_INFO | OPT_GO => self.info_go(w, opt, &data),
            OPT_STRUCTURED_REPLY => self.structured(w, &data).map(|()| None),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(w, opt, &data).map(|()| None)
            }
            _ => reply(w, opt, REP_ERR_UNSUP, b"option not supported").map(|()| None),
        }
    }

    /// NBD_OPT_EXPORT_NAME: no error reply exists, so an unknown name closes the connection.
    fn export_name(&mut self, w: &mut impl Write, name: &[u8]) -> io::Result<Option<End>> {
        if name != self.ex.name.as_bytes() {
            return Ok(Some(End::Close));
        }
        let mut v = Vec::with_capacity(134);
        v.extend_from_slice(&self.ex.size().to_be_bytes());
        v.extend_from_slice(
            &self
                .ex
                .transmission_flags(self.framing.structured)
                .to_be_bytes(),
        );
        if !self.no_zeroes {
            v.extend_from_slice(&[0u8; 124]);
        }
        w.write_all(&v)?;
        Ok(Some(End::Transmit(self.framing)))
    }

    fn list(&mut self, w: &mut impl Write, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return reply(w, OPT_LIST, REP_ERR_INVALID, b"OPT_LIST with data");
        }
        let name = self.ex.name.as_bytes();
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(self.ex.description.as_bytes());
        reply(w, OPT_LIST, REP_SERVER, &v)?;
        reply(w, OPT_LIST, REP_ACK, b"")
    }

    fn structured(&mut self, w: &mut impl Write, data: &[u8]) -> io::Result<()> {
        let opt = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return reply(w, opt, REP_ERR_INVALID, b"OPT_STRUCTURED_REPLY with data");
        }
        if self.framing.structured {
            return reply(
                w,
                opt,
                REP_ERR_INVALID,
                b"structured reply already negotiated",
            );
        }
        self.framing.structured = true;
        reply(w, opt, REP_ACK, b"")
    }

    /// NBD_OPT_INFO / NBD_OPT_GO: export name, then the information requests.
    fn info_go(&mut self, w: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<Option<End>> {
        let Some((name, rest)) = name_prefix(data) else {
            return reply(w, opt, REP_ERR_INVALID, b"malformed request").map(|()| None);
        };
        let n = if rest.len() >= 2 {
            be16(rest)
        } else {
            u16::MAX
        };
        if rest.len() != 2 + 2 * usize::from(n) {
            return reply(w, opt, REP_ERR_INVALID, b"malformed request").map(|()| None);
        }
        if name != self.ex.name.as_bytes() {
            let msg = format!("export '{}' not present", String::from_utf8_lossy(name));
            return reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).map(|()| None);
        }
        let wants = |t: u16| rest[2..].chunks_exact(2).any(|c| be16(c) == t);
        if wants(INFO_NAME) {
            info(w, opt, INFO_NAME, self.ex.name.as_bytes())?;
        }
        if wants(INFO_DESCRIPTION) && !self.ex.description.is_empty() {
            info(w, opt, INFO_DESCRIPTION, self.ex.description.as_bytes())?;
        }
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        info(w, opt, INFO_BLOCK_SIZE, &bs)?;
        let mut e = self.ex.size().to_be_bytes().to_vec();
        let flags = self.ex.transmission_flags(self.framing.structured);
        e.extend_from_slice(&flags.to_be_bytes());
        info(w, opt, INFO_EXPORT, &e)?;
        reply(w, opt, REP_ACK, b"")?;
        Ok((opt == OPT_GO).then_some(End::Transmit(self.framing)))
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    fn meta_context(&mut self, w: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
        let list = opt == OPT_LIST_META_CONTEXT;
        if !list && !self.framing.structured {
            return reply(
                w,
                opt,
                REP_ERR_INVALID,
                b"structured replies not negotiated",
            );
        }
        let Some((name, queries)) = parse_queries(data) else {
            return reply(w, opt, REP_ERR_INVALID, b"malformed request");
        };
        if name != self.ex.name.as_bytes() {
            let msg = format!("export '{}' not present", String::from_utf8_lossy(name));
            return reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes());
        }
        let bitmap = self.ex.bitmap.as_deref();
        let sel = context::resolve(&queries, bitmap, list);
        if sel.allocation {
            meta(w, opt, BASE_ALLOCATION_ID, "base:allocation")?;
        }
        if let (true, Some(b)) = (sel.bitmap, bitmap) {
            meta(w, opt, DIRTY_BITMAP_ID, &context::bitmap_context_name(b))?;
        }
        if !list {
            self.framing.contexts = sel;
        }
        reply(w, opt, REP_ACK, b"")
    }
}

/// Splits `u32 length, name` off the front of an option payload.
fn name_prefix(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = be32(data.get(0..4)?) as usize;
    if n > MAX_NAME_LEN {
        return None;
    }
    let name = data.get(4..4 + n)?;
    Some((name, &data[4 + n..]))
}

/// The export name and the queries of a meta-context option; queries longer than
/// [`context::MAX_QUERY_LEN`] are kept but match nothing.
fn parse_queries(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let (name, rest) = name_prefix(data)?;
    let n = be32(rest.get(0..4)?);
    let mut rest = &rest[4..];
    let mut qs = Vec::new();
    for _ in 0..n {
        let l = be32(rest.get(0..4)?) as usize;
        let q = rest.get(4..4usize.checked_add(l)?)?;
        qs.push(if l > context::MAX_QUERY_LEN {
            &[][..]
        } else {
            q
        });
        rest = &rest[4 + l..];
    }
    rest.is_empty().then_some((name, qs))
}

fn reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&option_reply(opt, kind, data))
}

fn info(w: &mut impl Write, opt: u32, kind: u16, data: &[u8]) -> io::Result<()> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend_from_slice(data);
    reply(w, opt, REP_INFO, &v)
}

fn meta(w: &mut impl Write, opt: u32, id: u32, name: &str) -> io::Result<()> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    reply(w, opt, REP_META_CONTEXT, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_must_fill_the_payload_exactly() {
        let mut d = 1u32.to_be_bytes().to_vec();
        d.push(b'x');
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"base:");
        let (n, q) = parse_queries(&d).unwrap();
        assert_eq!((n, q), (&b"x"[..], vec![&b"base:"[..]]));
        d.push(0);
        assert!(parse_queries(&d).is_none());
        d.truncate(d.len() - 3);
        assert!(parse_queries(&d).is_none());
        let huge = u32::MAX.to_be_bytes();
        assert!(name_prefix(&huge).is_none());
    }
}
