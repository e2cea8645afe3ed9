//! The `oxcow` command line on images with an external data file, against qemu-img 10 in the
//! same directory: `create -o data_file=...` with a relative name (resolved against the
//! current directory, as QEMU resolves it), `info` (human and JSON), `map` and `check`.

mod common;

use common::*;

fn ok(o: CmdOut, what: &str) -> CmdOut {
    assert_eq!(o.code, 0, "{what} failed: {}", o.all());
    o
}

#[test]
fn create_info_map_and_check_match_qemu_img_with_a_relative_data_file_name() {
    let dir = TempDir::new("df-cli");
    let d = dir.path();
    for raw in ["on", "off"] {
        let (o, q) = (format!("o{raw}.qcow2"), format!("q{raw}.qcow2"));
        let oo = format!("data_file=o{raw}.raw,data_file_raw={raw}");
        let qo = format!("data_file=q{raw}.raw,data_file_raw={raw}");
        let ours = ok(
            oxcow_in(d, &["create", "-o", &oo, &o, "4M"]),
            "oxcow create",
        );
        let theirs = ok(
            run_in(
                d,
                "qemu-img",
                &["create", "-f", "qcow2", "-o", &qo, &q, "4M"],
            ),
            "qemu-img create",
        );
        assert_eq!(
            ours.stdout.replace(&format!("o{raw}"), "X"),
            theirs.stdout.replace(&format!("q{raw}"), "X"),
            "Formatting line"
        );
        assert!(
            d.join(format!("o{raw}.raw")).exists(),
            "data file made in the cwd"
        );
        for img in [&o, &q] {
            let w = [
                "-c",
                "write -P 7 100k 200k",
                "-c",
                "write -z 1M 64k",
                img.as_str(),
            ];
            ok(run_in(d, "qemu-io", &w), "qemu-io");
        }
        for img in [&o, &q] {
            let human = ok(oxcow_in(d, &["info", img]), "oxcow info");
            let qhuman = ok(run_in(d, "qemu-img", &["info", img]), "qemu-img info");
            // Sizes on disk differ between runs of the file system; the rest must not.
            let keep = |s: &str| {
                s.lines()
                    .filter(|l| !l.contains("disk size"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            assert_eq!(keep(&human.stdout), keep(&qhuman.stdout), "info of {img}");
            let json = ok(oxcow_in(d, &["info", "--output=json", img]), "oxcow info");
            let qjson = ok(
                run_in(d, "qemu-img", &["info", "--output=json", img]),
                "qemu-img info",
            );
            assert_eq!(Json::parse(&json.stdout), Json::parse(&qjson.stdout));
            let map = ok(oxcow_in(d, &["map", "--output=json", img]), "oxcow map");
            let qmap = ok(
                run_in(d, "qemu-img", &["map", "--output=json", img]),
                "qemu-img map",
            );
            // A known difference of `oxcow map` on every image (README): no host offset
            // for zero clusters that keep their allocation.
            let strip = |j: Json| match j {
                Json::Arr(v) => Json::Arr(
                    v.into_iter()
                        .map(|mut e| {
                            if let Json::Obj(m) = &mut e {
                                if m.get("zero") == Some(&Json::Bool(true)) {
                                    m.remove("offset");
                                }
                            }
                            e
                        })
                        .collect(),
                ),
                other => other,
            };
            assert_eq!(
                strip(Json::parse(&map.stdout)),
                strip(Json::parse(&qmap.stdout)),
                "map of {img}"
            );
            ok(oxcow_in(d, &["check", img]), "oxcow check");
        }
    }
}

#[test]
fn a_relative_data_file_name_is_resolved_against_the_current_directory_like_qemu() {
    let dir = TempDir::new("df-cli-rel");
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).expect("sub");
    // Made from the parent: the data file lands in the parent, the name stays "rel.raw".
    ok(
        oxcow_in(
            dir.path(),
            &["create", "-o", "data_file=rel.raw", "sub/r.qcow2", "1M"],
        ),
        "oxcow create",
    );
    assert!(dir.join("rel.raw").exists() && !sub.join("rel.raw").exists());
    ok(
        oxcow_in(dir.path(), &["check", "sub/r.qcow2"]),
        "check from the parent",
    );
    let q = run_in(&sub, "qemu-io", &["-c", "read 0 4k", "r.qcow2"]);
    let o = oxcow_in(&sub, &["convert", "-O", "raw", "r.qcow2", "out.raw"]);
    assert_ne!(q.code, 0, "qemu-io opened it from sub/");
    assert_ne!(o.code, 0, "oxcow opened it from sub/");
    assert!(q.all().contains("Could not open 'rel.raw'"), "{}", q.all());
    assert!(o.all().contains("Could not open 'rel.raw'"), "{}", o.all());
}

#[test]
fn info_reports_an_image_whose_data_file_is_missing_like_qemu_img_while_map_and_check_fail() {
    let dir = TempDir::new("df-missing");
    let d = dir.path();
    ok(
        run_in(
            d,
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "data_file=gone.raw",
                "a.qcow2",
                "1M",
            ],
        ),
        "qemu-img create",
    );
    std::fs::remove_file(d.join("gone.raw")).expect("remove the data file");
    let ours = ok(
        oxcow_in(d, &["info", "--output=json", "a.qcow2"]),
        "oxcow info",
    );
    let theirs = ok(
        run_in(d, "qemu-img", &["info", "--output=json", "a.qcow2"]),
        "qemu-img info",
    );
    assert_eq!(ours.stdout, theirs.stdout, "info --output=json");
    let human = ok(oxcow_in(d, &["info", "a.qcow2"]), "oxcow info");
    assert!(
        human.stdout.contains("data file: gone.raw"),
        "{}",
        human.stdout
    );
    // Only info is metadata-only in qemu-img: the rest needs the data file.
    for cmd in [&["map", "a.qcow2"][..], &["check", "a.qcow2"][..]] {
        let o = oxcow_in(d, cmd);
        let q = run_in(d, "qemu-img", cmd);
        assert_ne!(o.code, 0, "oxcow {cmd:?} succeeded without the data file");
        assert_eq!(o.code, q.code, "exit code of {cmd:?}: {}", o.all());
        assert!(o.all().contains("gone.raw"), "{cmd:?}: {}", o.all());
    }
}

#[test]
fn check_repair_keeps_the_data_file_raw_promise_like_qemu_img() {
    let dir = TempDir::new("df-repair");
    let d = dir.path();
    for (tool, img) in [("oxcow", "o.qcow2"), ("qemu-img", "q.qcow2")] {
        let opts = format!("data_file={img}.raw,data_file_raw=on");
        ok(
            run_in(
                d,
                "qemu-img",
                &["create", "-f", "qcow2", "-o", &opts, img, "1M"],
            ),
            "qemu-img create",
        );
        let args = ["check", "-r", "all", img];
        let out = if tool == "oxcow" {
            oxcow_in(d, &args)
        } else {
            run_in(d, tool, &args)
        };
        ok(out, tool);
        let info = ok(run_in(d, "qemu-img", &["info", img]), "qemu-img info");
        assert!(
            info.stdout.contains("data file raw: true"),
            "{tool} check -r all dropped data_file_raw:\n{}",
            info.stdout
        );
    }
}
