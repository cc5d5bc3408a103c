//! A multi-variant run: several overlays of one base, each on its own virtio disk with its own
//! rules, customized one after another in this one boot. Each variant runs the whole task
//! sequence on its disk; a failing variant is reported (`VARIANT-FAILED`) and the next one
//! starts, so one variant fails alone. After a variant's operations, and before its disk is
//! unmounted, the helper reports what they added, changed and removed (`CHANGE` lines, as a dry
//! run lists them) and the digest of its tree manifest (`MANIFEST`).

use crate::change_watch::{ChangeWatch, Touched};
use crate::changes;
use crate::layout::{PAYLOAD_DIR, STATE_DIR, TARGET_DIR};
use crate::reporter::Reporter;
use crate::snapshot::{self, Snapshot};
use crate::task_env::{Place, TaskEnv};
use crate::tasks::{self, Builtins, TaskFailure, When};
use imgforge_protocol::digest_cache;
use imgforge_protocol::manifest::ManifestContent;
use imgforge_protocol::report::ReportLine;
use imgforge_protocol::rules::{Rules, VariantRules};
use imgforge_protocol::task::TaskName;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a variant's disk to appear.
const DISK_WAIT: Duration = Duration::from_secs(15);

/// Runs every variant of `rules` (whose `variants` is not empty). An error is the helper's own
/// (the payload disk cannot be mounted): no variant ran.
pub fn run_all(dir: &Path, rules: &Rules, builtins: Builtins, reporter: &mut Reporter) -> Result<(), TaskFailure> {
    let payload_task = TaskName::parse("05-MountPayload").map_err(|e| helper_failure(e.to_string()))?;
    reporter.send(&ReportLine::TaskStart { task: payload_task.to_string() });
    crate::mounts::mount_payload(&TaskEnv::new(&payload_task, rules))
        .map_err(|message| TaskFailure { task: payload_task.to_string(), message })?;
    reporter.send(&ReportLine::TaskEnd { task: payload_task.to_string(), millis: 0 });
    load_digest_cache();
    // Every disk starts as the same base: an LVM volume group on one is on all of them at once,
    // and LVM would pick any of the copies. Such a base gets one variant a boot.
    let shared_lvm = rules.variants.len() > 1
        && rules.variants.first().and_then(|v| find_disk(&v.serial).ok()).is_some_and(|d| holds_lvm(&d));
    let mut base_tree: Option<BaseTree> = None;
    let mut exporting: Option<std::thread::JoinHandle<()>> = None;
    for (k, variant) in rules.variants.iter().enumerate() {
        reporter.send(&ReportLine::VariantStart { name: variant.name.clone() });
        let started = Instant::now();
        let result = if shared_lvm && k > 0 {
            Err(helper_failure(
                "the base holds an LVM volume group, which would appear on every variant's disk of this boot at once: \
                 such a base is customized one variant a boot (jobs=1 per boot); build this variant on its own"
                    .into(),
            ))
        } else {
            run_one(dir, rules, variant, builtins, reporter, &mut base_tree, &mut exporting)
        };
        match result {
            Ok(sha256) => {
                reporter.send(&ReportLine::Manifest { name: variant.name.clone(), sha256 });
                reporter.send(&ReportLine::VariantDone { name: variant.name.clone() });
            }
            Err(failure) => reporter.send(&ReportLine::VariantFailed {
                name: variant.name.clone(),
                task: failure.task,
                message: failure.message,
            }),
        }
        println!("variant {}: {} ms", variant.name, started.elapsed().as_millis());
    }
    if let Some(thread) = exporting {
        let _ = thread.join();
    }
    Ok(())
}

/// Takes the digests of the base's files that the host kept from an earlier boot, if it gave
/// them (a damaged cache is said and left: the files are then read).
fn load_digest_cache() {
    let path = Path::new(PAYLOAD_DIR).join(digest_cache::PAYLOAD_NAME);
    let Ok(file) = std::fs::File::open(&path) else { return };
    let mut bytes = Vec::new();
    let read =
        std::io::Read::read_to_end(&mut std::io::Read::take(file, digest_cache::MAX_BYTES as u64 + 1), &mut bytes);
    match read.map_err(|e| e.to_string()).and_then(|_| digest_cache::parse(&bytes).map_err(|e| e.to_string())) {
        Ok(entries) => {
            println!("digest cache: {} files of the base known from an earlier boot", entries.len());
            snapshot::digest_cache::preload(entries);
        }
        Err(e) => println!("WARNING: the digest cache {} is not used: {e}", path.display()),
    }
}

/// Writes the digests of the base's files (those of `base`, the tree before any operation,
/// just walked) to the export disk, when the host attached one, for the next builds of this
/// base: on a thread of its own, while the variants run. Guest programs run meanwhile and could
/// write that disk too (were they to reach it): the host keeps only the bytes whose SHA-256 the
/// `DIGESTS-KEPT` line says, sent here, before any of them runs.
fn export_digest_cache(base: &Snapshot, reporter: &mut Reporter) -> Option<std::thread::JoinHandle<()>> {
    let disk = crate::digest_exchange::export_disk()?;
    let entries = crate::digest_exchange::known_entries(base);
    let (bytes, sha256) = crate::digest_exchange::rendered(&entries);
    let files = entries.len();
    reporter.send(&ReportLine::DigestsKept { files: files as u64, sha256 });
    Some(std::thread::spawn(move || match crate::digest_exchange::export(&disk, &bytes, 0) {
        Ok(()) => println!("digest cache: {files} files of the base written to {disk}"),
        Err(e) => println!("WARNING: the digest cache of this base is not kept: {e}"),
    }))
}

fn helper_failure(message: String) -> TaskFailure {
    TaskFailure { task: "helper".into(), message }
}

/// The guest's tree as the first variant of the boot found it before its operations, and the
/// mounts it was found on. Every disk of a boot is a fresh overlay of one base, and no task
/// before MountRoot changes a file, so the next variants, mounted alike, start from this same
/// tree: it is walked once a boot, not once a variant.
struct BaseTree {
    mounts: Vec<(PathBuf, snapshot::Meta)>,
    snapshot: Snapshot,
    contents: BTreeMap<Vec<u8>, ManifestContent>,
}

/// One variant's tasks; the manifest's digest.
fn run_one(
    dir: &Path,
    top: &Rules,
    variant: &VariantRules,
    builtins: Builtins,
    reporter: &mut Reporter,
    base_tree: &mut Option<BaseTree>,
    exporting: &mut Option<std::thread::JoinHandle<()>>,
) -> Result<String, TaskFailure> {
    let state = Path::new(STATE_DIR).join("variants").join(&variant.name);
    let disk = find_disk(&variant.serial).map_err(helper_failure)?;
    std::fs::create_dir_all(&state).map_err(|e| helper_failure(format!("cannot create {}: {e}", state.display())))?;
    let mut rules = variant.rules.clone();
    // The payload disk is mounted once for all; each variant's files are under its name.
    rules.excluded_tasks.extend(top.excluded_tasks.iter().cloned());
    rules.excluded_tasks.push("MountPayload".into());
    rules.verbose |= top.verbose;
    rules.dry_run = false;
    let rules_path = state.join("rules.json");
    std::fs::write(&rules_path, rules.to_json())
        .map_err(|e| helper_failure(format!("cannot store the rules in {}: {e}", rules_path.display())))?;
    let place = Place {
        disk,
        rules: rules_path.display().to_string(),
        state: state.display().to_string(),
        payload: Path::new(PAYLOAD_DIR).join(&variant.name).display().to_string(),
    };
    let source_date_epoch = rules.source_date_epoch;
    // The base's files are read beside other boots only by the first walk of the boot.
    let digest_share = top.digest_share.filter(|_| base_tree.is_none());
    let mut manifest: Option<String> = None;
    let mounts_file = state.join("mounts");
    let scratch = state.join("manifest-root");
    let target = Path::new(TARGET_DIR);
    // Every walk sees the guest's own filesystems bound on `scratch`, without the pseudo
    // filesystems mounted for chroots: what any reader of the image would see.
    let mut watch: Option<ChangeWatch> = None;
    let mut hook = |when: When, task: &TaskName, reporter: &mut Reporter| -> Result<(), String> {
        match (when, task.short()) {
            (When::After, "MountRoot") => {
                // Before any guest program: where each filesystem is, for the digests' keys.
                crate::manifest::register_mounts(target, &mounts_file)?;
                let mounts = crate::manifest::mounts_fingerprint(target, &mounts_file)?;
                if base_tree.as_ref().is_none_or(|b| b.mounts != mounts) {
                    let (snapshot, contents) =
                        crate::manifest::with_guest_tree(target, &mounts_file, &scratch, |root| {
                            let walked = match digest_share {
                                Some(share) => snapshot::record_with_contents_shared(
                                    root,
                                    share,
                                    &mut crate::digest_exchange::Exchange::new(reporter),
                                ),
                                None => snapshot::record_with_contents(root),
                            };
                            walked.map_err(|e| format!("cannot read the guest's tree: {e}"))
                        })?;
                    // The boot's first walk only (no guest program ran before it): a later one
                    // comes after guest programs ran, and the host takes the first DIGESTS-KEPT
                    // line only.
                    if base_tree.is_none() {
                        *exporting = export_digest_cache(&snapshot, reporter);
                    }
                    *base_tree = Some(BaseTree { mounts, snapshot, contents });
                }
                watch = ChangeWatch::start(target, &mounts_file)
                    .map_err(|e| println!("manifest: the whole tree will be walked after the operations: {e}"))
                    .ok();
            }
            (When::Before, "Unmount") => {
                let started = Instant::now();
                let base = base_tree.as_ref().ok_or("the guest tree was not recorded")?;
                let before = &base.snapshot;
                let touched = watch.take().map(|w| w.finish(target));
                let (after, contents, tracked) =
                    crate::manifest::with_guest_tree(target, &mounts_file, &scratch, |root| {
                        let ((after, contents), tracked) = after_operations(root, base, touched)?;
                        if let Some(epoch) = source_date_epoch {
                            set_times(root, before, &after, epoch)?;
                        }
                        Ok((after, contents, tracked))
                    })?;
                let walked = started.elapsed();
                let phase = if tracked { "manifest-tracked" } else { "manifest-walked" };
                reporter.send(&ReportLine::Phase { name: phase.into(), uptime_ms: crate::reporter::uptime_ms() });
                let changes = changes::diff_with_contents(&before.entries, &base.contents, &after.entries, &contents);
                changes::send(&changes, &mut |line| reporter.send(&line));
                manifest = Some(crate::manifest::digest_of(&after, &contents)?);
                println!(
                    "manifest: {} paths, {} {} ms, changes and digest {} ms",
                    after.entries.len(),
                    if tracked { "changed directories listed" } else { "whole tree walked" },
                    walked.as_millis(),
                    (started.elapsed() - walked).as_millis()
                );
            }
            _ => {}
        }
        Ok(())
    };
    let result = tasks::run_all_at(dir, &rules, &place, builtins, reporter, &mut hook);
    // A watch left by a failed variant holds descriptors on its filesystems: it must go
    // before the unmount below.
    drop(watch);
    if let Err(failure) = result {
        // The next variant mounts on the same place: whatever this one left mounted goes.
        if let Ok(task) = TaskName::parse("90-Unmount") {
            if let Err(e) = crate::mounts::unmount_all(&TaskEnv::at(&task, &rules, &place)) {
                println!("WARNING: after variant {} failed: {e}", variant.name);
            }
        }
        return Err(failure);
    }
    manifest.ok_or_else(|| TaskFailure {
        task: "helper".into(),
        message: "no tree manifest was computed: the tasks MountRoot and Unmount must not be excluded".into(),
    })
}

/// The tree at `root` after a variant's operations, with contents, and whether it came from
/// the changes the kernel reported (`touched`) rather than a walk of the whole tree: a walk
/// when no watch ran or its report cannot be trusted (said in the log).
fn after_operations(
    root: &Path,
    base: &BaseTree,
    touched: Option<Result<Touched, String>>,
) -> Result<(snapshot::WithContents, bool), String> {
    let refreshed = match touched {
        Some(Ok(touched)) => {
            let dirs = touched.dirs_to_list(&base.snapshot);
            snapshot::refresh_with_contents(root, &base.snapshot, &base.contents, &dirs, &touched.whole)
                .map_err(|e| e.to_string())
        }
        Some(Err(e)) => Err(e),
        None => Err("no watch ran".into()),
    };
    match refreshed {
        Ok(tree) => Ok((tree, true)),
        Err(e) => {
            println!("manifest: walking the whole tree: {e}");
            let tree = snapshot::record_with_contents(root)
                .map_err(|e| format!("cannot read the guest's tree for its manifest: {e}"))?;
            Ok((tree, false))
        }
    }
}

/// Gives every path added or changed between `before` and `after` (walks of the tree at
/// `root`) the time `epoch`, without following a symlink. The walk found each path's parents to
/// be directories of the guest's own filesystems, and no guest program runs any more.
fn set_times(root: &Path, before: &Snapshot, after: &Snapshot, epoch: i64) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let time = libc::timespec { tv_sec: epoch, tv_nsec: 0 };
    let times = [time, time];
    for (path, meta) in &after.entries {
        if before.entries.get(path) == Some(meta) {
            continue;
        }
        let mut full = root.as_os_str().as_bytes().to_vec();
        full.extend_from_slice(path);
        let c = std::ffi::CString::new(full).map_err(|_| "a guest path holds a NUL byte".to_owned())?;
        // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("cannot set the time of {}: {e}", String::from_utf8_lossy(path)));
        }
    }
    Ok(())
}

/// Whether a partition of `disk` (or the disk itself) is an LVM physical volume.
fn holds_lvm(disk: &str) -> bool {
    let name = Path::new(disk).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut devices = vec![disk.to_owned()];
    if let Ok(entries) = std::fs::read_dir(format!("/sys/block/{name}")) {
        devices.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&name) && *n != name)
                .map(|n| format!("/dev/{n}")),
        );
    }
    devices.iter().any(|d| crate::mounts::superblock(d).is_some_and(|f| f.kind == "LVM2_member"))
}

/// The device of the virtio disk with serial number `serial`, waiting for it to appear.
fn find_disk(serial: &str) -> Result<String, String> {
    let started = Instant::now();
    loop {
        if let Some(dev) = disk_with_serial(Path::new("/sys/block"), serial) {
            return Ok(dev);
        }
        if started.elapsed() > DISK_WAIT {
            return Err(format!(
                "no disk with serial {serial} appeared within {} s: qemu did not attach it",
                DISK_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `/dev/vdX` whose `serial` in `sys_block` is `serial`.
pub(crate) fn disk_with_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vd")))
        .collect();
    names.sort();
    names.into_iter().find_map(|p| {
        let found = std::fs::read_to_string(p.join("serial")).ok()?;
        let name = p.file_name()?.to_string_lossy().into_owned();
        (found.trim() == serial).then(|| format!("/dev/{name}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_found_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "imgforge-target\n"), ("vdb", "imgforge-payload"), ("vdc", "imgforge-v1")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        std::fs::create_dir(dir.path().join("fd0")).unwrap();
        assert_eq!(disk_with_serial(dir.path(), "imgforge-target").as_deref(), Some("/dev/vda"));
        assert_eq!(disk_with_serial(dir.path(), "imgforge-v1").as_deref(), Some("/dev/vdc"));
        assert_eq!(disk_with_serial(dir.path(), "imgforge-v2"), None);
    }
}
