//! Transactional customization: the helper writes into a qcow2 overlay over the disk, and the
//! overlay is committed into the disk only after the helper reported success. Any failure
//! (task error, timeout, crash, interrupt) just drops the overlay: the disk was only ever read.

use crate::vm::cmdline::DiskFormat;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why the overlay could not be created or committed.
#[derive(Debug, Error)]
pub enum OverlayError {
    /// `qemu-img create` failed.
    #[error("cannot create the overlay {path}: {reason}")]
    Create {
        /// The overlay.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `qemu-img commit` failed: the disk may be partly updated.
    #[error("committing the changes into {disk} failed: {reason}")]
    Commit {
        /// The disk.
        disk: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A qcow2 overlay over a disk.
pub struct Overlay {
    /// The overlay file.
    pub path: PathBuf,
    disk: PathBuf,
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
        Ok(Self { path, disk })
    }

    /// Writes the overlay's changes into the disk; returns how long it took.
    pub fn commit(&self) -> Result<Duration, OverlayError> {
        let started = Instant::now();
        let out = duct::cmd!("qemu-img", "commit", "-q", "-f", "qcow2", "-d", &self.path)
            .stderr_capture()
            .stdout_null()
            .unchecked()
            .run()
            .map_err(|e| OverlayError::Commit { disk: self.disk.clone(), reason: e.to_string() })?;
        if !out.status.success() {
            return Err(OverlayError::Commit {
                disk: self.disk.clone(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(started.elapsed())
    }

    /// Bytes the overlay occupies (what the commit copies, plus metadata).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map(|m| m.blocks() * 512).unwrap_or(0)
    }
}
