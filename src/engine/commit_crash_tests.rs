//! Crash points and injected I/O errors of a commit, on simulated host files.
