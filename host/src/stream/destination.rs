//! Where an image is written: a block device, an existing file (`--force`), or a new file that
//! appears under its name only when complete.

use super::buffer::ALIGN_BYTES;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a destination cannot be written.
#[derive(Debug, Error)]
pub enum DestinationError {
    /// Open/stat failed.
    #[error("cannot open target {path}: {source}")]
    Open {
        /// The target.
        path: PathBuf,
        /// The I/O error opening or sizing it.
        source: std::io::Error,
    },
    /// A directory or other non-disk.
    #[error("target {0} is neither a block device nor a regular file")]
    NotADisk(PathBuf),
    /// Exists, no --force.
    #[error("target {0} exists: pass --force to write into it in place (it is never truncated), or name a new file")]
    Exists(PathBuf),
    /// Mounted or opened exclusively by someone else.
    #[error("target {0} is in use (mounted, or held by another program): unmount it first")]
    Busy(PathBuf),
    /// Too small.
    #[error(
        "target {path} holds {have} bytes, the image needs {need}: use a larger target (or --size for a new file)"
    )]
    TooSmall {
        /// The target.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The image size.
        need: u64,
    },
    /// The target is the source.
    #[error("target {0} is the source image itself")]
    IsSource(PathBuf),
}

/// How a range the source holds as zeros is made zero on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// The target already reads back zeros there (a new sparse file): skip.
    Skip,
    /// Block device: BLKZEROOUT, which guarantees zeros.
    ZeroOut,
    /// Existing file: punch a hole (reads back zeros), writing zeros where that fails.
    Punch,
}

/// An opened destination.
pub struct Destination {
    /// The name the user gave.
    pub path: PathBuf,
    /// O_DIRECT descriptor when the filesystem allows it.
    pub direct: File,
    /// Buffered descriptor for unaligned tails and fallbacks.
    pub buffered: File,
    /// Bytes available.
    pub capacity: u64,
    /// How zero ranges are handled.
    pub zero_mode: ZeroMode,
    /// True for block devices.
    pub is_block_device: bool,
    /// Temporary name of a new file until [`Destination::commit`].
    temp: Option<PathBuf>,
}

/// Options for opening a destination.
#[derive(Debug, Clone, Default)]
pub struct DestinationOptions {
    /// Write into an existing regular file.
    pub force: bool,
    /// Size of a new file (default: the image size).
    pub size: Option<u64>,
}

/// True if `path` is a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKRRPART: libc::c_ulong = 0x125f;

fn open_direct(path: &Path, extra_flags: i32, create: bool) -> std::io::Result<(File, bool)> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true).mode(0o600);
    }
    match o.clone().custom_flags(libc::O_DIRECT | extra_flags).open(path) {
        Ok(f) => Ok((f, true)),
        // tmpfs and a few others have no O_DIRECT.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((o.custom_flags(extra_flags).open(path)?, false)),
        Err(e) => Err(e),
    }
}

impl Destination {
    /// Opens `path` for an image of `image_size` bytes (None: unknown until the end),
    /// refusing before a byte is written if it cannot hold it.
    pub fn open(
        path: &Path,
        image_size: Option<u64>,
        source: Option<&Path>,
        opts: &DestinationOptions,
    ) -> Result<Self, DestinationError> {
        let err = |source| DestinationError::Open { path: path.to_owned(), source };
        if let (Some(src), Ok(meta)) = (source, std::fs::metadata(path)) {
            if let Ok(src_meta) = std::fs::metadata(src) {
                if src_meta.dev() == meta.dev() && src_meta.ino() == meta.ino() {
                    return Err(DestinationError::IsSource(path.to_owned()));
                }
            }
        }
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::new_file(path, image_size, opts),
            Err(e) => Err(err(e)),
            Ok(meta) if meta.file_type().is_block_device() => {
                let (direct, _) = open_direct(path, libc::O_EXCL, false).map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) => DestinationError::Busy(path.to_owned()),
                    _ => err(e),
                })?;
                let mut capacity: u64 = 0;
                // SAFETY: valid fd and out-pointer.
                if unsafe { libc::ioctl(direct.as_raw_fd(), BLKGETSIZE64, &mut capacity) } != 0 {
                    return Err(err(std::io::Error::last_os_error()));
                }
                let buffered = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
                let dest = Self {
                    path: path.to_owned(),
                    direct,
                    buffered,
                    capacity,
                    zero_mode: ZeroMode::ZeroOut,
                    is_block_device: true,
                    temp: None,
                };
                dest.check_size(image_size)
            }
            Ok(meta) if meta.is_file() => {
                if !opts.force {
                    return Err(DestinationError::Exists(path.to_owned()));
                }
                let (direct, _) = open_direct(path, 0, false).map_err(err)?;
                let buffered = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
                let dest = Self {
                    path: path.to_owned(),
                    direct,
                    buffered,
                    capacity: meta.len(),
                    zero_mode: ZeroMode::Punch,
                    is_block_device: false,
                    temp: None,
                };
                dest.check_size(image_size)
            }
            Ok(_) => Err(DestinationError::NotADisk(path.to_owned())),
        }
    }

    fn check_size(self, image_size: Option<u64>) -> Result<Self, DestinationError> {
        match image_size {
            Some(need) if need > self.capacity => {
                Err(DestinationError::TooSmall { path: self.path.clone(), have: self.capacity, need })
            }
            _ => Ok(self),
        }
    }

    fn new_file(path: &Path, image_size: Option<u64>, opts: &DestinationOptions) -> Result<Self, DestinationError> {
        let err = |source| DestinationError::Open { path: path.to_owned(), source };
        let name = path.file_name().ok_or_else(|| DestinationError::NotADisk(path.to_owned()))?;
        let temp = crate::workdir::temp_beside(path, "new", name);
        let (direct, _) = open_direct(&temp, 0, true).map_err(err)?;
        let buffered = match std::fs::OpenOptions::new().read(true).write(true).open(&temp) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(err(e));
            }
        };
        let size = match (opts.size, image_size) {
            (Some(s), Some(need)) if s < need => {
                let _ = std::fs::remove_file(&temp);
                return Err(DestinationError::TooSmall { path: path.to_owned(), have: s, need });
            }
            (Some(s), _) => s,
            (None, Some(n)) => n,
            (None, None) => 0,
        };
        let dest = Self {
            path: path.to_owned(),
            direct,
            buffered,
            // A new file grows with the image, up to --size when one was given.
            capacity: opts.size.unwrap_or(u64::MAX),
            zero_mode: ZeroMode::Skip,
            is_block_device: false,
            temp: Some(temp),
        };
        dest.buffered.set_len(size).map_err(err)?;
        Ok(dest)
    }

    /// True if this is a new file (its size follows the image).
    pub fn is_new_file(&self) -> bool {
        self.temp.is_some()
    }

    /// The path being written now (a new file's temporary name until commit).
    pub fn write_path(&self) -> &Path {
        self.temp.as_deref().unwrap_or(&self.path)
    }

    /// True if writes go through O_DIRECT.
    pub fn is_direct(&self) -> bool {
        // SAFETY: valid fd.
        let flags = unsafe { libc::fcntl(self.direct.as_raw_fd(), libc::F_GETFL) };
        flags >= 0 && flags & libc::O_DIRECT != 0
    }

    /// Refuses a range past the end: a write there would grow a file target.
    fn check_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.capacity) {
            return Err(std::io::Error::other(format!(
                "refusing to write {len} bytes at offset {offset}: past the end of {} ({} bytes)",
                self.path.display(),
                self.capacity
            )));
        }
        Ok(())
    }

    /// Writes `data` at `offset`: through O_DIRECT for the aligned part, buffered for a tail.
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let aligned = data.len() / ALIGN_BYTES * ALIGN_BYTES;
        // O_DIRECT needs the memory, the offset and the length aligned.
        if aligned > 0
            && offset.is_multiple_of(ALIGN_BYTES as u64)
            && (data.as_ptr() as usize).is_multiple_of(ALIGN_BYTES)
        {
            self.direct.write_all_at(&data[..aligned], offset)?;
            if aligned < data.len() {
                self.buffered.write_all_at(&data[aligned..], offset + aligned as u64)?;
            }
            Ok(())
        } else {
            self.buffered.write_all_at(data, offset)
        }
    }

    /// Makes `[offset, offset+len)` read back as zeros.
    pub fn zero_range(&self, offset: u64, len: u64, zeros: &[u8]) -> std::io::Result<()> {
        self.check_range(offset, len)?;
        match self.zero_mode {
            ZeroMode::Skip => Ok(()),
            ZeroMode::ZeroOut => {
                let range: [u64; 2] = [offset, len];
                // SAFETY: valid fd and pointer to two u64.
                // SAFETY: BLKZEROOUT reads the two u64 of `range`, which outlives the call, on a
                // descriptor this value owns.
                let zeroed = || unsafe { libc::ioctl(self.direct.as_raw_fd(), BLKZEROOUT, &range) } == 0;
                if offset.is_multiple_of(512) && len.is_multiple_of(512) && zeroed() {
                    return Ok(());
                }
                self.write_zeros(offset, len, zeros)
            }
            ZeroMode::Punch => {
                // SAFETY: valid fd.
                let rc = unsafe {
                    libc::fallocate(
                        self.buffered.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as i64,
                        len as i64,
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
                self.write_zeros(offset, len, zeros)
            }
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64, zeros: &[u8]) -> std::io::Result<()> {
        let end = offset + len;
        while offset < end {
            let n = super::at_most(end - offset, zeros.len());
            self.write_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Flushes everything, writes `start` (the held-back first bytes) last and flushes again,
    /// re-reads a device's partition table, and gives a new file its name.
    pub fn commit(mut self, final_size: u64, start: Option<&[u8]>) -> std::io::Result<()> {
        let io_err = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{what} {}: {e}", self.path.display()))
        };
        if let Some(temp) = &self.temp {
            if self.buffered.metadata()?.len() < final_size {
                self.buffered.set_len(final_size).map_err(|e| io_err("cannot size", e))?;
            }
            let _ = temp;
        }
        self.direct.sync_all().map_err(|e| io_err("cannot flush", e))?;
        self.buffered.sync_all().map_err(|e| io_err("cannot flush", e))?;
        if let Some(start) = start {
            // Only once everything after it is on disk: a crash in between leaves zeros there.
            self.write_at(start, 0).map_err(|e| io_err("cannot write the first MiB of", e))?;
            self.direct.sync_all().map_err(|e| io_err("cannot flush", e))?;
            self.buffered.sync_all().map_err(|e| io_err("cannot flush", e))?;
        }
        if self.is_block_device {
            // SAFETY: valid fd. Fails harmlessly (EINVAL) on devices without partitions.
            unsafe { libc::ioctl(self.direct.as_raw_fd(), BLKRRPART) };
        }
        if let Some(temp) = self.temp.take() {
            rename_noreplace(&temp, &self.path).inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })?;
            if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        Ok(())
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        // Never leave a partial new file behind.
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Renames `from` to `to` unless `to` exists (never replaces what appeared meanwhile), then
/// flushes the directory so the name survives a crash.
pub fn publish(from: &Path, to: &Path) -> std::io::Result<()> {
    rename_noreplace(from, to)?;
    if let Some(dir) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("path contains NUL"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: NUL-terminated paths.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot rename the finished image to {}: {e}", to.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.img");
        let dest = Destination::open(&path, Some(8192), None, &DestinationOptions::default()).unwrap();
        dest.write_at(&[1u8; 4096], 0).unwrap();
        assert!(!path.exists());
        drop(dest);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary file left behind");

        let dest = Destination::open(&path, Some(8192), None, &DestinationOptions::default()).unwrap();
        dest.write_at(&[1u8; 5000], 0).unwrap();
        dest.commit(8192, None).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 8192);
        assert!(data[..5000].iter().all(|b| *b == 1) && data[5000..].iter().all(|b| *b == 0));
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("existing");
        std::fs::write(&existing, vec![7u8; 4096]).unwrap();
        let o = DestinationOptions::default();
        assert!(matches!(Destination::open(&existing, Some(10), None, &o), Err(DestinationError::Exists(_))));
        let force = DestinationOptions { force: true, size: None };
        assert!(matches!(
            Destination::open(&existing, Some(8192), None, &force),
            Err(DestinationError::TooSmall { .. })
        ));
        assert!(matches!(Destination::open(dir.path(), Some(1), None, &force), Err(DestinationError::NotADisk(_))));
        assert!(matches!(
            Destination::open(&existing, Some(1), Some(&existing), &force),
            Err(DestinationError::IsSource(_))
        ));
        let small = DestinationOptions { force: false, size: Some(10) };
        assert!(matches!(
            Destination::open(&dir.path().join("new"), Some(4096), None, &small),
            Err(DestinationError::TooSmall { .. })
        ));
        assert_eq!(std::fs::read(&existing).unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn punching_an_existing_file_reads_back_zero() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("existing");
        std::fs::write(&existing, vec![0xffu8; 3 * 4096]).unwrap();
        let dest = Destination::open(&existing, Some(3 * 4096), None, &DestinationOptions { force: true, size: None })
            .unwrap();
        dest.zero_range(4096, 4096, &[0u8; 4096]).unwrap();
        dest.commit(3 * 4096, None).unwrap();
        let data = std::fs::read(&existing).unwrap();
        assert_eq!(data.len(), 3 * 4096, "never truncated");
        assert!(data[4096..8192].iter().all(|b| *b == 0) && data[..4096].iter().all(|b| *b == 0xff));
    }
}
