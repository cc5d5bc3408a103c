//! Progress for people (an indicatif bar on a terminal) and for programs (JSON lines on
//! stdout, snf-image's monitor message types: `image-info`, `image-copy-progress`,
//! `image-helper`, `image-error`, `image-done`).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `--progress` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, nothing otherwise.
    Auto,
    /// Always a bar (on stderr).
    Bar,
    /// One JSON object a line on stdout.
    Json,
    /// Nothing.
    None,
}

/// A progress sink.
pub struct Progress {
    json: bool,
    bar: Option<ProgressBar>,
    /// Where JSON goes instead of stdout (Ganeti's PROGRESS_MONITOR).
    sink: Option<std::sync::Mutex<Box<dyn Write + Send>>>,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Progress {
    /// A sink for `mode` (`auto` looks at whether stderr is a terminal).
    pub fn new(mode: ProgressMode) -> Self {
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Json | ProgressMode::None => false,
        };
        let bar = bar.then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("static template"));
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Self { json: mode == ProgressMode::Json, bar, sink: None }
    }

    /// JSON events written to `sink` (a monitor's stdin) instead of stdout.
    pub fn to_writer(sink: Box<dyn Write + Send>) -> Self {
        Self { json: true, bar: None, sink: Some(std::sync::Mutex::new(sink)) }
    }

    /// True when events go out as JSON on stdout (so stdout carries nothing else).
    pub fn is_json(&self) -> bool {
        self.json && self.sink.is_none()
    }

    fn emit(&self, mut event: Value) {
        if !self.json {
            return;
        }
        event["timestamp"] = json!(now());
        if let Some(sink) = &self.sink {
            let mut out = sink.lock().expect("progress sink");
            let _ = writeln!(out, "{event}");
            let _ = out.flush();
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{event}");
        let _ = out.flush();
    }

    /// A status message for the bar.
    pub fn message(&self, text: &str) {
        if let Some(b) = &self.bar {
            b.set_message(text.to_owned());
        }
    }

    /// Prints a line above the bar (or to stderr without one).
    pub fn println(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// `image-info`.
    pub fn image_info(&self, info: Value) {
        let mut event = json!({"type": "image-info"});
        if let (Some(e), Value::Object(fields)) = (event.as_object_mut(), info) {
            e.extend(fields);
        }
        self.emit(event);
    }

    /// `image-copy-progress`, and the bar moved (bytes).
    pub fn copy_progress(&self, position: u64, total: Option<u64>) {
        let percent = total.filter(|t| *t > 0).map(|t| (position as f64 * 100.0 / t as f64).min(100.0));
        self.emit(json!({"type": "image-copy-progress", "position": position, "total": total, "progress": percent.map(|p| (p * 100.0).round() / 100.0)}));
        if let Some(b) = &self.bar {
            if b.length() != total {
                match total {
                    Some(t) => {
                        b.set_style(
                            ProgressStyle::with_template(
                                "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                            )
                            .expect("static template"),
                        );
                        b.set_length(t);
                    }
                    None => b.unset_length(),
                }
            }
            b.set_position(position);
        }
    }

    /// `image-helper` with a subtype (`task-start`, `task-end`, `warning`, `error`).
    pub fn helper(&self, subtype: &str, task: &str, message: Option<&str>) {
        let mut event = json!({"type": "image-helper", "subtype": subtype, "task": task});
        if let Some(m) = message {
            event["messages"] = json!([m]);
        }
        self.emit(event);
        if subtype == "task-start" {
            self.message(&format!("helper: {task}"));
        }
    }

    /// `image-helper` subtype `phase`: a helper VM phase reached (host ms since qemu started,
    /// guest uptime where known).
    pub fn phase(&self, name: &str, host_ms: u64, guest_ms: Option<u64>) {
        self.emit(json!({"type": "image-helper", "subtype": "phase", "phase": name, "host_ms": host_ms, "guest_ms": guest_ms}));
    }

    /// `image-error`.
    pub fn error(&self, messages: &[String]) {
        self.emit(json!({"type": "image-error", "messages": messages}));
    }

    /// `image-done`, and the bar cleared.
    pub fn done(&self) {
        self.emit(json!({"type": "image-done"}));
        self.finish();
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
