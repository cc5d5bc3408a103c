//! `imgforge customize`: run the operations on a disk in the helper VM.

use crate::exit::{ExitStatus, Failure};
use crate::ops::Plan;
use crate::progress::Progress;
use crate::vm::{self, accel::Accel, privilege, Interrupt, VmEvent, VmSpec};
use crate::{floppy, helper_image, payload, target};
use imgforge_protocol::report::{ReportLine, Verdict};
use imgforge_protocol::rules::Rules;
use std::path::PathBuf;
use std::time::Duration;

/// Default soft timeout of the helper VM.
pub const HELPER_SOFT_TIMEOUT_SECS: u64 = 600;
/// Grace between the soft timeout's graceful stop and SIGKILL.
pub const HELPER_HARD_GRACE_SECS: u64 = 10;
/// Default helper VM memory.
pub const HELPER_MEMORY_MIB: u32 = 1024;

/// How to run the helper VM.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// Accelerator choice.
    pub accel: Accel,
    /// Soft timeout.
    pub timeout: Duration,
    /// After the soft timeout's graceful stop, how long until SIGKILL.
    pub hard_grace: Duration,
    /// Memory.
    pub memory_mib: u32,
    /// User qemu runs as.
    pub helper_user: String,
    /// Helper tasks not to run, by short name (`*`: all).
    pub excluded_tasks: Vec<String>,
    /// Show the helper console on stderr.
    pub show_console: bool,
    /// Trace every task command (`set -x`) in the console.
    pub trace_tasks: bool,
    /// qemu binary.
    pub qemu: PathBuf,
}

/// Customizes `disk` in place with `plan`; `grow_filesystem` also grows a whole-disk root
/// filesystem to the disk's size.
pub async fn run(
    disk: &std::path::Path,
    plan: Plan,
    grow_filesystem: bool,
    settings: &VmSettings,
    progress: &Progress,
    interrupt: &Interrupt,
) -> Result<(), Failure> {
    let target = target::open(disk).map_err(|e| Failure::bad_input(e.to_string()))?;
    let user = privilege::for_this_process(&settings.helper_user).map_err(|e| Failure::bad_input(e.to_string()))?;
    progress
        .image_info(serde_json::json!({"path": target.path, "format": target.format.as_str(), "size": target.size}));
    for (user, password) in &plan.random_passwords {
        let line = format!("Setting random password of {user} to {password}");
        if progress.is_json() {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    progress.message("preparing the helper image");
    let cache = helper_image::cache_dir();
    let image = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || helper_image::ensure(&cache))
            .await
            .map_err(|e| Failure::environment(format!("helper image build panicked: {e}")))??
    };

    let work = tempfile::Builder::new().prefix("imgforge-").tempdir().map_err(|e| {
        Failure::environment(format!("cannot create a temporary directory in {}: {e}", std::env::temp_dir().display()))
    })?;
    let mut rules = Rules::new();
    rules.operations = plan.operations;
    rules.rpms = plan.rpms;
    rules.install = plan.install;
    rules.repo = plan.repo;
    rules.gpgcheck = plan.gpgcheck;
    rules.root_partition = plan.root_partition;
    rules.selinux_relabel = plan.selinux_relabel;
    rules.verbose = settings.trace_tasks;
    rules.grow_filesystem = grow_filesystem;
    rules.excluded_tasks = settings.excluded_tasks.clone();
    let floppy_path = work.path().join("rules.img");
    floppy::build(&rules, &floppy_path).map_err(|e| match e {
        floppy::FloppyError::TooLarge(_) => Failure::bad_input(e.to_string()),
        _ => Failure::environment(e.to_string()),
    })?;
    let payload_path = if plan.payload.is_empty() {
        None
    } else {
        let p = work.path().join("payload.img");
        payload::build(&plan.payload, &p).map_err(|e| match e {
            payload::PayloadError::Source { .. } => Failure::bad_input(e.to_string()),
            _ => Failure::environment(e.to_string()),
        })?;
        Some(p)
    };

    let overlay = crate::overlay::Overlay::create(&target.path, target.format, target.virtual_size, work.path())
        .map_err(|e| Failure::environment(e.to_string()))?;
    let spec_payload = payload_path.is_some();
    let spec = VmSpec {
        qemu: settings.qemu.clone(),
        image,
        disk: target.path.clone(),
        disk_format: target.format,
        overlay: Some(overlay.path.clone()),
        floppy: floppy_path,
        payload: payload_path,
        memory_mib: settings.memory_mib,
        accel: settings.accel,
        soft_timeout: settings.timeout,
        hard_grace: settings.hard_grace,
        user,
        cache,
        preload: preload_for(&target, &settings.excluded_tasks, spec_payload),
    };
    progress.message("booting the helper VM");
    let outcome = run_vm(&spec, settings.show_console, progress, interrupt).await?;
    let result = match outcome.verdict {
        Verdict::Success => {
            tracing::info!(accel = %outcome.accel, secs = outcome.elapsed.as_secs_f32(), "customization succeeded");
            // Past this point an interrupt waits for the commit: a half-committed disk is the
            // one outcome worse than either before or after.
            progress.message("committing the changes");
            let bytes = overlay.allocated_bytes();
            let spent = tokio::task::spawn_blocking(move || overlay.commit().map(|d| (d, overlay)))
                .await
                .map_err(|e| Failure::environment(format!("commit panicked: {e}")))?
                .map_err(|e| Failure::environment(e.to_string()))?;
            tracing::info!(secs = spent.0.as_secs_f32(), overlay_bytes = bytes, "changes committed into the disk");
            Ok(())
        }
        Verdict::Failed { task, message } => Err(Failure::new(
            ExitStatus::CustomizationFailed,
            format!("task {task} failed in the helper VM: {message}"),
        )),
        Verdict::Incomplete { .. } => unreachable!("vm::run turns an incomplete report into an error"),
    };
    drop(target);
    result
}

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

/// Runs the VM, forwarding its events to the progress sink and (with -v) the console to stderr.
/// The modules worth loading early for `target` (nothing when every task is excluded: then
/// nothing is mounted).
pub fn preload_for(target: &target::Target, excluded_tasks: &[String], payload: bool) -> Vec<&'static str> {
    if excluded_tasks.iter().any(|t| t == "*") {
        return Vec::new();
    }
    let kinds = match target.format {
        vm::cmdline::DiskFormat::Raw => crate::inspect::raw_filesystem_kinds(&target.path),
        // qcow2 is read by qemu only: the host parses no image data with C code.
        vm::cmdline::DiskFormat::Qcow2 => Vec::new(),
    };
    vm::preload_modules(&kinds, payload)
}

pub async fn run_vm(
    spec: &VmSpec,
    verbose: bool,
    progress: &Progress,
    interrupt: &Interrupt,
) -> Result<vm::VmOutcome, Failure> {
    run_vm_collecting(spec, verbose, progress, interrupt).await.map(|(outcome, _)| outcome)
}

/// A `CHECK` result the helper reported: (ok, name, detail).
pub type CheckResult = (bool, String, String);

/// [`run_vm`], also returning the `CHECK` results the helper reported.
pub async fn run_vm_collecting(
    spec: &VmSpec,
    verbose: bool,
    progress: &Progress,
    interrupt: &Interrupt,
) -> Result<(vm::VmOutcome, Vec<CheckResult>), Failure> {
    let mut checks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut timeline = Timeline::default();
    let mut started: Option<std::time::Instant> = None;
    let mut console_seen = false;
    let forward = async {
        while let Some(event) = rx.recv().await {
            if let VmEvent::Started { .. } = event {
                started = Some(std::time::Instant::now());
            }
            let since = started;
            let mark = |name: String, guest: Option<u64>, timeline: &mut Timeline| {
                let host = since.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                progress.phase(&name, host, guest);
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
                        progress.println(&format!("helper: {line}"));
                    }
                }
                VmEvent::Report(line) => match line {
                    ReportLine::TaskStart { task } => progress.helper("task-start", &task, None),
                    ReportLine::TaskEnd { task, millis } => {
                        tracing::info!(%task, millis, "task done");
                        mark(format!("task {task}"), None, &mut timeline);
                        progress.helper("task-end", &task, None)
                    }
                    ReportLine::Warning { task, message } => {
                        tracing::warn!(%task, "{message}");
                        progress.helper("warning", &task, Some(&message))
                    }
                    ReportLine::Error { task, message } => progress.helper("error", &task, Some(&message)),
                    ReportLine::Phase { name, uptime_ms } => {
                        mark(format!("helper {name}"), Some(uptime_ms), &mut timeline)
                    }
                    ReportLine::Success => mark("SUCCESS reported".into(), None, &mut timeline),
                    ReportLine::Check { ok, name, detail } => checks.push((ok, name, detail)),
                },
            }
        }
        if let Some(s) = started {
            let host = s.elapsed().as_millis() as u64;
            progress.phase("qemu exited", host, None);
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
        progress.println(timeline.render().trim_end());
    }
    Ok((result?, checks))
}
