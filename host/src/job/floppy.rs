//! The parameter floppy: a FAT image holding the rules document, built with fatfs.

use imgforge_protocol::rules::Rules;
use imgforge_protocol::{FLOPPY_LABEL, RULES_FILE_NAME};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// A 3.5" high-density floppy, the size the helper's floppy driver probes for by default.
pub const FLOPPY_BYTES: u64 = 1_474_560;
/// Room FAT12 leaves for files on it (with margin for the FAT and root directory).
const MAX_RULES_BYTES: usize = 1_400_000;

/// Why the floppy could not be built.
#[derive(Debug, Error)]
pub enum FloppyError {
    /// The rules do not fit.
    #[error(
        "the rules are {0} bytes, more than a floppy holds: carry large contents with --upload instead of --write"
    )]
    TooLarge(usize),
    /// I/O on the image file.
    #[error("cannot write the parameter floppy {path}: {source}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The I/O error creating, formatting or writing it.
        source: std::io::Error,
    },
}

/// Writes a new floppy image at `path` holding `rules`.
pub fn build(rules: &Rules, path: &Path) -> Result<(), FloppyError> {
    let json = rules.to_json();
    if json.len() > MAX_RULES_BYTES {
        return Err(FloppyError::TooLarge(json.len()));
    }
    let io = |source| FloppyError::Io { path: path.to_owned(), source };
    // The rules hold password hashes: readable by root only (qemu gets a descriptor).
    let mut file =
        std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    file.set_len(FLOPPY_BYTES).map_err(io)?;
    let mut label = [b' '; 11];
    label[..FLOPPY_LABEL.len()].copy_from_slice(FLOPPY_LABEL.as_bytes());
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(label).fat_type(fatfs::FatType::Fat12),
    )
    .map_err(io)?;
    let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(io)?;
    let mut out = fs.root_dir().create_file(RULES_FILE_NAME).map_err(io)?;
    out.write_all(json.as_bytes()).map_err(io)?;
    out.flush().map_err(io)?;
    drop(out);
    fs.unmount().map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::Operation;
    use std::io::Read;

    #[test]
    fn rules_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("floppy.img");
        let mut rules = Rules::new();
        rules.operations.push(Operation::Hostname { name: "h".into() });
        build(&rules, &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), FLOPPY_BYTES);
        let fs = fatfs::FileSystem::new(std::fs::File::open(&path).unwrap(), fatfs::FsOptions::new());
        // fatfs wants a writable handle; reopen read-write for the check.
        drop(fs);
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        let mut text = String::new();
        fs.root_dir().open_file(RULES_FILE_NAME).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(Rules::from_json(&text).unwrap(), rules);
    }

    #[test]
    fn refuses_existing_file_and_oversized_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("floppy.img");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(build(&Rules::new(), &path), Err(FloppyError::Io { .. })));
        let mut rules = Rules::new();
        rules.operations.push(Operation::Write { path: "/x".into(), content: "x".repeat(MAX_RULES_BYTES) });
        assert!(matches!(build(&rules, &dir.path().join("f2")), Err(FloppyError::TooLarge(_))));
    }
}
