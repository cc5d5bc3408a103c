//! The disk a helper run works on (`customize`, `verify`, Ganeti's `create` and `rename`):
//! checked, its format read from its header only when the caller does not know it, held.
//!
//! Held means: a block device is opened with `O_EXCL` (the kernel refuses it while mounted or
//! claimed by another exclusive opener, and refuses mounting it while imgforge runs), and any
//! disk is `flock`ed against another imgforge; both last as long as the [`Target`]. A qcow2
//! passes [`crate::source::qcow2::check`], the check every qcow2 opener runs.

use crate::source::qcow2::{self, Backing, Qcow2Error, MAGIC as QCOW2_MAGIC};
use crate::vm::cmdline::DiskFormat;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the disk cannot be customized.
#[derive(Debug, Error)]
pub enum TargetError {
    /// Missing or unreadable.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The disk.
        path: PathBuf,
        /// The I/O error opening or reading it.
        source: std::io::Error,
    },
    /// A directory, socket, ...
    #[error("disk {0} is not a regular file or block device")]
    NotADisk(PathBuf),
    /// Zero bytes.
    #[error("disk {0} is empty")]
    Empty(PathBuf),
    /// A qcow2 image imgforge does not open (it names other files, or is corrupt).
    #[error("disk {path} is refused: {source}")]
    Qcow2 {
        /// The disk.
        path: PathBuf,
        /// What the qcow2 check found.
        source: Qcow2Error,
    },
    /// Another imgforge works on it.
    #[error("disk {0} is in use by another imgforge run (or another program holding a lock on it)")]
    Busy(PathBuf),
    /// A block device that is mounted or claimed by another program.
    #[error("disk {0} is in use (mounted, or held by another program): unmount it first")]
    DeviceBusy(PathBuf),
}

/// How the disk's format is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownFormat {
    /// From its header: a disk the user named (`customize -a`, `verify`).
    FromHeader,
    /// Given: a disk whose bytes belong to a guest (what `write` wrote, a Ganeti disk) is
    /// raw whatever they look like.
    Given(DiskFormat),
}

/// An opened, checked, held disk. The hold lasts as long as this value.
pub struct Target {
    /// Its path.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Size in bytes (of the file or device).
    pub size: u64,
    /// Size of the disk it holds (a qcow2's virtual size).
    pub virtual_size: u64,
    _held: std::fs::File,
}

/// The format the first bytes of a disk say (pure).
pub fn format_from_header(header: &[u8]) -> DiskFormat {
    if header.starts_with(QCOW2_MAGIC) {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// Opens `path` read-only, exclusively when it is a block device.
fn open_held(path: &Path, is_device: bool) -> Result<std::fs::File, TargetError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if is_device {
        options.custom_flags(libc::O_EXCL);
    }
    options.open(path).map_err(|source| match source.raw_os_error() {
        Some(libc::EBUSY) if is_device => TargetError::DeviceBusy(path.to_owned()),
        _ => TargetError::Open { path: path.to_owned(), source },
    })
}

/// Opens, checks and holds `path` for writing: no other imgforge run may use it meanwhile.
pub fn open(path: &Path, known: KnownFormat) -> Result<Target, TargetError> {
    open_locked(path, known, libc::LOCK_EX)
}

/// Opens, checks and holds `path` as a base only read (the variants' base): other runs may read
/// it too, none may write it meanwhile.
pub fn open_shared(path: &Path, known: KnownFormat) -> Result<Target, TargetError> {
    open_locked(path, known, libc::LOCK_SH)
}

fn open_locked(path: &Path, known: KnownFormat, lock: libc::c_int) -> Result<Target, TargetError> {
    let err = |source| TargetError::Open { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(err)?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(TargetError::NotADisk(path.to_owned()));
    }
    let mut file = open_held(path, ft.is_block_device())?;
    let size = if ft.is_block_device() {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(err)?
    } else {
        meta.len()
    };
    if size == 0 {
        return Err(TargetError::Empty(path.to_owned()));
    }
    let format = match known {
        KnownFormat::Given(format) => format,
        KnownFormat::FromHeader => {
            let mut magic = [0u8; 4];
            let n = file.read_at(&mut magic, 0).map_err(err)?;
            format_from_header(&magic[..n])
        }
    };
    let virtual_size = match format {
        DiskFormat::Qcow2 => {
            qcow2::check(&file, size, Backing::Refused)
                .map_err(|source| TargetError::Qcow2 { path: path.to_owned(), source })?
                .size
        }
        DiskFormat::Raw => size,
    };
    // SAFETY: valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        return Err(TargetError::Busy(path.to_owned()));
    }
    Ok(Target { path: path.to_owned(), format, size, virtual_size, _held: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(QCOW2_MAGIC);
        assert_eq!(format_from_header(&q), DiskFormat::Qcow2);
        assert_eq!(format_from_header(&[0u8; 512]), DiskFormat::Raw);
        assert_eq!(format_from_header(b"QFI"), DiskFormat::Raw);
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(open(dir.path(), KnownFormat::FromHeader), Err(TargetError::NotADisk(_))));
        assert!(matches!(open(&dir.path().join("missing"), KnownFormat::FromHeader), Err(TargetError::Open { .. })));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(open(&empty, KnownFormat::FromHeader), Err(TargetError::Empty(_))));
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let held = open(&disk, KnownFormat::FromHeader).unwrap();
        assert!(matches!(open(&disk, KnownFormat::FromHeader), Err(TargetError::Busy(_))));
        assert!(matches!(open_shared(&disk, KnownFormat::FromHeader), Err(TargetError::Busy(_))));
        drop(held);
        open(&disk, KnownFormat::FromHeader).unwrap();
    }

    /// A base is read by any number of builds at once, and written by none meanwhile.
    #[test]
    fn bases_are_shared_among_readers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let first = open_shared(&disk, KnownFormat::FromHeader).unwrap();
        let second = open_shared(&disk, KnownFormat::FromHeader).unwrap();
        assert!(matches!(open(&disk, KnownFormat::FromHeader), Err(TargetError::Busy(_))));
        drop((first, second));
        open(&disk, KnownFormat::FromHeader).unwrap();
    }

    /// A guest that writes a qcow2 header at sector 0 of its raw disk still has a raw disk.
    #[test]
    fn a_given_format_is_never_sniffed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        std::fs::write(&disk, &bytes).unwrap();
        let t = open(&disk, KnownFormat::Given(DiskFormat::Raw)).unwrap();
        assert_eq!((t.format, t.virtual_size), (DiskFormat::Raw, 1 << 20));
        drop(t);
        let err = open(&disk, KnownFormat::FromHeader).err().expect("sniffed as a bad qcow2");
        assert!(matches!(err, TargetError::Qcow2 { .. }), "{err}");
    }

    /// A qcow2 whose data lives in a host file is refused before any qemu sees it.
    #[test]
    fn a_qcow2_naming_a_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host-file");
        std::fs::write(&host, vec![b's'; 1 << 20]).unwrap();
        let disk = dir.path().join("evil.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", host.display()))
            .arg(&disk)
            .arg("1M")
            .status()
            .expect("qemu-utils is installed");
        assert!(made.success());
        let err = open(&disk, KnownFormat::FromHeader).err().expect("refused");
        assert!(matches!(err, TargetError::Qcow2 { source: Qcow2Error::DataFile, .. }), "{err}");
        assert!(err.to_string().contains("evil.qcow2"), "{err}");
    }
}
