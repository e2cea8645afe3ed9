//! Standard output that a closed pipe ends quietly (`oxcow info --output json img | head -c 1`).
//! Rust's print macros panic when stdout is a pipe whose reader has gone (the runtime ignores
//! SIGPIPE, so the write fails with EPIPE), where qemu-img is killed by the signal; these exit
//! with the status a shell reports for that (128 + SIGPIPE) and nothing on stderr.

/// Like `print!`, through [`write_fmt`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!($($arg)*)) };
}

/// Like `println!`, through [`write_fmt`].
macro_rules! outln {
    () => { $crate::out::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Exit status of a process a shell saw killed by SIGPIPE.
const BROKEN_PIPE_STATUS: i32 = 128 + 13;

/// Writes `args` to standard output; a reader that has gone ends the process quietly, any
/// other failure with a message and status 1.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        eprintln!("oxcow: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}
