//! Progress as a typed, versioned event stream. Library code (job, write, ganeti) emits
//! [`Event`]s to a [`Progress`]; what becomes of them is the renderer's business: JSON lines
//! ([`JsonLines`]: on stdout for `--progress json`, into Ganeti's PROGRESS_MONITOR), an
//! indicatif bar (the command line's own renderer, `cli::render`), or nothing ([`Silent`]).
//!
//! The JSON form is documented in `docs/progress-v1.schema.json`; every line carries the
//! stream's version (`"v"`, [`VERSION`]) and snf-image's fields for snf-image's types.

mod event;
#[cfg(test)]
mod schema_tests;

pub use event::{Event, HelperEvent, ImageInfo, Line, Secret, VERSION};

use std::io::Write;
use std::sync::Mutex;

/// Where library code reports what it is doing.
pub trait Progress: Send + Sync {
    /// One event of the stream.
    fn emit(&self, event: Event);

    /// What is happening now, in words for a person watching (not part of the stream).
    fn status(&self, _text: &str) {}

    /// A line for a person (the helper console with `-v`, the phase table): on stderr unless
    /// the renderer has a better place.
    fn note(&self, text: &str) {
        crate::stdio::err_line(text);
    }
}

/// Shows no progress (lines for a person still go to stderr).
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn emit(&self, _event: Event) {}
}

/// The stream as JSON lines on a writer (stdout, a monitor's stdin), each flushed at once.
/// Write errors are ignored: a monitor that went away does not stop the job.
pub struct JsonLines<W> {
    out: Mutex<W>,
}

impl<W: Write + Send> JsonLines<W> {
    /// Lines written to `out`.
    pub fn new(out: W) -> Self {
        Self { out: Mutex::new(out) }
    }
}

/// `line` as one line of JSON, keys in alphabetical order: the order the untyped emitter
/// before it produced, so lines stay byte for byte what monitors saw, plus `"v"`.
pub fn to_json_line(line: &Line) -> Result<String, serde_json::Error> {
    serde_json::to_value(line).map(|value| value.to_string())
}

impl<W: Write + Send> Progress for JsonLines<W> {
    fn emit(&self, event: Event) {
        let text = match to_json_line(&Line::now(event)) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!("progress event not written: {e}");
                return;
            }
        };
        let mut out = self.out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // One write per line: nothing else written to the same stream splits it.
        let _ = out.write_all(format!("{text}\n").as_bytes());
        let _ = out.flush();
    }
}
