//! A raw-socket NBD client for the protocol tests: the fixed-newstyle handshake up to
//! transmission with simple replies, request encoding and simple reply headers. Kept minimal
//! and byte-explicit on purpose, so the tests can also send what a well-behaved client never
//! would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// "IHAVEOPT": the magic in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of a request.
pub const REQ_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;

/// A connection to the server's Unix socket whose reads give up after 20 s (a hung server
/// fails the test instead of hanging it).
pub fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Option `opt` with `data`, as the client sends it.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_GO for export "" with no info requests.
pub fn go() -> Vec<u8> {
    option(7, &[0, 0, 0, 0, 0, 0])
}

/// Reads one option reply: (option, type, data).
pub fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("option reply data");
    let be = |r: std::ops::Range<usize>| u32::from_be_bytes(h[r].try_into().unwrap());
    (be(8..12), be(12..16), d)
}

/// Greeting and client flags; returns the stream ready for options.
pub fn hello(path: &Path) -> UnixStream {
    let mut s = connect(path);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// A connection in transmission with simple replies.
pub fn transmission(path: &Path) -> UnixStream {
    let mut s = hello(path);
    s.write_all(&go()).unwrap();
    loop {
        let (_, kind, _) = option_reply(&mut s);
        if kind == 1 {
            return s;
        }
        assert_eq!(kind, 3, "NBD_REP_INFO before the ACK");
    }
}

/// A request header (a WRITE's payload follows it separately).
pub fn request(cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) -> Vec<u8> {
    let mut v = REQ_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&off.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Reads a simple reply header: (error, cookie).
pub fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("simple reply");
    assert_eq!(&h[..4], &SIMPLE_MAGIC.to_be_bytes());
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    (err, u64::from_be_bytes(h[8..16].try_into().unwrap()))
}
