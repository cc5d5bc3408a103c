//! liveimg in, liveimg out (`deploy --target-format liveimg`): the filesystem image is taken
//! out of the squashfs into a temporary sparse file, customized there by the helper, and
//! repacked with backhand into a new squashfs with the source's compressor, block size and
//! layout. The output appears under its name only when complete.

mod compressor;

use crate::job::write::LIVEIMG_ROOTFS;
use crate::source::SourceError;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a liveimg could not be made.
#[derive(Debug, Error)]
pub enum LiveimgError {
    /// The output cannot go where it was asked to.
    #[error("target {} {reason}", target.display())]
    Target {
        /// The output.
        target: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The source is not a liveimg that can be repacked.
    #[error("image {name} {reason}")]
    Source {
        /// The source.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The source cannot be read.
    #[error(transparent)]
    Read(#[from] SourceError),
    /// The source is a URL: repacking needs random access to a local file.
    #[error("--target-format liveimg reads a local liveimg; download {0} first")]
    Remote(String),
    /// The source is another kind of image.
    #[error("--target-format liveimg needs a liveimg source; {} is {format}", name.display())]
    NotALiveimg {
        /// The source.
        name: PathBuf,
        /// What it is.
        format: &'static str,
    },
    /// The new squashfs cannot be built or stored.
    #[error("cannot {what}: {reason}")]
    Repack {
        /// The step, naming the file.
        what: String,
        /// Why.
        reason: String,
    },
}

/// A file removed when dropped (temporary rootfs, unfinished output).
pub struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where the temporary files for `target` go: beside it, hidden, named for this process.
pub fn temp_beside(target: &Path, what: &str) -> PathBuf {
    crate::workdir::temp_beside(target, what, target.file_name().unwrap_or_default())
}

/// Checks the output can be created (before any work).
pub fn check_target(target: &Path, force: bool) -> Result<(), LiveimgError> {
    let refuse = |reason| Err(LiveimgError::Target { target: target.to_owned(), reason });
    if target.is_dir() {
        return refuse("is a directory");
    }
    if target.exists() && !force {
        return refuse("exists: pass --force to replace it with the new liveimg");
    }
    Ok(())
}

/// Repacks `source` with `rootfs` as its filesystem image into `target`; returns the time spent.
pub fn repack(source: &Path, rootfs: &Path, target: &Path) -> Result<Duration, LiveimgError> {
    let started = Instant::now();
    let name = source.display().to_string();
    let mut file = std::fs::File::open(source).map_err(|e| SourceError::Io { name: name.clone(), source: e })?;
    let mut head = vec![0u8; 128];
    let got =
        std::io::Read::read(&mut file, &mut head).map_err(|e| SourceError::Io { name: name.clone(), source: e })?;
    head.truncate(got);
    std::io::Seek::rewind(&mut file).map_err(|e| SourceError::Io { name: name.clone(), source: e })?;
    let reader = crate::source::squashfs::open(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| LiveimgError::Source { name: name.clone(), reason: format!("is not a readable squashfs: {e}") })?;
    let inner = crate::job::write::liveimg_rootfs(&reader).map(|(p, _)| p).ok_or_else(|| LiveimgError::Source {
        name: name.clone(),
        reason: format!("holds no {}", LIVEIMG_ROOTFS.join(" or ")),
    })?;
    // Same compressor, options and block size as the source: from_fs_reader inherits them.
    let mut writer = backhand::FilesystemWriter::from_fs_reader(&reader)
        .map_err(|e| LiveimgError::Repack { what: "prepare the new squashfs".into(), reason: e.to_string() })?;
    writer.replace_file_from_path(&inner, rootfs.to_owned()).map_err(|e| LiveimgError::Repack {
        what: format!("replace {inner} in the new squashfs"),
        reason: e.to_string(),
    })?;
    let parallel = compress_ahead(&reader, &mut writer, &head, rootfs);
    let out_path = temp_beside(target, "out");
    let out = TempPath(out_path.clone());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out_path)
        .map_err(|e| LiveimgError::Repack { what: format!("create {}", out_path.display()), reason: e.to_string() })?;
    let mut w = BufWriter::with_capacity(4 << 20, file);
    let written = writer.write(&mut w);
    if parallel {
        compressor::AHEAD.stop();
    }
    written.map_err(|e| LiveimgError::Repack {
        what: format!("write the new liveimg {}", target.display()),
        reason: e.to_string(),
    })?;
    let file = w
        .into_inner()
        .map_err(|e| LiveimgError::Repack { what: format!("write {}", out_path.display()), reason: e.to_string() })?;
    file.sync_all()
        .map_err(|e| LiveimgError::Repack { what: format!("flush {}", out_path.display()), reason: e.to_string() })?;
    std::fs::rename(&out.0, target).map_err(|e| LiveimgError::Repack {
        what: format!("rename the new liveimg to {}", target.display()),
        reason: e.to_string(),
    })?;
    std::mem::forget(out);
    Ok(started.elapsed())
}

/// Lets worker threads compress `rootfs`'s blocks ahead of `writer` (see [`compressor`]); false
/// when the source is not a little-endian squashfs 4.0 (then backhand compresses alone, as before).
fn compress_ahead(
    reader: &backhand::FilesystemReader,
    writer: &mut backhand::FilesystemWriter,
    source_head: &[u8],
    rootfs: &Path,
) -> bool {
    let codec = compressor::Codec::of_squashfs(source_head);
    let le_v4 = backhand::kind::Kind::from_const(backhand::kind::LE_V4_0).expect("backhand's own kind");
    let kind = &reader.kind;
    if kind.magic() != le_v4.magic() || (kind.version_major(), kind.version_minor()) != (4, 0) {
        return false;
    }
    let Some(id) = reader.compressor else { return false };
    let Ok(fc) = backhand::FilesystemCompressor::new(id.into(), reader.compression_options) else {
        return false;
    };
    if compressor::AHEAD.start(rootfs, codec, fc, reader.block_size).is_err() {
        return false;
    }
    writer.set_kind(backhand::kind::Kind::new_v4_with_const(&compressor::REPACK, backhand::kind::LE_V4_0));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().expect("squashfs-tools are installed by scripts/setup.sh");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The compressor lines of `unsquashfs -s` (compressor, its options, block size).
    fn settings(image: &Path) -> Vec<String> {
        let out = run(Command::new("unsquashfs").arg("-s").arg(image));
        let keep = |l: &&str| l.starts_with("Compression") || l.starts_with('\t') || l.starts_with("Block size");
        out.lines().filter(keep).map(str::to_owned).collect()
    }

    /// Repacks with blocks compressed ahead on worker threads (xz with BCJ, a non-default
    /// dictionary and block size; zero blocks, a short tail): the kernel's tools read back the
    /// new filesystem image byte for byte, and the compressor settings are the source's.
    #[test]
    fn repack_keeps_xz_settings_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("LiveOS")).unwrap();
        let text: Vec<u8> =
            (0..3_000_000u32).map(|i| b"imgforge liveimg\n"[(i % 17) as usize] ^ (i / 4096 % 7) as u8).collect();
        std::fs::write(tree.join("LiveOS/rootfs.img"), &text).unwrap();
        std::fs::write(tree.join("LiveOS/osmin.img"), b"other file").unwrap();
        let source = dir.path().join("live.img");
        run(Command::new("mksquashfs").arg(&tree).arg(&source).args([
            "-comp",
            "xz",
            "-Xbcj",
            "x86",
            "-Xdict-size",
            "50%",
            "-b",
            "65536",
            "-noappend",
            "-quiet",
            "-no-progress",
        ]));
        let mut changed = text.clone();
        changed[70_000..70_100].fill(b'#');
        changed[200_000..400_000].fill(0);
        changed.truncate(2_950_123);
        let rootfs = dir.path().join("rootfs.img");
        std::fs::write(&rootfs, &changed).unwrap();
        let target = dir.path().join("out.img");
        repack(&source, &rootfs, &target).map_err(|e| e.to_string()).unwrap();
        assert_eq!(settings(&target), settings(&source));
        assert!(settings(&target).iter().any(|l| l.contains("x86")), "{:?}", settings(&target));
        let cat = |name: &str| Command::new("unsquashfs").arg("-cat").arg(&target).arg(name).output().unwrap().stdout;
        assert!(cat("LiveOS/rootfs.img") == changed, "the repacked filesystem image differs");
        assert_eq!(cat("LiveOS/osmin.img"), b"other file");
    }
}
