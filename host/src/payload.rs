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
        /// Why.
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("cannot write the payload disk {path}: {reason}")]
    Write {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Builds the payload squashfs at `path` from `files`.
pub fn build(files: &[PayloadFile], path: &Path) -> Result<(), PayloadError> {
    let write_err = |reason: String| PayloadError::Write { path: path.to_owned(), reason };
    let mut fs = FilesystemWriter::default();
    // Uploads are often compressed already (RPMs, tarballs): gzip is the cheap choice.
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
    out.set_len(len.div_ceil(PAYLOAD_ALIGN_BYTES) * PAYLOAD_ALIGN_BYTES).map_err(|e| write_err(e.to_string()))?;
    out.sync_all().map_err(|e| write_err(e.to_string()))
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

    #[test]
    fn missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&[PayloadFile { name: "f".into(), source: "/nonexistent/x".into() }], &dir.path().join("p"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }
}
