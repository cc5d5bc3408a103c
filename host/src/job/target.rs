//! The disk `customize` works on: checked, its format read from its header, locked.

use crate::source::qcow2::MAGIC as QCOW2_MAGIC;
use crate::vm::cmdline::DiskFormat;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
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
    /// A qcow2 image that reads another file.
    #[error("disk {0} is a qcow2 image with a backing file, which could point at any host file: flatten it first (qemu-img convert -O qcow2)")]
    BackingFile(PathBuf),
    /// Another imgforge works on it.
    #[error("disk {0} is in use by another imgforge run (or another program holding a lock on it)")]
    Busy(PathBuf),
}

/// An opened, checked, locked disk. The lock lasts as long as this value.
pub struct Target {
    /// Its path.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Size in bytes (of the file or device).
    pub size: u64,
    /// Size of the disk it holds (a qcow2's virtual size).
    pub virtual_size: u64,
    _lock: std::fs::File,
}

/// Parses the format from the first bytes of a disk (pure).
pub fn format_from_header(header: &[u8]) -> (DiskFormat, bool) {
    if header.len() >= 32 && &header[..4] == QCOW2_MAGIC {
        let backing_offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        return (DiskFormat::Qcow2, backing_offset != 0);
    }
    (DiskFormat::Raw, false)
}

/// Opens, checks and locks `path`.
pub fn open(path: &Path) -> Result<Target, TargetError> {
    let err = |source| TargetError::Open { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(err)?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(TargetError::NotADisk(path.to_owned()));
    }
    let mut file = std::fs::File::open(path).map_err(err)?;
    let size = if ft.is_block_device() {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(err)?
    } else {
        meta.len()
    };
    if size == 0 {
        return Err(TargetError::Empty(path.to_owned()));
    }
    let mut header = [0u8; 512];
    let n = file.read(&mut header).map_err(err)?;
    let (format, backing) = format_from_header(&header[..n]);
    let virtual_size = match format {
        DiskFormat::Qcow2 => u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")),
        DiskFormat::Raw => size,
    };
    if backing {
        return Err(TargetError::BackingFile(path.to_owned()));
    }
    // SAFETY: valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(TargetError::Busy(path.to_owned()));
    }
    Ok(Target { path: path.to_owned(), format, size, virtual_size, _lock: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(QCOW2_MAGIC);
        assert_eq!(format_from_header(&q), (DiskFormat::Qcow2, false));
        q[15] = 0x30;
        assert_eq!(format_from_header(&q), (DiskFormat::Qcow2, true));
        assert_eq!(format_from_header(&[0u8; 512]), (DiskFormat::Raw, false));
        assert_eq!(format_from_header(b"QFI"), (DiskFormat::Raw, false));
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(open(dir.path()), Err(TargetError::NotADisk(_))));
        assert!(matches!(open(&dir.path().join("missing")), Err(TargetError::Open { .. })));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(open(&empty), Err(TargetError::Empty(_))));
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let held = open(&disk).unwrap();
        assert!(matches!(open(&disk), Err(TargetError::Busy(_))));
        drop(held);
        open(&disk).unwrap();
    }
}

#[cfg(test)]
mod properties {
    proptest::proptest! {
        #[test]
        fn qcow2_header_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut b = bytes;
            if b.len() >= 4 { b[..4].copy_from_slice(super::QCOW2_MAGIC); }
            let _ = super::format_from_header(&b);
        }
    }
}
