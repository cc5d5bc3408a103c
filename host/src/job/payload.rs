//! The read-only payload disk: a squashfs (built with backhand) of uploaded files and scripts.

use crate::ops::{PayloadFile, TreeNodeKind};
use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use imgforge_protocol::rules::{BulkFile, Operation, BULK_ALIGN_BYTES};
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
    /// A file the helper VM reads in place (a single large upload: its own bulk disk) changed
    /// between planning and the end of the run: the guest may hold some other bytes.
    #[error("{} changed while the helper VM was reading it (its size, times or inode moved): nothing was written; upload it again once nothing writes to it", path.display())]
    Changed {
        /// The host file.
        path: PathBuf,
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

/// A tree file opened on first read, never through a symlink, and closed at its end: a large
/// `--copy-in` tree holds one descriptor at a time, and a file swapped for a symlink since the
/// tree was read is an error, not a way out of it.
struct NoFollowFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    done: bool,
}

impl NoFollowFile {
    fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), file: None, done: false }
    }
}

impl std::io::Read for NoFollowFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::OpenOptionsExt;
        if self.done {
            return Ok(0);
        }
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&self.path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
            self.file = Some(file);
        }
        let n = self.file.as_mut().map_or(Ok(0), |f| f.read(buf))?;
        if n == 0 && !buf.is_empty() {
            self.file = None;
            self.done = true;
        }
        Ok(n)
    }
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
        // Parents first: squashfs nodes go under an existing directory.
        let ancestors: Vec<&Path> = Path::new(&f.name).ancestors().skip(1).collect();
        for ancestor in ancestors.into_iter().rev() {
            if !ancestor.as_os_str().is_empty() && dirs.insert(ancestor.to_owned()) {
                fs.push_dir(ancestor, dir_header).map_err(|e| write_err(e.to_string()))?;
            }
        }
        match &f.tree {
            None => {
                let source = std::fs::File::open(&f.source)
                    .map_err(|source| PayloadError::Source { path: f.source.clone(), source })?;
                fs.push_file(source, &f.name, NodeHeader::new(0o644, 0, 0, 0)).map_err(|e| write_err(e.to_string()))?;
            }
            Some(node) => {
                let header = NodeHeader::new(node.mode, node.uid, node.gid, node.mtime);
                let pushed = match &node.kind {
                    TreeNodeKind::Dir => {
                        dirs.insert(PathBuf::from(&f.name));
                        fs.push_dir(&f.name, header)
                    }
                    TreeNodeKind::File => fs.push_file(NoFollowFile::new(&f.source), &f.name, header),
                    TreeNodeKind::Symlink(target) => fs.push_symlink(target.clone(), &f.name, header),
                };
                pushed.map_err(|e| write_err(e.to_string()))?;
            }
        }
    }
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| write_err(e.to_string()))?;
    fs.write(&mut out).map_err(|e| write_err(e.to_string()))?;
    let len = out.seek(SeekFrom::End(0)).map_err(|e| write_err(e.to_string()))?;
    // No fsync: the image is a scratch file that qemu reads at once and that is gone after the run.
    out.set_len(len.div_ceil(PAYLOAD_ALIGN_BYTES) * PAYLOAD_ALIGN_BYTES).map_err(|e| write_err(e.to_string()))
}

/// Files an operation copies into the guest go on the bulk disk from this size up: below it,
/// the squashfs's copy costs less than the O_DIRECT round trips (and a 1 MB upload keeps the
/// one-disk boot).
pub const BULK_MIN_BYTES: u64 = 1 << 20;

/// The payload files of `files` that `operations` (snf-image tasks' included) upload, and that
/// are at least [`BULK_MIN_BYTES`]: these go on the bulk disk, the rest on the squashfs.
pub fn bulk_candidates(files: &[PayloadFile], operations: &[Operation]) -> Vec<usize> {
    fn uploaded<'a>(ops: &'a [Operation], out: &mut std::collections::BTreeSet<&'a str>) {
        for op in ops {
            match op {
                Operation::Upload { payload_path, .. } => {
                    out.insert(payload_path);
                }
                Operation::Task { operations, .. } => uploaded(operations, out),
                _ => {}
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    uploaded(operations, &mut names);
    files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.tree.is_none() && names.contains(f.name.as_str()))
        .filter(|(_, f)| std::fs::metadata(&f.source).is_ok_and(|m| m.is_file() && m.len() >= BULK_MIN_BYTES))
        .map(|(i, _)| i)
        .collect()
}

/// What identifies one state of a host file: any write moves its size or change time (which
/// no unprivileged program sets), a replacement its device or inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl SourceStamp {
    /// The state of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// `file` as a bulk disk of its own, at offset 0 (qemu shows it a sector-rounded size, its last
/// sector padded with zeros; the helper reads up to its end), and the state of the file whose
/// length the helper is told: the helper reads it in place, during the run, so
/// [`check_unchanged`] after the run tells whether it read that state.
pub fn whole_file(file: &PayloadFile) -> Result<(BulkFile, SourceStamp), PayloadError> {
    let meta =
        std::fs::metadata(&file.source).map_err(|source| PayloadError::Source { path: file.source.clone(), source })?;
    Ok((BulkFile { payload_path: file.name.clone(), offset: 0, length: meta.len() }, SourceStamp::of(&meta)))
}

/// Fails if the file at `path` is no longer in the state `stamp` (from [`whole_file`]): qemu
/// pads a file that shrank with zeros and the helper copies only the planned length of one that
/// grew, so a changed file would reach the guest as bytes it never held, without an error.
pub fn check_unchanged(path: &Path, stamp: &SourceStamp) -> Result<(), PayloadError> {
    let meta = std::fs::metadata(path).map_err(|source| PayloadError::Source { path: path.to_owned(), source })?;
    if SourceStamp::of(&meta) != *stamp {
        return Err(PayloadError::Changed { path: path.to_owned() });
    }
    Ok(())
}

/// Builds the raw bulk disk at `path`: each of `files` at the next [`BULK_ALIGN_BYTES`] boundary
/// (copied by `copy_file_range`, a reflink on filesystems that share extents), the end padded
/// to one; returns where each lies.
pub fn build_bulk(files: &[PayloadFile], path: &Path) -> Result<Vec<BulkFile>, PayloadError> {
    let write_err = |reason: String| PayloadError::Write { path: path.to_owned(), reason };
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| write_err(e.to_string()))?;
    let mut placed = Vec::with_capacity(files.len());
    let mut offset = 0u64;
    for f in files {
        let mut source =
            std::fs::File::open(&f.source).map_err(|source| PayloadError::Source { path: f.source.clone(), source })?;
        out.seek(SeekFrom::Start(offset)).map_err(|e| write_err(e.to_string()))?;
        // std's copy between two files is copy_file_range: no bytes through this process.
        let length = std::io::copy(&mut source, &mut out)
            .map_err(|e| write_err(format!("copying {}: {e}", f.source.display())))?;
        placed.push(BulkFile { payload_path: f.name.clone(), offset, length });
        offset = (offset + length).next_multiple_of(BULK_ALIGN_BYTES);
    }
    // No fsync: a scratch file that qemu reads at once, gone after the run.
    out.set_len(offset.max(BULK_ALIGN_BYTES)).map_err(|e| write_err(e.to_string()))?;
    Ok(placed)
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
        build(&[PayloadFile { name: "files/0001-hello.txt".into(), source: src, tree: None }], &img).unwrap();
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
        build(&[PayloadFile { name: "files/text".into(), source: src, tree: None }], &img).unwrap();
        assert!(std::fs::metadata(&img).unwrap().len() > text.len() as u64, "stored, not compressed");
        let out = dir.path().join("out");
        let status = std::process::Command::new("unsquashfs").arg("-q").arg("-d").arg(&out).arg(&img).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read(out.join("files/text")).unwrap(), text);
    }

    /// A `--copy-in` tree keeps its types, modes, owners and times on the payload disk, as the
    /// kernel's squashfs reader (unsquashfs here) sees them.
    #[test]
    fn trees_keep_their_metadata() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tree");
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("sub/f"), "f").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.join("abs")).unwrap();
        std::os::unix::fs::chown(t.join("sub/f"), Some(1234), Some(4321)).unwrap();
        std::fs::set_permissions(t.join("sub/f"), std::os::unix::fs::PermissionsExt::from_mode(0o4711)).unwrap();
        let entries = crate::ops::copy_in::tree_entries(&t, "copy-in/0001").unwrap();
        let img = dir.path().join("payload.img");
        build(&entries, &img).unwrap();
        let out = dir.path().join("out");
        let status = std::process::Command::new("unsquashfs").arg("-q").arg("-d").arg(&out).arg(&img).status().unwrap();
        assert!(status.success());
        let f = std::fs::metadata(out.join("copy-in/0001/tree/sub/f")).unwrap();
        let orig = std::fs::metadata(t.join("sub/f")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.uid(), f.gid(), f.mtime()), (0o4711, 1234, 4321, orig.mtime()));
        assert_eq!(std::fs::read_link(out.join("copy-in/0001/tree/abs")).unwrap(), Path::new("/etc/passwd"));
    }

    /// Only uploads of at least BULK_MIN_BYTES go on the bulk disk, each at an aligned offset
    /// and readable there byte for byte.
    #[test]
    fn large_uploads_go_on_the_bulk_disk_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, len: usize| {
            let p = dir.path().join(name);
            std::fs::write(&p, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
            PayloadFile { name: format!("files/{name}"), source: p, tree: None }
        };
        let files = vec![
            file("small", 1000),
            file("big", BULK_MIN_BYTES as usize + 3),
            file("script", 2 << 20),
            file("odd", BULK_MIN_BYTES as usize * 2 + 511),
        ];
        let upload = |p: &str| Operation::Upload {
            payload_path: p.into(),
            guest_path: "/opt/".into(),
            file_name: "x".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let task = Operation::Task { name: "FilesystemResize".into(), operations: vec![upload("files/odd")] };
        let ops = vec![upload("files/small"), upload("files/big"), task];
        let picked = bulk_candidates(&files, &ops);
        assert_eq!(picked, vec![1, 3], "small files and files no upload names stay on the squashfs");
        let chosen: Vec<PayloadFile> = picked.iter().map(|&i| files[i].clone()).collect();
        let img = dir.path().join("bulk.img");
        let placed = build_bulk(&chosen, &img).unwrap();
        let disk = std::fs::read(&img).unwrap();
        assert_eq!(disk.len() as u64 % BULK_ALIGN_BYTES, 0);
        for (p, f) in placed.iter().zip(&chosen) {
            assert_eq!(p.payload_path, f.name);
            assert_eq!(p.offset % BULK_ALIGN_BYTES, 0);
            let want = std::fs::read(&f.source).unwrap();
            assert_eq!(&disk[p.offset as usize..(p.offset + p.length) as usize], &want[..]);
        }
    }

    /// A single large upload read in place: a file that shrank, grew, was rewritten at the
    /// same size or replaced since planning is refused; one left alone passes.
    #[test]
    fn a_bulk_source_changed_since_planning_is_refused() {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let fresh = |len: usize| {
            std::fs::write(&p, vec![7u8; len]).unwrap();
            let f = PayloadFile { name: "files/0001-big".into(), source: p.clone(), tree: None };
            whole_file(&f).unwrap().1
        };
        let stamp = fresh(3 << 20);
        check_unchanged(&p, &stamp).unwrap();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(1 << 20).unwrap();
        assert!(matches!(check_unchanged(&p, &stamp), Err(PayloadError::Changed { .. })), "shrunk");
        let stamp = fresh(3 << 20);
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"more").unwrap();
        assert!(matches!(check_unchanged(&p, &stamp), Err(PayloadError::Changed { .. })), "grown");
        let stamp = fresh(3 << 20);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all_at(b"x", 5).unwrap();
        assert!(matches!(check_unchanged(&p, &stamp), Err(PayloadError::Changed { .. })), "rewritten in place");
        let stamp = fresh(3 << 20);
        let other = dir.path().join("other");
        std::fs::write(&other, vec![7u8; 3 << 20]).unwrap();
        std::fs::rename(&other, &p).unwrap();
        assert!(matches!(check_unchanged(&p, &stamp), Err(PayloadError::Changed { .. })), "replaced");
    }

    #[test]
    fn missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(
            &[PayloadFile { name: "f".into(), source: "/nonexistent/x".into(), tree: None }],
            &dir.path().join("p"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }
}
