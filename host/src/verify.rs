//! `imgforge verify`: the "test" step of the image life-cycle. The helper checks every
//! filesystem read-only and asks the guest's package database for each required package;
//! the image is never modified (the helper works on an overlay that is thrown away).

use crate::customize::{self, VmSettings};
use crate::exit::{ExitStatus, Failure};
use crate::progress::{Progress, ProgressMode};
use crate::source::{self, Format, Location};
use crate::vm::{privilege, Interrupt, VmSpec};
use crate::{floppy, helper_image, overlay, target};
use imgforge_protocol::report::Verdict;
use imgforge_protocol::rules::Rules;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The verification report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The image.
    pub image: String,
    /// True only if every check held.
    pub ok: bool,
    /// Each check.
    pub checks: Vec<Check>,
    /// Why the helper could not finish, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// The report for people.
    pub fn render(&self) -> String {
        let mut out = format!("image: {}\n", self.image);
        for c in &self.checks {
            out.push_str(&format!("  {:<4} {:<28} {}\n", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail));
        }
        if let Some(e) = &self.error {
            out.push_str(&format!("  FAIL {e}\n"));
        }
        out.push_str(if self.ok { "verdict: good\n" } else { "verdict: BAD\n" });
        out
    }
}

/// Verifies `image`, requiring `packages`.
pub async fn run(
    image: &Path,
    packages: &[String],
    settings: &VmSettings,
    interrupt: &Interrupt,
) -> Result<Report, Failure> {
    for p in packages {
        if p.is_empty() || p.starts_with('-') || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-:~".contains(&b))
        {
            return Err(Failure::bad_input(format!("--require-package {p:?} is not a package name")));
        }
    }
    let header = source::read_header(image)?;
    let work = tempfile::Builder::new()
        .prefix("imgforge-verify-")
        .tempdir()
        .map_err(|e| Failure::environment(format!("cannot create a temporary directory: {e}")))?;
    // Disks are checked where they are; anything else (liveimg, compressed) is unpacked first.
    let disk = match source::detect(&header) {
        Format::Raw | Format::Qemu("qcow2") => image.to_owned(),
        _ => {
            let unpacked = work.path().join("image.raw");
            let request = crate::write::WriteRequest {
                image: Location::Path(image.to_owned()),
                target: unpacked.clone(),
                force: false,
                size: None,
                sha256: None,
                backing_file: None,
            };
            let cancel = AtomicBool::new(false);
            let quiet = Progress::new(ProgressMode::None);
            tokio::task::spawn_blocking(move || crate::write::write(&request, &quiet, &cancel))
                .await
                .map_err(|e| Failure::environment(format!("unpacking panicked: {e}")))??;
            unpacked
        }
    };
    let target = target::open(&disk).map_err(|e| Failure::bad_input(e.to_string()))?;
    let user = privilege::for_this_process(&settings.helper_user).map_err(|e| Failure::bad_input(e.to_string()))?;
    let cache = helper_image::cache_dir();
    let image_files = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || helper_image::ensure(&cache))
            .await
            .map_err(|e| Failure::environment(format!("helper image build panicked: {e}")))??
    };
    let mut rules = Rules::new();
    rules.verify = true;
    rules.required_packages = packages.to_vec();
    rules.verbose = settings.trace_tasks;
    let floppy_path = work.path().join("rules.img");
    floppy::build(&rules, &floppy_path).map_err(|e| Failure::environment(e.to_string()))?;
    // Mounting, even read-only, may replay a journal: it lands in the overlay, never the image.
    let overlay = overlay::Overlay::create(&target.path, target.format, target.virtual_size, work.path())
        .map_err(|e| Failure::environment(e.to_string()))?;
    let spec = VmSpec {
        qemu: settings.qemu.clone(),
        image: image_files,
        disk: target.path.clone(),
        disk_format: target.format,
        overlay: Some(overlay.path.clone()),
        floppy: floppy_path,
        payload: None,
        memory_mib: settings.memory_mib,
        accel: settings.accel,
        soft_timeout: settings.timeout,
        hard_grace: settings.hard_grace,
        user,
        cache,
        preload: customize::preload_for(&target, &[], false),
    };
    let quiet = Progress::new(ProgressMode::None);
    let (outcome, checks) = customize::run_vm_collecting(&spec, settings.show_console, &quiet, interrupt).await?;
    let checks: Vec<Check> = checks.into_iter().map(|(ok, name, detail)| Check { name, ok, detail }).collect();
    let error = match outcome.verdict {
        Verdict::Success => None,
        Verdict::Failed { task, message } => Some(format!("task {task} failed: {message}")),
        Verdict::Incomplete { .. } => Some("the helper stopped without a verdict".into()),
    };
    let ok = error.is_none() && !checks.is_empty() && checks.iter().all(|c| c.ok);
    Ok(Report { image: image.display().to_string(), ok, checks, error })
}

/// The failure for a bad report (exit 1, naming what failed).
pub fn failure(report: &Report) -> Failure {
    let mut failed: Vec<String> =
        report.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    failed.extend(report.error.clone());
    Failure::new(
        ExitStatus::CustomizationFailed,
        format!("{} failed verification: {}", report.image, failed.join("; ")),
    )
}
