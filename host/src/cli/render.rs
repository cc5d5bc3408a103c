//! How the command line shows the progress stream (`--progress auto|bar|json|none`): an
//! indicatif bar on stderr, JSON lines on stdout, or nothing; and the random passwords a job
//! sets, on stdout, or on stderr when stdout carries JSON; and a dry run's changes, one line
//! each on stdout (only as JSON events when stdout carries JSON).

use crate::progress::{Event, HelperEvent, JsonLines, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;

/// How often the spinner turns.
const SPINNER_TICK_MILLIS: u64 = 120;

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

/// The renderer for `mode` (`auto` looks at whether stderr is a terminal).
pub fn renderer(mode: ProgressMode) -> Arc<dyn Progress> {
    match mode {
        ProgressMode::Json => Arc::new(JsonStdout(JsonLines::new(std::io::stdout()))),
        ProgressMode::Bar => Arc::new(Terminal::with_bar()),
        ProgressMode::Auto if std::io::stderr().is_terminal() => Arc::new(Terminal::with_bar()),
        ProgressMode::Auto | ProgressMode::None => Arc::new(Terminal { bar: None, variants: Default::default() }),
    }
}

/// What the user is told of a random password.
fn random_password_line(user: &str, variant: Option<&str>, password: &str) -> String {
    match variant {
        Some(variant) => format!("Setting random password of {user} in variant {variant} to {password}"),
        None => format!("Setting random password of {user} to {password}"),
    }
}

/// What the user is told of changes a dry run did not list.
fn omitted_changes_line(count: u64) -> String {
    format!("and {count} more changes, not listed")
}

/// For a person: a bar on stderr (or nothing), random passwords and a dry run's changes on
/// stdout.
struct Terminal {
    bar: Option<ProgressBar>,
    /// `imgforge build`'s variants: done, failed.
    variants: std::sync::Mutex<(usize, usize)>,
}

impl Terminal {
    fn with_bar() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("static template"));
        bar.enable_steady_tick(std::time::Duration::from_millis(SPINNER_TICK_MILLIS));
        Self { bar: Some(bar), variants: Default::default() }
    }

    fn copy_progress(bar: &ProgressBar, position: u64, total: Option<u64>) {
        if bar.length() != total {
            match total {
                Some(t) => {
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                        )
                        .expect("static template"),
                    );
                    bar.set_length(t);
                }
                None => bar.unset_length(),
            }
        }
        bar.set_position(position);
    }
}

impl Terminal {
    /// Counts a finished variant; the counts after it (done, failed).
    fn count_variant(&self, done: bool) -> (usize, usize) {
        let mut counts = self.variants.lock().unwrap_or_else(|p| p.into_inner());
        if done {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        *counts
    }

    /// `line` on stdout, the bar (if any) out of its way.
    fn out_line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| crate::stdio::out_line(line)),
            None => crate::stdio::out_line(line),
        }
    }
}

impl Progress for Terminal {
    fn emit(&self, event: Event) {
        match event {
            Event::RandomPassword { user, variant, password } => {
                self.out_line(&random_password_line(&user, variant.as_deref(), password.expose()))
            }
            Event::FileChange(change) => self.out_line(&change.human_line()),
            Event::FileChangesOmitted { count } => self.out_line(&omitted_changes_line(count)),
            Event::ImageCopyProgress { position, total, .. } => {
                if let Some(bar) = &self.bar {
                    Self::copy_progress(bar, position, total);
                }
            }
            Event::ImageHelper(HelperEvent::TaskStart { task }) => self.status(&format!("helper: {task}")),
            Event::ImageDone | Event::ImageError { .. } => {
                if let Some(bar) = &self.bar {
                    bar.finish_and_clear();
                }
            }
            Event::VariantStarted { name, index, total } => {
                let (done, failed) = *self.variants.lock().unwrap_or_else(|p| p.into_inner());
                self.status(&format!("variant {}/{total} {name} started ({done} done, {failed} failed)", index + 1));
            }
            Event::VariantDone { name, total, output, .. } => {
                let (done, failed) = self.count_variant(true);
                self.note(&format!("variant {name} written to {output} ({done} done, {failed} failed of {total})"));
            }
            Event::VariantFailed { name, total, messages, .. } => {
                let (done, failed) = self.count_variant(false);
                self.note(&format!(
                    "variant {name} FAILED: {} ({done} done, {failed} failed of {total})",
                    imgforge_protocol::printable::printable(&messages.join("; "))
                ));
            }
            Event::ImageInfo(_) | Event::ImageHelper(_) => {}
        }
    }

    fn status(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(text.to_owned());
        }
    }

    fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => crate::stdio::err_line(text),
        }
    }
}

/// For a program: JSON lines on stdout, so whatever a person is told goes to stderr.
struct JsonStdout(JsonLines<std::io::Stdout>);

impl Progress for JsonStdout {
    fn emit(&self, event: Event) {
        if let Event::RandomPassword { user, variant, password } = &event {
            crate::stdio::err_line(&random_password_line(user, variant.as_deref(), password.expose()));
        }
        self.0.emit(event);
    }
}
