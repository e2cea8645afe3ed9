//! The fuzz targets' operations (see `ops.rs`, which `tests/fuzz_regressions.rs` in the main
//! crate also includes, so that reproducers replay exactly what the fuzzer ran).

mod ops;
pub use ops::*;
