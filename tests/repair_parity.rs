//! Repair parity with `qemu-img check -r all` (issue 15): damaged snapshot tables and
//! missing or unusable refcount tables. For every case the same damaged image is checked by
//! qemu-img 10.0.2 and by oxcow on two copies, plain and with `-r all`; exit codes and every
//! counter of `--output json` must agree, the repaired copies must hold the same guest data
//! (`qemu-img compare`) and the same snapshot list, and `qemu-img check` must accept oxcow's
//! repair wherever it accepts QEMU's. The oracle of each case is stated with it.

mod common;

use common::*;
use oxcow::{CheckFix, Image};
use std::fs;
use std::path::{Path, PathBuf};

/// A 64 MiB image with data, one snapshot "s1", and cluster 0 rewritten afterwards.
fn base(dir: &TempDir) -> PathBuf {
    let p = dir.join("base.qcow2");
    qemu_create(&p, 64 << 20, "");
    qemu_io(
        &p,
        &["write -P 7 0 256k".to_string(), "write -P 9 1M 64k".into()],
    );
    qemu_img(&["snapshot", "-c", "s1", path_str(&p)]);
    qemu_io(&p, &["write -P 5 0 64k".to_string()]);
    p
}

/// `qemu-img check [-r all] --output=json` → (exit code, JSON when printed).
fn qemu_check(p: &Path, repair: bool) -> (i32, Option<Json>) {
    let mut args = vec!["check", "-f", "qcow2", "--output=json"];
    if repair {
        args.extend(["-r", "all"]);
    }
    args.push(path_str(p));
    let o = run("qemu-img", &args);
    let j = (!o.stdout.trim().is_empty()).then(|| Json::parse(o.stdout.trim()));
    (o.code, j)
}

struct Case {
    name: &'static str,
    damage: fn(&Path),
    /// `qemu-img check` exit code before the repair.
    plain: i32,
    /// `qemu-img check -r all` exit code; `None` when QEMU's own repair fails (then oxcow's
    /// repair must leave `after` for `qemu-img check`).
    repair: Option<i32>,
    /// `qemu-img check` exit code after oxcow's repair.
    after: i32,
}

fn cases() -> Vec<Case> {
    vec![
        // Oracle: plain exit 2 (14 corruptions: every refcount reads 0); -r all "Rebuilding
        // refcount structure", exit 0, 12 corruptions fixed. oxcow used to fail the check
        // ("Image does not contain a reference count table").
        Case {
            name: "reftable-zero-clusters",
            damage: |p| poke(p, H_RT_CLUSTERS, &0u32.to_be_bytes()),
            plain: 2,
            repair: Some(0),
            after: 0,
        },
        // Oracle: the header words read as the refcount table: plain exit 2 (43 corruptions,
        // "refcount table entry 0 has reserved bits set", ...); -r all rebuilds, exit 0. oxcow
        // used to fail the check ("Reference count table offset invalid (0)").
        Case {
            name: "reftable-offset-zero",
            damage: |p| poke(p, H_RT_OFF, &0u64.to_be_bytes()),
            plain: 2,
            repair: Some(0),
            after: 0,
        },
        // Oracle: both zero: like zero clusters (exit 2, then -r all exit 0).
        Case {
            name: "reftable-offset-and-clusters-zero",
            damage: |p| {
                poke(p, H_RT_OFF, &0u64.to_be_bytes());
                poke(p, H_RT_CLUSTERS, &0u32.to_be_bytes());
            },
            plain: 2,
            repair: Some(0),
            after: 0,
        },
        // Oracle: table 4 GiB past EOF: exit 2 ("region exceeding the end of the file" plus
        // every refcount 0); -r all rebuilds, exit 0, 13 corruptions fixed.
        Case {
            name: "reftable-past-eof",
            damage: |p| poke(p, H_RT_OFF, &(1u64 << 32).to_be_bytes()),
            plain: 2,
            repair: Some(0),
            after: 0,
        },
        // Oracle: "ERROR snapshot table entry 0 is incomplete" + the table past EOF: exit 2;
        // -r all "Repairing snapshot table entry 0 is incomplete", rewrites the table, exit 0.
        // oxcow used to fail the check ("failed to read the snapshot table").
        Case {
            name: "snapshot-table-past-eof",
            damage: |p| poke(p, H_SNAP_OFF, &(1u64 << 32).to_be_bytes()),
            plain: 2,
            repair: Some(0),
            after: 0,
        },
        // Oracle: "ERROR snapshot 1 (s1) l1_offset=0x...200: L1 table is not cluster
        // aligned; snapshot table entry corrupted" (not fixable; the snapshot's clusters are
        // leaks): exit 2; -r all fixes the leaks, exit 2 with 1 corruption. oxcow used to fail
        // the check.
        Case {
            name: "snapshot-l1-unaligned",
            damage: |p| {
                let s = snapshot_table_offset(p);
                poke(p, s, &(be64(p, s) + 0x200).to_be_bytes())
            },
            plain: 2,
            repair: Some(2),
            after: 2,
        },
        // Oracle: "l1_size=0x1000000: L1 table is too large; snapshot table entry corrupted":
        // exit 2; QEMU's -r all trips its own overlap check while fixing COPIED flags
        // ("Could not write L2 table; metadata overlap check failed"), exit 1 and the image is
        // marked corrupt. oxcow's repair completes: only the unfixable entry is left (exit 2).
        Case {
            name: "snapshot-l1-huge",
            damage: |p| {
                poke(
                    p,
                    snapshot_table_offset(p) + 8,
                    &0x100_0000u32.to_be_bytes(),
                )
            },
            plain: 2,
            repair: None,
            after: 2,
        },
        // Oracle: plain check exit 1, "ERROR failed to read the snapshot table: Too much
        // extra metadata in snapshot table entry 0", no JSON counters but check-errors; -r all
        // "Discarding too much extra metadata in snapshot table entry 0 (2000 > 1024)",
        // exit 0, 1 corruption fixed. oxcow used to fail the repair the same way as the check.
        Case {
            name: "snapshot-excess-extra-data",
            damage: |p| poke(p, snapshot_table_offset(p) + 36, &2000u32.to_be_bytes()),
            plain: 1,
            repair: Some(0),
            after: 0,
        },
        // Oracle: "ERROR snapshot table entry 0 is incomplete": exit 2, 1 corruption; -r all
        // rewrites the entry with 24 bytes of extra data (icount -1): exit 0. oxcow used to
        // fail the check.
        Case {
            name: "snapshot-v3-without-extra-data",
            damage: strip_first_snapshot_extra_data,
            plain: 2,
            repair: Some(0),
            after: 0,
        },
    ]
}

/// `qemu-img snapshot -l` without the header line.
fn snapshot_list(p: &Path) -> String {
    let o = run("qemu-img", &["snapshot", "-l", "-U", path_str(p)]);
    o.stdout.lines().skip(1).collect::<Vec<_>>().join("\n")
}

fn run_case(c: &Case) {
    let dir = TempDir::new(&format!("parity-{}", c.name));
    let orig = base(&dir);
    let damaged = dir.join("damaged.qcow2");
    fs::copy(&orig, &damaged).unwrap();
    (c.damage)(&damaged);
    let copy = |n: &str| {
        let p = dir.join(n);
        fs::copy(&damaged, &p).unwrap();
        p
    };

    // Plain check.
    let (qrc, qj) = qemu_check(&copy("plain-q.qcow2"), false);
    assert_eq!(qrc, c.plain, "{}: oracle drifted", c.name);
    let r = Image::check_path(copy("plain-o.qcow2"), CheckFix::None, false, None)
        .unwrap_or_else(|e| panic!("{}: oxcow check failed: {e}", c.name));
    assert_eq!(r.exit_code() as i32, qrc, "{}: plain exit ({r:#?})", c.name);
    if let Some(j) = qj {
        assert_check_counters(&format!("{} plain", c.name), &r, &j, true);
    }

    // Full repair.
    let q = copy("all-q.qcow2");
    let o = copy("all-o.qcow2");
    let (qrc, qj) = qemu_check(&q, true);
    let r = Image::check_path(&o, CheckFix::All, false, None)
        .unwrap_or_else(|e| panic!("{}: oxcow repair failed: {e}", c.name));
    match c.repair {
        Some(code) => {
            assert_eq!(qrc, code, "{}: oracle drifted", c.name);
            assert_eq!(
                r.exit_code() as i32,
                qrc,
                "{}: repair exit ({r:#?})",
                c.name
            );
            let rebuilt = r
                .repair_messages
                .iter()
                .any(|m| m.contains("Rebuilding refcount structure"));
            let j = qj.expect("qemu-img printed its JSON");
            assert_check_counters(&format!("{} -r all", c.name), &r, &j, !rebuilt);
            assert_eq!(snapshot_list(&o), snapshot_list(&q), "{}", c.name);
        }
        None => assert_eq!(qrc, 1, "{}: oracle drifted", c.name),
    }
    let (after, out) = qemu_img_check(&o);
    assert_eq!(
        after, c.after,
        "{}: qemu-img check after oxcow's repair:\n{out}",
        c.name
    );
    // Guest data: unchanged by either repair.
    for other in [&orig, &q] {
        let cmp = run(
            "qemu-img",
            &["compare", "-U", "-q", path_str(other), path_str(&o)],
        );
        assert_eq!(cmp.code, 0, "{}: {}", c.name, cmp.all());
    }
    // A second repair has nothing left to do.
    let again = Image::check_path(&o, CheckFix::All, false, None).unwrap();
    assert_eq!(again.corruptions_fixed + again.leaks_fixed, 0, "{}", c.name);
}

#[test]
fn refcount_table_damage_is_rebuilt_like_qemu() {
    for c in cases().iter().filter(|c| c.name.starts_with("reftable")) {
        run_case(c);
    }
}

#[test]
fn snapshot_table_damage_is_repaired_like_qemu() {
    for c in cases().iter().filter(|c| c.name.starts_with("snapshot")) {
        run_case(c);
    }
}

/// Oracle: `qemu-img check --output=json` on an image whose refcount table has 0 clusters
/// prints its JSON report (exit 2), and `-r all --output=json` prints the repair's (exit 0,
/// "corruptions-fixed": 12). oxcow used to print only "Check failed" and no JSON.
#[test]
fn cli_reports_json_for_a_missing_refcount_table() {
    let dir = TempDir::new("parity-cli");
    let p = base(&dir);
    poke(&p, H_RT_CLUSTERS, &0u32.to_be_bytes());
    let q = dir.join("q.qcow2");
    fs::copy(&p, &q).unwrap();
    let cli = |args: &[&str]| run(env!("CARGO_BIN_EXE_oxcow"), args);
    let o = cli(&["check", "--output=json", path_str(&p)]);
    assert_eq!(o.code, 2, "{}", o.all());
    let (_, qj) = qemu_check(&q, false);
    let (j, qj) = (Json::parse(o.stdout.trim()), qj.unwrap());
    for k in [
        "corruptions",
        "check-errors",
        "allocated-clusters",
        "total-clusters",
    ] {
        assert_eq!(check_field(&j, k), check_field(&qj, k), "{k}");
    }
    let o = cli(&["check", "-r", "all", "--output=json", path_str(&p)]);
    assert_eq!(o.code, 0, "{}", o.all());
    let (_, qj) = qemu_check(&q, true);
    let (j, qj) = (Json::parse(o.stdout.trim()), qj.unwrap());
    assert_eq!(
        check_field(&j, "corruptions-fixed"),
        check_field(&qj, "corruptions-fixed")
    );
    assert!(
        o.stderr.contains("Rebuilding refcount structure"),
        "{}",
        o.stderr
    );
    let o = cli(&["check", path_str(&p)]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("No errors were found on the image."));
    assert_check_clean(&p);
}

/// Replaces the snapshot table with `nb` v3 entries (ids 1.., names "s0".., no L1 table, 64 MiB
/// disk size) whose id and name are padded to `name_len` bytes, appended at the next cluster
/// boundary of the file. The old table and snapshot "s1" become leaks and mismatched refcounts.
fn replace_snapshot_table(p: &Path, nb: u32, name_len: usize) {
    let mut data = fs::read(p).unwrap();
    let table = data.len().next_multiple_of(1 << 16);
    data.resize(table, 0);
    for i in 0..nb {
        let pad = |s: String| format!("{s:x<name_len$}").into_bytes();
        let (id, name) = (pad(format!("{}", i + 1)), pad(format!("s{i}")));
        let mut e = vec![0u8; 40];
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[36..40].copy_from_slice(&16u32.to_be_bytes());
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(64u64 << 20).to_be_bytes());
        e.extend_from_slice(&id);
        e.extend_from_slice(&name);
        e.resize(e.len().next_multiple_of(8), 0);
        data.extend_from_slice(&e);
    }
    fs::write(p, &data).unwrap();
    poke(p, H_NB_SNAP, &nb.to_be_bytes());
    poke(p, H_SNAP_OFF, &(table as u64).to_be_bytes());
}

/// Snapshots past QEMU's limits (more than 65536 entries, or more than 64 MiB of table).
/// Oracle: a plain `qemu-img check` fails (exit 1) with "ERROR snapshot table too large" /
/// "ERROR failed to read the snapshot table: Snapshot table is too big" and "You can
/// force-remove all N overhanging snapshots with qemu-img check -r all"; `-r all` prints
/// "Discarding N overhanging snapshots[ (snapshot table is too big)]" and keeps the first
/// entries (65536, or 511 of 600 128-KiB entries). QEMU's own repair of the count case then
/// trips its overlap check and marks the image corrupt; oxcow's completes. oxcow used to
/// refuse both checks ("Snapshot table too large").
#[test]
fn overhanging_snapshots_are_discarded_by_a_repair_like_qemu() {
    for (nb, name_len, error, overhang, kept) in [
        (65540, 0, "ERROR snapshot table too large", 4, 65536),
        (
            600,
            0xffff,
            "ERROR failed to read the snapshot table: Snapshot table is too big",
            89,
            511,
        ),
    ] {
        let dir = TempDir::new("parity-overhang");
        let orig = base(&dir);
        let p = dir.join("damaged.qcow2");
        fs::copy(&orig, &p).unwrap();
        replace_snapshot_table(&p, nb, name_len);
        let q = dir.join("q.qcow2");
        fs::copy(&p, &q).unwrap();

        let (qrc, _) = qemu_check(&q, false);
        assert_eq!(qrc, 1, "oracle drifted ({nb} entries)");
        let r = Image::check_path(&p, CheckFix::None, false, None).unwrap();
        assert_eq!(r.exit_code(), 1, "{r:#?}");
        assert_eq!(r.messages[0], error);
        assert!(r.messages[1].starts_with(&format!(
            "You can force-remove all {overhang} overhanging snapshots with"
        )));

        let r = Image::check_path(&p, CheckFix::All, false, None).unwrap();
        assert_eq!(r.exit_code(), 0, "{r:#?}");
        assert!(r.repair_messages[0]
            .starts_with(&format!("Discarding {overhang} overhanging snapshots")));
        assert_check_clean(&p);
        // The list's first line names the columns.
        assert_eq!(snapshot_list(&p).lines().count(), kept + 1);
        if nb < 65536 {
            qemu_check(&q, true);
            assert_eq!(snapshot_list(&p), snapshot_list(&q));
        }
        let cmp = run(
            "qemu-img",
            &["compare", "-q", path_str(&orig), path_str(&p)],
        );
        assert_eq!(cmp.code, 0, "{}", cmp.all());
        let again = Image::check_path(&p, CheckFix::All, false, None).unwrap();
        assert_eq!(again.corruptions_fixed + again.leaks_fixed, 0);
    }
}
