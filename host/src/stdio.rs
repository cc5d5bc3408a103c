//! Text for stdout and stderr that never panics. `println!` panics when the write fails, and
//! with SIGPIPE ignored (as Rust sets it) a closed pipe (`imgforge … 2>&1 | head -1`, `2>&-`)
//! fails every write: a job would die half-way (exit 101) with its temporary files left. Here
//! the text is lost instead and the job ends with its own status.

use std::io::Write;

/// Writes `text` and a newline to stdout, ignoring any error.
pub fn out_line(text: &str) {
    // One write per line, so nothing else written to the stream splits it.
    let _ = std::io::stdout().lock().write_all(format!("{text}\n").as_bytes());
}

/// Writes `text` as it is to stdout, ignoring any error.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Writes `text` and a newline to stderr, ignoring any error.
pub fn err_line(text: &str) {
    let _ = std::io::stderr().lock().write_all(format!("{text}\n").as_bytes());
}

/// stderr for the tracing subscriber: a failed write counts as done, so the subscriber never
/// falls back to its own `eprintln!` (which panics on a closed stderr).
#[derive(Debug, Default, Clone, Copy)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
