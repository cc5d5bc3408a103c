//! liveimg in, liveimg out (`deploy --target-format liveimg`): the filesystem image is taken
//! out of the squashfs into a temporary sparse file, customized there by the helper, and
//! repacked with backhand into a new squashfs with the source's compressor, block size and
//! layout. The output appears under its name only when complete.

use crate::exit::Failure;
use crate::source::SourceError;
use crate::write::LIVEIMG_ROOTFS;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A file removed when dropped (temporary rootfs, unfinished output).
pub struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the temporary files for `target` go: beside it, hidden, named for this process.
pub fn temp_beside(target: &Path, what: &str) -> PathBuf {
    let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.imgforge-{what}-{}", std::process::id()))
}

/// Checks the output can be created (before any work).
pub fn check_target(target: &Path, force: bool) -> Result<(), Failure> {
    if target.is_dir() {
        return Err(Failure::bad_input(format!("target {} is a directory", target.display())));
    }
    if target.exists() && !force {
        return Err(Failure::bad_input(format!(
            "target {} exists: pass --force to replace it with the new liveimg",
            target.display()
        )));
    }
    Ok(())
}

/// Repacks `source` with `rootfs` as its filesystem image into `target`; returns the time spent.
pub fn repack(source: &Path, rootfs: &Path, target: &Path) -> Result<Duration, Failure> {
    let started = Instant::now();
    let name = source.display().to_string();
    let file = std::fs::File::open(source).map_err(|e| SourceError::Io { name: name.clone(), source: e })?;
    let reader = backhand::FilesystemReader::from_reader(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| Failure::bad_input(format!("image {name} is not a readable squashfs: {e}")))?;
    let inner = crate::write::liveimg_rootfs(&reader)
        .map(|(p, _)| p)
        .ok_or_else(|| Failure::bad_input(format!("image {name} holds no {}", LIVEIMG_ROOTFS.join(" or "))))?;
    // Same compressor, options and block size as the source: from_fs_reader inherits them.
    let mut writer = backhand::FilesystemWriter::from_fs_reader(&reader)
        .map_err(|e| Failure::environment(format!("cannot prepare the new squashfs: {e}")))?;
    writer
        .replace_file_from_path(&inner, rootfs.to_owned())
        .map_err(|e| Failure::environment(format!("cannot replace {inner} in the new squashfs: {e}")))?;
    let out_path = temp_beside(target, "out");
    let out = TempPath(out_path.clone());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out_path)
        .map_err(|e| Failure::environment(format!("cannot create {}: {e}", out_path.display())))?;
    let mut w = BufWriter::with_capacity(4 << 20, file);
    writer
        .write(&mut w)
        .map_err(|e| Failure::environment(format!("cannot write the new liveimg {}: {e}", target.display())))?;
    let file = w.into_inner().map_err(|e| Failure::environment(format!("cannot write {}: {e}", out_path.display())))?;
    file.sync_all().map_err(|e| Failure::environment(format!("cannot flush {}: {e}", out_path.display())))?;
    std::fs::rename(&out.0, target)
        .map_err(|e| Failure::environment(format!("cannot rename the new liveimg to {}: {e}", target.display())))?;
    std::mem::forget(out);
    Ok(started.elapsed())
}
