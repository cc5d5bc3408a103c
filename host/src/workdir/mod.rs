//! Temporary files and directories named for the process that made them
//! (`imgforge-<pid>-<start time>-<host>-<kind>-XXXXXX`, with a leading dot beside a target), so
//! that what a killed imgforge left behind (SIGKILL runs no destructor) is known for a leftover
//! and removed by the next imgforge: at the start of every command in the temporary directory,
//! and in a target's directory before a temporary file is made there (regular files only: see
//! [`Reach`]). Only entries tagged with this machine and pid namespace are looked at: a pid
//! means nothing elsewhere.

mod name;
mod stale;
mod sweep;

pub use name::{host_tag, ProcStat, WorkName};
pub use stale::{is_stale, EntryKind, Found, Liveness};
pub use sweep::{sweep, Reach, Swept};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process, as its work entries' names record it.
pub fn this_process() -> WorkName {
    static START_TIME: OnceLock<u64> = OnceLock::new();
    let start_time = *START_TIME.get_or_init(|| {
        std::fs::read_to_string("/proc/self/stat").ok().and_then(|t| ProcStat::parse(&t)).map_or(0, |s| s.start_time)
    });
    static HOST: OnceLock<u32> = OnceLock::new();
    let host = *HOST.get_or_init(|| {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let pid_namespace =
            std::fs::read_link("/proc/self/ns/pid").map(|l| l.display().to_string()).unwrap_or_default();
        host_tag(&read("/etc/machine-id"), &read("/proc/sys/kernel/hostname"), &pid_namespace)
    });
    WorkName { pid: std::process::id(), start_time, host }
}

/// The start of the name of a work entry of `kind` made by this process (`imgforge-…-kind-`).
pub fn prefix(kind: &str) -> String {
    this_process().prefix(kind)
}

/// The same, hidden (a leading dot): for files beside a target.
pub fn hidden_prefix(kind: &str) -> String {
    format!(".{}", prefix(kind))
}

/// A temporary directory of `kind` only its owner may enter (0700): the job's floppy, payload,
/// overlay (the guest's new /etc/shadow among its blocks) and qemu's sockets go there. qemu
/// gets descriptors, never these paths, so it needs no access.
pub fn private_tempdir(kind: &str) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new().prefix(&prefix(kind)).permissions(std::fs::Permissions::from_mode(0o700)).tempdir()
}

/// Removes the leftovers of dead imgforge processes from `dir` that `reach` allows, logging
/// what it did; a failure costs only disk space, so it never stops the command.
pub fn sweep_logged(dir: &Path, reach: Reach) {
    match sweep(dir, reach) {
        Ok(swept) => {
            for name in &swept.removed {
                tracing::info!("removed {} left by an imgforge that is gone", dir.join(name).display());
            }
            for (name, e) in &swept.failed {
                tracing::warn!("cannot remove {} left by an imgforge that is gone: {e}", dir.join(name).display());
            }
        }
        Err(e) => tracing::debug!("cannot look for leftovers in {}: {e}", dir.display()),
    }
}

/// The directory a temporary file beside `target` goes to.
pub fn beside(target: &Path) -> &Path {
    target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A hidden temporary name of `kind` beside `target`, ending with `shown` (the target's name,
/// for a person who finds it: at most [`SHOWN_NAME_BYTES`] of it, so the whole stays within
/// NAME_MAX). What dead imgforges left in that directory is removed first: a readdir of the
/// target's directory, which a sweep of the temporary directory does not reach.
pub fn temp_beside(target: &Path, kind: &str, shown: &std::ffi::OsStr) -> PathBuf {
    let dir = beside(target);
    sweep_logged(dir, Reach::Files);
    let shown = shown.to_string_lossy();
    let mut end = shown.len().min(SHOWN_NAME_BYTES);
    while !shown.is_char_boundary(end) {
        end -= 1;
    }
    dir.join(format!("{}{}", hidden_prefix(kind), &shown[..end]))
}

/// How much of a target's name a temporary name beside it repeats.
pub const SHOWN_NAME_BYTES: usize = 128;
