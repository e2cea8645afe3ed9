//! `Header::parse` on arbitrary bytes, plus a serialize-then-parse round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oxcow_fuzz::guarded(|| oxcow_fuzz::header(data));
});
