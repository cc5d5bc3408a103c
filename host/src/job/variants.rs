//! Many variants of one base image: each variant its own qcow2 overlay of the base and its own
//! rules, several customized in one helper VM boot (each overlay a virtio disk of its own, all
//! backed by the one read-only base node), up to `jobs` helper VMs side by side. A variant whose
//! task fails fails alone: its overlay is dropped and it is reported by name; the others are
//! written out. The base is only ever read.
//!
//! Each output is written from its overlay by a confined qemu (the helper user, `-sandbox`,
//! every file an inherited descriptor, as the commit of a one-disk run), under a temporary name
//! beside the output that is renamed once complete: raw and qcow2 are full copies, a
//! `Qcow2Backed` output holds only what the variant changed and names the base's absolute path
//! as its backing file.

use super::digest_exchange::{self, ShareBoard};
use super::helper_events::{self, VariantLines};
use super::overlay::Overlay;
use super::target::{self, KnownFormat, Target};
use super::{blocking, plan_rules, JobError, VmSettings};
use crate::helper_image;
use crate::ops::{PayloadFile, Plan};
use crate::progress::{Event, Progress, Secret};
use crate::vm::blockdev_qemu::{BlockdevQemu, Confinement};
use crate::vm::cmdline::{protocol_driver, DiskFormat};
use crate::vm::privilege;
use crate::vm::qmp::{Qmp, QmpError};
use crate::vm::{Interrupt, VmSpec};
use imgforge_protocol::change::FileChange;
use imgforge_protocol::digest_cache::{self, Share, PAYLOAD_NAME};
use imgforge_protocol::helper_vm::TARGET_SERIAL;
use imgforge_protocol::report::{ReportLine, Verdict};
use imgforge_protocol::rules::{is_variant_name, Rules, VariantRules};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Most variants one helper VM customizes: each is a virtio disk (a PCI slot of the 32 the
/// machine has, a few taken) and a qcow2 node with its caches in the helper VM's qemu; their
/// tasks run one after another, so more per boot only saves boots, which stop mattering here.
pub const MAX_VARIANTS_PER_BOOT: usize = 8;

/// How a variant's output is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw disk image.
    Raw,
    /// A standalone qcow2.
    Qcow2,
    /// qcow2 whose backing file is the base image (thin)
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
    pub plan: Plan,
    /// Appears only when complete (temporary name + rename).
    pub output: PathBuf,
    /// How it is written.
    pub format: OutputFormat,
    /// Files imgforge writes get this mtime (None: now).
    pub source_date_epoch: Option<i64>,
}

/// What one variant produced.
#[derive(Debug, Clone)]
pub struct VariantProduct {
    /// The output written.
    pub output: PathBuf,
    /// SHA-256 (hex) of the output file as written.
    pub output_sha256: String,
    /// SHA-256 (hex) of the guest tree manifest (`imgforge_protocol::manifest`), computed in the helper.
    pub manifest_sha256: String,
    /// What the operations added, changed and removed, as the dry run lists them.
    pub changes: Vec<FileChange>,
}

/// One variant's result.
#[derive(Debug)]
pub struct VariantOutcome {
    /// The variant.
    pub name: String,
    /// Its product, or why it failed.
    pub result: Result<VariantProduct, JobError>,
}

/// The image every variant starts from.
#[derive(Debug, Clone)]
pub struct VariantBase {
    /// Where it is.
    pub path: PathBuf,
    /// Its format.
    pub format: KnownFormat,
    /// Its SHA-256, when the caller checked it: the key of the digests of its files that one
    /// build keeps for the next (`imgforge_protocol::digest_cache`). `None`: no digest is kept.
    pub sha256: Option<String>,
    /// The caller's check of that SHA-256 when it runs beside the helper VMs rather than before
    /// them: no output is published and no digest kept until it has passed. `None`: checked
    /// before (or nothing to check).
    pub check: Option<BaseCheck>,
}

/// The verdict of a check of the base that runs while the variants are built (hashing a large
/// base takes a while the helper VMs can boot in).
#[derive(Debug, Clone)]
pub struct BaseCheck(watch::Receiver<Option<Result<(), String>>>);

/// Where the verdict of a [`BaseCheck`] is sent: `Ok`, or why the base is not the one expected.
pub type BaseCheckVerdict = watch::Sender<Option<Result<(), String>>>;

impl BaseCheck {
    /// A check whose verdict is still to come, and where to send it.
    pub fn pending() -> (BaseCheckVerdict, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self(rx))
    }

    /// Waits for the verdict.
    async fn passed(&self) -> Result<(), String> {
        let mut rx = self.0.clone();
        let verdict = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match verdict {
            Ok(Some(verdict)) => verdict,
            _ => Err("the check of the base image ended without a verdict".into()),
        }
    }
}

/// Customizes every variant from `base`; up to `jobs` helper VMs side by side, each
/// customizing several variants in one boot (each its own overlay of the base: one failing
/// variant fails alone). The base is never modified. Progress: `variant-started`,
/// `variant-done`, `variant-failed` events (name, index, total) through `progress`. The
/// outcomes come in the order of `variants`.
pub async fn customize_variants(
    base: &VariantBase,
    variants: Vec<VariantJob>,
    jobs: usize,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Vec<VariantOutcome> {
    let total = variants.len();
    let mut results: Vec<Option<Result<VariantProduct, JobError>>> = (0..total).map(|_| None).collect();
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let fail = |i: usize, reason: String| {
        progress.emit(Event::VariantFailed { name: names[i].clone(), index: i, total, messages: vec![reason.clone()] });
        Some(Err(JobError::Variant { name: names[i].clone(), reason }))
    };
    // Names travel in the report and name files: checked first, duplicates refused.
    let mut seen = HashSet::new();
    for (i, v) in variants.iter().enumerate() {
        if !is_variant_name(&v.name) {
            results[i] = fail(i, "a variant name is 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)".into());
        } else if !seen.insert(v.name.clone()) {
            results[i] = fail(i, "another variant has the same name: give each its own".into());
        }
    }
    // The base's state before anything here reads it (see DigestCache).
    let base_stamp = std::fs::metadata(&base.path).ok().map(|m| crate::job::payload::SourceStamp::of(&m));
    match prepare(&base.path, base.format, settings).await {
        Ok((target, image)) => {
            let digests = base
                .sha256
                .as_deref()
                .zip(base_stamp)
                .and_then(|(sha256, stamp)| DigestCache::for_base(sha256, &base.path, stamp));
            let digests = &digests;
            let todo: Vec<usize> = (0..total).filter(|i| results[*i].is_none()).collect();
            // A raw LVM base: its volume group would be on every disk of a boot (the helper
            // refuses that for a qcow2 base, whose content the host does not read).
            let lvm = target.format == DiskFormat::Raw
                && crate::inspect::raw_filesystem_kinds(&target.path).contains(&"LVM2_member");
            let batches = batches(&todo, jobs, if lvm { 1 } else { MAX_VARIANTS_PER_BOOT });
            let lanes: Vec<Vec<Vec<usize>>> = lanes(batches, jobs);
            // The lanes' first boots start together: with no digests kept, they share the reading.
            let parts = lanes.len() as u32;
            let board = ShareBoard::default();
            let board = &board;
            let variants = &variants;
            let target = &target;
            let image = &image;
            let lane_futures: Vec<Lane<'_>> = lanes
                .into_iter()
                .enumerate()
                .map(|(k, lane)| {
                    Box::pin(async move {
                        let mut out = Vec::new();
                        for (b, batch) in lane.into_iter().enumerate() {
                            let share = (parts > 1 && parts <= digest_cache::MAX_PARTS && b == 0)
                                .then_some((Share { part: k as u32, parts }, board));
                            out.extend(
                                run_batch(
                                    target,
                                    image,
                                    digests,
                                    share,
                                    base.check.as_ref(),
                                    variants,
                                    &batch,
                                    total,
                                    settings,
                                    progress,
                                    interrupt,
                                )
                                .await,
                            );
                        }
                        out
                    }) as Pin<Box<dyn Future<Output = _>>>
                })
                .collect();
            for (i, result) in join_all(lane_futures).await.into_iter().flatten() {
                results[i] = Some(result);
            }
        }
        Err(e) => {
            for (i, result) in results.iter_mut().enumerate() {
                if result.is_none() {
                    *result = fail(i, e.to_string());
                }
            }
        }
    }
    names
        .into_iter()
        .zip(results)
        .map(|(name, result)| {
            let result = result.unwrap_or_else(|| {
                Err(JobError::Variant { name: name.clone(), reason: "it was not run (an internal error)".into() })
            });
            VariantOutcome { name, result }
        })
        .collect()
}

/// Where the digests of one base's files are kept between builds: under the cache directory,
/// named by the base's SHA-256.
#[derive(Debug)]
struct DigestCache {
    path: PathBuf,
    /// The base file and its state before any boot read it: the digests are of the bytes its
    /// SHA-256 names only if it is still in that state after the boot.
    base: PathBuf,
    stamp: crate::job::payload::SourceStamp,
}

/// Where the digests of the files of the base whose SHA-256 is `sha256` are kept between
/// builds; `None` if `sha256` is not 64 hex digits.
pub fn kept_digests_path(sha256: &str) -> Option<PathBuf> {
    let sha256 = sha256.to_ascii_lowercase();
    (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| helper_image::cache_dir().join("manifest-digests").join(format!("{sha256}.v1")))
}

impl DigestCache {
    /// The cache of the base whose SHA-256 is `sha256` (64 hex digits, or no cache): the file
    /// `base`, in state `stamp` before any boot read it.
    fn for_base(sha256: &str, base: &Path, stamp: crate::job::payload::SourceStamp) -> Option<Self> {
        kept_digests_path(sha256).map(|path| Self { path, base: base.to_owned(), stamp })
    }

    /// The kept file, if there is one and it is a digest cache; a damaged one is removed, so
    /// that this build keeps a new one.
    fn kept(&self) -> Option<PathBuf> {
        let meta = std::fs::symlink_metadata(&self.path).ok()?;
        let sound = meta.is_file()
            && meta.len() <= digest_cache::MAX_BYTES as u64
            && std::fs::read(&self.path).is_ok_and(|bytes| digest_cache::parse(&bytes).is_ok());
        if !sound {
            tracing::warn!(cache = %self.path.display(), "the kept digests of the base are damaged: removed");
            let _ = std::fs::remove_file(&self.path);
            return None;
        }
        Some(self.path.clone())
    }

    /// Keeps what the helper wrote to `export`, if it is the digest cache whose SHA-256 the
    /// helper said (`sha256`) before any guest program ran, not what those programs could write
    /// there since: checked entry by entry too, then stored under a temporary name and renamed.
    /// Any failure only costs the next build the reading of the files again.
    fn keep(&self, export: &Path, sha256: &str) {
        let stored = (|| -> Result<usize, String> {
            // A base written to since its SHA-256 was checked: the helper read other bytes.
            crate::job::payload::check_unchanged(&self.base, &self.stamp).map_err(|e| e.to_string())?;
            let (bytes, entries) = super::digest_exchange::read_export(export, 0, sha256)?;
            let entries = entries.len();
            let dir = self.path.parent().ok_or("no directory")?;
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            std::io::Write::write_all(&mut temp, &bytes).map_err(|e| e.to_string())?;
            temp.persist(&self.path).map_err(|e| e.to_string())?;
            Ok(entries)
        })();
        match stored {
            Ok(n) => tracing::info!(files = n, cache = %self.path.display(), "kept the digests of the base's files"),
            Err(e) => {
                tracing::warn!(cache = %self.path.display(), "the digests of the base's files were not kept: {e}")
            }
        }
    }
}

/// Variants' results by index.
type Indexed = Vec<(usize, Result<VariantProduct, JobError>)>;
/// A lane of boots run one after another, side by side with the other lanes.
type Lane<'a> = Pin<Box<dyn Future<Output = Indexed> + 'a>>;

/// The base opened and held (read only), and the helper image.
async fn prepare(
    base: &Path,
    format: KnownFormat,
    settings: &VmSettings,
) -> Result<(Target, helper_image::HelperImage), JobError> {
    let target = target::open_shared(base, format)?;
    privilege::for_this_process(&settings.helper_user)?;
    let cache = helper_image::cache_dir();
    let image = blocking("helper image build", move || helper_image::ensure(&cache)).await??;
    Ok((target, image))
}

/// The variants (their indices) split into boots: as few boots as `per_boot` variants a boot
/// allow, but at least one a job, each boot as large as the others give or take one (pure).
pub fn batches(todo: &[usize], jobs: usize, per_boot: usize) -> Vec<Vec<usize>> {
    if todo.is_empty() {
        return Vec::new();
    }
    let count = todo.len().div_ceil(per_boot.max(1)).max(jobs.max(1).min(todo.len()));
    let (size, extra) = (todo.len() / count, todo.len() % count);
    let mut out = Vec::with_capacity(count);
    let mut at = 0;
    for k in 0..count {
        let n = size + usize::from(k < extra);
        out.push(todo[at..at + n].to_vec());
        at += n;
    }
    out
}

/// The boots dealt to `jobs` lanes that run side by side, each lane's boots one after another
/// (pure).
fn lanes(batches: Vec<Vec<usize>>, jobs: usize) -> Vec<Vec<Vec<usize>>> {
    let jobs = jobs.max(1).min(batches.len().max(1));
    let mut lanes: Vec<Vec<Vec<usize>>> = (0..jobs).map(|_| Vec::new()).collect();
    for (k, batch) in batches.into_iter().enumerate() {
        lanes[k % jobs].push(batch);
    }
    lanes.retain(|l| !l.is_empty());
    lanes
}

/// Polls every future to its end, side by side on this task; their outputs in order.
async fn join_all<T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// What the helper said of one variant.
#[derive(Debug, Default)]
struct Reported {
    started: bool,
    done: bool,
    failed: Option<(String, String)>,
    manifest: Option<String>,
    changes: Vec<FileChange>,
    omitted: u64,
}

/// A boot's report, variant by variant, as it arrives.
struct BatchReport<'a> {
    /// Index among all variants, by name.
    index: BTreeMap<String, usize>,
    total: usize,
    current: Mutex<Option<String>>,
    reported: Mutex<BTreeMap<String, Reported>>,
    progress: &'a dyn Progress,
    /// When this boot reads a share of the base's files: its share, the board, its export disk.
    share: Option<(u32, &'a ShareBoard, PathBuf)>,
    /// What the helper said on its first `DIGESTS-KEPT` line (sent before any guest program
    /// ran; a later one may be the guest's): the SHA-256 of the digests it writes, if any.
    kept: Mutex<Option<String>>,
}

impl BatchReport<'_> {
    fn take(&self, line: ReportLine) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        // Lines naming a variant not in this boot are noise from the guest side: ignored.
        let known = |name: &str| self.index.contains_key(name);
        match line {
            ReportLine::VariantStart { name } if known(&name) => {
                self.progress.emit(Event::VariantStarted {
                    name: name.clone(),
                    index: self.index[&name],
                    total: self.total,
                });
                reported.entry(name.clone()).or_default().started = true;
                *current = Some(name);
            }
            ReportLine::Manifest { name, sha256 } if known(&name) => {
                reported.entry(name).or_default().manifest = Some(sha256);
            }
            ReportLine::VariantDone { name } if known(&name) => {
                reported.entry(name).or_default().done = true;
                *current = None;
            }
            ReportLine::VariantFailed { name, task, message } if known(&name) => {
                reported.entry(name).or_default().failed = Some((task, message));
                *current = None;
            }
            ReportLine::Change(change) => {
                if let Some(name) = current.as_ref() {
                    reported.entry(name.clone()).or_default().changes.push(change);
                }
            }
            ReportLine::DigestsShared { sha256, .. } => match &self.share {
                Some((part, board, export)) => board.give(*part, export, &sha256),
                None => tracing::warn!("a boot that reads no share said it gave one: ignored"),
            },
            ReportLine::DigestsKept { sha256, .. } => {
                let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
                if kept.is_none() {
                    *kept = Some(sha256);
                } else {
                    tracing::warn!("the helper said twice which digests it keeps: the first counts");
                }
            }
            ReportLine::ChangesOmitted { count } => {
                if let Some(name) = current.as_ref() {
                    reported.entry(name.clone()).or_default().omitted += count;
                }
            }
            other => tracing::warn!("unexpected line in a multi-variant report: {other:?}"),
        }
    }
}

/// One helper boot for the variants `batch` (indices into `variants`): their outcomes.
#[allow(clippy::too_many_arguments)]
async fn run_batch(
    target: &Target,
    image: &helper_image::HelperImage,
    digests: &Option<DigestCache>,
    share: Option<(Share, &ShareBoard)>,
    check: Option<&BaseCheck>,
    variants: &[VariantJob],
    batch: &[usize],
    total: usize,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Vec<(usize, Result<VariantProduct, JobError>)> {
    let all_fail = |reason: String| {
        batch
            .iter()
            .map(|&i| {
                let name = variants[i].name.clone();
                progress.emit(Event::VariantFailed {
                    name: name.clone(),
                    index: i,
                    total,
                    messages: vec![reason.clone()],
                });
                (i, Err(JobError::Variant { name, reason: reason.clone() }))
            })
            .collect()
    };
    let prepared = match prepare_boot(target, image, digests.as_ref(), share, variants, batch, settings, progress) {
        Ok(p) => p,
        Err(e) => return all_fail(e.to_string()),
    };
    let report = BatchReport {
        index: batch.iter().map(|&i| (variants[i].name.clone(), i)).collect(),
        total,
        current: Mutex::new(None),
        reported: Mutex::new(BTreeMap::new()),
        progress,
        share: share
            .filter(|_| prepared.spec.import.is_some())
            .zip(prepared.export.clone())
            .map(|((share, board), export)| (share.part, board, export)),
        kept: Mutex::new(None),
    };
    let take = |line: ReportLine| report.take(line);
    let lines: VariantLines<'_> = &take;
    progress.status(&format!("booting a helper VM for {} variants", batch.len()));
    let started = Instant::now();
    let outcome =
        helper_events::run_vm_with(&prepared.spec, settings.show_console, progress, interrupt, Some(lines)).await;
    tracing::info!(variants = batch.len(), secs = started.elapsed().as_secs_f32(), "helper VM for variants ended");
    match outcome {
        Err(e) => return all_fail(JobError::from(e).to_string()),
        Ok((outcome, _)) => match outcome.verdict {
            Verdict::Success => {}
            Verdict::Failed { task, message } => {
                return all_fail(JobError::TaskFailed { task, message }.to_string());
            }
            Verdict::Incomplete { .. } => return all_fail("the helper VM stopped without a verdict".into()),
        },
    }
    let kept = report.kept.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let (Some(cache), Some(export)) = (digests, &prepared.export) {
        match (check, kept) {
            (_, None) => tracing::warn!("the helper said no digests to keep: none kept"),
            (Some(check), Some(sha256)) => {
                if check.passed().await.is_ok() {
                    cache.keep(export, &sha256)
                }
            }
            (None, Some(sha256)) => cache.keep(export, &sha256),
        }
    }
    let mut reported = report.reported.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    for (&i, overlay) in batch.iter().zip(prepared.overlays) {
        let variant = &variants[i];
        let said = reported.remove(&variant.name).unwrap_or_default();
        let result = match said {
            Reported { failed: Some((task, message)), .. } => Err(JobError::TaskFailed { task, message }),
            Reported { done: true, manifest: Some(manifest), changes, omitted, .. } => {
                if omitted > 0 {
                    tracing::warn!(variant = %variant.name, omitted, "more changes than listed");
                }
                progress.status(&format!("writing variant {}", variant.name));
                write_variant(target, overlay, variant, check, settings.confinement()).await.map(
                    |(output, output_sha256)| VariantProduct {
                        output,
                        output_sha256,
                        manifest_sha256: manifest,
                        changes,
                    },
                )
            }
            Reported { started, .. } => Err(JobError::Variant {
                name: variant.name.clone(),
                reason: if started {
                    "the helper did not report this variant's end".into()
                } else {
                    "the helper did not report on this variant".into()
                },
            }),
        };
        match &result {
            Ok(p) => progress.emit(Event::VariantDone {
                name: variant.name.clone(),
                index: i,
                total,
                output: p.output.display().to_string(),
            }),
            Err(e) => progress.emit(Event::VariantFailed {
                name: variant.name.clone(),
                index: i,
                total,
                messages: vec![e.to_string()],
            }),
        }
        out.push((i, result));
    }
    drop(prepared.work);
    out
}

/// A boot's files: the overlays, floppy and payload, and the VM that uses them.
struct PreparedBoot {
    spec: VmSpec,
    /// The disk the helper writes its digest cache to, when none was kept for this base yet.
    export: Option<PathBuf>,
    overlays: Vec<Overlay>,
    work: tempfile::TempDir,
}

/// The serial number of the `k`th disk of a boot: the first is the usual target disk.
fn serial(k: usize) -> String {
    if k == 0 {
        TARGET_SERIAL.to_owned()
    } else {
        format!("imgforge-v{k}")
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_boot(
    target: &Target,
    image: &helper_image::HelperImage,
    digests: Option<&DigestCache>,
    share: Option<(Share, &ShareBoard)>,
    variants: &[VariantJob],
    batch: &[usize],
    settings: &VmSettings,
    progress: &dyn Progress,
) -> Result<PreparedBoot, JobError> {
    let user = privilege::for_this_process(&settings.helper_user)?;
    let tmp = std::env::temp_dir();
    let work = crate::workdir::private_tempdir("variants").map_err(|source| JobError::WorkDir { dir: tmp, source })?;
    let mut top = Rules::new();
    top.verbose = settings.trace_tasks;
    top.excluded_tasks = settings.excluded_tasks.clone();
    let mut overlays = Vec::new();
    let mut payload_files: Vec<PayloadFile> = Vec::new();
    for (k, &i) in batch.iter().enumerate() {
        let variant = &variants[i];
        let plan = &variant.plan;
        for event in password_events(&variant.name, plan) {
            progress.emit(event);
        }
        // A variant's files sit under its name on the one payload disk of the boot.
        payload_files.extend(
            plan.payload.iter().map(|f| PayloadFile { name: format!("{}/{}", variant.name, f.name), ..f.clone() }),
        );
        let dir = work.path().join(&variant.name);
        std::fs::create_dir(&dir).map_err(|source| JobError::WorkDir { dir: dir.clone(), source })?;
        overlays.push(Overlay::create(&target.path, target.format, target.virtual_size, &dir)?);
        let mut rules = plan_rules(plan, false, settings);
        rules.dry_run = false;
        rules.source_date_epoch = variant.source_date_epoch;
        top.variants.push(VariantRules { name: variant.name.clone(), serial: serial(k), rules });
    }
    // The digests kept from an earlier boot of this base go on the payload disk; without them
    // the helper gets a disk to write this boot's to.
    let mut export = None;
    let mut import = None;
    if let Some(cache) = digests {
        match cache.kept() {
            Some(kept) => payload_files.push(PayloadFile { name: PAYLOAD_NAME.into(), source: kept, tree: None }),
            None => {
                let path = work.path().join("digest-export.raw");
                digest_exchange::create_disk(&path, 2)
                    .map_err(|source| JobError::WorkDir { dir: path.clone(), source })?;
                export = Some(path);
                // Read cold beside other boots: this boot reads its share first.
                if let Some((share, board)) = share {
                    let path = work.path().join("digest-import.raw");
                    digest_exchange::create_disk(&path, 1)
                        .map_err(|source| JobError::WorkDir { dir: path.clone(), source })?;
                    board.join(share.part, path.clone());
                    top.digest_share = Some(share);
                    import = Some(path);
                }
            }
        }
    }
    let (floppy_path, payload_path) = super::rules_and_payload_disks(work.path(), &top, &payload_files)?;
    let preload = super::preload_for(std::slice::from_ref(target), &settings.excluded_tasks, payload_path.is_some());
    let spec = VmSpec {
        qemu: settings.qemu.clone(),
        image: image.clone(),
        disk: target.path.clone(),
        disk_format: target.format,
        overlay: Some(overlays[0].path.clone()),
        // A variant's guest is on its one disk: other disks belong to `customize -a`'s guests.
        extra_disks: Vec::new(),
        more_overlays: overlays.iter().enumerate().skip(1).map(|(k, o)| (o.path.clone(), serial(k))).collect(),
        floppy: floppy_path,
        payload: payload_path,
        export: export.clone(),
        import,
        bulk: None,
        // Each variant's disk caches in the VM: a little more memory for each past the first.
        memory_mib: settings.memory_mib + 64 * (batch.len() as u32 - 1),
        vcpus: settings.vcpus,
        accel: settings.accel,
        // The timeout is per variant: a boot customizes several one after another.
        soft_timeout: settings.timeout * batch.len() as u32,
        hard_grace: settings.hard_grace,
        user,
        cache: helper_image::cache_dir(),
        preload,
    };
    Ok(PreparedBoot { spec, export, overlays, work })
}

/// The `random-password` events of variant `name`'s `plan`, each naming the variant: with
/// several variants, "random password of root" alone would not say which image it opens.
fn password_events(name: &str, plan: &Plan) -> Vec<Event> {
    plan.random_passwords
        .iter()
        .map(|(user, password)| Event::RandomPassword {
            user: user.clone(),
            variant: Some(name.to_owned()),
            password: Secret::new(password.clone()),
        })
        .collect()
}

/// Writes `variant`'s output from its overlay (temporary name, then renamed): its path and
/// SHA-256.
async fn write_variant(
    target: &Target,
    overlay: Overlay,
    variant: &VariantJob,
    check: Option<&BaseCheck>,
    confinement: Confinement,
) -> Result<(PathBuf, String), JobError> {
    let fail = |reason: String| JobError::Variant { name: variant.name.clone(), reason };
    let output = variant.output.clone();
    let shown = output.file_name().map(|n| n.to_owned()).unwrap_or_else(|| variant.name.clone().into());
    let temp = crate::workdir::temp_beside(&output, "variant", &shown);
    let base = std::fs::canonicalize(&target.path).map_err(|e| fail(format!("{}: {e}", target.path.display())))?;
    let (base_format, size, format) = (target.format, target.virtual_size, variant.format);
    let job_temp = temp.clone();
    let written = blocking("variant output", move || {
        let result = write_output(&base, base_format, size, &overlay.path, &job_temp, format, &confinement)
            .and_then(|()| sha256_file(&job_temp));
        drop(overlay);
        result
    })
    .await
    .map_err(|e| fail(e.to_string()))
    .and_then(|r| r.map_err(|reason| fail(format!("cannot write {}: {reason}", output.display()))));
    let written = match (written, check) {
        (Ok(sha), Some(check)) => check.passed().await.map(|()| sha).map_err(fail),
        (written, _) => written,
    };
    match written {
        Ok(sha) => match std::fs::rename(&temp, &output) {
            Ok(()) => Ok((output, sha)),
            Err(source) => {
                let _ = std::fs::remove_file(&temp);
                Err(JobError::Publish { path: output, source })
            }
        },
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// How long a silent copy job may go without moving before it is given up.
const COPY_STALL_LIMIT: Duration = Duration::from_secs(300);

/// Writes the output file `out` from `overlay` (backed by `base`) in `format`: a thin output is
/// the overlay copied; the others are written by a confined qemu's backup job. The empty output
/// is made first with `qemu-img create`, which reads no image (the size is given, the backing
/// file not opened).
fn write_output(
    base: &Path,
    base_format: DiskFormat,
    size: u64,
    overlay: &Path,
    out: &Path,
    format: OutputFormat,
    confinement: &Confinement,
) -> Result<(), String> {
    let _ = std::fs::remove_file(out);
    // A raw base in a regular file is copied into a raw output by its data, holes skipped.
    let raw_file_base = format == OutputFormat::Raw
        && base_format == DiskFormat::Raw
        && std::fs::metadata(base).is_ok_and(|m| m.is_file() && m.len() == size);
    let create = |extra: &[&str]| -> Result<(), String> {
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(out.display().to_string());
        args.push(size.to_string());
        duct::cmd("qemu-img", &args)
            .stderr_capture()
            .stdout_null()
            .run()
            .map(|_| ())
            .map_err(|e| format!("qemu-img create: {e}"))
    };
    match format {
        OutputFormat::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            file.set_len(size).map_err(|e| format!("{}: {e}", out.display()))?;
            if raw_file_base {
                copy_raw_data(base, size, &file).map_err(|e| format!("copying {} into it: {e}", base.display()))?;
            }
        }
        OutputFormat::Qcow2 => create(&[])?,
        OutputFormat::Qcow2Backed => return copy_thin(base, base_format, size, overlay, out),
    }
    let open = |p: &Path, write: bool| {
        std::fs::OpenOptions::new().read(true).write(write).open(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let (base_file, overlay_file, out_file) = (open(base, false)?, open(overlay, false)?, open(out, true)?);
    let mut base_node =
        json!({"driver": base_format.as_str(), "node-name": "base", "file": "base-file", "read-only": true});
    if base_format == DiskFormat::Qcow2 {
        base_node["backing"] = serde_json::Value::Null;
    }
    let out_node = match format {
        OutputFormat::Raw => json!({"driver": "raw", "node-name": "out", "file": "out-file"}),
        OutputFormat::Qcow2 => json!({"driver": "qcow2", "node-name": "out", "file": "out-file", "backing": null}),
        // The output's header names the base; qemu is given the base node, never the path.
        OutputFormat::Qcow2Backed => {
            json!({"driver": "qcow2", "node-name": "out", "file": "out-file", "backing": "base"})
        }
    };
    let is_device = crate::stream::destination::is_block_device(base);
    let blockdevs = [
        json!({"driver": protocol_driver(is_device), "node-name": "base-file", "filename": "/dev/fdset/1", "read-only": true}),
        base_node,
        json!({"driver": "file", "node-name": "overlay-file", "filename": "/dev/fdset/2", "read-only": true}),
        json!({"driver": "qcow2", "node-name": "overlay", "file": "overlay-file", "backing": "base", "read-only": true}),
        json!({"driver": "file", "node-name": "out-file", "filename": "/dev/fdset/3"}),
        out_node,
    ];
    let fdsets = [
        (1, base_file.as_raw_fd(), "base"),
        (2, overlay_file.as_raw_fd(), "overlay"),
        (3, out_file.as_raw_fd(), "out"),
    ];
    let started = BlockdevQemu::start(confinement, &fdsets, &blockdevs);
    drop((base_file, overlay_file, out_file));
    let mut qemu = started.map_err(|e| e.to_string())?;
    // Only what the variant wrote goes into a thin output, or into a raw output that already
    // holds a raw base's data; the rest stays the base's. (A full backup of a raw output would
    // write the base's holes as allocated zeros: qemu's copy does not ask to unmap.)
    let sync = match format {
        OutputFormat::Qcow2Backed => "top",
        OutputFormat::Raw if raw_file_base => "top",
        _ => "full",
    };
    match run_backup(&mut qemu.qmp, sync) {
        Ok(()) => qemu.quit(),
        Err(e) => Err(qemu.failure(e)),
    }
}

/// A thin output is the variant's overlay as it is: a qcow2 that names the base by its
/// canonical path and format (see `Overlay::create`) and holds what the variant wrote, made by
/// the helper VM's qemu, which has exited. Copying it costs no qemu of its own. That qemu ran
/// the hostile guest and could write the whole file, header included: the copy is published
/// only if its header is still the one made for it — the base (`base`, canonical, of
/// `base_format`) as its only backing file, the size `size`, no external data file, no
/// encryption — and its tables check as any qcow2 imgforge reads.
fn copy_thin(base: &Path, base_format: DiskFormat, size: u64, overlay: &Path, out: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", overlay.display());
    let mut from =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(overlay).map_err(|e| at(&e))?;
    let len = from.metadata().map_err(|e| at(&e))?.len();
    let header = crate::source::qcow2::check(&from, len, crate::source::qcow2::Backing::Allowed)
        .map_err(|e| format!("the overlay {} is not the one made for it: {e}", overlay.display()))?;
    let mut first = vec![0u8; usize::try_from(len.min(1 << header.cluster_bits)).map_err(|e| at(&e))?];
    std::os::unix::fs::FileExt::read_exact_at(&from, &mut first, 0).map_err(|e| at(&e))?;
    let expected = (base.as_os_str().as_bytes().to_vec(), Some(base_format.as_str().as_bytes().to_vec()));
    if header.size != size || crate::source::qcow2::backing_of(&first, &header).as_ref() != Some(&expected) {
        return Err(format!(
            "the overlay {} no longer names {} ({}) of {size} bytes as its base: it is not published",
            overlay.display(),
            base.display(),
            base_format.as_str()
        ));
    }
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    std::io::copy(&mut from, &mut to)
        .map_err(|e| format!("copying {} to {}: {e}", overlay.display(), out.display()))?;
    Ok(())
}

/// Copies a raw `base`'s data into `out` (already its size, sparse) at the same offsets, its
/// holes skipped without reading: no byte of it is interpreted.
fn copy_raw_data(base: &Path, size: u64, out: &std::fs::File) -> std::io::Result<()> {
    use crate::stream::{ChunkReader, Piece, RawFile};
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(base)?;
    let mut reader = RawFile::new(file, size);
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    loop {
        match reader.next(&mut buf)? {
            Piece::Data(n) => {
                out.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
            Piece::Hole(n) => at += n,
            Piece::End => return Ok(()),
        }
    }
}

/// Runs a backup job from `overlay` to `out` to its end.
fn run_backup(qmp: &mut Qmp, sync: &str) -> Result<(), String> {
    qmp.execute(
        "blockdev-backup",
        Some(json!({"job-id": "write", "device": "overlay", "target": "out", "sync": sync})),
    )
    .map_err(|e| e.to_string())?;
    let mut last = (None, Instant::now());
    loop {
        match qmp.wait_for_event(&["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], Duration::from_secs(10)) {
            Ok(event) if event.name == "BLOCK_JOB_COMPLETED" => {
                return match event.data["error"].as_str() {
                    Some(e) => Err(e.to_owned()),
                    None => Ok(()),
                };
            }
            Ok(_) => return Err("the copy job was cancelled".into()),
            Err(QmpError::Timeout { .. }) => {
                let jobs = qmp.execute("query-block-jobs", None).map_err(|e| e.to_string())?;
                let offset = jobs
                    .as_array()
                    .and_then(|j| j.iter().find(|j| j["device"] == "write"))
                    .and_then(|j| j["offset"].as_u64());
                if offset.is_some() && offset != last.0 {
                    last = (offset, Instant::now());
                } else if last.1.elapsed() > COPY_STALL_LIMIT {
                    return Err(format!("the copy made no progress for {} s", COPY_STALL_LIMIT.as_secs()));
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// SHA-256 (hex) of a file's bytes (read as bytes: nothing in them is parsed; holes hashed
/// from memory).
fn sha256_file(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::file_digest::sha256_of_file(&file, &std::sync::atomic::AtomicBool::new(false)).map_err(|e| match e {
        crate::file_digest::DigestError::Io(e) => format!("{}: {e}", path.display()),
        crate::file_digest::DigestError::Cancelled => format!("{}: cancelled", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digests kept for the next builds are those the helper said it wrote, before any
    /// guest program ran: the same region rewritten since (the export disk is the guest's too
    /// while its programs run, and the helper writes it on a thread meanwhile) is not kept.
    #[test]
    fn only_the_digests_the_helper_said_are_kept() {
        use sha2::Digest;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, b"base").unwrap();
        let stamp = crate::job::payload::SourceStamp::of(&std::fs::metadata(&base).unwrap());
        let cache = DigestCache { path: dir.path().join("kept").join("digests.v1"), base, stamp };
        let entry = |sha: char| digest_cache::Entry {
            path: b"/bin/sh".to_vec(),
            ino: 12,
            size: 3,
            mtime: (1, 2),
            ctime: (3, 4),
            sha256: sha.to_string().repeat(64),
        };
        let export = dir.path().join("export.raw");
        digest_exchange::create_disk(&export, 2).unwrap();
        let write = |e: digest_cache::Entry| {
            let bytes = digest_cache::render(&[e]);
            let f = std::fs::OpenOptions::new().write(true).open(&export).unwrap();
            f.write_all_at(&(bytes.len() as u64).to_le_bytes(), 0).unwrap();
            f.write_all_at(&bytes, 8).unwrap();
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        let said = write(entry('a'));
        write(entry('f'));
        cache.keep(&export, &said);
        assert!(!cache.path.exists(), "digests written after the helper's line were kept");
        write(entry('a'));
        cache.keep(&export, &said);
        let kept = digest_cache::parse(&std::fs::read(&cache.path).unwrap()).unwrap();
        assert_eq!(kept, [entry('a')]);
    }

    /// A thin output is published only while the overlay still names the base it was made
    /// over: the helper VM's qemu ran the hostile guest and could rewrite the header to name
    /// any host file (or another format, or size) for whoever opens the output.
    #[test]
    fn a_thin_output_is_only_an_overlay_of_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let base = std::fs::canonicalize(&base).unwrap();
        let make = |name: &str, backing: &Path, format: &str, size: &str| {
            let overlay = dir.path().join(name);
            let made = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-u", "-F", format, "-b"])
                .arg(backing)
                .arg(&overlay)
                .arg(size)
                .output()
                .unwrap();
            assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
            overlay
        };
        let size = 1u64 << 20;
        let good = make("good.qcow2", &base, "raw", "1M");
        let out = dir.path().join("good-out.qcow2");
        copy_thin(&base, DiskFormat::Raw, size, &good, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&good).unwrap());

        let hostile = [
            make("other-file.qcow2", Path::new("/etc/hostname"), "raw", "1M"),
            make("other-format.qcow2", &base, "qcow2", "1M"),
            make("other-size.qcow2", &base, "raw", "2M"),
        ];
        for overlay in &hostile {
            let out = dir.path().join("out.qcow2");
            let refused = copy_thin(&base, DiskFormat::Raw, size, overlay, &out);
            assert!(refused.is_err(), "{} was published", overlay.display());
            assert!(!out.exists());
        }
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(copy_thin(&base, DiskFormat::Raw, size, &link, &dir.path().join("linked.qcow2")).is_err());
    }

    #[test]
    fn variants_are_split_into_boots_and_lanes() {
        let todo: Vec<usize> = (0..20).collect();
        let sizes = |b: &[Vec<usize>]| b.iter().map(Vec::len).collect::<Vec<_>>();
        let batches = |todo: &[usize], jobs| batches(todo, jobs, MAX_VARIANTS_PER_BOOT);
        assert_eq!(super::batches(&todo[..3], 1, 1), [[0], [1], [2]], "one a boot (an LVM base)");
        // One job: as few boots as the cap allows, evened out.
        assert_eq!(sizes(&batches(&todo, 1)), [7, 7, 6]);
        // Four jobs: at least one boot each.
        assert_eq!(sizes(&batches(&todo, 4)), [5, 5, 5, 5]);
        assert_eq!(sizes(&batches(&todo[..3], 8)), [1, 1, 1]);
        assert_eq!(sizes(&batches(&todo[..3], 1)), [3]);
        assert!(batches(&[], 2).is_empty());
        let all: Vec<usize> = batches(&todo, 3).concat();
        assert_eq!(all, todo, "every variant once, in order");
        let lanes = lanes(batches(&todo, 1), 2);
        assert_eq!(lanes.len(), 2);
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 3);
        assert_eq!(serial(0), TARGET_SERIAL);
        assert!(serial(MAX_VARIANTS_PER_BOOT).len() <= 20, "virtio serial numbers hold 20 bytes");
    }

    /// Each variant's random password is announced with the variant's name.
    #[test]
    fn random_passwords_name_their_variant() {
        let mut plan = Plan::default();
        plan.random_passwords.push(("root".into(), "pw".into()));
        let seen: Vec<Option<String>> = ["ath-web", "ber-db"]
            .iter()
            .flat_map(|name| password_events(name, &plan))
            .map(|e| match e {
                Event::RandomPassword { variant, .. } => variant,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seen, [Some("ath-web".to_owned()), Some("ber-db".to_owned())]);
    }
}
