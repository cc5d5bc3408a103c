//! `imgforge verify`: the "test" step of the image life-cycle. The helper checks every
//! filesystem read-only and asks the guest's package database for each required package;
//! the image is never modified (the helper works on an overlay that is thrown away).

use super::{Job, JobError, KnownFormat, VmSettings};
use crate::progress::Silent;
use crate::source::{self, Format, Location, SourceError};
use crate::vm::Interrupt;
use imgforge_protocol::report::Verdict;
use imgforge_protocol::rules::Rules;
use serde::Serialize;
use std::path::Path;
use thiserror::Error;

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

/// Why an image could not be verified (a bad image is a [`Report`], not an error).
#[derive(Debug, Error)]
pub enum VerifyError {
    /// A `--require-package` value that no package manager takes.
    #[error("--require-package {0:?} is not a package name")]
    PackageName(String),
    /// The image cannot be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The helper run did not complete.
    #[error(transparent)]
    Job(#[from] JobError),
}

/// Verifies `image`, requiring `packages`.
pub async fn run(
    image: &Path,
    packages: &[String],
    settings: &VmSettings,
    interrupt: &Interrupt,
) -> Result<Report, VerifyError> {
    for p in packages {
        if p.is_empty() || p.starts_with('-') || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-:~".contains(&b))
        {
            return Err(VerifyError::PackageName(p.clone()));
        }
    }
    let header = source::read_header(image)?;
    let tmp = std::env::temp_dir();
    let work = crate::workdir::private_tempdir("verify").map_err(|source| JobError::WorkDir { dir: tmp, source })?;
    // Disks are checked where they are; anything else (liveimg, compressed) is unpacked first.
    let (disk, format) = match source::detect(&header) {
        Format::Raw | Format::Qemu("qcow2") => (image.to_owned(), KnownFormat::FromHeader),
        _ => {
            let unpacked = work.path().join("image.raw");
            let request = super::write::WriteRequest {
                http: Default::default(),
                // A file: nothing is fetched.
                reach: crate::source::reach::Reach::Any,
                confinement: settings.confinement(),
                image: Location::Path(image.to_owned()),
                target: unpacked.clone(),
                force: false,
                size: None,
                sha256: None,
                sha256_before_write: false,
                backing_file: None,
            };
            super::cancellable("unpacking", interrupt, move |cancel| super::write::write(&request, &Silent, cancel))
                .await?;
            // Unpacked bytes are the guest's: raw, whatever they start with.
            (unpacked, KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw))
        }
    };
    let mut rules = Rules::new();
    rules.verify = true;
    rules.required_packages = packages.to_vec();
    rules.verbose = settings.trace_tasks;
    let job = Job::prepare(&[super::GuestDisk::new(disk.clone(), format)], rules, &[], settings, &Silent).await?;
    let result = job.run(settings.show_console, &Silent, interrupt).await?;
    job.discard();
    let checks: Vec<Check> = result.checks.into_iter().map(|(ok, name, detail)| Check { name, ok, detail }).collect();
    let error = match result.outcome.verdict {
        Verdict::Success => None,
        Verdict::Failed { task, message } => Some(format!("task {task} failed: {message}")),
        Verdict::Incomplete { .. } => Some("the helper stopped without a verdict".into()),
    };
    let ok = error.is_none() && !checks.is_empty() && checks.iter().all(|c| c.ok);
    Ok(Report { image: image.display().to_string(), ok, checks, error })
}

/// What failed in a bad report, in one line naming the image.
pub fn summary(report: &Report) -> String {
    let mut failed: Vec<String> =
        report.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    failed.extend(report.error.clone());
    format!("{} failed verification: {}", report.image, failed.join("; "))
}
