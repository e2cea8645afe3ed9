//! `oxcow nbd` with real NBD clients (qemu-io, qemu-img, libnbd's nbdinfo/nbdcopy): the same
//! operations through `oxcow nbd` and through `qemu-nbd` on copies of one image leave the
//! same guest data, report the same allocation and the same dirty bitmap.

mod common;

use std::path::{Path, PathBuf};

use common::nbd::{client, client_ok, nbd_bitmap_map, nbd_map, qemu_io_nbd, NbdServer, Server};
use common::*;

/// Two identical images with data, a zero cluster and holes: (oxcow's copy, qemu-nbd's copy).
fn twin_images(dir: &TempDir, bitmap: bool) -> (PathBuf, PathBuf) {
    let a = dir.join("ox.qcow2");
    qemu_create(&a, 16 * MIB, "");
    qemu_io(
        &a,
        &[
            "write -P 0x11 0 1M".into(),
            "write -z 1M 64k".into(),
            "write -P 0x22 3M 192k".into(),
        ],
    );
    if bitmap {
        qemu_bitmap_add(&a, "b0", true);
    }
    let b = dir.join("qemu.qcow2");
    std::fs::copy(&a, &b).expect("copy image");
    (a, b)
}

/// Guest writes of every kind an NBD client sends: plain, unaligned, FUA, zeroes (with and
/// without unmap), trim, plus reads that check patterns.
fn workload() -> Vec<String> {
    [
        "write -P 0x33 64k 4k",
        "write -P 0x44 5000 3000",
        "write -f -P 0x55 2M 128k",
        "write -z 3M 64k",
        "write -z -u 3136k 64k",
        "discard 8M 1M",
        "write -P 0x66 15M 1M",
        "read -P 0x11 128k 64k",
        "read -P 0x55 2M 128k",
        "read -P 0 3M 64k",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The guest contents of an export, read through NBD with qemu-img convert.
fn read_export(uri: &str, dir: &TempDir) -> Vec<u8> {
    let out = dir.join(&format!("export-{}.raw", unique_id()));
    let o = path_str(&out);
    client_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, o]);
    std::fs::read(&out).expect("read converted export")
}

fn assert_same_export(ox: &NbdServer, qemu: &NbdServer, dir: &TempDir) {
    let (x, y) = (read_export(&ox.uri, dir), read_export(&qemu.uri, dir));
    assert_eq!(x.len(), y.len());
    let first = x.iter().zip(&y).position(|(a, b)| a != b);
    assert_eq!(first, None, "guest data differs at this offset");
}

fn same_ops_through_both(tcp: bool, discard: &str) {
    let dir = TempDir::new("nbd-same-ops");
    let (a, b) = twin_images(&dir, false);
    let args = ["-t", "--discard", discard];
    let start = |w, img: &Path| {
        if tcp {
            NbdServer::tcp(w, &dir, img, &args)
        } else {
            NbdServer::unix(w, &dir, img, &args)
        }
    };
    let (mut ox, mut qemu) = (start(Server::Oxcow, &a), start(Server::QemuNbd, &b));
    let out_ox = qemu_io_nbd(&ox.uri, &workload());
    let out_qemu = qemu_io_nbd(&qemu.uri, &workload());
    let ops = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("wrote") || l.starts_with("read"))
            .count()
    };
    assert_eq!(ops(&out_ox.stdout), ops(&out_qemu.stdout));
    assert_same_export(&ox, &qemu, &dir);
    assert_eq!(nbd_map(&ox.uri), nbd_map(&qemu.uri), "allocation over NBD");
    ox.stop();
    qemu.stop();
    assert_check_clean(&a);
    assert_same_guest(&a, &b);
}

#[test]
fn qemu_io_over_unix_socket_leaves_what_qemu_nbd_leaves() {
    same_ops_through_both(false, "ignore");
}

#[test]
fn qemu_io_over_tcp_with_discard_unmap_leaves_what_qemu_nbd_leaves() {
    same_ops_through_both(true, "unmap");
}

/// qemu-img map of the file, merged into (start, length, data, zero) runs.
fn file_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let o = qemu_img(&["map", "-f", "qcow2", "--output=json", path_str(path)]);
    common::nbd::map_of(&o.stdout)
}

#[test]
fn qemu_img_map_over_nbd_reports_the_files_allocation() {
    let dir = TempDir::new("nbd-map");
    let (a, _) = twin_images(&dir, false);
    let want = file_map(&a);
    let ox = NbdServer::unix(Server::Oxcow, &dir, &a, &["-r", "-t"]);
    assert_eq!(nbd_map(&ox.uri), want);
    assert!(
        want.len() >= 4,
        "the image has data, zeroes and holes: {want:?}"
    );
}

#[test]
fn dirty_bitmap_context_reports_what_qemu_nbd_reports() {
    let dir = TempDir::new("nbd-bitmap");
    let (a, b) = twin_images(&dir, true);
    let writes = [
        "write -P 0x77 2M 64k".to_string(),
        "write -P 0x78 10M 200k".into(),
    ];
    qemu_io(&a, &writes);
    qemu_io(&b, &writes);
    let args = ["-r", "-t", "-B", "b0", "-x", "disk"];
    let ox = NbdServer::unix(Server::Oxcow, &dir, &a, &args);
    let qemu = NbdServer::unix(Server::QemuNbd, &dir, &b, &args);
    let ctx = "qemu:dirty-bitmap:b0";
    let got = nbd_bitmap_map(ox.socket.as_ref().unwrap(), "disk", ctx);
    let want = nbd_bitmap_map(qemu.socket.as_ref().unwrap(), "disk", ctx);
    assert_eq!(got, want);
    // x-dirty-bitmap reports dirty ranges as "data": false.
    let dirty: Vec<_> = got.iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect();
    assert_eq!(dirty, vec![(2 * MIB, 64 * KIB), (10 * MIB, 256 * KIB)]);
}

#[test]
fn export_list_matches_qemu_nbd() {
    let dir = TempDir::new("nbd-list");
    let (a, b) = twin_images(&dir, true);
    let args = ["-t", "-x", "disk", "-D", "a test disk", "-B", "b0"];
    let ox = NbdServer::unix(Server::Oxcow, &dir, &a, &args);
    let qemu = NbdServer::unix(Server::QemuNbd, &dir, &b, &args);
    let list = |s: &NbdServer| {
        let sock = path_str(s.socket.as_ref().unwrap()).to_string();
        client_ok("qemu-nbd", &["-L", "-k", &sock]).stdout
    };
    let (got, want) = (list(&ox), list(&qemu));
    // qemu-nbd also offers qemu:allocation-depth (-A) and other flags; compare the lines
    // that describe the export.
    let keep = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                [
                    "export:",
                    "description:",
                    "size:",
                    "base:",
                    "qemu:dirty-bitmap:",
                ]
                .iter()
                .any(|k| l.trim_start().starts_with(k))
            })
            .map(|l| l.to_string())
            .collect()
    };
    assert_eq!(
        keep(&got),
        keep(&want),
        "\noxcow:\n{got}\nqemu-nbd:\n{want}"
    );
}

#[test]
fn qemu_img_convert_from_and_to_the_export_with_several_clients() {
    let dir = TempDir::new("nbd-convert");
    let (a, b) = twin_images(&dir, false);
    let mut ox = NbdServer::unix(Server::Oxcow, &dir, &a, &["-t", "-e", "4"]);
    // Three readers at once.
    let outs: Vec<PathBuf> = (0..3).map(|i| dir.join(&format!("out{i}.qcow2"))).collect();
    let handles: Vec<_> = outs
        .iter()
        .map(|o| {
            let (uri, o) = (ox.uri.clone(), path_str(o).to_string());
            std::thread::spawn(move || {
                client_ok(
                    "qemu-img",
                    &["convert", "-f", "raw", "-O", "qcow2", &uri, &o],
                )
            })
        })
        .collect();
    for h in handles {
        h.join().expect("convert thread");
    }
    for o in &outs {
        assert_same_guest(&b, o);
    }
    // And a write of a whole image into the export.
    let src = dir.join("src.qcow2");
    qemu_create(&src, 16 * MIB, "");
    qemu_io(
        &src,
        &["write -P 0x5c 1M 3M".into(), "write -P 0x5d 12M 1M".into()],
    );
    let s = path_str(&src);
    client_ok(
        "qemu-img",
        &["convert", "-n", "-f", "qcow2", "-O", "raw", s, &ox.uri],
    );
    ox.stop();
    assert_check_clean(&a);
    assert_same_guest(&a, &src);
}

fn have(prog: &str) -> bool {
    client(prog, &["--version"]).code == 0
}

#[test]
fn libnbd_tools_read_info_and_copy() {
    if !have("nbdinfo") || !have("nbdcopy") {
        eprintln!("skipped: libnbd-bin (nbdinfo, nbdcopy) is not installed");
        return;
    }
    let dir = TempDir::new("nbd-libnbd");
    let (a, _) = twin_images(&dir, true);
    let mut ox = NbdServer::unix(Server::Oxcow, &dir, &a, &["-t", "-e", "2", "-B", "b0"]);
    let info = client_ok("nbdinfo", &[&ox.uri]).stdout;
    for want in [
        "export-size: 16777216",
        "base:allocation",
        "qemu:dirty-bitmap:b0",
    ] {
        assert!(info.contains(want), "nbdinfo lacks '{want}':\n{info}");
    }
    let m = client_ok("nbdinfo", &["--map", &ox.uri]).stdout;
    assert!(
        m.contains("data") && m.contains("hole,zero"),
        "nbdinfo --map:\n{m}"
    );
    let copy = dir.join("copy.raw");
    client_ok("nbdcopy", &[&ox.uri, path_str(&copy)]);
    let back = dir.join("back.raw");
    std::fs::write(&back, vec![0x9eu8; 16 << 20]).expect("write raw");
    client_ok("nbdcopy", &["--connections", "2", path_str(&back), &ox.uri]);
    ox.stop();
    let raw = qemu_to_raw(&a, "qcow2", &dir);
    assert!(
        raw.iter().all(|&b| b == 0x9e),
        "nbdcopy's write did not land"
    );
    assert_check_clean(&a);
    assert_eq!(std::fs::read(&copy).expect("copy").len(), 16 << 20);
}

#[test]
fn allocation_through_a_backing_chain_matches_qemu_nbd() {
    let dir = TempDir::new("nbd-chain");
    let base = dir.join("base.qcow2");
    qemu_create(&base, 4 * MIB, "");
    qemu_io(&base, &["write -P 1 0 1M".into(), "write -z 3M 64k".into()]);
    let mid = dir.join("mid.qcow2");
    qemu_create_overlay(&mid, Some(6 * MIB), "", "base.qcow2", "qcow2");
    qemu_io(&mid, &["write -P 2 1536k 64k".into()]);
    let top = dir.join("top.qcow2");
    qemu_create_overlay(&top, Some(8 * MIB), "", "mid.qcow2", "qcow2");
    qemu_io(
        &top,
        &["write -P 3 2M 1M".into(), "write -z 512k 64k".into()],
    );
    let ox = NbdServer::unix(Server::Oxcow, &dir, &top, &["-r", "-t"]);
    let qemu = NbdServer::unix(Server::QemuNbd, &dir, &top, &["-r", "-t"]);
    let got = nbd_map(&ox.uri);
    assert_eq!(got, nbd_map(&qemu.uri));
    assert!(
        got.len() >= 6,
        "data, zeroes and holes at several depths: {got:?}"
    );
    assert_same_export(&ox, &qemu, &dir);
}

#[test]
fn nbdcopy_against_a_single_client_server_does_not_wait_for_a_second_connection() {
    if !have("nbdcopy") {
        eprintln!("skipped: libnbd-bin (nbdcopy) is not installed");
        return;
    }
    let dir = TempDir::new("nbd-single-client");
    let (a, _) = twin_images(&dir, false);
    let mut ox = NbdServer::unix(Server::Oxcow, &dir, &a, &["-t"]);
    let copy = dir.join("copy.raw");
    // Multi-conn is not offered with -e 1, so nbdcopy keeps to one connection.
    client_ok("nbdcopy", &[&ox.uri, path_str(&copy)]);
    ox.stop();
}
