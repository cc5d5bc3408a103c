//! The one pipeline every command and Ganeti action goes through: prepare a helper run (the
//! disk opened and locked, the helper image, the rules floppy, the payload disk, a qcow2
//! overlay, the VM spec), run it, then commit the overlay into the disk or discard it.
//!
//! `customize`, `verify`, `deploy` (to a disk or a liveimg) and Ganeti's `create` and `rename`
//! differ only in the rules they hand over and in what they do with the outcome; the CLI and
//! Ganeti parse, build a request, call here, and map the result to an exit status.

mod deploy;
mod digest_exchange;
pub mod floppy;
mod helper_events;
pub mod overlay;
pub mod payload;
pub mod target;
pub mod variants;
pub mod verify;
pub mod write;

pub use deploy::{cancellable, customize_written, deploy, deploy_liveimg, write, DeployTarget};
pub use helper_events::{CheckResult, Timeline};

use crate::helper_image::{self, BuildError};
use crate::ops::Plan;
use crate::progress::{Event, ImageInfo, Progress, Secret};
use crate::vm::privilege::{self, PrivilegeError};
use crate::vm::{self, accel::Accel, Interrupt, VmError, VmOutcome, VmSpec};
use floppy::FloppyError;
use imgforge_protocol::report::Verdict;
use imgforge_protocol::rules::Rules;
use overlay::{Overlay, OverlayError};
use payload::PayloadError;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use target::KnownFormat;
use target::{Target, TargetError};
use thiserror::Error;

/// Default soft timeout of the helper VM.
pub const HELPER_SOFT_TIMEOUT_SECS: u64 = 600;
/// Grace between the soft timeout's graceful stop and SIGKILL.
pub const HELPER_HARD_GRACE_SECS: u64 = 10;
/// Default helper VM memory.
pub const HELPER_MEMORY_MIB: u32 = 1024;
/// Default helper VM vCPUs: the tasks run one after another, so one is enough.
pub const HELPER_VCPUS: u32 = 1;

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
    /// vCPUs.
    pub vcpus: u32,
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

impl VmSettings {
    /// The settings of a quiet run under TCG with `timeout` a variant, otherwise the defaults
    /// (benchmarks and tests, on machines where KVM is not used).
    pub fn tcg(timeout: Duration) -> Self {
        Self {
            accel: Accel::Tcg,
            timeout,
            hard_grace: Duration::from_secs(10),
            memory_mib: HELPER_MEMORY_MIB,
            vcpus: 1,
            helper_user: crate::vm::privilege::DEFAULT_HELPER_USER.into(),
            excluded_tasks: Vec::new(),
            show_console: false,
            trace_tasks: false,
            qemu: "qemu-system-x86_64".into(),
        }
    }

    /// The qemu that reads images and commits overlays, as the helper VM's user.
    pub fn confinement(&self) -> crate::vm::blockdev_qemu::Confinement {
        crate::vm::blockdev_qemu::Confinement { qemu: self.qemu.clone(), user: self.helper_user.clone() }
    }
}

/// Why a job did not reach its end.
#[derive(Debug, Error)]
pub enum JobError {
    /// The disk cannot be customized.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The helper user cannot be used.
    #[error(transparent)]
    HelperUser(#[from] PrivilegeError),
    /// The helper image cannot be built or found.
    #[error("cannot prepare the helper image: {0}")]
    HelperImage(#[from] BuildError),
    /// No scratch directory for the job's files.
    #[error("cannot create a temporary directory in {}: {source}", dir.display())]
    WorkDir {
        /// Where it was to be made.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The rules do not fit on, or cannot be written to, the floppy.
    #[error(transparent)]
    Floppy(#[from] FloppyError),
    /// The payload disk cannot be built.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The overlay cannot be created or committed.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The helper VM did not report.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A task failed inside the helper VM.
    #[error("task {task} failed in the helper VM: {message}")]
    TaskFailed {
        /// `NN-Name`.
        task: String,
        /// Its message.
        message: String,
    },
    /// `-a` names one disk twice: its two overlays would each hold half of the changes.
    #[error("disk {} is given twice (-a {} and -a {}): give each disk of the guest once", second.display(), first.display(), second.display())]
    SameDisk {
        /// Its first name.
        first: PathBuf,
        /// The name that is the same disk again.
        second: PathBuf,
    },
    /// The first disks' changes were committed, then a later disk's commit failed: the guest's
    /// disks no longer belong together.
    #[error("{source}; the changes to {} were already committed, so the guest's disks are now out of step: restore them from a backup", committed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    PartlyCommitted {
        /// The disks already committed.
        committed: Vec<PathBuf>,
        /// The failed commit.
        source: OverlayError,
    },
    /// The image could not be written.
    #[error(transparent)]
    Write(#[from] crate::job::write::WriteError),
    /// The liveimg could not be taken apart or repacked.
    #[error(transparent)]
    Liveimg(#[from] crate::source::liveimg::LiveimgError),
    /// A blocking step died.
    #[error("{0} panicked: {1}")]
    Panicked(&'static str, String),
    /// A variant of a multi-variant build could not be made (the others may have been).
    #[error("variant {name}: {reason}")]
    Variant {
        /// The variant.
        name: String,
        /// What failed, and what to do.
        reason: String,
    },
    /// The finished, customized image cannot be given its name.
    #[error("cannot move the finished image to {}: {source}", path.display())]
    Publish {
        /// The output.
        path: PathBuf,
        /// The rename's error.
        source: std::io::Error,
    },
    /// Customizing a device or existing file failed after the image was written there; its
    /// start was zeroed.
    #[error("{source}; the first MiB of {} was zeroed so it does not boot a partial image", target.display())]
    StartZeroed {
        /// The target.
        target: PathBuf,
        /// Why the job failed.
        source: Box<JobError>,
    },
}

impl JobError {
    /// The failure itself, whatever was done to the target afterwards.
    pub fn cause(&self) -> &JobError {
        match self {
            JobError::StartZeroed { source, .. } => source.cause(),
            other => other,
        }
    }
}

/// Runs blocking `f` off the async runtime; `what` names it if it panics.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| JobError::Panicked(what, e.to_string()))
}

/// What a finished helper run reported.
#[derive(Debug)]
pub struct RunResult {
    /// The VM's outcome (success or the failing task, the accelerator, the time).
    pub outcome: VmOutcome,
    /// The `CHECK` results the helper reported (verify).
    pub checks: Vec<CheckResult>,
}

/// One disk of the guest, as `customize -a` names it: its path and how its format is known.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestDisk {
    /// The disk.
    pub path: PathBuf,
    /// Its format.
    pub format: target::KnownFormat,
}

impl GuestDisk {
    /// `path` of `format`.
    pub fn new(path: impl Into<PathBuf>, format: target::KnownFormat) -> Self {
        Self { path: path.into(), format }
    }
}

/// A prepared helper run on the guest's disks: each locked, the helper writing into an overlay
/// of each.
pub struct Job {
    /// The disks, the first the one the helper sees as its target disk.
    targets: Vec<Target>,
    /// Their overlays, in the same order.
    overlays: Vec<Overlay>,
    spec: VmSpec,
    /// The qemu and user the commit runs with: the helper VM's.
    confinement: crate::vm::blockdev_qemu::Confinement,
    /// The host file the helper reads in place as its bulk disk, and its state when planned.
    bulk_source: Option<(PathBuf, payload::SourceStamp)>,
    // Holds the floppy, payload and overlay files until the job ends.
    _work: tempfile::TempDir,
}

impl Job {
    /// Prepares a helper run with `rules` (and the `payload` files) on `disks` (at least one:
    /// the first is the helper's target disk, the others are attached after it, each behind an
    /// overlay of its own).
    pub async fn prepare(
        disks: &[GuestDisk],
        mut rules: Rules,
        payload: &[crate::ops::PayloadFile],
        settings: &VmSettings,
        progress: &dyn Progress,
    ) -> Result<Job, JobError> {
        assert!(!disks.is_empty(), "a job has at least one disk");
        check_distinct(disks)?;
        let targets = disks.iter().map(|d| target::open(&d.path, d.format)).collect::<Result<Vec<_>, _>>()?;
        rules.extra_disks = (targets.len() - 1) as u32;
        let user = privilege::for_this_process(&settings.helper_user)?;
        for target in &targets {
            progress.emit(ImageInfo::disk(&target.path, target.format.as_str(), target.size).into());
        }
        progress.status("preparing the helper image");
        let cache = helper_image::cache_dir();
        let image = {
            let cache = cache.clone();
            blocking("helper image build", move || helper_image::ensure(&cache)).await??
        };
        let tmp = std::env::temp_dir();
        let work = crate::workdir::private_tempdir("job").map_err(|source| JobError::WorkDir { dir: tmp, source })?;
        // Large uploads on a raw disk of their own, read by DMA in the helper (payload::build_bulk).
        let bulk = payload::bulk_candidates(payload, &rules.operations);
        let (bulk_files, payload): (Vec<_>, Vec<_>) =
            payload.iter().cloned().enumerate().partition(|(i, _)| bulk.contains(i));
        let bulk_files: Vec<_> = bulk_files.into_iter().map(|(_, f)| f).collect();
        let payload: Vec<_> = payload.into_iter().map(|(_, f)| f).collect();
        let mut bulk_source = None;
        let bulk_path = match bulk_files.as_slice() {
            [] => None,
            // One file is its own bulk disk: no copy of it on the host.
            [one] => {
                let (placed, stamp) = payload::whole_file(one)?;
                rules.bulk = vec![placed];
                bulk_source = Some((one.source.clone(), stamp));
                Some(one.source.clone())
            }
            _ => {
                let p = work.path().join("bulk.img");
                rules.bulk = payload::build_bulk(&bulk_files, &p)?;
                Some(p)
            }
        };
        let (floppy_path, payload_path) = rules_and_payload_disks(work.path(), &rules, &payload)?;
        // Mounting, even read-only, may replay a journal: every write lands in an overlay.
        let overlays = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let name = if i == 0 { "overlay.qcow2".to_owned() } else { format!("overlay-{}.qcow2", i + 1) };
                Overlay::create_named(&t.path, t.format, t.virtual_size, &work.path().join(name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let preload = preload_for(&targets, &rules.excluded_tasks, payload_path.is_some());
        let extra_disks = targets
            .iter()
            .zip(&overlays)
            .skip(1)
            .map(|(t, o)| vm::ExtraDisk { path: t.path.clone(), format: t.format, overlay: o.path.clone() })
            .collect();
        let spec = VmSpec {
            qemu: settings.qemu.clone(),
            image,
            disk: targets[0].path.clone(),
            disk_format: targets[0].format,
            overlay: Some(overlays[0].path.clone()),
            extra_disks,
            more_overlays: Vec::new(),
            floppy: floppy_path,
            payload: payload_path,
            export: None,
            import: None,
            bulk: bulk_path,
            memory_mib: settings.memory_mib,
            vcpus: settings.vcpus,
            accel: settings.accel,
            soft_timeout: settings.timeout,
            hard_grace: settings.hard_grace,
            user,
            cache,
            preload,
        };
        Ok(Job { targets, overlays, spec, confinement: settings.confinement(), bulk_source, _work: work })
    }

    /// Boots the helper VM on the prepared disk and collects its report.
    pub async fn run(
        &self,
        verbose: bool,
        progress: &dyn Progress,
        interrupt: &Interrupt,
    ) -> Result<RunResult, JobError> {
        progress.status("booting the helper VM");
        let (outcome, checks) = helper_events::run_vm(&self.spec, verbose, progress, interrupt).await?;
        // Read in place during the run: a change makes what the guest got unknown.
        if let Some((path, stamp)) = &self.bulk_source {
            payload::check_unchanged(path, stamp)?;
        }
        Ok(RunResult { outcome, checks })
    }

    /// Commits the helper's writes into the disks, one after the other. Past this point an
    /// interrupt waits for the commit: a half-committed disk is the one outcome worse than
    /// either before or after.
    pub async fn commit(self, progress: &dyn Progress) -> Result<(), JobError> {
        progress.status("committing the changes");
        let Job { targets, overlays, confinement, _work, .. } = self;
        let mut committed = Vec::new();
        for (target, overlay) in targets.iter().zip(overlays) {
            let bytes = overlay.allocated_bytes();
            let confinement = confinement.clone();
            let result = blocking("commit", move || overlay.commit(&confinement).map(|d| (d, overlay))).await?;
            let (spent, overlay) = match result {
                Ok(done) => done,
                Err(source) if !committed.is_empty() => return Err(JobError::PartlyCommitted { committed, source }),
                Err(e) => return Err(e.into()),
            };
            tracing::info!(disk = %target.path.display(), secs = spent.as_secs_f32(), overlay_bytes = bytes, "changes committed into the disk");
            drop(overlay);
            committed.push(target.path.clone());
        }
        drop(targets);
        Ok(())
    }

    /// Drops the helper's writes: the disk was only ever read.
    pub fn discard(self) {}
}

/// Customizes `disk` (of `format`) in place with `plan`; `grow_filesystem` also grows a
/// whole-disk root filesystem to the disk's size. The disk changes only if every task succeeded,
/// and never in a dry run (`plan.dry_run`): the helper then lists what it changed (as
/// `file-change` events) and the overlay holding those changes is dropped.
pub async fn customize(
    disks: &[GuestDisk],
    mut plan: Plan,
    grow_filesystem: bool,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    announce_random_passwords(&mut plan, progress);
    let rules = plan_rules(&plan, grow_filesystem, settings);
    let job = Job::prepare(disks, rules, &plan.payload, settings, progress).await?;
    let result = job.run(settings.show_console, progress, interrupt).await?;
    let disk = DiskNames(disks);
    match result.outcome.verdict {
        Verdict::Success if plan.dry_run => {
            job.discard();
            tracing::info!("dry run: the changes listed were dropped, nothing was written to {}", disk.display());
            Ok(())
        }
        Verdict::Failed { task, message } if plan.dry_run => {
            job.discard();
            tracing::warn!(
                "dry run failed in {task}: the changes listed are those made before the failure, all dropped; nothing was written to {}",
                disk.display()
            );
            Err(JobError::TaskFailed { task, message })
        }
        Verdict::Success => {
            tracing::info!(accel = %result.outcome.accel, secs = result.outcome.elapsed.as_secs_f32(), "customization succeeded");
            job.commit(progress).await
        }
        Verdict::Failed { task, message } => {
            job.discard();
            Err(JobError::TaskFailed { task, message })
        }
        Verdict::Incomplete { .. } => unreachable!("vm::run turns an incomplete report into an error"),
    }
}

/// The rules document that carries out `plan` with `settings`' task options.
fn plan_rules(plan: &Plan, grow_filesystem: bool, settings: &VmSettings) -> Rules {
    let mut rules = Rules::new();
    rules.operations = plan.operations.clone();
    rules.rpms = plan.rpms.clone();
    rules.debs = plan.debs.clone();
    rules.install = plan.install.clone();
    rules.uninstall = plan.uninstall.clone();
    rules.update = plan.update;
    rules.repo = plan.repo.clone();
    rules.repo_format = plan.repo_format.clone();
    rules.gpgcheck = plan.gpgcheck;
    rules.root_partition = plan.root_partition.clone();
    // virt-customize relabels an SELinux guest after every customization unless told not to.
    rules.selinux_relabel = !plan.no_selinux_relabel;
    rules.verbose = settings.trace_tasks;
    rules.grow_filesystem = grow_filesystem;
    rules.grow_to_disk = plan.grow_to_disk;
    rules.excluded_tasks = settings.excluded_tasks.clone();
    rules.dry_run = plan.dry_run;
    rules.swap = plan.swap.clone();
    rules.swap_disk = plan.swap_disk.clone();
    rules.task_overwriting = plan.task_overwriting.clone();
    rules
}

/// Emits a `random-password` event for each random password `plan` sets, at the start of the
/// job that sets them; they are taken out of the plan, so a later step of the same job does
/// not announce them again.
fn announce_random_passwords(plan: &mut Plan, progress: &dyn Progress) {
    for (user, password) in std::mem::take(&mut plan.random_passwords) {
        progress.emit(Event::RandomPassword { user, variant: None, password: Secret::new(password) });
    }
}

/// The guest's disks named in a message: `a.img` or `a.img and b.img`.
struct DiskNames<'a>(&'a [GuestDisk]);

impl DiskNames<'_> {
    fn display(&self) -> String {
        self.0.iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>().join(" and ")
    }
}

/// Refuses one disk named twice (the same file or device under two names).
pub(crate) fn check_distinct(disks: &[GuestDisk]) -> Result<(), JobError> {
    use std::os::unix::fs::MetadataExt;
    let identity =
        |p: &Path| std::fs::metadata(p).map(|m| if m.rdev() != 0 { (0, m.rdev()) } else { (m.dev(), m.ino()) }).ok();
    let ids: Vec<_> = disks.iter().map(|d| identity(&d.path)).collect();
    for (i, id) in ids.iter().enumerate() {
        if let Some(j) = id.and_then(|id| ids[..i].iter().position(|other| *other == Some(id))) {
            return Err(JobError::SameDisk { first: disks[j].path.clone(), second: disks[i].path.clone() });
        }
    }
    Ok(())
}

/// The modules worth loading early for `targets` (nothing when every task is excluded: then
/// nothing is mounted).
/// Writes the rules floppy and, when there are files, the payload disk into `work`: their paths.
fn rules_and_payload_disks(
    work: &Path,
    rules: &Rules,
    payload: &[crate::ops::PayloadFile],
) -> Result<(PathBuf, Option<PathBuf>), JobError> {
    let floppy_path = work.join("rules.img");
    floppy::build(rules, &floppy_path)?;
    if payload.is_empty() {
        return Ok((floppy_path, None));
    }
    let payload_path = work.join("payload.img");
    payload::build(payload, &payload_path)?;
    Ok((floppy_path, Some(payload_path)))
}

fn preload_for(targets: &[Target], excluded_tasks: &[String], payload: bool) -> Vec<&'static str> {
    if excluded_tasks.iter().any(|t| t == "*") {
        return Vec::new();
    }
    let kinds: Vec<&str> = targets
        .iter()
        .flat_map(|target| match target.format {
            vm::cmdline::DiskFormat::Raw => crate::inspect::raw_filesystem_kinds(&target.path),
            // qcow2 is read by qemu only: the host parses no image data with C code.
            vm::cmdline::DiskFormat::Qcow2 => Vec::new(),
        })
        .collect();
    vm::preload_modules(&kinds, payload)
}
