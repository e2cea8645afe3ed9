//! NBD servers for the `nbd_*` tests: `oxcow nbd` and `qemu-nbd` started on a Unix socket (or
//! 127.0.0.1 and a free port) in a temp dir, ready once their pid file exists (both write it
//! after listening), always killed when the guard drops; and clients bounded in time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{path_str, run, CmdOut, TempDir};

/// Which server to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Oxcow,
    QemuNbd,
}

/// A running NBD server; killed (SIGKILL) on drop unless stopped before.
pub struct NbdServer {
    child: Option<Child>,
    /// `nbd+unix:///NAME?socket=...` or `nbd://127.0.0.1:PORT/NAME`.
    pub uri: String,
    /// The Unix socket path (None over TCP).
    pub socket: Option<PathBuf>,
    pub port: Option<u16>,
    pub stderr: PathBuf,
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl NbdServer {
    /// Starts `which` serving `image` on a Unix socket in `dir` with extra `args`.
    pub fn unix(which: Server, dir: &TempDir, image: &Path, args: &[&str]) -> NbdServer {
        let sock = dir.join(&format!("nbd-{}.sock", super::unique_id()));
        let mut a = vec!["-k".to_string(), path_str(&sock).to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        let name = export_name(args);
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        Self::start(which, dir, image, a, uri, Some(sock), None)
    }

    /// Starts `which` serving `image` on 127.0.0.1 and a free port.
    pub fn tcp(which: Server, dir: &TempDir, image: &Path, args: &[&str]) -> NbdServer {
        let port = free_port();
        let mut a = vec![
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let uri = format!("nbd://127.0.0.1:{port}/{}", export_name(args));
        Self::start(which, dir, image, a, uri, None, Some(port))
    }

    fn start(
        which: Server,
        dir: &TempDir,
        image: &Path,
        mut args: Vec<String>,
        uri: String,
        socket: Option<PathBuf>,
        port: Option<u16>,
    ) -> NbdServer {
        let id = super::unique_id();
        let pid = dir.join(&format!("nbd-{id}.pid"));
        let stderr = dir.join(&format!("nbd-{id}.err"));
        args.extend(["--pid-file".into(), path_str(&pid).into()]);
        args.extend(["-f".into(), "qcow2".into(), path_str(image).into()]);
        let mut cmd = match which {
            Server::Oxcow => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_oxcow"));
                c.arg("nbd");
                c
            }
            Server::QemuNbd => Command::new("qemu-nbd"),
        };
        let err = fs::File::create(&stderr).expect("stderr file");
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start NBD server");
        let mut s = NbdServer {
            child: Some(child),
            uri,
            socket,
            port,
            stderr,
        };
        s.wait_ready(&pid);
        s
    }

    fn wait_ready(&mut self, pid: &Path) {
        let t = Instant::now();
        while !pid.exists() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("NBD server exited early ({st}): {}", self.stderr_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "NBD server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pid file may be written a moment before the socket listens (qemu-nbd).
        std::thread::sleep(Duration::from_millis(50));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `sig` (e.g. "TERM") and waits for the exit (bounded); returns the exit code.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> Option<i32> {
        run("kill", &[&format!("-{sig}"), &self.pid().to_string()]);
        self.wait_exit(timeout)
    }

    /// Graceful stop: SIGTERM, then the exit (asserted 0, within 30 s).
    pub fn stop(&mut self) {
        let code = self.signal_and_wait("TERM", Duration::from_secs(30));
        assert_eq!(code, Some(0), "server stop: {}", self.stderr_text());
    }

    /// Waits for the server to exit by itself (bounded); None when it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st.code().unwrap_or(-1));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn export_name(args: &[&str]) -> String {
    args.iter()
        .position(|a| *a == "-x")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Runs a client program, killed after 120 s (`timeout`), and returns its output.
pub fn client(prog: &str, args: &[&str]) -> CmdOut {
    let mut a = vec!["-k", "5", "120", prog];
    a.extend_from_slice(args);
    run("timeout", &a)
}

/// Like [`client`], panicking with the output unless it exits 0.
pub fn client_ok(prog: &str, args: &[&str]) -> CmdOut {
    let o = client(prog, args);
    assert_eq!(o.code, 0, "{prog} {args:?} failed:\n{}", o.all());
    o
}

/// `qemu-io -f raw -c CMD... URI`, asserting success and no failed command.
pub fn qemu_io_nbd(uri: &str, cmds: &[String]) -> CmdOut {
    let mut a: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        a.extend(["-c", c.as_str()]);
    }
    a.push(uri);
    let o = client_ok("qemu-io", &a);
    assert!(
        !o.all().contains("failed") && !o.all().contains("error"),
        "qemu-io on {uri}: {}",
        o.all()
    );
    o
}

/// `qemu-img map -f raw --output=json` of an NBD URI, as (start, length, data, zero) with
/// neighbours of equal status merged.
pub fn nbd_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    map_of(&client_ok("qemu-img", &["map", "-f", "raw", "--output=json", uri]).stdout)
}

/// `qemu-img map --image-opts` of a Unix-socket export with `x-dirty-bitmap=CONTEXT`.
pub fn nbd_bitmap_map(socket: &Path, export: &str, context: &str) -> Vec<(u64, u64, bool, bool)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap={context}",
        socket.display()
    );
    let o = client_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    map_of(&o.stdout)
}

/// Parses `qemu-img map --output=json` into merged (start, length, data, zero) runs.
pub fn map_of(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let j = super::Json::parse(json);
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in j.as_array() {
        let (s, l) = (e.get("start").as_u64(), e.get("length").as_u64());
        let (d, z) = (e.get("data").as_bool(), e.get("zero").as_bool());
        match out.last_mut() {
            Some(last) if last.2 == d && last.3 == z && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, d, z)),
        }
    }
    out
}
