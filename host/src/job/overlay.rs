//! Transactional customization: the helper writes into a qcow2 overlay over the disk, and the
//! overlay is committed into the disk only after the helper reported success. Any failure
//! (task error, timeout, crash, interrupt) just drops the overlay: the disk was only ever read.

use crate::stream::destination::is_block_device;
use crate::vm::blockdev_qemu::{BlockdevQemu, Confinement, QMP_TIMEOUT};
use crate::vm::cmdline::{protocol_driver, DiskFormat};
use crate::vm::qmp::{Qmp, QmpError};
use serde_json::json;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The commit job's id.
const COMMIT_JOB: &str = "commit";
/// The events that move the commit job on or end it.
const COMMIT_JOB_EVENTS: [&str; 3] = ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"];

/// Why the overlay could not be created or committed.
#[derive(Debug, Error)]
pub enum OverlayError {
    /// `qemu-img create` failed.
    #[error("cannot create the overlay {path}: {reason}")]
    Create {
        /// The overlay.
        path: PathBuf,
        /// The error resolving the disk's path or running qemu-img.
        reason: String,
    },
    /// The disk is a qcow2 imgforge does not write into (checked again at the commit).
    #[error("cannot commit into disk {disk}: {source}")]
    Refused {
        /// The disk.
        disk: PathBuf,
        /// What the qcow2 check found.
        source: crate::source::qcow2::Qcow2Error,
    },
    /// The commit failed: the disk may be partly updated.
    #[error("committing the changes into {disk} failed: {reason}")]
    Commit {
        /// The disk.
        disk: PathBuf,
        /// The step that failed (opening a file, starting the confined qemu, the block job) and its error.
        reason: String,
    },
}

/// A qcow2 overlay over a disk.
pub struct Overlay {
    /// The overlay file.
    pub path: PathBuf,
    disk: PathBuf,
    format: DiskFormat,
}

impl Overlay {
    /// Creates `dir/overlay.qcow2` over `disk` (absolute path recorded, never opened here:
    /// `-u`, the size is given).
    pub fn create(disk: &Path, format: DiskFormat, virtual_size: u64, dir: &Path) -> Result<Self, OverlayError> {
        Self::create_named(disk, format, virtual_size, &dir.join("overlay.qcow2"))
    }

    /// Creates the overlay `path` over `disk`, as [`Overlay::create`] does: one for each disk of
    /// a guest on several disks.
    pub fn create_named(disk: &Path, format: DiskFormat, virtual_size: u64, path: &Path) -> Result<Self, OverlayError> {
        let path = path.to_owned();
        let disk = std::fs::canonicalize(disk)
            .map_err(|e| OverlayError::Create { path: path.clone(), reason: e.to_string() })?;
        duct::cmd!(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            format.as_str(),
            "-b",
            &disk,
            &path,
            virtual_size.to_string()
        )
        .stderr_capture()
        .stdout_null()
        .run()
        .map_err(|e| OverlayError::Create { path: path.clone(), reason: e.to_string() })?;
        Ok(Self { path, disk, format })
    }

    /// Writes the overlay's changes into the disk; returns how long it took. The commit runs in
    /// a confined qemu ([`BlockdevQemu`]): the overlay was written by the helper VM's qemu and the
    /// disk may be the user's qcow2, so neither is parsed by a qemu running as root.
    pub fn commit(&self, confinement: &Confinement) -> Result<Duration, OverlayError> {
        let started = Instant::now();
        let err = |reason: String| OverlayError::Commit { disk: self.disk.clone(), reason };
        let open_rw = |p: &Path| {
            std::fs::OpenOptions::new().read(true).write(true).open(p).map_err(|e| err(format!("{}: {e}", p.display())))
        };
        let (disk, overlay) = (open_rw(&self.disk)?, open_rw(&self.path)?);
        let mut disk_node = json!({"driver": self.format.as_str(), "node-name": "disk", "file": "disk-file"});
        if self.format == DiskFormat::Qcow2 {
            // The file opened here is the one qemu writes: it is checked, not the one opened before.
            let len = disk.metadata().map_err(|e| err(format!("{}: {e}", self.disk.display())))?.len();
            crate::source::qcow2::check(&disk, len, crate::source::qcow2::Backing::Refused)
                .map_err(|source| OverlayError::Refused { disk: self.disk.clone(), source })?;
            disk_node["backing"] = serde_json::Value::Null;
        }
        let blockdevs = [
            json!({"driver": protocol_driver(is_block_device(&self.disk)), "node-name": "disk-file", "filename": "/dev/fdset/1"}),
            disk_node,
            json!({"driver": "file", "node-name": "overlay-file", "filename": "/dev/fdset/2"}),
            json!({"driver": "qcow2", "node-name": "overlay", "file": "overlay-file", "backing": "disk"}),
        ];
        let fdsets = [(1, disk.as_raw_fd(), "disk"), (2, overlay.as_raw_fd(), "overlay")];
        let started_qemu = BlockdevQemu::start(confinement, &fdsets, &blockdevs);
        drop((disk, overlay));
        let mut qemu = started_qemu.map_err(|e| err(e.to_string()))?;
        match run_commit_job(&mut qemu.qmp) {
            Ok(()) => qemu.quit().map_err(err)?,
            Err(e) => return Err(err(qemu.failure(e))),
        }
        Ok(started.elapsed())
    }

    /// Bytes the overlay occupies (what the commit copies, plus metadata).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

/// How often a commit that sends no event is looked at: qemu is silent while it copies.
const COMMIT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the commit job to its end. The overlay is the active layer: its commit is a mirror that
/// reports ready, is told to complete, then completes (or reports the error). A large overlay
/// copies for minutes without an event: the job is looked at every [`COMMIT_CHECK_INTERVAL`],
/// and given up only when it made no progress for [`QMP_TIMEOUT`].
fn run_commit_job(qmp: &mut Qmp) -> Result<(), String> {
    run_commit_job_checking(qmp, COMMIT_CHECK_INTERVAL, QMP_TIMEOUT)
}

fn run_commit_job_checking(qmp: &mut Qmp, check_every: Duration, stall_limit: Duration) -> Result<(), String> {
    let qmp_failed = |e: QmpError| e.to_string();
    qmp.execute("block-commit", Some(json!({"job-id": COMMIT_JOB, "device": "overlay"}))).map_err(qmp_failed)?;
    let mut progress = CommitProgress { offset: None, since: Instant::now(), missing: false };
    loop {
        let event = match qmp.wait_for_event(&COMMIT_JOB_EVENTS, check_every) {
            Ok(event) => event,
            Err(QmpError::Timeout { .. }) => {
                progress.check(qmp, stall_limit)?;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        match event.name.as_str() {
            "BLOCK_JOB_READY" => {
                qmp.execute("job-complete", Some(json!({"id": COMMIT_JOB}))).map_err(qmp_failed)?;
            }
            "BLOCK_JOB_COMPLETED" => {
                return match event.data["error"].as_str() {
                    Some(e) => Err(e.to_owned()),
                    None => Ok(()),
                };
            }
            _ => return Err("the commit job was cancelled".into()),
        }
    }
}

/// What a silent commit job was last seen doing.
struct CommitProgress {
    /// Bytes copied at the last look (`query-block-jobs`' offset).
    offset: Option<u64>,
    /// When that offset was first seen.
    since: Instant,
    /// The job was not listed at the last look (its last event may still be on its way).
    missing: bool,
}

impl CommitProgress {
    /// Looks at the job: fine while it copies, an error once it is gone or stalled.
    fn check(&mut self, qmp: &mut Qmp, stall_limit: Duration) -> Result<(), String> {
        let jobs = qmp.execute("query-block-jobs", None).map_err(|e| e.to_string())?;
        let job = jobs.as_array().and_then(|jobs| jobs.iter().find(|j| j["device"] == COMMIT_JOB));
        // Progress is an offset that rose and stays within the job's length: anything else
        // (a qemu confused by the image) counts as none, so the stall limit still ends it.
        let len = job.and_then(|j| j["len"].as_u64()).unwrap_or(u64::MAX);
        let Some(offset) = job.and_then(|j| j["offset"].as_u64()).filter(|o| *o <= len) else {
            if std::mem::replace(&mut self.missing, true) {
                return Err("the commit job ended without saying how".into());
            }
            return Ok(());
        };
        self.missing = false;
        if self.offset.is_none_or(|last| offset > last) {
            (self.offset, self.since) = (Some(offset), Instant::now());
        } else if self.since.elapsed() > stall_limit {
            return Err(format!("the commit made no progress for {} s (at byte {offset})", stall_limit.as_secs()));
        }
        tracing::debug!(offset, "committing the overlay");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qmp::tests::{connected, step, EMPTY_RETURN};

    const TICK: Duration = Duration::from_millis(30);

    fn run(program: &str, args: &[&str]) {
        let out = std::process::Command::new(program).args(args).output().expect("qemu-utils is installed");
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The commit checks the disk it writes into: a qcow2 whose data file is a host file the
    /// helper user may write is refused, and that file keeps its bytes (qemu wrote the
    /// overlay's data into it before).
    #[test]
    fn a_commit_into_a_qcow2_with_a_data_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let host = dir.path().join("host-file");
        let disk = dir.path().join("evil.qcow2");
        let data_file = format!("data_file={}", host.display());
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &data_file, disk.to_str().unwrap(), "1M"]);
        // Written after qemu-img, which creates the data file empty.
        std::fs::write(&host, vec![b's'; 1 << 20]).unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o666)).unwrap();
        let work = tempfile::tempdir().unwrap();
        let overlay = Overlay::create(&disk, DiskFormat::Qcow2, 1 << 20, work.path()).unwrap();
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x41 0 64k", overlay.path.to_str().unwrap()]);
        let err = overlay.commit(&Confinement::default()).unwrap_err();
        assert!(matches!(err, OverlayError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("evil.qcow2"), "{err}");
        assert!(std::fs::read(&host).unwrap() == vec![b's'; 1 << 20], "the host file changed");
    }

    fn at(offset: u64) -> &'static str {
        Box::leak(
            format!(r#"{{"return": [{{"device": "commit", "offset": {offset}, "len": 1000}}]}}"#).into_boxed_str(),
        )
    }

    #[test]
    fn a_long_silent_commit_is_waited_for_while_it_progresses() {
        let (mut qmp, server) = connected(vec![
            step("block-commit", &[EMPTY_RETURN]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(600)]),
            step("query-block-jobs", &[at(1000), r#"{"event": "BLOCK_JOB_READY", "data": {"device": "commit"}}"#]),
            step("job-complete", &[EMPTY_RETURN, r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "commit"}}"#]),
        ]);
        run_commit_job_checking(&mut qmp, TICK, TICK * 2).unwrap();
        assert_eq!(server.join().unwrap().len(), 6);
    }

    #[test]
    fn a_stalled_or_vanished_commit_is_an_error() {
        let (mut qmp, server) = connected(vec![
            step("block-commit", &[EMPTY_RETURN]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(100)]),
        ]);
        let err = run_commit_job_checking(&mut qmp, TICK, TICK * 2).unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        // The fake may still wait for a look the client did not need: hang up first.
        drop(qmp);
        let _ = server.join();

        // An offset that goes back and forth is no progress either.
        let (mut qmp, server) = connected(vec![
            step("block-commit", &[EMPTY_RETURN]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(200)]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(200)]),
            step("query-block-jobs", &[at(100)]),
            step("query-block-jobs", &[at(200)]),
            step("query-block-jobs", &[at(100)]),
        ]);
        let err = run_commit_job_checking(&mut qmp, TICK, TICK * 3).unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        drop(qmp);
        let _ = server.join();

        let (mut qmp, server) = connected(vec![
            step("block-commit", &[EMPTY_RETURN]),
            step("query-block-jobs", &[r#"{"return": []}"#]),
            step("query-block-jobs", &[r#"{"return": []}"#]),
        ]);
        let err = run_commit_job_checking(&mut qmp, TICK, TICK * 10).unwrap_err();
        assert!(err.contains("ended without"), "{err}");
        server.join().unwrap();
    }
}
