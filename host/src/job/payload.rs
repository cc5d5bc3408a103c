//! The read-only payload disk: a squashfs (built with backhand) of uploaded files and scripts.

use crate::ops::PayloadFile;
use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Payload images are padded to whole 4 KiB blocks for the virtio disk.
const PAYLOAD_ALIGN_BYTES: u64 = 4096;

/// Why the payload disk could not be built.
#[derive(Debug, Error)]
pub enum PayloadError {
    /// A host file vanished or became unreadable.
    #[error("cannot read {path} for the payload disk: {source}")]
    Source {
        /// The host file.
        path: PathBuf,
        /// The I/O error opening it.
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("cannot write the payload disk {path}: {reason}")]
    Write {
        /// The image.
        path: PathBuf,
        /// The squashfs writer's or the file's I/O error.
        reason: String,
    },
}

/// Builds the payload squashfs at `path` from `files`.
pub fn build(files: &[PayloadFile], path: &Path) -> Result<(), PayloadError> {
    let write_err = |reason: String| PayloadError::Write { path: path.to_owned(), reason };
    let mut fs = FilesystemWriter::default();
    // Blocks stored uncompressed (see STORE_ONLY); gzip is the compressor the superblock names.
    fs.set_kind(backhand::kind::Kind::new_v4_with_const(&crate::source::squashfs::STORE_ONLY, backhand::kind::LE_V4_0));
    fs.set_compressor(FilesystemCompressor::new(Compressor::Gzip, None).map_err(|e| write_err(e.to_string()))?);
    let dir_header = NodeHeader::new(0o755, 0, 0, 0);
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        for ancestor in Path::new(&f.name).ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() && dirs.insert(ancestor.to_owned()) {
                fs.push_dir(ancestor, dir_header).map_err(|e| write_err(e.to_string()))?;
            }
        }
        let source =
            std::fs::File::open(&f.source).map_err(|source| PayloadError::Source { path: f.source.clone(), source })?;
        fs.push_file(source, &f.name, NodeHeader::new(0o644, 0, 0, 0)).map_err(|e| write_err(e.to_string()))?;
    }
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| write_err(e.to_string()))?;
    fs.write(&mut out).map_err(|e| write_err(e.to_string()))?;
    let len = out.seek(SeekFrom::End(0)).map_err(|e| write_err(e.to_string()))?;
    // No fsync: the image is a scratch file that qemu reads at once and that is gone after the run.
    out.set_len(len.div_ceil(PAYLOAD_ALIGN_BYTES) * PAYLOAD_ALIGN_BYTES).map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("hello.txt");
        std::fs::write(&src, b"hello payload").unwrap();
        let img = dir.path().join("payload.img");
        build(&[PayloadFile { name: "files/0001-hello.txt".into(), source: src }], &img).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len() % PAYLOAD_ALIGN_BYTES, 0);
        let reader = std::io::BufReader::new(std::fs::File::open(&img).unwrap());
        let fs = backhand::FilesystemReader::from_reader(reader).unwrap();
        let node = fs.files().find(|n| n.fullpath == Path::new("/files/0001-hello.txt")).expect("file in payload");
        let backhand::InnerNode::File(file) = &node.inner else { panic!("not a file") };
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut fs.file(file).reader(), &mut data).unwrap();
        assert_eq!(data, b"hello payload");
    }

    /// Compressible data is stored as it is, and the kernel's reader (unsquashfs here) reads it.
    #[test]
    fn blocks_are_stored_uncompressed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("text");
        let text: Vec<u8> = b"compressible line\n".iter().copied().cycle().take(300_000).collect();
        std::fs::write(&src, &text).unwrap();
        let img = dir.path().join("payload.img");
        build(&[PayloadFile { name: "files/text".into(), source: src }], &img).unwrap();
        assert!(std::fs::metadata(&img).unwrap().len() > text.len() as u64, "stored, not compressed");
        let out = dir.path().join("out");
        let status = std::process::Command::new("unsquashfs").arg("-q").arg("-d").arg(&out).arg(&img).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read(out.join("files/text")).unwrap(), text);
    }

    #[test]
    fn missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&[PayloadFile { name: "f".into(), source: "/nonexistent/x".into() }], &dir.path().join("p"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }
}
