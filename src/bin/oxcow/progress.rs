//! A qemu-img-style progress line on stderr: "    (42.00/100%)", redrawn in place.

use std::io::Write;

/// Progress display for long operations; silent unless enabled (`-p`).
pub struct Progress {
    enabled: bool,
    last_shown: i64,
}

impl Progress {
    /// A progress display that prints only when `enabled`.
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            last_shown: -1,
        }
    }

    /// Reports `done` of `total` units; redraws only when the hundredth of a percent changes.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let pct = if total == 0 {
            10000
        } else {
            (done.min(total) as u128 * 10000 / total as u128) as i64
        };
        if pct != self.last_shown {
            self.last_shown = pct;
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r    ({}.{:02}/100%)", pct / 100, pct % 100);
            let _ = e.flush();
        }
    }

    /// Ends the progress line (prints 100% and a newline when enabled).
    pub fn finish(&mut self) {
        if self.enabled {
            self.update(1, 1);
            eprintln!();
        }
    }
}
