//! Hostile NBD clients over a raw socket: malformed options and requests get an error reply
//! or a closed connection, never a crash or a write outside the request, and the server keeps
//! serving other clients; disconnecting at every byte of the handshake is harmless too.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::nbd::{qemu_io_nbd, NbdServer, Server};
use common::nbd_wire::*;
use common::*;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;

fn expect_error(s: &mut UnixStream, req: Vec<u8>, payload: &[u8], cookie: u64, err: u32) {
    s.write_all(&req).unwrap();
    s.write_all(payload).unwrap();
    assert_eq!(simple_reply(s), (err, cookie));
}

fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "connection should be closed"
    );
}

const SIZE: u64 = 4 * MIB;

#[test]
fn malformed_requests_get_errors_and_nothing_outside_them_is_written() {
    let dir = TempDir::new("nbd-bad-requests");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, SIZE, "", 0x11, SIZE);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-e", "4"]);
    let sock = srv.socket.clone().unwrap();
    let mut s = transmission(&sock);
    let junk = vec![0xeeu8; 4096];
    // Out of range, wrapping, bad flags, unknown command, no context negotiated.
    expect_error(&mut s, request(0, 0, 1, SIZE - 512, 4096), &[], 1, EINVAL);
    expect_error(&mut s, request(1, 0, 2, SIZE, 4096), &junk, 2, EINVAL);
    expect_error(
        &mut s,
        request(1, 0, 3, u64::MAX - 100, 4096),
        &junk,
        3,
        EINVAL,
    );
    expect_error(&mut s, request(0, 0x8000, 4, 0, 512), &[], 4, EINVAL);
    expect_error(&mut s, request(1, 1 << 3, 5, 0, 4096), &junk, 5, EINVAL);
    expect_error(&mut s, request(99, 0, 6, 0, 512), &[], 6, EINVAL);
    expect_error(&mut s, request(7, 0, 7, 0, 512), &[], 7, EINVAL);
    expect_error(&mut s, request(6, 1 << 2, 8, 0, 512), &[], 8, EINVAL);
    // Oversized: a read is refused; a write's payload is skipped without being stored.
    expect_error(&mut s, request(0, 0, 9, 0, (32 << 20) + 1), &[], 9, EINVAL);
    let big = vec![0xeeu8; (32 << 20) + 4096];
    expect_error(
        &mut s,
        request(1, 0, 10, 0, big.len() as u32),
        &big,
        10,
        EINVAL,
    );
    // The connection still works: a valid write and read.
    let ok = vec![0x22u8; 4096];
    expect_error(&mut s, request(1, 0, 11, 8192, 4096), &ok, 11, 0);
    s.write_all(&request(0, 0, 12, 8192, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 12));
    let mut back = vec![0u8; 4096];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, ok);
    // Bad magic ends the connection.
    let mut bad = request(0, 0, 13, 0, 512);
    bad[0] ^= 0xff;
    s.write_all(&bad).unwrap();
    assert_closed(&mut s);
    // Another client is still served; only the one valid write landed.
    let io = qemu_io_nbd(
        &srv.uri,
        &["read -P 0x22 8k 4k".into(), "read -P 0x11 0 8k".into()],
    );
    assert!(io.stdout.contains("read 4096/4096"));
    srv.stop();
    assert_check_clean(&img);
    qemu_io(
        &img,
        &["read -P 0x11 0 8k".into(), "read -P 0x11 12k 4084k".into()],
    );
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = TempDir::new("nbd-ro");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, SIZE, "", 0x11, MIB);
    let srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-r"]);
    let mut s = transmission(srv.socket.as_ref().unwrap());
    let junk = vec![0xeeu8; 4096];
    expect_error(&mut s, request(1, 0, 1, 0, 4096), &junk, 1, EPERM);
    expect_error(&mut s, request(4, 0, 2, 0, 4096), &[], 2, EPERM);
    expect_error(&mut s, request(6, 0, 3, 0, 4096), &[], 3, EPERM);
    expect_error(&mut s, request(3, 0, 4, 0, 0), &[], 4, 0);
}

#[test]
fn malformed_options_get_option_errors() {
    let dir = TempDir::new("nbd-bad-options");
    let img = dir.join("a.qcow2");
    qemu_create(&img, SIZE, "");
    let srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-e", "2", "-x", "disk"]);
    let sock = srv.socket.clone().unwrap();
    let mut s = hello(&sock);
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (option(77, b""), (1 << 31) | 1), // unknown: ERR_UNSUP
        (option(3, b"x"), (1 << 31) | 3), // LIST with data: ERR_INVALID
        (option(7, &[0, 0, 0, 9, b'a']), (1 << 31) | 3), // GO, name runs past the data
        (option(7, &[0, 0, 0, 0, 0, 0]), (1 << 31) | 6), // GO, unknown export
        (option(10, &[0; 8]), (1 << 31) | 3), // SET_META without structured
        (option(6, &[0xff; 12]), (1 << 31) | 3), // INFO, name length 4 GiB
        (option(8, &[1]), (1 << 31) | 3), // STRUCTURED_REPLY with data
        (option(5, b""), (1 << 31) | 2),  // STARTTLS: ERR_POLICY
        (option(9, &vec![0u8; 200_000]), (1 << 31) | 9), // too long: ERR_TOO_BIG
    ];
    for (i, (opt, want)) in cases.into_iter().enumerate() {
        s.write_all(&opt).unwrap();
        let (_, kind, _) = option_reply(&mut s);
        assert_eq!(kind, want, "case {i}");
    }
    // The connection still negotiates normally afterwards.
    let mut name = 4u32.to_be_bytes().to_vec();
    name.extend_from_slice(b"disk\0\0");
    s.write_all(&option(7, &name)).unwrap();
    while option_reply(&mut s).1 != 1 {}
    s.write_all(&request(3, 0, 1, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 1));
    // NBD_OPT_EXPORT_NAME with an unknown name can only be answered by closing.
    let mut t = hello(&sock);
    t.write_all(&option(1, b"nope")).unwrap();
    assert_closed(&mut t);
}

#[test]
fn disconnecting_at_every_byte_of_the_handshake_and_requests_is_harmless() {
    let dir = TempDir::new("nbd-early-disconnect");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, SIZE, "", 0x11, MIB);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t"]);
    let sock = srv.socket.clone().unwrap();
    let mut script = 3u32.to_be_bytes().to_vec();
    script.extend(option(8, b""));
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    script.extend(option(10, &meta));
    script.extend(go());
    script.extend(request(1, 0, 1, 0, 512));
    script.extend(vec![0x99u8; 512]);
    for cut in 0..script.len() {
        let mut s = connect(&sock);
        let _ = s.write_all(&script[..cut]);
        // Close without reading: the server must cope with replies it cannot send.
    }
    // The truncated write never completed, so nothing changed; the server still serves.
    qemu_io_nbd(&srv.uri, &["read -P 0x11 0 1M".into()]);
    srv.stop();
    assert_check_clean(&img);
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: 0 kB");
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_never_reads_replies_cannot_grow_the_server_or_block_its_stop() {
    let dir = TempDir::new("nbd-no-reader");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, 32 * MIB, "", 0x11, 32 * MIB);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-r"]);
    let mut s = transmission(srv.socket.as_ref().unwrap());
    // 4 GiB of reads requested, none of the replies read.
    let mut reqs = Vec::new();
    for i in 0..1024u64 {
        reqs.extend(request(0, 0, i, (i % 8) * 4 * MIB, 4 << 20));
    }
    s.write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let rss = rss_kib(srv.pid());
    assert!(rss < 400 * 1024, "server RSS {rss} KiB");
    let code = srv.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", srv.stderr_text());
    drop(s);
}

#[test]
fn a_client_that_pipelines_small_reads_and_never_reads_replies_cannot_grow_the_server() {
    // Small reads run on the connection's reader thread, their replies collected in a batch:
    // the batch must stay bounded too, the reader waiting for the client instead of reading on.
    let dir = TempDir::new("nbd-no-reader-small");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, 32 * MIB, "", 0x11, 32 * MIB);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-r"]);
    let s = transmission(srv.socket.as_ref().unwrap());
    let rss_before = rss_kib(srv.pid());
    // 1 GiB of 64 KiB reads requested (16384 requests), none of the replies read; the
    // requests are sent from another thread, as the server stops reading them.
    let mut reqs = Vec::new();
    for i in 0..16384u64 {
        reqs.extend(request(0, 0, i, (i % 512) * (64 << 10), 64 << 10));
    }
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = w.write_all(&reqs);
    });
    std::thread::sleep(Duration::from_millis(1500));
    let rss = rss_kib(srv.pid());
    assert!(
        rss < rss_before + 128 * 1024,
        "server RSS {rss} KiB (before the requests: {rss_before} KiB)"
    );
    let code = srv.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", srv.stderr_text());
    drop(s);
    sender.join().unwrap();
}

#[test]
fn a_handshake_trickling_in_byte_by_byte_is_cut_at_the_handshake_limit() {
    let dir = TempDir::new("nbd-slow-handshake");
    let img = dir.join("a.qcow2");
    qemu_create(&img, SIZE, "");
    let args = ["-t", "--handshake-limit", "2"];
    let srv = NbdServer::unix(Server::Oxcow, &dir, &img, &args);
    let mut s = hello(srv.socket.as_ref().unwrap());
    let opt = option(9, &vec![0u8; 1000]);
    let t = std::time::Instant::now();
    let mut cut = false;
    for b in opt.iter() {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if t.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    assert!(cut || matches!(s.read(&mut [0u8; 8]), Ok(0) | Err(_)));
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "not cut within the limit"
    );
}

#[test]
fn a_client_past_the_shared_limit_waits_and_is_served_when_a_place_frees() {
    let dir = TempDir::new("nbd-shared-limit");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, SIZE, "", 0x21, SIZE);
    let srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t", "-e", "1"]);
    let sock = srv.socket.clone().unwrap();
    let first = transmission(&sock);
    // Accepted by the kernel's backlog, not by the server: no greeting while the place is taken.
    let mut second = connect(&sock);
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut g = [0u8; 18];
    let early = second.read(&mut g);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "greeted past the -e 1 limit: {early:?}"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    second
        .read_exact(&mut g)
        .expect("greeting once the first client left");
    assert_eq!(&g[..8], b"NBDMAGIC");
    drop(second);
    qemu_io_nbd(&srv.uri, &["read -P 0x21 0 64k".into()]);
}
