//! Writes report lines on the second serial port.

use imgforge_protocol::report::ReportLine;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// The second serial port, as the helper kernel names it.
pub const REPORT_PORT: &str = "/dev/ttyS1";

/// Sends report lines to the host; falls back to the console if the port cannot be opened, so
/// a broken port still leaves a trace in the log.
pub struct Reporter {
    port: Option<File>,
}

impl Reporter {
    /// Opens [`REPORT_PORT`].
    pub fn open() -> Self {
        let port = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(REPORT_PORT)
            .map_err(|e| eprintln!("imgforge-helper: cannot open report port {REPORT_PORT}: {e}"))
            .ok();
        Self { port }
    }

    /// Sends one line and flushes it (a poweroff may follow immediately).
    pub fn send(&mut self, line: &ReportLine) {
        let text = format!("{line}\n");
        if let Some(port) = self.port.as_mut() {
            if port.write_all(text.as_bytes()).and_then(|_| port.flush()).is_ok() {
                let _ = port.sync_all();
                return;
            }
        }
        eprint!("imgforge-report: {text}");
    }
}

/// Guest uptime in milliseconds (CLOCK_BOOTTIME: what `/proc/uptime` shows, to the millisecond).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
