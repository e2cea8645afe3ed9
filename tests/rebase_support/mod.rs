//! The rebase and amend oracle: the same command through qemu-img on one copy of a set of
//! images and through oxcow on another, then the results compared (exit code, message,
//! `qemu-img check`, guest content, the top image's own allocation map, `qemu-img info`).

use crate::common::*;
use std::path::Path;

/// What both tools did.
#[allow(dead_code)] // each test file uses a part
pub struct Outcome {
    pub qemu: CmdOut,
    pub oxcow: CmdOut,
    pub dir: TempDir,
}

/// Runs `setup` (a shell script making the images, `top.qcow2` among them) in `q/`, copies
/// every file to `o/` and keeps `orig.qcow2` (a copy of top.qcow2 over the same chain) in
/// both, then runs `qemu-img CMD ARGS top.qcow2` in `q/` and `oxcow CMD ARGS top.qcow2` in
/// `o/`. Asserts the same exit code and, on failure, the same first message line.
pub fn both(tag: &str, setup: &str, cmd: &str, args: &[&str]) -> Outcome {
    let dir = TempDir::new(tag);
    let (q, o) = (dir.join("q"), dir.join("o"));
    std::fs::create_dir_all(&q).expect("mkdir q");
    std::fs::create_dir_all(&o).expect("mkdir o");
    let s = run_in(&q, "sh", &["-c", &format!("set -e; {setup}")]);
    assert_eq!(s.code, 0, "setup failed: {}", s.all());
    for e in std::fs::read_dir(&q).expect("read q") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), o.join(e.file_name())).expect("copy");
    }
    for d in [&q, &o] {
        std::fs::copy(d.join("top.qcow2"), d.join("orig.qcow2")).expect("copy orig");
    }
    let mut v: Vec<&str> = vec![cmd];
    v.extend(args);
    v.push("top.qcow2");
    let qemu = run_in(&q, "qemu-img", &v);
    let oxcow = run_in(&o, env!("CARGO_BIN_EXE_oxcow"), &v);
    assert_eq!(
        oxcow.code,
        qemu.code,
        "{cmd} {args:?}: exit codes\noxcow: {}\nqemu-img: {}",
        oxcow.all(),
        qemu.all()
    );
    if qemu.code != 0 {
        let first = |s: &str, p: &str| {
            let l = s.lines().next().unwrap_or("").to_string();
            l.strip_prefix(p).map(str::to_string).unwrap_or(l)
        };
        let (qm, om) = (
            first(&qemu.stderr, "qemu-img: "),
            first(&oxcow.stderr, "oxcow: "),
        );
        // The part QEMU's message has before the cause from the layer below.
        let head = qm.split(": ").next().unwrap_or("");
        assert!(
            om.starts_with(head),
            "{cmd} {args:?}: messages\noxcow: {om}\nqemu-img: {qm}"
        );
    }
    Outcome { qemu, oxcow, dir }
}

#[allow(dead_code)]
impl Outcome {
    pub fn q(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("q").join(name)
    }

    pub fn o(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("o").join(name)
    }

    /// Both tops clean, the same guest content, the same own allocation and the same info.
    pub fn assert_same_images(&self) {
        let (q, o) = (self.q("top.qcow2"), self.o("top.qcow2"));
        assert_check_clean(&q);
        assert_check_clean(&o);
        assert_same_guest(&q, &o);
        assert_eq!(own_map(&o), own_map(&q), "the top's own allocation");
        assert_eq!(info_text(&o, "o/"), info_text(&q, "q/"), "qemu-img info");
        self.assert_other_layers_untouched();
    }

    /// Every file but the top is as both tools found it (backing layers are never written).
    pub fn assert_other_layers_untouched(&self) {
        for e in std::fs::read_dir(self.dir.join("q")).expect("read q") {
            let name = e.expect("entry").file_name();
            if name == "top.qcow2" {
                continue;
            }
            let q = std::fs::read(self.dir.join("q").join(&name)).expect("read");
            let o = std::fs::read(self.dir.join("o").join(&name)).expect("read");
            assert!(q == o, "{name:?} differs between the two runs");
        }
    }

    /// The first 64 KiB of both tops are the same bytes (header-only changes, where the
    /// new backing file cannot be opened).
    pub fn assert_same_header(&self) {
        let read = |p: std::path::PathBuf| {
            let mut b = std::fs::read(p).expect("read top");
            b.truncate(64 << 10);
            b
        };
        assert!(
            read(self.o("top.qcow2")) == read(self.q("top.qcow2")),
            "cluster 0 differs from qemu-img's"
        );
        assert!(self.qemu.code == 0 || self.oxcow.code != 0);
    }

    /// oxcow's top reads as it did before the command (the guest content was kept).
    pub fn assert_guest_kept(&self) {
        assert_same_guest(&self.o("top.qcow2"), &self.o("orig.qcow2"));
        assert_same_guest(&self.q("top.qcow2"), &self.q("orig.qcow2"));
    }
}

/// The extents the top image itself determines (depth 0): start, length, zero, data. The
/// zero flag counts only without data: on data it says whether the host file has a hole
/// there (QEMU punches one where oxcow writes zeros), not what the image records.
pub fn own_map(p: &Path) -> Vec<(u64, u64, bool, bool)> {
    let mut v: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in qemu_map(p)
        .into_iter()
        .filter(|e| e.depth == 0 && e.present)
    {
        let zero = e.zero && !e.data;
        match v.last_mut() {
            Some(l) if l.0 + l.1 == e.start && (l.2, l.3) == (zero, e.data) => l.1 += e.length,
            _ => v.push((e.start, e.length, zero, e.data)),
        }
    }
    v
}

/// `qemu-img info --output=json` without the disk usage and the host file's length (where
/// new metadata lands is the implementation's choice), with the directory made neutral.
pub fn info_text(p: &Path, dir: &str) -> String {
    let o = qemu_img(&["info", "--output=json", path_str(p)]);
    let base = p.parent().and_then(|d| d.parent()).expect("two levels");
    let nested_size = |l: &str| l.starts_with("        ") && l.contains("\"virtual-size\"");
    o.stdout
        .replace(&format!("{}/{dir}", base.display()), "DIR/")
        .lines()
        .filter(|l| !l.contains("actual-size") && !nested_size(l))
        .collect::<Vec<_>>()
        .join("\n")
}
