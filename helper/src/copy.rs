//! Recursive copies as `cp -a` and `tar` make them — type, mode, owner, times kept, symlinks
//! copied as symlinks — between directory descriptors: every name is looked up relative to an
//! open directory with `O_NOFOLLOW`, so no symlink on either side leads anywhere else.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// How deep a copied or walked tree may nest: a hostile guest's deep tree ends in an error
/// naming the limit, not in a stack overflow of PID 1.
pub const MAX_TREE_DEPTH: usize = 1024;

/// A libc call's 0-or-errno return, as a `Result`.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid dirfd, NUL-terminated name, writable stat.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fstat(fd)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, writable stat.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// The file type bits of a stat.
pub fn kind(st: &libc::stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`; what lies on one of the helper's
/// mounts inside the guest (`pseudo_filesystems`) is refused, and for data anything but a regular
/// file or directory. The callers look (`lstat_at`) before they open.
pub fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let fd = open_at_unchecked(dir, name, flags, mode)?;
    let shown = OsStr::from_bytes(name.to_bytes()).to_string_lossy();
    if flags & libc::O_PATH != 0 {
        crate::pseudo_filesystems::refuse_helper_mount(fd.as_fd(), &shown)?;
    } else {
        crate::pseudo_filesystems::refuse_for_data(fd.as_fd(), &shown)?;
    }
    Ok(fd)
}

/// [`open_at`] without its checks: for a handle that is only looked at.
pub fn open_at_unchecked(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid dirfd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `unlinkat(dir, name, flags)`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// The names in an open directory (without `.` and `..`).
pub fn names_in(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // Through /proc/self/fd: the directory is the one already opened, whatever its path.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let name = entry?.file_name();
        names.push(CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?);
    }
    names.sort();
    Ok(names)
}

/// Copies `src_dir/src_name` (not following a symlink there) to `dst_dir/dst_name`: a
/// directory merges into an existing directory, anything else replaces an existing
/// non-directory. Hard links inside a tree become separate files.
pub fn copy_entry(
    src_dir: BorrowedFd<'_>,
    src_name: &CStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CStr,
) -> io::Result<()> {
    copy_at_depth(src_dir, src_name, dst_dir, dst_name, 0)
}

fn copy_at_depth(
    src_dir: BorrowedFd<'_>,
    src_name: &CStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CStr,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_TREE_DEPTH {
        return Err(io::Error::other(format!("the tree nests more than {MAX_TREE_DEPTH} directories deep")));
    }
    let st = lstat_at(src_dir, src_name)?;
    // Opened (and checked) before anything at the destination changes.
    let source = match kind(&st) {
        libc::S_IFDIR => Some(open_at(src_dir, src_name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?),
        libc::S_IFREG => Some(open_at(src_dir, src_name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?),
        _ => None,
    };
    let existing = match lstat_at(dst_dir, dst_name) {
        Ok(e) => Some(e),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let shown = || OsStr::from_bytes(dst_name.to_bytes()).to_string_lossy().into_owned();
    match (kind(&st), existing.as_ref().map(kind)) {
        (libc::S_IFDIR, Some(libc::S_IFDIR)) => {}
        (libc::S_IFDIR, Some(_)) => {
            return Err(io::Error::other(format!("cannot overwrite non-directory {} with a directory", shown())));
        }
        (_, Some(libc::S_IFDIR)) => {
            return Err(io::Error::other(format!("cannot overwrite directory {} with a non-directory", shown())));
        }
        (_, Some(_)) => unlink_at(dst_dir, dst_name, 0)?,
        (_, None) => {}
    }
    match (kind(&st), source) {
        (libc::S_IFDIR, Some(src)) => {
            if existing.is_none() {
                // SAFETY: valid dirfd and NUL-terminated name.
                cvt(unsafe { libc::mkdirat(dst_dir.as_raw_fd(), dst_name.as_ptr(), 0o700) })?;
            }
            let dst = open_at(dst_dir, dst_name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            for name in names_in(src.as_fd())? {
                copy_at_depth(src.as_fd(), &name, dst.as_fd(), &name, depth + 1).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", OsStr::from_bytes(name.to_bytes()).to_string_lossy()))
                })?;
            }
            set_metadata(dst.as_fd(), &st)
        }
        (libc::S_IFREG, Some(src)) => {
            let dst = open_at(dst_dir, dst_name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)?;
            let (mut from, mut to) = (File::from(src), File::from(dst));
            io::copy(&mut from, &mut to)?;
            let dst = OwnedFd::from(to);
            set_metadata(dst.as_fd(), &st)
        }
        (libc::S_IFLNK, _) => {
            let target = read_link_at(src_dir, src_name)?;
            // SAFETY: NUL-terminated strings, valid dirfd.
            cvt(unsafe { libc::symlinkat(target.as_ptr(), dst_dir.as_raw_fd(), dst_name.as_ptr()) })?;
            set_metadata_at(dst_dir, dst_name, &st)
        }
        _ => {
            // Devices, FIFOs and sockets: recreated, as cp -a and tar do.
            // SAFETY: valid dirfd and NUL-terminated name.
            cvt(unsafe { libc::mknodat(dst_dir.as_raw_fd(), dst_name.as_ptr(), st.st_mode, st.st_rdev) })?;
            set_metadata_at(dst_dir, dst_name, &st)
        }
    }
}

/// A symlink's target, read without following it.
pub fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid dirfd, NUL-terminated name, writable buffer of the length given.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    CString::new(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

fn times(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec { tv_sec: st.st_atime, tv_nsec: st.st_atime_nsec },
        libc::timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec },
    ]
}

/// Owner, then mode (a chown clears set-id bits), then times, on an open file or directory.
fn set_metadata(fd: BorrowedFd<'_>, st: &libc::stat) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), st.st_uid, st.st_gid) })?;
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), st.st_mode & 0o7777) })?;
    let t = times(st);
    // SAFETY: valid fd and two timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) })
}

/// The same for a symlink or special file by name, never following it (a symlink's own mode
/// cannot be set and is not).
fn set_metadata_at(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), st.st_uid, st.st_gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    if kind(st) != libc::S_IFLNK {
        // A just-made special file, not a symlink, so following it is harmless.
        // SAFETY: valid dirfd and NUL-terminated name.
        cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), st.st_mode & 0o7777, 0) })?;
    }
    let t = times(st);
    // SAFETY: valid dirfd, NUL-terminated name and two timespecs.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn dir_fd(path: &std::path::Path) -> OwnedFd {
        File::open(path).unwrap().into()
    }

    #[test]
    fn trees_keep_types_modes_times_and_links() {
        let src = tempfile::tempdir().unwrap();
        let t = src.path().join("tree");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("sub/f"), "data").unwrap();
        std::fs::set_permissions(t.join("sub/f"), std::fs::Permissions::from_mode(0o4751)).unwrap();
        std::fs::set_permissions(t.join("sub"), std::fs::Permissions::from_mode(0o710)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub", t.join("rel")).unwrap();
        let old = filetime_of(&t.join("sub/f"));
        let dst = tempfile::tempdir().unwrap();
        let (s, d) = (dir_fd(src.path()), dir_fd(dst.path()));
        copy_entry(s.as_fd(), c"tree", d.as_fd(), c"copy").unwrap();
        let c = dst.path().join("copy");
        assert_eq!(std::fs::read(c.join("sub/f")).unwrap(), b"data");
        assert_eq!(std::fs::metadata(c.join("sub/f")).unwrap().mode() & 0o7777, 0o4751);
        assert_eq!(std::fs::metadata(c.join("sub")).unwrap().mode() & 0o7777, 0o710);
        assert_eq!(filetime_of(&c.join("sub/f")), old);
        assert_eq!(std::fs::read_link(c.join("abs")).unwrap().to_str(), Some("/etc/passwd"));
        assert_eq!(std::fs::read_link(c.join("rel")).unwrap().to_str(), Some("sub"));
        // Copied again: merges, replacing files (a symlink in the way is replaced, not followed).
        std::fs::remove_file(c.join("sub/f")).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), c.join("sub/f")).unwrap();
        copy_entry(s.as_fd(), c"tree", d.as_fd(), c"copy").unwrap();
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"");
        assert!(std::fs::symlink_metadata(c.join("sub/f")).unwrap().is_file());
        // A directory never replaces a file, nor a file a directory.
        std::fs::write(dst.path().join("plain"), "x").unwrap();
        assert!(copy_entry(s.as_fd(), c"tree", d.as_fd(), c"plain").is_err());
        assert!(copy_entry(s.as_fd(), c"tree", d.as_fd(), c"copy").is_ok());
    }

    fn filetime_of(p: &std::path::Path) -> (i64, i64) {
        let m = std::fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    }
}
