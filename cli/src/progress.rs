//! qemu-img's progress line: `    (12.34/100%)\r` while running with `-p`, and one such line
//! (newline-terminated) on SIGUSR1 without it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static USR1: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1.store(true, Ordering::Relaxed);
}

/// Progress reporting for one command.
pub struct Progress {
    enabled: bool,
    last: Mutex<f64>,
}

impl Progress {
    /// With `enabled` (`-p`), print the initial line; otherwise arm SIGUSR1.
    pub fn new(enabled: bool) -> Progress {
        if enabled {
            print_line(0.0, '\r');
        } else {
            let act = SigAction::new(
                SigHandler::Handler(on_usr1),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let _ = unsafe { sigaction(Signal::SIGUSR1, &act) };
        }
        Progress {
            enabled,
            last: Mutex::new(0.0),
        }
    }

    /// Report `done` of `total` bytes.
    pub fn update(&self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        if self.enabled {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if pct - *last >= 1.0 || (pct >= 100.0 && *last < 100.0) {
                *last = pct;
                print_line(pct, '\r');
            }
        } else if USR1.swap(false, Ordering::Relaxed) {
            print_line(pct, '\n');
        }
    }

    /// Finish as convert does: one more 100% line, then a newline.
    pub fn finish(&self) {
        if self.enabled {
            print_line(100.0, '\r');
            println!();
        }
    }

    /// Finish as compare does: just the newline (after the result line).
    pub fn end_line(&self) {
        if self.enabled {
            println!();
        }
    }
}

fn print_line(pct: f64, end: char) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "    ({pct:3.2}/100%){end}");
    let _ = out.flush();
}
