//! `oxcow rebase` against `qemu-img rebase` (QEMU 10): the same command on two copies of a
//! chain gives the same exit code and message, clean images, the same guest content (the
//! original content, in safe mode), the same own allocation of the top and the same info.

mod common;
mod rebase_support;

use rebase_support::both;

/// old: data over 1 MiB, other data at 1 MiB, a zero cluster at 2 MiB; new: partly the same
/// data, a 4 KiB difference at 1 MiB, data where old has none; the top: one written cluster.
fn chain(compat: &str) -> String {
    format!(
        "qemu-img create -q -f qcow2 old.qcow2 4M
         qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 1M 64k' -c 'write -z 2M 64k' old.qcow2 >/dev/null
         qemu-img create -q -f qcow2 new.qcow2 4M
         qemu-io -c 'write -P 1 0 512k' -c 'write -P 3 1M 4k' -c 'write -P 5 3M 64k' new.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat={compat} -b old.qcow2 -F qcow2 top.qcow2
         qemu-io -c 'write -P 9 0 4k' top.qcow2 >/dev/null"
    )
}

/// The old backing file shorter than the top, the new one longer: past the old end, QEMU
/// writes zeros (zero clusters on version 3) where the new chain has data.
fn short_old_long_new(compat: &str) -> String {
    format!(
        "qemu-img create -q -f qcow2 old.qcow2 1M
         qemu-io -c 'write -P 1 0 1M' old.qcow2 >/dev/null
         qemu-img create -q -f qcow2 new.qcow2 8M
         qemu-io -c 'write -P 2 1536k 64k' -c 'write -P 2 3M 64k' -c 'write -P 3 5M 64k' new.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o compat={compat} -b old.qcow2 -F qcow2 top.qcow2 6M
         qemu-io -c 'write -P 4 2560k 64k' top.qcow2 >/dev/null"
    )
}

/// Raw backing files of sizes that are not cluster multiples, under an extended-L2 top
/// (the comparison granule is the subcluster).
const RAW_EXTL2: &str = "qemu-img create -q -f raw old.raw 1000000
    qemu-io -f raw -c 'write -P 1 0 900000' old.raw >/dev/null
    qemu-img create -q -f raw new.raw 3M
    qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 7 2M 4k' new.raw >/dev/null
    qemu-img create -q -f qcow2 -o extended_l2=on -b old.raw -F raw top.qcow2 3M
    qemu-io -c 'write -P 4 128k 8k' top.qcow2 >/dev/null";

/// Three levels: base, mid (its own data) and the top; rebasing the top onto base copies
/// mid's data.
const THREE_LEVELS: &str = "qemu-img create -q -f qcow2 base.qcow2 2M
    qemu-io -c 'write -P 1 0 2M' base.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    qemu-io -c 'write -P 2 64k 128k' -c 'write -z 1M 64k' mid.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    qemu-io -c 'write -P 3 96k 4k' top.qcow2 >/dev/null
    qemu-img create -q -f qcow2 new.qcow2 2M";

#[test]
fn safe_rebase_onto_another_file_keeps_the_guest_content_like_qemu_img() {
    for compat in ["1.1", "0.10"] {
        let o = both(
            "rb-safe",
            &chain(compat),
            "rebase",
            &["-b", "new.qcow2", "-F", "qcow2"],
        );
        o.assert_same_images();
        o.assert_guest_kept();
    }
}

#[test]
fn past_the_old_backing_end_zeros_are_written_like_qemu_img() {
    for compat in ["1.1", "0.10"] {
        let setup = short_old_long_new(compat);
        let o = both(
            "rb-short",
            &setup,
            "rebase",
            &["-b", "new.qcow2", "-F", "qcow2"],
        );
        o.assert_same_images();
        o.assert_guest_kept();
    }
}

#[test]
fn raw_backing_files_and_subclusters_like_qemu_img() {
    let o = both(
        "rb-raw",
        RAW_EXTL2,
        "rebase",
        &["-b", "new.raw", "-F", "raw"],
    );
    o.assert_same_images();
    o.assert_guest_kept();
    let o = both("rb-raw-none", RAW_EXTL2, "rebase", &["-b", ""]);
    o.assert_same_images();
    o.assert_guest_kept();
}

#[test]
fn safe_rebase_onto_nothing_copies_the_chain_like_qemu_img() {
    for compat in ["1.1", "0.10"] {
        let o = both("rb-none", &chain(compat), "rebase", &["-b", ""]);
        o.assert_same_images();
        o.assert_guest_kept();
    }
}

#[test]
fn rebase_over_three_levels_onto_the_base_like_qemu_img() {
    let o = both(
        "rb-3",
        THREE_LEVELS,
        "rebase",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    o.assert_same_images();
    o.assert_guest_kept();
    let o = both(
        "rb-3-new",
        THREE_LEVELS,
        "rebase",
        &["-b", "new.qcow2", "-F", "qcow2"],
    );
    o.assert_same_images();
    o.assert_guest_kept();
}

#[test]
fn safe_rebase_of_an_image_without_backing_like_qemu_img() {
    for compat in ["1.1", "0.10"] {
        let setup = format!(
            "qemu-img create -q -f qcow2 new.qcow2 2M
             qemu-io -c 'write -P 1 64k 64k' new.qcow2 >/dev/null
             qemu-img create -q -f qcow2 -o compat={compat} top.qcow2 2M
             qemu-io -c 'write -P 3 0 4k' top.qcow2 >/dev/null"
        );
        let o = both(
            "rb-add",
            &setup,
            "rebase",
            &["-b", "new.qcow2", "-F", "qcow2"],
        );
        if compat == "1.1" {
            o.assert_same_images();
            o.assert_guest_kept();
        } else {
            // QEMU 10 writes nothing here (its zero write is a no-op on a version-2 image
            // without a backing file), so the new backing file shows through: a guest
            // content change in safe mode. oxcow writes the zeros as data instead.
            common::assert_check_clean(&o.o("top.qcow2"));
            common::assert_same_guest(&o.o("top.qcow2"), &o.o("orig.qcow2"));
            let q = common::run_in(
                &o.q(""),
                "qemu-img",
                &["compare", "top.qcow2", "orig.qcow2"],
            );
            assert_eq!(q.code, 1, "qemu-img's result changed: {}", q.all());
        }
    }
}

#[test]
fn unsafe_rebase_changes_only_the_header_like_qemu_img() {
    let o = both(
        "rb-u",
        &chain("1.1"),
        "rebase",
        &["-u", "-b", "new.qcow2", "-F", "qcow2"],
    );
    o.assert_same_images();
    assert_eq!(
        rebase_support::own_map(&o.o("top.qcow2")),
        rebase_support::own_map(&o.o("orig.qcow2"))
    );
    let o = both("rb-u-none", &chain("0.10"), "rebase", &["-u"]);
    o.assert_same_images();
    // The old backing file may be missing: fixing a moved file is what -u is for.
    let setup = format!("{}\nmv old.qcow2 moved.qcow2", chain("1.1"));
    let o = both(
        "rb-u-moved",
        &setup,
        "rebase",
        &["-u", "-b", "moved.qcow2", "-F", "qcow2"],
    );
    o.assert_same_images();
    let o = both(
        "rb-u-raw",
        &chain("1.1"),
        "rebase",
        &["-u", "-b", "", "-F", "raw"],
    );
    o.assert_same_images();
}

#[test]
fn refusals_match_qemu_img_and_change_nothing() {
    let cases: &[&[&str]] = &[
        &["-b", "new.qcow2"],
        &["-u", "-b", "new.qcow2"],
        &["-b", "new.qcow2", "-F", "foo"],
        &["-b", "missing.qcow2", "-F", "qcow2"],
        &[],
    ];
    for args in cases {
        let o = both("rb-refuse", &chain("1.1"), "rebase", args);
        assert_ne!(o.oxcow.code, 0);
        common::assert_check_clean(&o.o("top.qcow2"));
        let info = rebase_support::info_text(&o.o("top.qcow2"), "o/");
        assert!(
            info.contains("\"backing-filename\": \"old.qcow2\""),
            "{info}"
        );
        o.assert_guest_kept();
    }
}

#[test]
fn backing_names_too_long_for_the_header_are_refused_like_qemu_img() {
    let long = "a".repeat(1024);
    let o = both(
        "rb-long",
        &chain("1.1"),
        "rebase",
        &["-u", "-b", &long, "-F", "raw"],
    );
    assert_ne!(o.oxcow.code, 0);
    let max = "a".repeat(1023);
    let o = both(
        "rb-max",
        &chain("1.1"),
        "rebase",
        &["-u", "-b", &max, "-F", "raw"],
    );
    assert_eq!(o.oxcow.code, 0);
    o.assert_same_header();
    // 512-byte clusters: the name must fit in cluster 0 beside the header and extensions.
    let small = "qemu-img create -q -f qcow2 -o cluster_size=512 top.qcow2 1M";
    for n in [300, 376, 377, 400] {
        let name = "b".repeat(n);
        let o = both("rb-fit", small, "rebase", &["-u", "-b", &name, "-F", "raw"]);
        o.assert_same_header();
        if o.oxcow.code != 0 {
            assert!(o.oxcow.stderr.contains("No space left in the file header"));
        }
    }
}
