//! Many variants of one base image (`imgforge build`): the interface agreed with the variants
//! engine (docs in the lead's notes, `variants_api.md`).
//!
//! PROVISIONAL body: one copy and one helper boot per variant, `jobs` at a time, until the
//! engine (several variants in one helper boot) replaces it. The tree manifest and the list of
//! changes come with the engine: here they are empty, and `source_date_epoch` is not applied.

use crate::job::{customize, JobError, KnownFormat, VmSettings};
use crate::progress::{Event, Progress};
use crate::source::liveimg::{temp_beside, TempPath};
use crate::vm::Interrupt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a variant's output is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw disk image.
    Raw,
    /// A standalone qcow2.
    Qcow2,
    /// qcow2 whose backing file is the base image (thin).
    Qcow2Backed,
}

impl OutputFormat {
    /// The recipe's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Qcow2Backed => "qcow2-backed",
        }
    }
}

/// One variant to produce.
#[derive(Debug)]
pub struct VariantJob {
    /// Unique, `[A-Za-z0-9._-]+`.
    pub name: String,
    /// The operations, parsed by the same parser as the command line.
    pub plan: crate::ops::Plan,
    /// Appears only when complete (temp name + rename).
    pub output: PathBuf,
    /// How the output is written.
    pub format: OutputFormat,
    /// Files imgforge writes get this mtime (`None`: now).
    pub source_date_epoch: Option<i64>,
}

/// What one variant produced.
#[derive(Debug, Clone)]
pub struct VariantProduct {
    /// The output file.
    pub output: PathBuf,
    /// SHA-256 of the output file as written.
    pub output_sha256: String,
    /// SHA-256 of the guest tree manifest, computed in the helper (empty: not computed).
    pub manifest_sha256: String,
    /// Paths added, changed or removed, as the dry run lists them.
    pub changes: Vec<imgforge_protocol::change::FileChange>,
}

/// How one variant ended.
#[derive(Debug)]
pub struct VariantOutcome {
    /// The variant's name.
    pub name: String,
    /// Its product, or why it failed.
    pub result: Result<VariantProduct, JobError>,
}

/// Customizes every variant from `base`; up to `jobs` side by side. The base is never
/// modified. Progress: `variant-started`, `variant-done`, `variant-failed` events.
pub async fn customize_variants(
    base: &Path,
    format: KnownFormat,
    variants: Vec<VariantJob>,
    jobs: usize,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Vec<VariantOutcome> {
    use futures_util::stream::{self, StreamExt};
    let total = variants.len();
    let mut outcomes: Vec<(usize, VariantOutcome)> = stream::iter(variants.into_iter().enumerate())
        .map(|(index, job)| async move {
            progress.emit(Event::VariantStarted { name: job.name.clone(), index, total });
            let name = job.name.clone();
            let scoped = Scoped { inner: progress, name: &name };
            let result = one_variant(base, format, job, settings, &scoped, interrupt).await;
            match &result {
                Ok(product) => progress.emit(Event::VariantDone {
                    name: name.clone(),
                    index,
                    total,
                    output: product.output.display().to_string(),
                }),
                Err(e) => progress.emit(Event::VariantFailed {
                    name: name.clone(),
                    index,
                    total,
                    messages: vec![e.to_string()],
                }),
            }
            (index, VariantOutcome { name, result })
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, o)| o).collect()
}

/// Progress of one variant: its status lines carry its name.
struct Scoped<'a> {
    inner: &'a dyn Progress,
    name: &'a str,
}

impl Progress for Scoped<'_> {
    fn emit(&self, event: Event) {
        // The bar's line for a task start, with the variant's name (after the renderer's own).
        let task = match &event {
            Event::ImageHelper(crate::progress::HelperEvent::TaskStart { task }) => Some(task.clone()),
            _ => None,
        };
        // A random password names its variant: with several, the user must know whose it is.
        let event = match event {
            Event::RandomPassword { user, variant: None, password } => {
                Event::RandomPassword { user, variant: Some(self.name.to_owned()), password }
            }
            other => other,
        };
        self.inner.emit(event);
        if let Some(task) = task {
            self.status(&format!("helper: {task}"));
        }
    }

    fn status(&self, text: &str) {
        self.inner.status(&format!("{}: {text}", self.name));
    }

    fn note(&self, text: &str) {
        self.inner.note(text);
    }
}

/// The base copied raw beside the output, customized, converted, renamed.
async fn one_variant(
    base: &Path,
    format: KnownFormat,
    job: VariantJob,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<VariantProduct, JobError> {
    if job.format == OutputFormat::Qcow2Backed {
        return Err(JobError::Publish {
            path: job.output.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "qcow2-backed outputs come with the variants engine; use format = \"raw\" or \"qcow2\" for now",
            ),
        });
    }
    progress.status("copying the base image");
    let raw = TempPath(temp_beside(&job.output, "variant"));
    let request = crate::job::write::WriteRequest {
        confinement: settings.confinement(),
        image: crate::source::Location::Path(base.to_owned()),
        target: raw.0.clone(),
        force: false,
        size: None,
        sha256: None,
        sha256_before_write: false,
        backing_file: None,
        http: Default::default(),
        reach: crate::source::reach::Reach::Any,
    };
    let _ = format; // the writer reads the base's format from its header, confined
    crate::job::write(&request, Arc::new(crate::progress::Silent), interrupt).await?;
    let raw_format = KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw);
    customize(&[crate::job::GuestDisk::new(&raw.0, raw_format)], job.plan, false, settings, progress, interrupt)
        .await?;
    let finished = match job.format {
        OutputFormat::Raw => raw,
        OutputFormat::Qcow2 | OutputFormat::Qcow2Backed => {
            progress.status("converting to qcow2");
            let qcow2 = TempPath(temp_beside(&job.output, "qcow2"));
            let (from, to) = (raw.0.clone(), qcow2.0.clone());
            crate::job::blocking("qemu-img convert", move || convert_to_qcow2(&from, &to))
                .await?
                .map_err(|source| JobError::Publish { path: job.output.clone(), source })?;
            drop(raw);
            qcow2
        }
    };
    crate::stream::destination::publish(&finished.0, &job.output)
        .map_err(|source| JobError::Publish { path: job.output.clone(), source })?;
    drop(finished);
    let output = job.output.clone();
    let output_sha256 = crate::job::blocking("hashing the output", move || {
        let file = std::fs::File::open(&output)
            .map_err(|source| crate::source::SourceError::Io { name: output.display().to_string(), source })?;
        crate::job::write::sha256_of_file(&file, &output.display().to_string(), &Default::default())
    })
    .await??;
    Ok(VariantProduct { output: job.output, output_sha256, manifest_sha256: String::new(), changes: Vec::new() })
}

/// `qemu-img convert` of a raw file imgforge wrote (raw has no metadata for qemu to parse).
fn convert_to_qcow2(raw: &Path, qcow2: &Path) -> std::io::Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Secret;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Event>>);

    impl Progress for Collect {
        fn emit(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
        fn status(&self, _: &str) {}
        fn note(&self, _: &str) {}
    }

    /// Each variant's random password is announced with the variant's name: sixteen lines of
    /// "random password of root" would not say which image each opens.
    #[test]
    fn random_passwords_name_their_variant() {
        let inner = Collect::default();
        for name in ["ath-web", "ber-db"] {
            let scoped = Scoped { inner: &inner, name };
            scoped.emit(Event::RandomPassword {
                user: "root".into(),
                variant: None,
                password: Secret::new("pw".into()),
            });
        }
        let seen: Vec<Option<String>> = inner
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                Event::RandomPassword { variant, .. } => variant.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seen, [Some("ath-web".to_owned()), Some("ber-db".to_owned())]);
    }
}
