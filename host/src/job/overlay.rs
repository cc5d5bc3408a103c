//! Transactional customization: the helper writes into a qcow2 overlay over the disk, and the
//! overlay is committed into the disk only after the helper reported success. Any failure
//! (task error, timeout, crash, interrupt) just drops the overlay: the disk was only ever read.

use crate::stream::destination::is_block_device;
use crate::vm::blockdev_qemu::{BlockdevQemu, QMP_TIMEOUT};
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
        let path = dir.join("overlay.qcow2");
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
    pub fn commit(&self) -> Result<Duration, OverlayError> {
        let started = Instant::now();
        let err = |reason: String| OverlayError::Commit { disk: self.disk.clone(), reason };
        let open_rw = |p: &Path| {
            std::fs::OpenOptions::new().read(true).write(true).open(p).map_err(|e| err(format!("{}: {e}", p.display())))
        };
        let (disk, overlay) = (open_rw(&self.disk)?, open_rw(&self.path)?);
        let blockdevs = [
            json!({"driver": protocol_driver(is_block_device(&self.disk)), "node-name": "disk-file", "filename": "/dev/fdset/1"}),
            json!({"driver": self.format.as_str(), "node-name": "disk", "file": "disk-file"}),
            json!({"driver": "file", "node-name": "overlay-file", "filename": "/dev/fdset/2"}),
            json!({"driver": "qcow2", "node-name": "overlay", "file": "overlay-file", "backing": "disk"}),
        ];
        let fdsets = [(1, disk.as_raw_fd(), "disk"), (2, overlay.as_raw_fd(), "overlay")];
        let started_qemu = BlockdevQemu::start(&fdsets, &blockdevs);
        drop((disk, overlay));
        let mut qemu = started_qemu.map_err(err)?;
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

/// Runs the commit job to its end. The overlay is the active layer: its commit is a mirror that
/// reports ready, is told to complete, then completes (or reports the error).
fn run_commit_job(qmp: &mut Qmp) -> Result<(), String> {
    let qmp_failed = |e: QmpError| e.to_string();
    qmp.execute("block-commit", Some(json!({"job-id": COMMIT_JOB, "device": "overlay"}))).map_err(qmp_failed)?;
    loop {
        let event = qmp.wait_for_event(&COMMIT_JOB_EVENTS, QMP_TIMEOUT).map_err(qmp_failed)?;
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
