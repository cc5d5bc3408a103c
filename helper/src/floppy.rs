//! Reads the rules from the parameter floppy with fatfs: no vfat driver, no mount.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The floppy drive carrying the rules.
pub const FLOPPY_DEVICE: &str = "/dev/fd0";

/// A read-only view of the floppy; fatfs wants `Write` but must never use it here.
struct ReadOnly(File);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the parameter floppy is read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `struct floppy_drive_params` of `<linux/fd.h>` on x86-64, as raw bytes.
#[repr(C, align(8))]
struct DriveParams([u8; 128]);
/// FDGETDRVPRM and FDSETDRVPRM: `_IOR(2, 0x11, …)` and `_IOW(2, 0x90, …)` of that struct.
const FDGETDRVPRM: libc::c_ulong = 0x8080_0211;
const FDSETDRVPRM: libc::c_ulong = 0x4080_0290;
/// Offsets of `spinup` (jiffies, `unsigned long`) and `select_delay` (jiffies, `u8`).
const SPINUP_AT: usize = 40;
const SELECT_DELAY_AT: usize = 57;

/// Tells the floppy driver that the drive needs no time to spin up or be selected. It waits
/// half a second for the motor of a 1.44 MB drive before the first transfer, which was most of
/// the time spent reading the rules; qemu's drive has no motor. On failure the read is only
/// slower.
pub fn skip_spin_up(device: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: open the drive without looking at the medium.
    let drive = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(device)?;
    let mut params = DriveParams([0; 128]);
    // SAFETY: the ioctls read and write exactly one struct floppy_drive_params (128 bytes).
    unsafe {
        if libc::ioctl(drive.as_raw_fd(), FDGETDRVPRM, params.0.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        params.0[SPINUP_AT..SPINUP_AT + 8].fill(0);
        params.0[SELECT_DELAY_AT] = 0;
        if libc::ioctl(drive.as_raw_fd(), FDSETDRVPRM, params.0.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads the rules document from the FAT image at `device`.
pub fn read_rules(device: &Path) -> Result<String, String> {
    let file = File::open(device).map_err(|e| format!("cannot open the parameter floppy {}: {e}", device.display()))?;
    read_rules_from(file).map_err(|e| {
        format!(
            "cannot read {} from the parameter floppy {}: {e}",
            imgforge_protocol::RULES_FILE_NAME,
            device.display()
        )
    })
}

fn read_rules_from(file: File) -> io::Result<String> {
    let options = fatfs::FsOptions::new().update_accessed_date(false);
    let fs = fatfs::FileSystem::new(ReadOnly(file), options)?;
    let mut text = String::new();
    fs.root_dir().open_file(imgforge_protocol::RULES_FILE_NAME)?.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rules_written_by_fatfs() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1_474_560).unwrap();
        {
            let mut f = tmp.reopen().unwrap();
            fatfs::format_volume(&mut f, fatfs::FormatVolumeOptions::new()).unwrap();
            let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).unwrap();
            let mut out = fs.root_dir().create_file(imgforge_protocol::RULES_FILE_NAME).unwrap();
            out.write_all(b"{\"version\":1}").unwrap();
        }
        assert_eq!(read_rules(tmp.path()).unwrap(), "{\"version\":1}");
    }

    #[test]
    fn names_the_device_on_error() {
        let err = read_rules(Path::new("/nonexistent/fd0")).unwrap_err();
        assert!(err.contains("/nonexistent/fd0"), "{err}");
    }
}
