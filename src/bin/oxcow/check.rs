//! `oxcow check`: qemu-img check over the engine.

/// Runs `oxcow check ARGS`; returns the process exit code.
pub fn run(_args: &[String]) -> Result<u8, String> {
    Err("check is not implemented yet".into())
}
