//! The helper's own filesystems that stand inside the guest root while it is mounted: a fresh
//! procfs on the guest's `/proc`, sysfs on its `/sys`, the tmpfs and devpts of its `/dev`
//! (`confinement.rs`), there for the guest's confined programs. The helper's own operations on
//! guest files resolve paths inside the guest root, so a guest link such as
//! `/etc/x -> /proc/sysrq-trigger` leads into them: every object those operations open (and
//! every directory they create, remove or rename entries in) is checked here and refused when it
//! lies on one of them. virt-customize's appliance has nothing mounted there while it edits
//! files; for it such a link leads to the guest's empty directory, never to the appliance's
//! kernel.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Filesystem magic numbers (linux/magic.h) the libc crate does not name.
const BINFMTFS_MAGIC: u64 = 0x4249_4e4d;
const CONFIGFS_MAGIC: u64 = 0x6265_6570;
const EFIVARFS_MAGIC: u64 = 0xde5e_81e4;
const PSTOREFS_MAGIC: u64 = 0x6165_676c;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// The source name the guest's `/dev` tmpfs is mounted with (`confinement.rs`), which tells it
/// from any other tmpfs in `/proc/self/mountinfo`.
pub const GUEST_DEV_SOURCE: &str = "imgforge-dev";

/// Which of the helper's mounts an object lies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperMount {
    /// procfs (and binfmt_misc below it).
    Proc,
    /// sysfs and the filesystems mounted below it.
    Sys,
    /// The guest's `/dev` tmpfs, its devpts, or a devtmpfs.
    Dev,
}

impl fmt::Display for HelperMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Proc => "/proc",
            Self::Sys => "/sys",
            Self::Dev => "/dev",
        })
    }
}

/// A guest path that leads onto one of the helper's mounts: the operation is refused.
#[derive(Debug)]
pub struct Refused {
    /// The path as the operation was given it (or the name it reached there).
    pub shown: String,
    /// Where it leads.
    pub mount: HelperMount,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} leads to the helper's {} (mounted there for the guest's programs), not to the guest's disk: \
             nothing was done to it",
            self.shown, self.mount
        )
    }
}

impl std::error::Error for Refused {}

/// True if `e` is a [`Refused`].
pub fn is_refused(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Refused>())
}

/// Refuses `fd` when it lies on one of the helper's mounts; `shown` names it in the error.
pub fn refuse_helper_mount(fd: BorrowedFd<'_>, shown: &str) -> io::Result<()> {
    match helper_mount(fd)? {
        Some(mount) => Err(io::Error::new(io::ErrorKind::PermissionDenied, Refused { shown: shown.to_owned(), mount })),
        None => Ok(()),
    }
}

/// The same, and for a descriptor opened to read or write data, anything but a regular file or
/// a directory (a device node, FIFO or socket) is refused too: the guest's filesystems are
/// mounted `nodev`, so a device node that opens is the helper's.
pub fn refuse_for_data(fd: BorrowedFd<'_>, shown: &str) -> io::Result<()> {
    refuse_helper_mount(fd, shown)?;
    let kind = crate::copy::kind(&crate::copy::fstat(fd)?);
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Err(io::Error::other(format!(
            "{shown} is not a regular file or directory (a device node, FIFO, socket or link): its contents are \
             not read or written"
        )));
    }
    Ok(())
}

/// Which of the helper's mounts `fd` lies on, if any.
fn helper_mount(fd: BorrowedFd<'_>) -> io::Result<Option<HelperMount>> {
    // SAFETY: statfs is plain old data, filled in by fstatfs.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd (O_PATH ones included) and a writable statfs.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between C libraries.
    let magic = fs.f_type as u64;
    let st = crate::copy::fstat(fd)?;
    // Only a tmpfs needs the mount table: read it then, as it is now (the guest's /dev is
    // mounted by an earlier task, and a process may outlive a mount).
    let mountinfo = || std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    Ok(classify(magic, || helper_tmpfs(&mountinfo(), libc::major(st.st_dev), libc::minor(st.st_dev))))
}

/// What a filesystem magic says; `helper_tmpfs` answers for a tmpfs or ramfs (pure).
fn classify(magic: u64, helper_tmpfs: impl FnOnce() -> bool) -> Option<HelperMount> {
    #[allow(clippy::unnecessary_cast)] // the constants' types differ between targets.
    let known = |m: libc::c_long| m as u64 == magic;
    if known(libc::PROC_SUPER_MAGIC as _) || magic == BINFMTFS_MAGIC {
        Some(HelperMount::Proc)
    } else if known(libc::SYSFS_MAGIC as _)
        || known(libc::DEBUGFS_MAGIC as _)
        || known(libc::TRACEFS_MAGIC as _)
        || known(libc::SECURITYFS_MAGIC as _)
        || known(libc::CGROUP_SUPER_MAGIC as _)
        || known(libc::CGROUP2_SUPER_MAGIC as _)
        || known(libc::BPF_FS_MAGIC as _)
        || [CONFIGFS_MAGIC, EFIVARFS_MAGIC, PSTOREFS_MAGIC].contains(&magic)
    {
        Some(HelperMount::Sys)
    } else if known(libc::DEVPTS_SUPER_MAGIC as _)
        || ((known(libc::TMPFS_MAGIC as _) || magic == RAMFS_MAGIC) && helper_tmpfs())
    {
        Some(HelperMount::Dev)
    } else {
        None
    }
}

/// True if the `/proc/self/mountinfo` line of the filesystem `major:minor` says it is the
/// guest's `/dev` tmpfs or a devtmpfs (pure).
fn helper_tmpfs(mountinfo: &str, major: u32, minor: u32) -> bool {
    let dev = format!("{major}:{minor}");
    mountinfo.lines().any(|line| {
        // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        let mut fields = line.split(' ');
        if fields.nth(2) != Some(dev.as_str()) {
            return false;
        }
        let mut after = fields.skip_while(|f| *f != "-").skip(1);
        let (fstype, source) = (after.next(), after.next());
        fstype == Some("devtmpfs") || source == Some(GUEST_DEV_SOURCE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn filesystems_are_classified_by_magic() {
        #[allow(clippy::unnecessary_cast)]
        let cases: [(u64, bool, Option<HelperMount>); 9] = [
            (libc::PROC_SUPER_MAGIC as u64, false, Some(HelperMount::Proc)),
            (BINFMTFS_MAGIC, false, Some(HelperMount::Proc)),
            (libc::SYSFS_MAGIC as u64, false, Some(HelperMount::Sys)),
            (libc::CGROUP2_SUPER_MAGIC as u64, false, Some(HelperMount::Sys)),
            (libc::DEVPTS_SUPER_MAGIC as u64, false, Some(HelperMount::Dev)),
            (libc::TMPFS_MAGIC as u64, true, Some(HelperMount::Dev)),
            (libc::TMPFS_MAGIC as u64, false, None),
            (0xef53, true, None),       // ext4: the guest's disk, whatever the mount table says
            (0x5846_5342, false, None), // xfs
        ];
        for (magic, tmpfs, want) in cases {
            assert_eq!(classify(magic, || tmpfs), want, "{magic:#x}");
        }
    }

    #[test]
    fn the_guest_dev_tmpfs_and_devtmpfs_are_found_in_mountinfo() {
        let mountinfo = "\
22 1 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,size=100k
30 28 253:1 / /mnt/guest rw,nodev shared:1 - ext4 /dev/vda1 rw
31 30 0:27 / /mnt/guest/dev rw,nosuid,noexec shared:2 master:1 - tmpfs imgforge-dev rw,size=1024k,mode=755
32 30 0:28 / /mnt/guest/tmp rw - tmpfs tmpfs rw
33 30 0:29 / /mnt/guest/odd\\040name rw - tmpfs - rw
";
        let cases =
            [((0, 5), true), ((0, 27), true), ((0, 28), false), ((253, 1), false), ((0, 29), false), ((9, 9), false)];
        for ((major, minor), want) in cases {
            assert_eq!(helper_tmpfs(mountinfo, major, minor), want, "{major}:{minor}");
        }
        assert!(!helper_tmpfs("", 0, 27));
        assert!(!helper_tmpfs("garbage\n1 2\n", 0, 27));
    }

    /// The helper's procfs and sysfs are refused, naming the path and where it leads; a file
    /// of an ordinary filesystem is not.
    #[test]
    fn proc_and_sys_are_refused_and_ordinary_files_are_not() {
        for (path, mount) in [("/proc/self/status", HelperMount::Proc), ("/sys/kernel", HelperMount::Sys)] {
            let Ok(file) = std::fs::File::open(path) else { continue };
            let err = refuse_helper_mount(file.as_fd(), "/etc/link").unwrap_err();
            assert!(is_refused(&err), "{err}");
            assert_eq!(
                err.to_string(),
                format!(
                    "/etc/link leads to the helper's {mount} (mounted there for the guest's programs), not to the \
                     guest's disk: nothing was done to it"
                )
            );
        }
        let file = tempfile::tempfile().unwrap();
        refuse_helper_mount(file.as_fd(), "/etc/plain").unwrap();
        refuse_for_data(file.as_fd(), "/etc/plain").unwrap();
        assert!(!is_refused(&io::Error::other("other")));
    }

    #[test]
    fn fifos_and_device_nodes_are_refused_for_data() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = crate::confinement::path_cstring(&dir.path().join("fifo"));
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join("fifo")).unwrap();
        let err = refuse_for_data(file.as_fd(), "/etc/fifo-link").unwrap_err();
        assert!(err.to_string().starts_with("/etc/fifo-link is not a regular file or directory"), "{err}");
        // /dev/null: refused as a device node, or as the devtmpfs it lies on.
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(refuse_for_data(null.as_fd(), "/etc/null-link").is_err());
        refuse_for_data(std::fs::File::open(dir.path()).unwrap().as_fd(), "/etc").unwrap();
    }
}
