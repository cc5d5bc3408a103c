//! A helper VM run's events turned into progress: phases (and the `-v` phase table), the
//! console with `-v`, task starts and ends, warnings, the `CHECK` results of `verify`, and the
//! changes a dry run lists.

use crate::progress::{Event, HelperEvent, Progress};
use crate::vm::{self, Interrupt, VmError, VmEvent, VmSpec};
use imgforge_protocol::report::ReportLine;

/// When each phase of a helper run was reached: host time since qemu started, and the
/// guest's uptime where the helper reported it.
#[derive(Debug, Default)]
pub struct Timeline {
    /// (phase, host milliseconds since qemu started, guest uptime in milliseconds).
    pub phases: Vec<(String, u64, Option<u64>)>,
}

impl Timeline {
    /// The table printed with `-v`.
    pub fn render(&self) -> String {
        let mut out = String::from("helper VM phases:   host ms   guest ms   step ms\n");
        let mut previous = 0;
        for (name, host, guest) in &self.phases {
            let guest = guest.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
            out.push_str(&format!("  {name:<22} {host:>7}   {guest:>8}   {:>7}\n", host - previous));
            previous = *host;
        }
        out
    }
}

/// The most console text one helper run shows (`-v`, and always for Ganeti, whose OS log on
/// the node's disk keeps it): the guest's programs decide how much they print.
pub const MAX_SHOWN_CONSOLE_BYTES: u64 = 8 << 20;

/// What becomes of a console line under the [`MAX_SHOWN_CONSOLE_BYTES`] budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Shown.
    Line,
    /// The budget is spent: say so, once, then show nothing more.
    Cut,
    /// Not shown.
    Dropped,
}

/// How much console text a run has shown.
#[derive(Debug, Default)]
pub struct ConsoleBudget {
    shown: u64,
    cut: bool,
}

impl ConsoleBudget {
    /// Counts `line` (and its newline) against the budget (pure).
    pub fn admit(&mut self, line: &str) -> Shown {
        if self.cut {
            return Shown::Dropped;
        }
        self.shown += line.len() as u64 + 1;
        if self.shown <= MAX_SHOWN_CONSOLE_BYTES {
            Shown::Line
        } else {
            self.cut = true;
            Shown::Cut
        }
    }
}

/// A `CHECK` result the helper reported: (ok, name, detail).
pub type CheckResult = (bool, String, String);

/// Name of the failed check an unparseable `CHECK` line becomes.
pub const MALFORMED_CHECK: &str = "malformed-check";

/// The failed check an unparseable `CHECK` line becomes: `verify` must not pass over a result
/// it could not read. The line is quoted with its escapes (it comes from the guest).
pub fn malformed_check_result(line: &str) -> CheckResult {
    (false, MALFORMED_CHECK.into(), format!("a task printed a CHECK line that does not parse: {line:?}"))
}

/// Runs the VM, forwarding its events to the progress sink (and with `verbose` the console
/// and the phase table to stderr); returns its outcome and the `CHECK` results it reported.
pub(super) async fn run_vm(
    spec: &VmSpec,
    verbose: bool,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<(vm::VmOutcome, Vec<CheckResult>), VmError> {
    run_vm_with(spec, verbose, progress, interrupt, None).await
}

/// Receives a multi-variant run's own lines (`VARIANT-*`, `MANIFEST`, and the `CHANGE` lines,
/// which are then a variant's, not a dry run's) as they arrive.
pub(super) type VariantLines<'a> = &'a (dyn Fn(ReportLine) + Sync);

/// [`run_vm`], a multi-variant run's lines handed to `variant_lines`.
pub(super) async fn run_vm_with(
    spec: &VmSpec,
    verbose: bool,
    progress: &dyn Progress,
    interrupt: &Interrupt,
    variant_lines: Option<VariantLines<'_>>,
) -> Result<(vm::VmOutcome, Vec<CheckResult>), VmError> {
    let mut checks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut timeline = Timeline::default();
    let mut started: Option<std::time::Instant> = None;
    let mut console_seen = false;
    let mut budget = ConsoleBudget::default();
    let forward = async {
        while let Some(event) = rx.recv().await {
            if let VmEvent::Started { .. } = event {
                started = Some(std::time::Instant::now());
            }
            let since = started;
            let mark = |name: String, guest: Option<u64>, timeline: &mut Timeline| {
                let host = since.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                progress.emit(HelperEvent::Phase { phase: name.clone(), host_ms: host, guest_ms: guest }.into());
                timeline.phases.push((name, host, guest));
            };
            match event {
                VmEvent::Started { accel, cpu } => {
                    tracing::info!(%accel, %cpu, "helper VM started");
                    timeline.phases.clear();
                    console_seen = false;
                    mark(format!("qemu started ({accel})"), None, &mut timeline);
                }
                VmEvent::KvmProbe(what) => tracing::info!("{what}"),
                VmEvent::Fallback(why) => tracing::warn!("{why}"),
                VmEvent::Console(line) => {
                    if !console_seen {
                        console_seen = true;
                        mark("first console line".into(), None, &mut timeline);
                    }
                    if verbose {
                        match budget.admit(&line) {
                            Shown::Line => progress.note(&format!("helper: {line}")),
                            Shown::Cut => progress.note(&format!(
                                "helper: (console output past {} MiB not shown: the guest's programs print it)",
                                MAX_SHOWN_CONSOLE_BYTES >> 20
                            )),
                            Shown::Dropped => {}
                        }
                    }
                }
                VmEvent::MalformedCheck(line) => {
                    tracing::warn!("unparseable CHECK line from the helper: {line:?}");
                    checks.push(malformed_check_result(&line));
                }
                VmEvent::Report(
                    line @ (ReportLine::VariantStart { .. }
                    | ReportLine::VariantDone { .. }
                    | ReportLine::VariantFailed { .. }
                    | ReportLine::Manifest { .. }
                    | ReportLine::Change(_)
                    | ReportLine::ChangesOmitted { .. }
                    | ReportLine::DigestsShared { .. }
                    | ReportLine::DigestsKept { .. }),
                ) if variant_lines.is_some() => {
                    if let Some(take) = variant_lines {
                        take(line)
                    }
                }
                VmEvent::Report(line) => match line {
                    ReportLine::TaskStart { task } => progress.emit(HelperEvent::TaskStart { task }.into()),
                    ReportLine::TaskEnd { task, millis } => {
                        tracing::info!(%task, millis, "task done");
                        mark(format!("task {task}"), None, &mut timeline);
                        progress.emit(HelperEvent::TaskEnd { task }.into())
                    }
                    ReportLine::Warning { task, message } => {
                        tracing::warn!(%task, "{message}");
                        progress.emit(HelperEvent::Warning { task, messages: vec![message] }.into())
                    }
                    ReportLine::Error { task, message } => {
                        progress.emit(HelperEvent::Error { task, messages: vec![message] }.into())
                    }
                    ReportLine::Phase { name, uptime_ms } => {
                        mark(format!("helper {name}"), Some(uptime_ms), &mut timeline)
                    }
                    ReportLine::Success => mark("SUCCESS reported".into(), None, &mut timeline),
                    ReportLine::Check { ok, name, detail } => checks.push((ok, name, detail)),
                    ReportLine::Change(change) => progress.emit(Event::FileChange(change)),
                    ReportLine::ChangesOmitted { count } => progress.emit(Event::FileChangesOmitted { count }),
                    // Only a multi-variant run has these (handled above); elsewhere they mean nothing.
                    ReportLine::VariantStart { .. }
                    | ReportLine::VariantDone { .. }
                    | ReportLine::VariantFailed { .. }
                    | ReportLine::Manifest { .. }
                    | ReportLine::DigestsShared { .. }
                    | ReportLine::DigestsKept { .. } => {
                        tracing::warn!("the helper reported a variant in a run that has none: {line:?}")
                    }
                },
            }
        }
        if let Some(s) = started {
            let host = s.elapsed().as_millis() as u64;
            progress.emit(HelperEvent::Phase { phase: "qemu exited".into(), host_ms: host, guest_ms: None }.into());
            timeline.phases.push(("qemu exited".into(), host, None));
        }
        timeline
    };
    let run = async {
        let result = vm::run(spec, &tx, interrupt).await;
        drop(tx);
        result
    };
    let (result, timeline) = tokio::join!(run, forward);
    if verbose && !timeline.phases.is_empty() {
        progress.note(timeline.render().trim_end());
    }
    Ok((result?, checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_budget_cuts_once() {
        let mut b = ConsoleBudget::default();
        let line = "A".repeat(1023);
        let fits = MAX_SHOWN_CONSOLE_BYTES / 1024;
        assert!((0..fits).all(|_| b.admit(&line) == Shown::Line));
        assert_eq!(b.admit("x"), Shown::Cut);
        assert_eq!(b.admit(""), Shown::Dropped);
        assert_eq!(b.admit(&line), Shown::Dropped);
    }
}
