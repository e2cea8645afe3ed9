//! See `oxcow_fuzz::manage`: the input is a (mutated) qcow2 image.
#![no_main]
use libfuzzer_sys::fuzz_target;
use oxcow_fuzz::Workdir;
use std::sync::OnceLock;

static WORKDIR: OnceLock<Workdir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let wd = WORKDIR.get_or_init(|| {
        let wd = Workdir::new("manage");
        wd.enter();
        wd
    });
    oxcow_fuzz::guarded(|| oxcow_fuzz::manage(data, wd));
});
