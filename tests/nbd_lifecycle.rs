//! `oxcow nbd`'s life cycle: a SIGTERM with writes in flight ends with a clean image whose
//! bitmap is stored (not left in use); `--fork` returns once the server listens and
//! `--pid-file` names the daemon; without `-t` the server leaves after its last client.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::nbd::{client, client_ok, nbd_bitmap_map, qemu_io_nbd, NbdServer, Server};
use common::*;

#[test]
fn sigterm_with_writes_in_flight_leaves_a_clean_image_and_a_stored_bitmap() {
    let dir = TempDir::new("nbd-sigterm");
    let img = dir.join("a.qcow2");
    qemu_create(&img, 64 * MIB, "");
    qemu_bitmap_add(&img, "b0", true);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &["-t"]);
    let uri = srv.uri.clone();
    // Allocating 4 KiB writes at depth 16, far more than can finish before the signal.
    let writer = std::thread::spawn(move || {
        let a = [
            "bench", "-f", "raw", "-w", "-d", "16", "-s", "4k", "-S", "69632",
        ];
        let mut a = a.to_vec();
        a.extend(["-c", "1000000", &uri]);
        client("qemu-img", &a)
    });
    std::thread::sleep(Duration::from_millis(700));
    let code = srv.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", srv.stderr_text());
    let bench = writer.join().expect("bench thread");
    assert_ne!(bench.code, 0, "the client was cut off: {}", bench.all());
    assert_check_clean(&img);
    let info = client_ok("qemu-img", &["info", path_str(&img)]).stdout;
    assert!(
        info.contains("name: b0") && !info.contains("in-use"),
        "{info}"
    );
    // The bitmap recorded the writes that made it: qemu-nbd exports it dirty.
    let q = NbdServer::unix(Server::QemuNbd, &dir, &img, &["-r", "-t", "-B", "b0"]);
    let m = nbd_bitmap_map(q.socket.as_ref().unwrap(), "", "qemu:dirty-bitmap:b0");
    assert!(m.iter().any(|r| !r.2), "no dirty range stored: {m:?}");
}

/// Kills the daemon (SIGKILL) when the test ends, whether it passed or not.
struct KillOnDrop(String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if run("kill", &["-0", &self.0]).code == 0 {
            run("kill", &["-KILL", &self.0]);
        }
    }
}

#[test]
fn fork_returns_once_listening_and_the_pid_file_names_the_server() {
    let dir = TempDir::new("nbd-fork");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, 8 * MIB, "", 0x42, MIB);
    let (sock, pid) = (dir.join("s.sock"), dir.join("s.pid"));
    let out = Command::new("timeout")
        .args(["30", env!("CARGO_BIN_EXE_oxcow"), "nbd", "--fork", "-t"])
        .args([
            "-k",
            path_str(&sock),
            "--pid-file",
            path_str(&pid),
            path_str(&img),
        ])
        .output()
        .expect("run oxcow nbd --fork");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let pid_text = std::fs::read_to_string(&pid).expect("pid file");
    let _reaper = KillOnDrop(pid_text.trim().to_string());
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io_nbd(
        &uri,
        &["read -P 0x42 0 1M".into(), "write -P 0x43 1M 1M".into()],
    );
    run_ok("kill", &["-TERM", pid_text.trim()]);
    let t = Instant::now();
    while run("kill", &["-0", pid_text.trim()]).code == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid.exists() && !sock.exists(),
        "pid file and socket are removed"
    );
    assert_check_clean(&img);
    qemu_io(&img, &["read -P 0x43 1M 1M".into()]);
}

#[test]
fn fork_reports_a_startup_failure_in_the_exit_code() {
    let dir = TempDir::new("nbd-fork-fail");
    let sock = dir.join("s.sock");
    let out = Command::new("timeout")
        .args([
            "30",
            env!("CARGO_BIN_EXE_oxcow"),
            "nbd",
            "--fork",
            "-k",
            path_str(&sock),
        ])
        .arg(path_str(&dir.join("missing.qcow2")))
        .output()
        .expect("run oxcow nbd --fork");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.qcow2"), "{err}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");
}

#[test]
fn without_persistent_the_server_exits_after_its_last_client() {
    let dir = TempDir::new("nbd-oneshot");
    let img = dir.join("a.qcow2");
    qemu_create_with_data(&img, 8 * MIB, "", 0x42, MIB);
    let mut srv = NbdServer::unix(Server::Oxcow, &dir, &img, &[]);
    qemu_io_nbd(&srv.uri, &["write -P 0x44 0 64k".into()]);
    assert_eq!(srv.wait_exit(Duration::from_secs(30)), Some(0));
    assert_check_clean(&img);
    qemu_io(&img, &["read -P 0x44 0 64k".into()]);
}

#[test]
fn a_missing_bitmap_is_refused_at_startup() {
    let dir = TempDir::new("nbd-no-bitmap");
    let img = dir.join("a.qcow2");
    qemu_create(&img, 8 * MIB, "");
    let sock = dir.join("s.sock");
    let o = oxcow_in(
        dir.path(),
        &["nbd", "-k", path_str(&sock), "-B", "nope", "a.qcow2"],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("Bitmap 'nope' is not found"),
        "{}",
        o.stderr
    );
}
