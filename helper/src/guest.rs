//! File operations inside the guest's root, resolving every path as if chrooted there.
//!
//! A hostile image can hold symlinks such as `/etc -> /` or `../../..`: every lookup goes
//! through `openat2(RESOLVE_IN_ROOT)`, so absolute links and `..` stay inside the guest root.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// The mounted guest root.
pub struct GuestRoot {
    root: OwnedFd,
    path: PathBuf,
}

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Splits an absolute guest path into its normal components; `..` and `.` are refused.
fn components(guest_path: &str) -> io::Result<Vec<&std::ffi::OsStr>> {
    let path = Path::new(guest_path);
    if !path.is_absolute() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("guest path {guest_path:?} is not absolute")));
    }
    path.components()
        .filter(|c| !matches!(c, Component::RootDir))
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest path {guest_path:?} contains '.' or '..'"),
            )),
        })
        .collect()
}

impl GuestRoot {
    /// Opens the directory where the guest root is mounted.
    pub fn open(path: &Path) -> io::Result<Self> {
        let dir = File::open(path)?;
        Ok(Self { root: dir.into(), path: path.to_owned() })
    }

    /// Where the guest root is mounted in the helper.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `openat2(root, path, flags, mode, RESOLVE_IN_ROOT)`; whatever it reaches on one of the
    /// helper's mounts (its /proc, /sys, the guest's /dev: `pseudo_filesystems`) is refused,
    /// and so is a device node, FIFO or socket opened for data. An existing object is first
    /// reached with `O_PATH`, which opens nothing, and checked; only then opened for data,
    /// through that very handle.
    fn open_raw(&self, guest_path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        use crate::pseudo_filesystems::{refuse_for_data, refuse_helper_mount};
        let lookup = libc::O_PATH | (flags & (libc::O_DIRECTORY | libc::O_NOFOLLOW));
        if flags & libc::O_PATH != 0 {
            let fd = self.open_unchecked(guest_path, lookup, 0)?;
            refuse_helper_mount(fd.as_fd(), guest_path)?;
            return Ok(fd);
        }
        // O_NONBLOCK and O_NOCTTY: a FIFO or terminal swapped in after the check neither makes
        // the open wait nor becomes the helper's terminal (no effect on the files accepted).
        let flags = flags | libc::O_NONBLOCK | libc::O_NOCTTY;
        let fd = match self.open_unchecked(guest_path, lookup, 0) {
            Ok(found) => {
                refuse_for_data(found.as_fd(), guest_path)?;
                let again = cstring(format!("/proc/self/fd/{}", found.as_raw_fd()).as_bytes())?;
                let reopen = flags & !(libc::O_CREAT | libc::O_EXCL) | libc::O_CLOEXEC;
                // SAFETY: a NUL-terminated path.
                let fd = unsafe { libc::open(again.as_ptr(), reopen) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor we own.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
            // Created here, in a directory that can only be the guest's (a dangling link into
            // the guest's /dev tmpfs could make an empty file there: refused below, unwritten).
            Err(e) if e.kind() == io::ErrorKind::NotFound && flags & libc::O_CREAT != 0 => {
                self.open_unchecked(guest_path, flags, mode)?
            }
            Err(e) => return Err(e),
        };
        refuse_for_data(fd.as_fd(), guest_path)?;
        Ok(fd)
    }

    /// `openat2(root, path, flags, mode, RESOLVE_IN_ROOT)` as is.
    fn open_unchecked(&self, guest_path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let rel: PathBuf = components(guest_path)?.iter().collect();
        let rel = if rel.as_os_str().is_empty() { PathBuf::from(".") } else { rel };
        let c = cstring(rel.as_os_str().as_bytes())?;
        // SAFETY: open_how is plain old data; all-zero means no flags, mode or resolve rules.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 };
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: `how` is a valid open_how of the size passed; `c` is NUL-terminated.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat2 returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Opens the parent directory of `guest_path` and returns it with the final name.
    pub(crate) fn parent(&self, guest_path: &str) -> io::Result<(OwnedFd, CString)> {
        let parts = components(guest_path)?;
        let (name, dirs) = parts.split_last().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the guest root itself is not a valid target")
        })?;
        let parent: String = format!("/{}", dirs.iter().map(|d| d.to_string_lossy()).collect::<Vec<_>>().join("/"));
        let fd = self.open_raw(&parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok((fd, cstring(name.as_bytes())?))
    }

    /// Opens an existing file for reading.
    pub fn open_read(&self, guest_path: &str) -> io::Result<File> {
        Ok(File::from(self.open_raw(guest_path, libc::O_RDONLY, 0)?))
    }

    /// Reads a whole file as text.
    pub fn read_to_string(&self, guest_path: &str) -> io::Result<String> {
        let mut s = String::new();
        self.open_read(guest_path)?.read_to_string(&mut s)?;
        Ok(s)
    }

    /// Opens (creating with `mode` if missing) a file for writing; `truncate` empties it.
    pub fn open_write(&self, guest_path: &str, mode: u32, truncate: bool) -> io::Result<File> {
        let flags = libc::O_RDWR | libc::O_CREAT | if truncate { libc::O_TRUNC } else { 0 };
        Ok(File::from(self.open_raw(guest_path, flags, mode)?))
    }

    /// Replaces a file's contents (created 0644 if missing; an existing file keeps its mode).
    pub fn write(&self, guest_path: &str, content: &[u8]) -> io::Result<()> {
        let mut f = self.open_write(guest_path, 0o644, true)?;
        f.write_all(content)
    }

    /// Appends `line` and a newline, first ending an unterminated last line.
    pub fn append_line(&self, guest_path: &str, line: &str) -> io::Result<()> {
        let mut f = self.open_write(guest_path, 0o644, false)?;
        let len = f.seek(SeekFrom::End(0))?;
        let mut text = Vec::new();
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                text.push(b'\n');
            }
        }
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
        f.seek(SeekFrom::End(0))?;
        f.write_all(&text)
    }

    /// `mkdir -p` with `mode` for directories it creates.
    pub fn mkdir_all(&self, guest_path: &str, mode: u32) -> io::Result<()> {
        let parts = components(guest_path)?;
        let mut current = String::new();
        for part in parts {
            let (dir, name) = self.parent(&format!("{current}/{}", part.to_string_lossy()))?;
            // SAFETY: valid dirfd and NUL-terminated name.
            let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) };
            if rc != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EEXIST) {
                    return Err(err);
                }
            }
            current = format!("{current}/{}", part.to_string_lossy());
        }
        // The last component must now be a directory (following in-root symlinks).
        self.open_raw(guest_path, libc::O_PATH | libc::O_DIRECTORY, 0).map(|_| ())
    }

    /// The helper path an existing guest path leads to, symlinks resolved inside the root.
    pub fn resolve(&self, guest_path: &str) -> io::Result<PathBuf> {
        let fd = self.open_raw(guest_path, libc::O_PATH, 0)?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let root = std::fs::read_link(format!("/proc/self/fd/{}", self.root.as_raw_fd()))?;
        if real.starts_with(&root) {
            Ok(real)
        } else {
            Err(io::Error::other(format!("{guest_path} resolves outside the guest root")))
        }
    }

    /// Names in a directory (following in-root symlinks).
    pub fn list_dir(&self, guest_path: &str) -> io::Result<Vec<String>> {
        let fd = self.open_raw(guest_path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let names = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        Ok(names)
    }

    /// True if the path exists (following in-root symlinks).
    pub fn exists(&self, guest_path: &str) -> bool {
        self.open_raw(guest_path, libc::O_PATH, 0).is_ok()
    }

    /// True if the path is a directory (following in-root symlinks).
    pub fn is_dir(&self, guest_path: &str) -> bool {
        self.open_raw(guest_path, libc::O_PATH | libc::O_DIRECTORY, 0).is_ok()
    }

    /// `rm -rf`: removes a file, symlink or directory tree; a missing path is not an error.
    pub fn remove_all(&self, guest_path: &str) -> io::Result<()> {
        let (dir, name) = match self.parent(guest_path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // The entry itself, not followed: one of the helper's mounts (`--delete /proc`) is
        // refused rather than emptied.
        if let Ok(entry) = crate::copy::open_at_unchecked(dir.as_fd(), &name, libc::O_PATH, 0) {
            crate::pseudo_filesystems::refuse_helper_mount(entry.as_fd(), guest_path)?;
        }
        // Through the resolved parent's /proc/self/fd link; remove_dir_all never follows
        // symlinks, so nothing outside the guest can be reached from here.
        let path =
            Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        let result = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
        };
        drop(dir);
        result
    }

    /// Sets permission bits (following in-root symlinks).
    pub fn chmod(&self, guest_path: &str, mode: u32) -> io::Result<()> {
        let fd = self.open_raw(guest_path, libc::O_PATH, 0)?;
        let proc = cstring(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
        // SAFETY: NUL-terminated path.
        if unsafe { libc::chmod(proc.as_ptr(), mode) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets owner and group (following in-root symlinks).
    pub fn chown(&self, guest_path: &str, uid: u32, gid: u32) -> io::Result<()> {
        let fd = self.open_raw(guest_path, libc::O_PATH, 0)?;
        let empty = c"";
        // SAFETY: valid fd; AT_EMPTY_PATH with an empty NUL-terminated path.
        if unsafe { libc::fchownat(fd.as_raw_fd(), empty.as_ptr(), uid, gid, libc::AT_EMPTY_PATH) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Replaces `guest_path` with a symlink to `target` (target stored verbatim).
    pub fn symlink(&self, target: &str, guest_path: &str) -> io::Result<()> {
        self.remove_all(guest_path)?;
        let (dir, name) = self.parent(guest_path)?;
        let t = cstring(target.as_bytes())?;
        // SAFETY: NUL-terminated strings, valid dirfd.
        if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `guest_path` an empty regular file (an existing one is emptied). Whatever else is
    /// there — a symlink, a FIFO, a device node — is replaced, never followed or opened: a
    /// hostile image's `/.autorelabel -> /mnt/guest/etc/shadow` must not empty a file elsewhere.
    pub fn create_empty_file(&self, guest_path: &str, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(guest_path)?;
        // SAFETY: stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, NUL-terminated name, writable stat.
        let found = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0;
        if found && st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{guest_path} is a directory")));
        }
        if found && st.st_mode & libc::S_IFMT != libc::S_IFREG {
            // SAFETY: valid dirfd and NUL-terminated name.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and NUL-terminated name.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        // A program of the guest still running could have swapped in something else meanwhile.
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!("{guest_path} changed under us into something not a regular file")));
        }
        Ok(())
    }

    /// Creates the directory `guest_path` (its parent resolved inside the root; an existing
    /// name is an error) and holds it open, so that later steps reach this very directory
    /// whatever the guest's programs rename or replace meanwhile.
    pub fn create_dir(&self, guest_path: &str, mode: u32) -> io::Result<CreatedDir> {
        let (parent, name) = self.parent(guest_path)?;
        // SAFETY: valid dirfd and NUL-terminated name.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), mode) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid dirfd and NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                parent.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: valid dirfd and NUL-terminated name.
            unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
            return Err(err);
        }
        // SAFETY: a fresh descriptor we own.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(CreatedDir { parent, name, dir })
    }

    /// What is at `guest_path` itself, a final symlink not followed (its parents are, inside
    /// the root); `None` when nothing is there.
    pub fn lstat(&self, guest_path: &str) -> io::Result<Option<libc::stat>> {
        let (dir, name) = match self.parent(guest_path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        not_found_is_none(crate::copy::lstat_at(dir.as_fd(), &name))
    }

    /// Creates the new regular file `guest_path` with `content`, owned by root with `mode`;
    /// anything already there, a symlink included, is an error.
    pub fn create_new(&self, guest_path: &str, mode: u32, content: &[u8]) -> io::Result<()> {
        let (dir, name) = self.parent(guest_path)?;
        let fd = crate::copy::open_at(dir.as_fd(), &name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0)?;
        let mut f = File::from(fd);
        std::os::unix::fs::fchown(&f, Some(0), Some(0))?;
        // Set after creation: the mode given to open obeys the umask.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(content)
    }

    /// Opens an existing path (following in-root symlinks, crossing mount points) without
    /// reading it: a handle for mount and unmount calls.
    pub fn open_path(&self, guest_path: &str) -> io::Result<OwnedFd> {
        self.open_raw(guest_path, libc::O_PATH, 0)
    }

    /// True if the path is an executable regular file (following in-root symlinks).
    pub fn is_executable(&self, guest_path: &str) -> bool {
        use std::os::unix::fs::PermissionsExt;
        self.open_raw(guest_path, libc::O_PATH, 0)
            .and_then(|fd| File::from(fd).metadata())
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }

    /// Atomically replaces a file's contents, keeping its owner and mode.
    pub fn replace(&self, guest_path: &str, content: &[u8]) -> io::Result<()> {
        let (dir, name) = self.parent(guest_path)?;
        let old = self.open_read(guest_path)?.metadata()?;
        let tmp_name = cstring(format!(".{}.imgforge-new", name.to_string_lossy()).as_bytes())?;
        // SAFETY: valid dirfd and NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                tmp_name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let mut f = unsafe { File::from_raw_fd(fd) };
        use std::os::unix::fs::MetadataExt;
        let write = (|| {
            f.write_all(content)?;
            std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()))?;
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(old.mode() & 0o7777))?;
            // No fsync: nothing reads the guest before 90-Unmount syncs it, and a helper that
            // dies before then leaves the disk as it was (the overlay is dropped).
            // SAFETY: valid dirfd and NUL-terminated names.
            if unsafe { libc::renameat(dir.as_raw_fd(), tmp_name.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })();
        if write.is_err() {
            // SAFETY: valid dirfd and NUL-terminated name.
            unsafe { libc::unlinkat(dir.as_raw_fd(), tmp_name.as_ptr(), 0) };
        }
        write
    }
}

/// How many times `--scrub` overwrites a file before deleting it: random, random, zeros —
/// scrub(1)'s default `nnsa` pattern, which guestfs `scrub-file` runs, less its read-back.
const SCRUB_PASSES: usize = 3;

/// Bytes written per call while scrubbing.
const SCRUB_CHUNK_BYTES: usize = 1 << 16;

fn not_found_is_none(r: io::Result<libc::stat>) -> io::Result<Option<libc::stat>> {
    match r {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn final_name(guest_path: &str) -> io::Result<String> {
    Path::new(guest_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{guest_path} has no final name")))
}

impl GuestRoot {
    /// `DEST`, or `DEST/<name of SOURCE>` when `DEST` is an existing directory (in-root
    /// symlinks followed), as cp, mv and ln place things.
    fn placed(&self, source: &str, dest: &str) -> io::Result<String> {
        if self.is_dir(dest) {
            Ok(format!("{}/{}", dest.trim_end_matches('/'), final_name(source)?))
        } else {
            Ok(dest.to_owned())
        }
    }

    /// The `(dev, ino)` of `fd` and of each directory above it up to the guest root.
    fn ancestors(&self, fd: OwnedFd) -> io::Result<Vec<(u64, u64)>> {
        let root = crate::copy::fstat(self.root.as_fd())?;
        let mut chain = Vec::new();
        let mut current = fd;
        for _ in 0..crate::copy::MAX_TREE_DEPTH {
            let st = crate::copy::fstat(current.as_fd())?;
            chain.push((st.st_dev, st.st_ino));
            if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino) {
                return Ok(chain);
            }
            current = crate::copy::open_at(current.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        }
        Err(io::Error::other("the destination nests too deep"))
    }

    /// `cp -a SOURCE DEST`: a final symlink in `source` is copied as a symlink; a directory is
    /// never copied into itself.
    pub fn copy(&self, source: &str, dest: &str) -> io::Result<()> {
        let (src_dir, src_name) = self.parent(source)?;
        let st = crate::copy::lstat_at(src_dir.as_fd(), &src_name)?;
        let dest = self.placed(source, dest)?;
        let (dst_dir, dst_name) = self.parent(&dest)?;
        if crate::copy::kind(&st) == libc::S_IFDIR {
            let inside =
                self.ancestors(crate::copy::open_at(dst_dir.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)?)?;
            if inside.contains(&(st.st_dev, st.st_ino)) {
                return Err(io::Error::other(format!("cannot copy directory {source} into itself ({dest})")));
            }
        }
        crate::copy::copy_entry(src_dir.as_fd(), &src_name, dst_dir.as_fd(), &dst_name)
    }

    /// Copies a helper path (not the guest's: the payload disk) into the existing guest
    /// directory `guest_dir`, under `name`, as tar extracts it.
    pub fn copy_in(&self, from: &Path, guest_dir: &str, name: &str) -> io::Result<()> {
        let parent = from.parent().unwrap_or(Path::new("/"));
        let src_dir: OwnedFd = File::open(parent)?.into();
        let src_name = cstring(from.file_name().unwrap_or_default().as_bytes())?;
        if !self.is_dir(guest_dir) {
            return Err(io::Error::new(io::ErrorKind::NotADirectory, format!("{guest_dir} is not a directory")));
        }
        let dst_dir = self.open_raw(guest_dir, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        crate::copy::copy_entry(src_dir.as_fd(), &src_name, dst_dir.as_fd(), &cstring(name.as_bytes())?)
    }

    /// `mv SOURCE DEST`: a rename, or a copy then delete across filesystems.
    pub fn rename(&self, source: &str, dest: &str) -> io::Result<()> {
        let (src_dir, src_name) = self.parent(source)?;
        crate::copy::lstat_at(src_dir.as_fd(), &src_name)?;
        let dest = self.placed(source, dest)?;
        let (dst_dir, dst_name) = self.parent(&dest)?;
        // SAFETY: valid dirfds and NUL-terminated names.
        let rc =
            unsafe { libc::renameat(src_dir.as_raw_fd(), src_name.as_ptr(), dst_dir.as_raw_fd(), dst_name.as_ptr()) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EXDEV) {
            return Err(err);
        }
        crate::copy::copy_entry(src_dir.as_fd(), &src_name, dst_dir.as_fd(), &dst_name)?;
        self.remove_all(source)
    }

    /// `ln -sf TARGET LINK`: an existing directory `link` receives the link under the target's
    /// name; anything else there but a directory is replaced.
    pub fn link(&self, target: &str, link: &str) -> io::Result<()> {
        let link = self.placed(target, link)?;
        let (dir, name) = self.parent(&link)?;
        if let Some(st) = not_found_is_none(crate::copy::lstat_at(dir.as_fd(), &name))? {
            if crate::copy::kind(&st) == libc::S_IFDIR {
                return Err(io::Error::other(format!("cannot overwrite directory {link}")));
            }
            crate::copy::unlink_at(dir.as_fd(), &name, 0)?;
        }
        let t = cstring(target.as_bytes())?;
        // SAFETY: NUL-terminated strings, valid dirfd.
        if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// guestfs `touch`: creates an empty file (0644) or sets an existing regular file's times
    /// to now; anything else — a symlink included — is refused, as guestfs refuses it.
    pub fn touch(&self, guest_path: &str) -> io::Result<()> {
        let (dir, name) = self.parent(guest_path)?;
        if let Some(st) = not_found_is_none(crate::copy::lstat_at(dir.as_fd(), &name))? {
            if crate::copy::kind(&st) != libc::S_IFREG {
                return Err(io::Error::other(format!(
                    "{guest_path} is not a regular file (touch only works on those)"
                )));
            }
        }
        let fd = crate::copy::open_at(
            dir.as_fd(),
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY,
            0o644,
        )?;
        // SAFETY: valid fd; a null times pointer means now.
        if unsafe { libc::futimens(fd.as_raw_fd(), std::ptr::null()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// guestfs `truncate`: an existing regular file (in-root symlinks followed) to zero length.
    pub fn truncate(&self, guest_path: &str) -> io::Result<()> {
        let fd = self.open_raw(guest_path, libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
        truncate_regular(fd, guest_path)
    }

    /// Truncates every regular file under the directory `guest_path` (its final component not
    /// followed, nor any symlink below, as guestfs `find` + `is_file` + `truncate`); returns how
    /// many. A `guest_path` that is not a directory truncates nothing.
    pub fn truncate_recursive(&self, guest_path: &str) -> io::Result<usize> {
        let top = if guest_path.trim_end_matches('/').is_empty() {
            self.open_raw("/", libc::O_RDONLY | libc::O_DIRECTORY, 0)?
        } else {
            let (dir, name) = self.parent(guest_path)?;
            match crate::copy::open_at(dir.as_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => return Ok(0),
                Err(e) => return Err(e),
            }
        };
        truncate_tree(top, 0)
    }

    /// guestfs `scrub-file`: the regular file `guest_path` leads to (in-root symlinks followed,
    /// as guestfs resolves it) is overwritten [`SCRUB_PASSES`] times, then that file is deleted.
    pub fn scrub(&self, guest_path: &str) -> io::Result<()> {
        let fd = self.open_raw(guest_path, libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
        let st = crate::copy::fstat(fd.as_fd())?;
        if crate::copy::kind(&st) != libc::S_IFREG {
            return Err(io::Error::other(format!("{guest_path} is not a regular file (only those are scrubbed)")));
        }
        let real = self.resolve(guest_path)?;
        let root = std::fs::read_link(format!("/proc/self/fd/{}", self.root.as_raw_fd()))?;
        let inside = format!("/{}", real.strip_prefix(&root).map_err(io::Error::other)?.display());
        let mut file = File::from(fd);
        let len = st.st_size as u64;
        for pass in 0..SCRUB_PASSES {
            file.seek(SeekFrom::Start(0))?;
            let mut left = len;
            let mut chunk = vec![0u8; SCRUB_CHUNK_BYTES];
            while left > 0 {
                let n = left.min(SCRUB_CHUNK_BYTES as u64) as usize;
                if pass + 1 < SCRUB_PASSES {
                    fill_random(&mut chunk[..n])?;
                } else {
                    chunk[..n].fill(0);
                }
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            // Each pass reaches the disk, or the page cache would keep only the last.
            file.sync_data()?;
        }
        let (dir, name) = self.parent(&inside)?;
        let there = crate::copy::lstat_at(dir.as_fd(), &name)?;
        if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino) {
            return Err(io::Error::other(format!("{inside} changed while it was scrubbed")));
        }
        crate::copy::unlink_at(dir.as_fd(), &name, 0)
    }
}

fn truncate_regular(fd: OwnedFd, guest_path: &str) -> io::Result<()> {
    if crate::copy::kind(&crate::copy::fstat(fd.as_fd())?) != libc::S_IFREG {
        return Err(io::Error::other(format!("{guest_path} is not a regular file")));
    }
    // SAFETY: valid fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn truncate_tree(dir: OwnedFd, depth: usize) -> io::Result<usize> {
    if depth > crate::copy::MAX_TREE_DEPTH {
        return Err(io::Error::other(format!(
            "the tree nests more than {} directories deep",
            crate::copy::MAX_TREE_DEPTH
        )));
    }
    let mut count = 0;
    for name in crate::copy::names_in(dir.as_fd())? {
        let st = crate::copy::lstat_at(dir.as_fd(), &name)?;
        match crate::copy::kind(&st) {
            libc::S_IFREG => {
                let fd =
                    crate::copy::open_at(dir.as_fd(), &name, libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
                truncate_regular(fd, &name.to_string_lossy())?;
                count += 1;
            }
            libc::S_IFDIR => {
                // The helper's /proc, /sys or the guest's /dev mounted on this directory stands
                // where the guest's (empty) one is: nothing of the guest's below.
                let sub = match crate::copy::open_at(dir.as_fd(), &name, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                    Err(e) if crate::pseudo_filesystems::is_refused(&e) => continue,
                    sub => sub?,
                };
                count += truncate_tree(sub, depth + 1)?;
            }
            _ => {}
        }
    }
    Ok(count)
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom` without flags: it blocks until the CRNG is
/// initialized, never returning bytes from an unseeded pool).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writable buffer of the length given.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

/// A directory [`GuestRoot::create_dir`] made, held open.
pub struct CreatedDir {
    parent: OwnedFd,
    name: CString,
    dir: OwnedFd,
}

impl CreatedDir {
    /// A helper path that leads to this very directory (through `/proc/self/fd`), to mount on.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }

    /// Removes the (empty) directory from where it was made.
    pub fn remove(self) -> io::Result<()> {
        drop(self.dir);
        // SAFETY: valid dirfd and NUL-terminated name.
        if unsafe { libc::unlinkat(self.parent.as_raw_fd(), self.name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn root() -> (tempfile::TempDir, GuestRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let g = GuestRoot::open(dir.path()).unwrap();
        (dir, g)
    }

    #[test]
    fn absolute_symlinks_stay_inside() {
        let (dir, g) = root();
        // /escape -> / must mean the guest root, not the helper's.
        std::os::unix::fs::symlink("/", dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", dir.path().join("up")).unwrap();
        g.write("/escape/etc/marker", b"x").unwrap();
        g.write("/up/etc/marker2", b"y").unwrap();
        assert_eq!(std::fs::read(dir.path().join("etc/marker")).unwrap(), b"x");
        assert_eq!(std::fs::read(dir.path().join("etc/marker2")).unwrap(), b"y");
    }

    #[test]
    fn dotdot_and_relative_refused() {
        let (_dir, g) = root();
        assert!(g.write("etc/x", b"").is_err());
        assert!(g.write("/etc/../x", b"").is_err());
    }

    #[test]
    fn append_line_terminates_previous_line() {
        let (dir, g) = root();
        std::fs::write(dir.path().join("etc/f"), "a").unwrap();
        g.append_line("/etc/f", "b").unwrap();
        g.append_line("/etc/new", "c").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("etc/f")).unwrap(), "a\nb\n");
        assert_eq!(std::fs::read_to_string(dir.path().join("etc/new")).unwrap(), "c\n");
    }

    #[test]
    fn mkdir_remove_chmod_replace() {
        let (dir, g) = root();
        g.mkdir_all("/a/b/c", 0o755).unwrap();
        assert!(g.is_dir("/a/b/c"));
        g.write("/a/b/c/f", b"1").unwrap();
        g.chmod("/a/b/c/f", 0o600).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("a/b/c/f")).unwrap().permissions().mode() & 0o777, 0o600);
        g.replace("/a/b/c/f", b"2").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b/c/f")).unwrap(), b"2");
        assert_eq!(std::fs::metadata(dir.path().join("a/b/c/f")).unwrap().permissions().mode() & 0o777, 0o600);
        // A symlink to outside the guest is removed, not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "k").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a/link")).unwrap();
        g.remove_all("/a").unwrap();
        assert!(!dir.path().join("a").exists());
        assert!(outside.path().join("keep").exists());
        g.remove_all("/does/not/exist").unwrap();
    }

    /// `/.autorelabel` pointing outside the root (as the helper sees it) or at a FIFO is
    /// replaced by a regular file; the file it pointed to is untouched.
    #[test]
    fn an_empty_file_replaces_links_and_fifos() {
        let (dir, g) = root();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("task");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".autorelabel")).unwrap();
        g.create_empty_file("/.autorelabel", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let made = std::fs::symlink_metadata(dir.path().join(".autorelabel")).unwrap();
        assert!(made.is_file() && made.len() == 0);
        let fifo = CString::new(dir.path().join("etc/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        g.create_empty_file("/etc/fifo", 0o644).unwrap();
        assert!(std::fs::symlink_metadata(dir.path().join("etc/fifo")).unwrap().is_file());
        assert!(g.create_empty_file("/etc", 0o644).is_err(), "a directory is refused");
    }

    #[test]
    fn created_directories_are_found_again_and_removed() {
        let (dir, g) = root();
        let made = g.create_dir("/etc/new", 0o700).unwrap();
        assert!(std::fs::metadata(made.fd_path()).unwrap().is_dir());
        assert!(g.create_dir("/etc/new", 0o700).is_err(), "an existing name is refused");
        // Renamed by the guest meanwhile: the held directory is the one removed.
        std::fs::rename(dir.path().join("etc"), dir.path().join("moved")).unwrap();
        made.remove().unwrap();
        assert!(!dir.path().join("moved/new").exists());
    }

    /// A hostile guest: `/etc/evil -> /`, and links to a file outside the root as the helper
    /// sees it. Copies, moves, links, truncates and scrubs stay inside the guest.
    #[test]
    fn file_operations_stay_inside_the_root() {
        let (dir, g) = root();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("etc/evil")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("etc/victim-link")).unwrap();
        std::fs::create_dir_all(dir.path().join("data/sub")).unwrap();
        std::fs::write(dir.path().join("data/sub/log"), "old log").unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("data/passwd-link")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("data/up")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("data/victim-link")).unwrap();

        assert_eq!(g.truncate_recursive("/data").unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("data/sub/log")).unwrap(), b"");
        assert_eq!(std::fs::read(dir.path().join("etc/passwd")).unwrap(), b"root:x:0:0::/root:/bin/sh\n");
        assert_eq!(g.truncate_recursive("/etc/evil").unwrap(), 0, "a symlink is not walked");

        g.copy("/etc/evil", "/data/evil-copy").unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("data/evil-copy")).unwrap().to_str(), Some("/"));
        g.copy("/etc/evil/etc/passwd", "/data/passwd-copy").unwrap();
        assert!(std::fs::read(dir.path().join("data/passwd-copy")).unwrap().starts_with(b"root:"));
        assert!(g.copy("/etc/victim-link/x", "/data/stolen").is_err(), "a link out of the root is not followed out");
        assert!(g.copy("/data", "/data/sub").is_err(), "a directory is not copied into itself");
        g.copy("/data/sub", "/etc/evil/copied").unwrap();
        assert!(dir.path().join("copied/log").is_file());

        g.rename("/etc/evil", "/data/sub").unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("data/sub/evil")).unwrap().to_str(), Some("/"));
        assert!(!dir.path().join("etc/evil").exists());

        // ln -sf onto a link to a directory places the link inside it: here the guest's root.
        g.link("/etc/passwd", "/data/sub/evil").unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("passwd")).unwrap().to_str(), Some("/etc/passwd"));
        g.link("/etc/hostname", "/data/sub/log").unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("data/sub/log")).unwrap().to_str(), Some("/etc/hostname"));
        g.link("../x", "/data").unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("data/x")).unwrap().to_str(), Some("../x"), "into a directory");

        // Scrubbing a link scrubs and deletes what it leads to inside the root; a link out of
        // the root leads to a missing guest file.
        std::fs::write(dir.path().join("etc/secret"), "secret").unwrap();
        std::os::unix::fs::symlink("/etc/secret", dir.path().join("data/secret-link")).unwrap();
        g.scrub("/data/secret-link").unwrap();
        assert!(!dir.path().join("etc/secret").exists());
        assert!(std::fs::symlink_metadata(dir.path().join("data/secret-link")).is_ok());
        assert!(g.scrub("/data/victim-link").is_err());
        assert!(g.scrub("/data").is_err(), "a directory is not scrubbed");
        assert!(g.truncate("/data/victim-link").is_err());
        assert!(g.touch("/data/victim-link").is_err(), "touch refuses symlinks");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn touch_creates_0644_and_truncate_needs_a_file() {
        let (dir, g) = root();
        g.touch("/etc/new").unwrap();
        let m = std::fs::metadata(dir.path().join("etc/new")).unwrap();
        assert_eq!((m.len(), m.permissions().mode() & 0o7777), (0, 0o644));
        std::fs::write(dir.path().join("etc/full"), "abc").unwrap();
        g.touch("/etc/full").unwrap();
        assert_eq!(std::fs::read(dir.path().join("etc/full")).unwrap(), b"abc", "touch keeps contents");
        g.truncate("/etc/full").unwrap();
        assert_eq!(std::fs::read(dir.path().join("etc/full")).unwrap(), b"");
        assert!(g.truncate("/etc/missing").is_err(), "the file must exist");
        assert!(g.touch("/etc").is_err(), "a directory is refused");
    }

    /// The test's own root stands for a guest root with the helper's /proc and /sys mounted in
    /// it, as during customization: no operation reads, writes or changes anything there.
    #[test]
    fn nothing_is_done_to_the_helpers_proc_and_sys() {
        let g = GuestRoot::open(Path::new("/")).unwrap();
        let comm = std::fs::read("/proc/self/comm").unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = format!("{}/copied", out.path().display());
        let refused = |result: io::Result<()>, what: &str, shown: &str| {
            let err = result.expect_err(what);
            assert!(crate::pseudo_filesystems::is_refused(&err), "{what}: {err}");
            assert!(err.to_string().starts_with(&format!("{shown} leads to the helper's /proc")), "{what}: {err}");
        };
        let comm_path = "/proc/self/comm";
        refused(g.write(comm_path, b"changed"), "write", comm_path);
        refused(g.append_line(comm_path, "changed"), "append_line", comm_path);
        refused(g.truncate(comm_path), "truncate", comm_path);
        refused(g.scrub(comm_path), "scrub", comm_path);
        refused(g.chmod(comm_path, 0o777), "chmod", comm_path);
        refused(g.chown(comm_path, 1, 1), "chown", comm_path);
        refused(g.read_to_string(comm_path).map(drop), "read", comm_path);
        refused(g.replace(comm_path, b"changed"), "replace", "/proc/self");
        refused(g.touch("/proc/self/new"), "touch", "/proc/self");
        refused(g.mkdir_all("/proc/self/new", 0o755), "mkdir", "/proc");
        refused(g.remove_all(comm_path), "delete", "/proc/self");
        refused(g.remove_all("/proc"), "delete of the mount itself", "/proc");
        refused(g.copy("/proc/self/status", &dest), "copy from", "/proc/self");
        refused(g.copy("/proc", &dest), "copy of the mount itself", "proc");
        refused(g.rename(comm_path, &dest), "move", "/proc/self");
        refused(g.link("/etc/hostname", "/proc/self/new"), "link", "/proc/self");
        refused(g.symlink("/etc/hostname", "/proc/self/new"), "symlink", "/proc/self");
        assert!(g.resolve(comm_path).is_err() && !g.exists(comm_path) && !g.is_dir("/proc/self"));
        assert_eq!(std::fs::read("/proc/self/comm").unwrap(), comm, "the thread's name is unchanged");
        assert!(!Path::new(&dest).exists());
        if g.open_unchecked("/sys/kernel", libc::O_PATH, 0).is_ok() {
            let err = g.append_line("/sys/kernel/uevent_seqnum", "1").unwrap_err();
            assert!(err.to_string().starts_with("/sys/kernel/uevent_seqnum leads to the helper's /sys"), "{err}");
        }
    }

    /// A FIFO is neither waited on nor read or written: opening it would hang the helper.
    #[test]
    fn fifos_are_refused_for_data() {
        let (dir, g) = root();
        let fifo = CString::new(dir.path().join("etc/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for result in [g.read_to_string("/etc/fifo").map(drop), g.write("/etc/fifo", b"x"), g.truncate("/etc/fifo")] {
            let err = result.unwrap_err();
            assert!(err.to_string().starts_with("/etc/fifo is not a regular file or directory"), "{err}");
        }
    }

    #[test]
    fn resolve_stays_inside() {
        let (dir, g) = root();
        std::os::unix::fs::symlink("/", dir.path().join("boot")).unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(g.resolve("/boot").unwrap(), real);
        assert_eq!(g.resolve("/boot/etc").unwrap(), real.join("etc"));
        assert!(g.resolve("/missing").is_err());
    }
}
