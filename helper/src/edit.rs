//! `--edit FILE:EXPR` in the guest, as virt-edit's `edit_file_perl` does it: the file a path
//! leads to (in-root symlinks followed) is read, its lines run through the expression, and
//! a new file with the result, the old one's mode, owner and extended attributes (SELinux
//! label, ACLs, capabilities) is renamed over it. Like virt-edit's, the new file has new times
//! and its own inode (a hard link to the old one keeps the old text).

use crate::copy::{fstat, kind, lstat_at, open_at, unlink_at};
use crate::guest::GuestRoot;
use imgforge_protocol::perl_edit::{Program, MAX_LINE_BYTES};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Most bytes of extended attribute names, and of one value, that are copied.
const XATTR_MAX_BYTES: usize = 64 * 1024;

/// Edits the regular file `guest_path` leads to with `program`; the error says what failed.
pub fn edit_file(guest: &GuestRoot, guest_path: &str, program: &Program) -> Result<(), String> {
    let real = match guest.resolve(guest_path) {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("{guest_path} does not exist in the guest"));
        }
        Err(e) if crate::pseudo_filesystems::is_refused(&e) => return Err(e.to_string()),
        Err(e) => return Err(format!("cannot resolve {guest_path}: {e}")),
    };
    let root = guest.resolve("/").map_err(|e| format!("cannot resolve the guest root: {e}"))?;
    let inside =
        format!("/{}", real.strip_prefix(&root).map_err(io::Error::other).map_err(|e| e.to_string())?.display());
    let (dir, name) = guest.parent(&inside).map_err(|e| format!("cannot open the directory of {inside}: {e}"))?;
    let st = lstat_at(dir.as_fd(), &name).map_err(|e| format!("cannot stat {inside}: {e}"))?;
    if kind(&st) != libc::S_IFREG {
        return Err(format!("{guest_path} is not a regular file in the guest"));
    }
    // O_NOFOLLOW (open_at) and the type checked again on the open file: nothing swapped in
    // meanwhile is read.
    let old = open_at(dir.as_fd(), &name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
        .map_err(|e| format!("cannot open {inside}: {e}"))?;
    let st = fstat(old.as_fd()).map_err(|e| format!("cannot stat {inside}: {e}"))?;
    if kind(&st) != libc::S_IFREG {
        return Err(format!("{guest_path} is not a regular file in the guest"));
    }
    let reader = File::from(old.try_clone().map_err(|e| e.to_string())?);
    replace_with(dir.as_fd(), &name, old.as_fd(), &st, |new| edit_lines(reader, new, program, &inside))
        .map_err(|e| format!("cannot write {inside}: {e}"))?;
    if inside != guest_path {
        println!("edited {inside} (where {guest_path} leads)");
    }
    Ok(())
}

/// Runs each line of `reader` through `program` into `out`, one line in memory at a time.
fn edit_lines(reader: File, out: &mut File, program: &Program, inside: &str) -> Result<(), String> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut writer = BufWriter::with_capacity(1 << 16, out);
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        // One byte past the limit is enough to know a line is too long.
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n =
            (&mut reader).take(limit).read_until(b'\n', &mut line).map_err(|e| format!("cannot read {inside}: {e}"))?;
        if n == 0 {
            break;
        }
        let edited = program.apply_line(&line).map_err(|e| format!("line {number} of {inside}: {e}"))?;
        writer.write_all(&edited).map_err(|e| e.to_string())?;
    }
    writer.flush().map_err(|e| e.to_string())
}

/// Writes a new file beside `name` (filled by `fill`) with `old`'s mode, owner and extended
/// attributes, then renames it over `name`; nothing is left behind when any step fails.
fn replace_with(
    dir: BorrowedFd<'_>,
    name: &CStr,
    old: BorrowedFd<'_>,
    st: &libc::stat,
    fill: impl FnOnce(&mut File) -> Result<(), String>,
) -> Result<(), String> {
    let tmp = temporary_name(name).map_err(|e| e.to_string())?;
    let new = open_at(dir, &tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600).map_err(|e| e.to_string())?;
    let result = (|| {
        let mut file = File::from(new.try_clone().map_err(|e| e.to_string())?);
        fill(&mut file)?;
        let attributes = || -> io::Result<()> {
            std::os::unix::fs::fchown(&file, Some(st.st_uid), Some(st.st_gid))?;
            // After the chown, which clears set-id bits; the attributes last, as chown also
            // drops file capabilities.
            // SAFETY: valid fd.
            if unsafe { libc::fchmod(new.as_raw_fd(), st.st_mode & 0o7777) } != 0 {
                return Err(io::Error::last_os_error());
            }
            copy_xattrs(old, new.as_fd())?;
            // No fsync: nothing reads the guest before 90-Unmount syncs it, and a helper that
            // dies before then leaves the disk as it was (the overlay is dropped).
            // SAFETY: valid dirfd and NUL-terminated names.
            if unsafe { libc::renameat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        attributes().map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = unlink_at(dir, &tmp, 0);
    }
    result
}

/// `.NAME.imgforge-edit-RANDOM`: random, so that a guest cannot have it waiting (O_EXCL).
fn temporary_name(name: &CStr) -> io::Result<CString> {
    let mut random = [0u8; 8];
    // SAFETY: writable buffer of the length given.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let suffix = imgforge_protocol::bytes::hex(&random);
    let mut tmp = b".".to_vec();
    tmp.extend_from_slice(name.to_bytes());
    tmp.extend_from_slice(format!(".imgforge-edit-{suffix}").as_bytes());
    CString::new(tmp).map_err(io::Error::other)
}

/// Every extended attribute of `from` set on `to` (guestfs `copy-attributes` with `all`).
fn copy_xattrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
    let mut names = vec![0u8; XATTR_MAX_BYTES];
    // SAFETY: valid fd, writable buffer of the length given.
    let len = unsafe { libc::flistxattr(from.as_raw_fd(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOTSUP) { Ok(()) } else { Err(err) };
    }
    names.truncate(len as usize);
    let mut value = vec![0u8; XATTR_MAX_BYTES];
    for attr in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let attr = CString::new(attr).map_err(io::Error::other)?;
        // SAFETY: valid fd, NUL-terminated name, writable buffer of the length given.
        let n = unsafe { libc::fgetxattr(from.as_raw_fd(), attr.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid fd, NUL-terminated name, a buffer of n bytes.
        if unsafe { libc::fsetxattr(to.as_raw_fd(), attr.as_ptr(), value.as_ptr().cast(), n as usize, 0) } != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("cannot copy extended attribute {}: {err}", attr.to_string_lossy()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn program(expr: &str) -> Program {
        Program::parse(expr).unwrap()
    }

    #[test]
    fn the_real_file_is_replaced_keeping_mode_and_attributes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let file = dir.path().join("etc/conf");
        std::fs::write(&file, "a=1\nb=2\n").unwrap();
        std::fs::set_permissions(&file, PermissionsExt::from_mode(0o4751)).unwrap();
        let c = CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
        // user.* attributes need a filesystem that has them (tmpfs may not): tried, not required.
        // SAFETY: NUL-terminated strings, a 3-byte value.
        let has_xattr = unsafe { libc::setxattr(c.as_ptr(), c"user.test".as_ptr(), b"abc".as_ptr().cast(), 3, 0) } == 0;
        std::os::unix::fs::symlink("/etc/conf", dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("etc/evil")).unwrap();
        let old_ino = std::fs::metadata(&file).unwrap().ino();
        let guest = GuestRoot::open(dir.path()).unwrap();
        edit_file(&guest, "/etc/evil/link", &program("s/1/one/; $_ = '' if /^b/")).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a=one\n");
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o4751);
        assert_ne!(meta.ino(), old_ino, "a new file renamed over the old one");
        assert!(std::fs::symlink_metadata(dir.path().join("link")).unwrap().file_type().is_symlink());
        if has_xattr {
            let mut buf = [0u8; 8];
            // SAFETY: NUL-terminated strings, writable buffer.
            let n = unsafe { libc::getxattr(c.as_ptr(), c"user.test".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(&buf[..n as usize], b"abc");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("etc")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
    }

    /// A sparse file of one line past the limit (a hostile image's, which read whole took the
    /// helper down) fails naming the line, and leaves the file as it was and nothing beside it.
    #[test]
    fn a_line_past_the_limit_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(MAX_LINE_BYTES as u64 + 1).unwrap();
        std::fs::write(dir.path().join("small"), "a\n").unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        let err = edit_file(&guest, "/big", &program("s/a/b/")).unwrap_err();
        assert!(err.starts_with("cannot write /big: line 1 of /big: a line longer than"), "{err}");
        assert_eq!(std::fs::metadata(&big).unwrap().len(), MAX_LINE_BYTES as u64 + 1);
        let err = edit_file(&guest, "/small", &program(&vec!["$_ .= $_"; 30].join(";"))).unwrap_err();
        assert!(err.contains("line 1 of /small: a line longer than"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("small")).unwrap(), b"a\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
    }

    /// The helper's procfs, which the guest's /proc is during customization, is not edited:
    /// here the guest root is the test's own root, whose /proc is a procfs too.
    #[test]
    fn files_of_the_helpers_proc_are_refused() {
        let guest = GuestRoot::open(std::path::Path::new("/")).unwrap();
        let err = edit_file(&guest, "/proc/self/status", &program("s/a/b/")).unwrap_err();
        assert!(err.starts_with("/proc/self/status leads to the helper's /proc"), "{err}");
    }

    #[test]
    fn missing_and_non_regular_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("dangling")).unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        let p = program("s/a/b/");
        assert_eq!(edit_file(&guest, "/etc/missing", &p), Err("/etc/missing does not exist in the guest".into()));
        assert_eq!(edit_file(&guest, "/dangling", &p), Err("/dangling does not exist in the guest".into()));
        assert_eq!(edit_file(&guest, "/etc", &p), Err("/etc is not a regular file in the guest".into()));
    }
}
