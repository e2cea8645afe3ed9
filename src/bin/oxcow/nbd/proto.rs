//! NBD wire constants and the fixed-size structures of the protocol (the NBD project's
//! `doc/proto.md`): handshake, option haggling, requests and simple/structured replies.
//! Everything here is pure encoding: no I/O, no policy.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixing every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// NBD_FLAG_NO_ZEROES in the protocol document.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// NBD_FLAG_C_NO_ZEROES in the protocol document.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// NBD_OPT_ABORT in the protocol document.
pub const OPT_ABORT: u32 = 2;
/// NBD_OPT_LIST in the protocol document.
pub const OPT_LIST: u32 = 3;
/// NBD_OPT_STARTTLS in the protocol document.
pub const OPT_STARTTLS: u32 = 5;
/// NBD_OPT_INFO in the protocol document.
pub const OPT_INFO: u32 = 6;
/// NBD_OPT_GO in the protocol document.
pub const OPT_GO: u32 = 7;
/// NBD_OPT_STRUCTURED_REPLY in the protocol document.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// NBD_OPT_LIST_META_CONTEXT in the protocol document.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// NBD_OPT_SET_META_CONTEXT in the protocol document.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// NBD_REP_SERVER in the protocol document.
pub const REP_SERVER: u32 = 2;
/// NBD_REP_INFO in the protocol document.
pub const REP_INFO: u32 = 3;
/// NBD_REP_META_CONTEXT in the protocol document.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// NBD_REP_ERR_UNSUP in the protocol document.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// NBD_REP_ERR_POLICY in the protocol document.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// NBD_REP_ERR_INVALID in the protocol document.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// NBD_REP_ERR_UNKNOWN in the protocol document.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// NBD_REP_ERR_TOO_BIG in the protocol document.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// NBD_OPT_INFO/GO information types.
pub const INFO_EXPORT: u16 = 0;
/// NBD_INFO_NAME in the protocol document.
pub const INFO_NAME: u16 = 1;
/// NBD_INFO_DESCRIPTION in the protocol document.
pub const INFO_DESCRIPTION: u16 = 2;
/// NBD_INFO_BLOCK_SIZE in the protocol document.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag NBD_FLAG_READ_ONLY in the protocol document.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag NBD_FLAG_SEND_FLUSH in the protocol document.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag NBD_FLAG_SEND_FUA in the protocol document.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag NBD_FLAG_SEND_TRIM in the protocol document.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag NBD_FLAG_SEND_WRITE_ZEROES in the protocol document.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag NBD_FLAG_SEND_DF in the protocol document.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag NBD_FLAG_CAN_MULTI_CONN in the protocol document.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag NBD_FLAG_SEND_CACHE in the protocol document.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag NBD_FLAG_SEND_FAST_ZERO in the protocol document.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
/// NBD_CMD_WRITE in the protocol document.
pub const CMD_WRITE: u16 = 1;
/// NBD_CMD_DISC in the protocol document.
pub const CMD_DISC: u16 = 2;
/// NBD_CMD_FLUSH in the protocol document.
pub const CMD_FLUSH: u16 = 3;
/// NBD_CMD_TRIM in the protocol document.
pub const CMD_TRIM: u16 = 4;
/// NBD_CMD_CACHE in the protocol document.
pub const CMD_CACHE: u16 = 5;
/// NBD_CMD_WRITE_ZEROES in the protocol document.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// NBD_CMD_BLOCK_STATUS in the protocol document.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// NBD_CMD_FLAG_NO_HOLE in the protocol document.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// NBD_CMD_FLAG_DF in the protocol document.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// NBD_CMD_FLAG_REQ_ONE in the protocol document.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// NBD_CMD_FLAG_FAST_ZERO in the protocol document.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// NBD_REPLY_TYPE_NONE in the protocol document.
pub const REPLY_TYPE_NONE: u16 = 0;
/// NBD_REPLY_TYPE_OFFSET_DATA in the protocol document.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// NBD_REPLY_TYPE_BLOCK_STATUS in the protocol document.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// NBD_REPLY_TYPE_ERROR in the protocol document.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Error values on the wire (fixed by the protocol, not the host's errno numbering).
pub const EPERM: u32 = 1;
/// NBD_EIO in the protocol document.
pub const EIO: u32 = 5;
/// NBD_ENOMEM in the protocol document.
pub const ENOMEM: u32 = 12;
/// NBD_EINVAL in the protocol document.
pub const EINVAL: u32 = 22;
/// NBD_ENOSPC in the protocol document.
pub const ENOSPC: u32 = 28;
/// NBD_EOVERFLOW in the protocol document.
pub const EOVERFLOW: u32 = 75;
/// NBD_ENOTSUP in the protocol document.
pub const ENOTSUP: u32 = 95;
/// NBD_ESHUTDOWN in the protocol document.
pub const ESHUTDOWN: u32 = 108;

/// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// NBD_STATE_ZERO in the protocol document.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// One transmission request as read from the wire (compact header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// NBD_CMD_FLAG_* bits.
    pub flags: u16,
    /// NBD_CMD_* value.
    pub command: u16,
    /// The client's opaque cookie, echoed in every reply to this request.
    pub cookie: u64,
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes (payload length for writes).
    pub length: u32,
}

impl Request {
    /// Decodes a 28-byte header; `None` when the magic is wrong.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            command: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// A big-endian u16 from the first two bytes of `b` (callers pass exact slices).
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// A big-endian u32 from the first four bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A big-endian u64 from the first eight bytes of `b`.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A simple reply header (16 bytes).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Writes a structured chunk header into `out[..20]`.
pub fn chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// An option reply header followed by `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_with_wrong_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        assert_eq!(Request::parse(&b), None);
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[7] = 1;
        b[27] = 9;
        let r = Request::parse(&b).unwrap();
        assert_eq!((r.command, r.length), (CMD_WRITE, 9));
    }
}
