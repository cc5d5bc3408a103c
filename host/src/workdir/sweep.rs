//! Removing the work entries of dead processes from one directory. Everything goes through
//! descriptors (`openat`, `fstatat` without following links, `unlinkat`), so a symbolic link
//! planted in or beside a work directory is removed as a link and never followed.

use super::stale::{is_stale, renames_guarded, EntryKind, Found, Liveness};
use super::{ProcStat, WorkName};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Deepest directory a removal descends into: imgforge's work dirs are one or two levels deep.
const MAX_DEPTH: usize = 32;

/// What one sweep did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Names of the entries removed.
    pub removed: Vec<String>,
    /// Stale entries that could not be removed (name and why).
    pub failed: Vec<(String, io::Error)>,
}

/// What a sweep may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Regular files only: beside a target (imgforge makes only files there: downloads,
    /// temporary outputs), in a directory a user may own and rename anything into.
    Files,
    /// Work directories too, where no one else can rename entries (the temporary directory,
    /// see [`renames_guarded`]); elsewhere only files.
    WorkDirectories,
}

/// Removes from `dir` the work entries whose process is gone (see [`is_stale`]) that `reach`
/// allows; other entries, and those made on another machine or in another pid namespace, are
/// not touched. One `readdir` of `dir` and one `fstatat` per entry named like ours.
pub fn sweep(dir: &Path, reach: Reach) -> io::Result<Swept> {
    let top = std::fs::File::open(dir)?;
    let euid = effective_uid();
    let st = fstat(top.as_fd())?;
    let directories = reach == Reach::WorkDirectories && renames_guarded(st.st_uid, st.st_mode & 0o7777, euid);
    let host = super::this_process().host;
    let mut swept = Swept::default();
    for name in names(top.as_fd())? {
        let Some(work) = name.to_str().ok().and_then(WorkName::parse).filter(|w| w.host == host) else { continue };
        let Some(found) = found_at(top.as_fd(), &name, work)? else { continue };
        if found.kind == EntryKind::Directory && !directories {
            continue;
        }
        if !is_stale(&found, euid, liveness(work.pid)) {
            continue;
        }
        let shown = name.to_string_lossy().into_owned();
        match remove(top.as_fd(), &name, &found, euid) {
            Ok(()) => swept.removed.push(shown),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // another imgforge was first
            Err(e) => swept.failed.push((shown, e)),
        }
    }
    Ok(swept)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// What the process with `pid` is: kill(pid, 0), then its start time from /proc.
fn liveness(pid: u32) -> Liveness {
    let Ok(raw) = libc::pid_t::try_from(pid) else { return Liveness::Unknown };
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(raw, 0) } != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Liveness::Gone;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => match ProcStat::parse(&text) {
            Some(stat) if stat.is_gone() => Liveness::Gone,
            Some(stat) => Liveness::Running { start_time: stat.start_time },
            None => Liveness::Unknown,
        },
        // It ended between the two looks.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Liveness::Gone,
        Err(_) => Liveness::Unknown,
    }
}

/// `name` in `dir`, not following a link; None if it went away.
fn found_at(dir: BorrowedFd, name: &CStr, work: WorkName) -> io::Result<Option<Found>> {
    match stat_at(dir, name) {
        Ok(st) => Ok(Some(Found {
            name: work,
            kind: kind_of(&st),
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
            links: st.st_nlink,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn kind_of(st: &libc::stat) -> EntryKind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => EntryKind::Directory,
        libc::S_IFREG => EntryKind::File,
        _ => EntryKind::Other,
    }
}

/// Removes the stale entry `name` of `dir` that `found` describes.
fn remove(dir: BorrowedFd, name: &CStr, found: &Found, euid: u32) -> io::Result<()> {
    if found.kind != EntryKind::Directory {
        return unlink_at(dir, name, 0);
    }
    let opened = open_dir_at(dir, name)?;
    // Checked again on the open directory: the name may have been replaced since the stat.
    let st = fstat(opened.as_fd())?;
    let now = Found { kind: kind_of(&st), uid: st.st_uid, mode: st.st_mode & 0o7777, ..*found };
    if !is_stale(&now, euid, Liveness::Gone) {
        return Err(io::Error::other("changed while being removed"));
    }
    remove_contents(opened.as_fd(), 0)?;
    unlink_at(dir, name, libc::AT_REMOVEDIR)
}

/// Empties the directory open as `dir`: files and links unlinked, directories emptied, then
/// removed.
fn remove_contents(dir: BorrowedFd, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!("more than {MAX_DEPTH} levels of directories")));
    }
    for name in names(dir)? {
        let st = match stat_at(dir, &name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if kind_of(&st) == EntryKind::Directory {
            let sub = open_dir_at(dir, &name)?;
            remove_contents(sub.as_fd(), depth + 1)?;
            unlink_at(dir, &name, libc::AT_REMOVEDIR)?;
        } else {
            unlink_at(dir, &name, 0)?;
        }
    }
    Ok(())
}

/// The names in the directory open as `dir`, without `.` and `..`.
fn names(dir: BorrowedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes the descriptor it is given: hand it a duplicate.
    // SAFETY: duplicating a valid descriptor.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor this function owns.
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: closing the duplicate fdopendir did not take.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // The listing starts at the beginning even if the descriptor was read before.
    // SAFETY: `stream` is a valid directory stream.
    unsafe { libc::rewinddir(stream) };
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir returns null with errno unchanged at the end.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is valid until closedir below.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: d_name is a NUL-terminated name inside the entry readdir returned.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    };
    // SAFETY: closes the stream (and `dup`) once.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

fn stat_at(dir: BorrowedFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, NUL-terminated name, `st` large enough.
    if unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat filled it.
    Ok(unsafe { st.assume_init() })
}

fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, `st` large enough.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat filled it.
    Ok(unsafe { st.assume_init() })
}

/// Opens the directory `name` of `dir`; a symbolic link there fails (O_NOFOLLOW).
fn open_dir_at(dir: BorrowedFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unlink_at(dir: BorrowedFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A pid that is not running: a child that has exited and was waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn private_dir(path: &Path) {
        std::fs::create_dir(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn removes_dead_processes_trees_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let precious = outside.path().join("precious");
        std::fs::write(&precious, "keep").unwrap();
        let dead = WorkName { pid: dead_pid(), start_time: 1, host: super::super::this_process().host };
        let stale = tmp.path().join(format!("{}abc", dead.prefix("job")));
        private_dir(&stale);
        std::fs::create_dir_all(stale.join("a/b")).unwrap();
        std::fs::write(stale.join("a/b/file"), "x").unwrap();
        symlink(&precious, stale.join("link")).unwrap();
        symlink(outside.path(), stale.join("a/dirlink")).unwrap();
        let stale_file = tmp.path().join(format!(".{}xyz", dead.prefix("download")));
        std::fs::write(&stale_file, "partial").unwrap();
        // Ours by name, but a symlink: left alone, and its target too.
        let link = tmp.path().join(format!("{}link", dead.prefix("job")));
        symlink(outside.path(), &link).unwrap();
        let live = tmp.path().join(format!("{}live", super::super::this_process().prefix("job")));
        private_dir(&live);
        // This test's own pid with another start time: a process that reused a dead one's pid.
        let this = super::super::this_process();
        let reused = WorkName { start_time: this.start_time + 1, ..this };
        let reused = tmp.path().join(format!("{}old", reused.prefix("qmp")));
        private_dir(&reused);
        // A dead pid, but of another machine or pid namespace: not ours to judge.
        let elsewhere = WorkName { host: dead.host ^ 1, ..dead };
        let elsewhere = tmp.path().join(format!("{}else", elsewhere.prefix("job")));
        private_dir(&elsewhere);
        let open_to_all = tmp.path().join(format!("{}open", dead.prefix("job")));
        std::fs::create_dir(&open_to_all).unwrap();
        std::fs::set_permissions(&open_to_all, std::fs::Permissions::from_mode(0o755)).unwrap();
        let foreign = tmp.path().join("not-ours");
        std::fs::write(&foreign, "x").unwrap();

        let swept = sweep(tmp.path(), Reach::WorkDirectories).unwrap();
        assert!(swept.failed.is_empty(), "{:?}", swept.failed);
        assert_eq!(swept.removed.len(), 3, "{:?}", swept.removed);
        assert!(!stale.exists() && !stale_file.exists() && !reused.exists());
        assert!(link.symlink_metadata().is_ok() && live.is_dir() && foreign.is_file() && open_to_all.is_dir());
        assert!(elsewhere.is_dir(), "another host's entry was removed");
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep");
        assert!(outside.path().is_dir());
    }

    /// A user's directory beside a target, where the user renamed root's private directory
    /// to a dead process's work name: the sweep removes stale files there, never directories,
    /// whatever reach it was asked for; in a sticky root-owned directory (the temporary
    /// directory) a stale work directory still goes.
    #[test]
    fn directories_renamed_into_a_users_directory_are_left_alone() {
        use std::os::unix::fs::chown;
        let root = tempfile::tempdir().unwrap();
        let users = root.path().join("images");
        std::fs::create_dir(&users).unwrap();
        chown(&users, Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dead = WorkName { pid: dead_pid(), start_time: 1, host: super::super::this_process().host };
        let renamed = users.join(format!("{}abc", dead.prefix("job")));
        private_dir(&renamed);
        std::fs::write(renamed.join("secret"), "root's").unwrap();
        let stale_file = users.join(format!(".{}out.img", dead.prefix("output")));
        std::fs::write(&stale_file, "partial").unwrap();
        for reach in [Reach::Files, Reach::WorkDirectories] {
            let swept = sweep(&users, reach).unwrap();
            assert!(swept.failed.is_empty(), "{:?}", swept.failed);
            assert_eq!(std::fs::read_to_string(renamed.join("secret")).unwrap(), "root's", "{reach:?}");
        }
        assert!(!stale_file.exists(), "the stale file beside the target was kept");

        let sticky = root.path().join("tmp");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let stale_dir = sticky.join(format!("{}xyz", dead.prefix("job")));
        private_dir(&stale_dir);
        std::fs::write(stale_dir.join("payload.img"), "x").unwrap();
        assert!(stale_dir.is_dir());
        sweep(&sticky, Reach::Files).unwrap();
        assert!(stale_dir.is_dir(), "a directory was removed by a files-only sweep");
        sweep(&sticky, Reach::WorkDirectories).unwrap();
        assert!(!stale_dir.exists(), "the stale work directory in the temporary directory was kept");
    }
}
