//! Per-qemu users, in the manner of systemd's `DynamicUser=`: a uid and gid (the same number)
//! that no user database entry names and no process runs as, reserved by an `flock`ed file for
//! as long as imgforge needs it and released by the kernel when imgforge dies.
//!
//! Why: a process is dumpable after it execs as a user that is not the one it started as, so
//! every other process of that user (a daemon running as `nobody`, the qemu of a concurrent job
//! that a hostile image took over) may open its `/proc/PID/mem` and descriptors. A uid shared
//! with nobody else leaves no such process.

use std::collections::HashSet;
use std::fs::File;
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The uids (and gids) handed out: the first 65536 of the range systemd's UIDS-GIDS document
/// leaves unused after the container ranges (524288…1879048191). Apart from systemd's own
/// `DynamicUser=` range (61184…65519), whose allocations systemd does not announce to other
/// programs, from shadow's default subordinate ranges (100000…600100000) and from systemd's
/// foreign range (from 2147352576); below 2^31, where some programs take ids for signed.
pub const DYNAMIC_UIDS: RangeInclusive<u32> = 0x7000_0000..=0x7000_FFFF;

/// Where the reservations live: root's alone (0700), on a tmpfs that a reboot empties.
pub const LOCK_DIR: &str = "/run/imgforge/uid";

/// Why no uid could be reserved.
#[derive(Debug, Error)]
pub enum DynamicUserError {
    /// The lock directory cannot be made or opened.
    #[error("cannot prepare {}, where per-job uids are reserved: {source} (or pass --helper-user NAME)", dir.display())]
    LockDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The lock directory is not this user's alone.
    #[error("{} must be a directory owned by root that no one else may write (0700): fix or remove it", dir.display())]
    UnsafeLockDir {
        /// The directory (or its parent) at fault.
        dir: PathBuf,
    },
    /// A lock file cannot be opened or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Every uid of the range is taken.
    #[error("every uid in {first}..={last} is named in the user database, used by a process or reserved by another imgforge: wait for other jobs to end, or pass --helper-user NAME")]
    Exhausted {
        /// First uid of the range.
        first: u32,
        /// Last uid of the range.
        last: u32,
    },
}

/// A reserved uid (and the gid of the same number); the reservation ends when this is dropped
/// or the process dies.
#[derive(Debug)]
pub struct Lease {
    uid: u32,
    // The flock lives as long as this descriptor (close-on-exec: qemu never holds it).
    _lock: File,
}

impl Lease {
    /// The reserved uid, which is also the gid.
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

/// Hands out uids of `uids`, reserving each with a lock file in `lock_dir`.
#[derive(Debug, Clone)]
pub struct Allocator {
    /// Directory of the `<uid>.lock` files.
    pub lock_dir: PathBuf,
    /// Candidate uids, tried in order.
    pub uids: RangeInclusive<u32>,
}

impl Allocator {
    /// The host-wide allocator every imgforge shares: [`DYNAMIC_UIDS`] locked in [`LOCK_DIR`].
    pub fn host() -> Self {
        Self { lock_dir: PathBuf::from(LOCK_DIR), uids: DYNAMIC_UIDS }
    }

    /// Reserves the first uid of the range that is not locked by another holder, has no
    /// passwd or group entry, and is no process's uid, gid or supplementary group.
    pub fn allocate(&self) -> Result<Lease, DynamicUserError> {
        prepare_lock_dir(&self.lock_dir)?;
        for uid in self.uids.clone() {
            if known_to_user_database(uid) {
                continue;
            }
            let Some(lock) = try_lock(&self.lock_dir.join(format!("{uid}.lock")))? else { continue };
            // Looked at under the lock: a process seen now is not one of a job that holds it.
            if ids_of_running_processes().contains(&uid) {
                tracing::debug!(uid, "a process runs with this id: not handed out");
                continue;
            }
            return Ok(Lease { uid, _lock: lock });
        }
        Err(DynamicUserError::Exhausted { first: *self.uids.start(), last: *self.uids.end() })
    }
}

/// Makes `dir` (and its parent) if missing, 0700, and checks that both are directories of this
/// user that no one else may write: whoever could would swap lock files under a holder.
fn prepare_lock_dir(dir: &Path) -> Result<(), DynamicUserError> {
    let failed = |source| DynamicUserError::LockDir { dir: dir.to_owned(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let meta = std::fs::symlink_metadata(d).map_err(failed)?;
        if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
            return Err(DynamicUserError::UnsafeLockDir { dir: d.to_owned() });
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(failed)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(DynamicUserError::UnsafeLockDir { dir: dir.to_owned() });
    }
    Ok(())
}

/// The lock file at `path`, locked exclusively; None if another open file holds it.
fn try_lock(path: &Path) -> Result<Option<File>, DynamicUserError> {
    let failed = |source| DynamicUserError::Lock { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(failed)?;
    // SAFETY: a valid descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(failed(e))
    }
}

/// Whether the user or group database has an entry with this id. A lookup that fails for any
/// other reason counts as an entry: an id is handed out only when surely unnamed.
pub fn known_to_user_database(id: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd and group are plain old data; all-zero values that the calls overwrite.
    let (mut pwd, mut grp): (libc::passwd, libc::group) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut pwd_found: *mut libc::passwd = std::ptr::null_mut();
    let mut grp_found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for each call; the buffer outlives the use of the results.
    let user = unsafe { libc::getpwuid_r(id, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut pwd_found) };
    if user != 0 || !pwd_found.is_null() {
        return true;
    }
    // SAFETY: as above.
    let group = unsafe { libc::getgrgid_r(id, &mut grp, buf.as_mut_ptr(), buf.len(), &mut grp_found) };
    group != 0 || !grp_found.is_null()
}

/// Every uid, gid and supplementary group of the processes running now.
pub fn ids_of_running_processes() -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return HashSet::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .flat_map(|status| ids_in_status(&status))
        .collect()
}

/// The ids in a `/proc/PID/status`: real, effective, saved and filesystem uids and gids, and
/// the supplementary groups (pure).
pub fn ids_in_status(status: &str) -> Vec<u32> {
    status
        .lines()
        .filter_map(|l| l.strip_prefix("Uid:").or_else(|| l.strip_prefix("Gid:")).or_else(|| l.strip_prefix("Groups:")))
        .flat_map(|values| values.split_whitespace().filter_map(|v| v.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    fn allocator(uids: RangeInclusive<u32>) -> (tempfile::TempDir, Allocator) {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator { lock_dir: dir.path().join("uid"), uids };
        (dir, alloc)
    }

    /// The start of a test range no real user or process has (just below the host range), one
    /// per `test` so that tests running at once do not see each other's processes.
    fn unused_base(test: u32) -> u32 {
        DYNAMIC_UIDS.start() - 0x1_0000 + (std::process::id() % 0x1000) * 16 + test * 4
    }

    /// Runs `argv` and waits until it prints its first line; killed when the guard drops.
    struct Holder(std::process::Child);
    impl Holder {
        fn start(argv: &[&str]) -> Holder {
            let mut child = Command::new(argv[0]).args(&argv[1..]).stdout(Stdio::piped()).spawn().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "{argv:?} did not start");
            Holder(child)
        }
    }
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn concurrent_jobs_get_different_uids() {
        let base = unused_base(1);
        let (_tmp, alloc) = allocator(base..=base + 2);
        let first = alloc.allocate().unwrap();
        let second = alloc.allocate().unwrap();
        assert_eq!((first.uid(), second.uid()), (base, base + 1));
        drop(first);
        // Another test's spawn may fork while `first`'s lock is open: its child holds the flock
        // until it execs (close-on-exec), so the uid can stay reserved for a moment.
        let mut again = alloc.allocate().unwrap().uid();
        for _ in 0..100 {
            if again == base {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            again = alloc.allocate().unwrap().uid();
        }
        assert_eq!(again, base, "a released uid is handed out again");
    }

    #[test]
    fn a_uid_locked_by_another_process_is_skipped() {
        let base = unused_base(2);
        let (_tmp, alloc) = allocator(base..=base + 1);
        prepare_lock_dir(&alloc.lock_dir).unwrap();
        let lock = alloc.lock_dir.join(format!("{base}.lock"));
        // One process holds the lock (flock(1) would leave it with its child too).
        let script = format!("exec 9>'{}' && flock --exclusive 9 && echo held && exec sleep 60", lock.display());
        let held = Holder::start(&["sh", "-c", &script]);
        assert_eq!(alloc.allocate().unwrap().uid(), base + 1);
        drop(held);
        assert_eq!(alloc.allocate().unwrap().uid(), base, "the lock died with its holder");
    }

    #[test]
    fn a_uid_some_process_runs_as_is_skipped() {
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run the tests as root, as CI does");
        let base = unused_base(3) + 1;
        let id = base.to_string();
        let (_tmp, alloc) = allocator(base..=base + 1);
        let _running = Holder::start(&[
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "sh",
            "-c",
            "echo up; exec sleep 60",
        ]);
        assert_eq!(alloc.allocate().unwrap().uid(), base + 1);
    }

    #[test]
    fn ids_named_in_the_user_or_group_database_are_skipped() {
        let getent = |db: &str| String::from_utf8(Command::new("getent").arg(db).output().unwrap().stdout).unwrap();
        let ids =
            |text: &str| -> HashSet<u32> { text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect() };
        let (users, groups) = (ids(&getent("passwd")), ids(&getent("group")));
        let running = ids_of_running_processes();
        let free = |id: u32| !users.contains(&id) && !groups.contains(&id) && !running.contains(&id);
        let user = *users.iter().find(|u| free(**u + 1)).unwrap();
        let (_tmp, alloc) = allocator(user..=user + 1);
        assert_eq!(alloc.allocate().unwrap().uid(), user + 1, "uid {user} has a passwd entry");
        let group_only = *groups.iter().find(|g| !users.contains(g)).expect("a group without a user of its id");
        let (_tmp, alloc) = allocator(group_only..=group_only);
        assert!(
            matches!(alloc.allocate(), Err(DynamicUserError::Exhausted { .. })),
            "gid {group_only} has a group entry"
        );
    }

    #[test]
    fn the_lock_directory_is_private() {
        let (_tmp, alloc) = allocator(unused_base(4)..=unused_base(4));
        let lease = alloc.allocate().unwrap();
        let meta = std::fs::metadata(&alloc.lock_dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        drop(lease);
        std::fs::set_permissions(&alloc.lock_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(alloc.allocate(), Err(DynamicUserError::UnsafeLockDir { .. })));
    }

    #[test]
    fn status_ids_are_read() {
        let status = "Name:\tqemu\nUid:\t1879048192\t1879048192\t1879048192\t1879048193\n\
                      Gid:\t5\t5\t5\t5\nGroups:\t108 109\nVmRSS:\t12 kB\n";
        let ids: HashSet<u32> = ids_in_status(status).into_iter().collect();
        assert_eq!(ids, HashSet::from([1_879_048_192, 1_879_048_193, 5, 108, 109]));
    }
}
