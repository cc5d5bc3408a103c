//! Image sources: a path or an http(s) URL, its format detected from content (never from the
//! name), opened for streaming.

// Image data decides lengths and offsets here: no silent truncation.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod decompress;
pub mod http;
pub mod liveimg;
pub mod nbd;
pub mod ordered_decode;
pub mod qcow2;
pub mod qcow2_reader;
pub mod qemu;
pub mod reach;
pub mod squashfs;
pub mod squashfs_blocks;
pub mod vmdk;
pub mod vpc;
pub mod xz_blocks;

use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// How many leading bytes format detection looks at.
pub const HEADER_BYTES: usize = 4096;

/// Formats imgforge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw disk or filesystem image.
    Raw,
    /// A format `qemu-img` converts, by its qemu name.
    Qemu(&'static str),
    /// gzip-compressed raw.
    Gzip,
    /// xz-compressed raw.
    Xz,
    /// zstd-compressed raw.
    Zstd,
    /// A squashfs: a liveimg when it holds `LiveOS/rootfs.img` or `LiveOS/ext3fs.img`.
    Squashfs,
}

impl Format {
    /// A short name for messages and `image-info`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qemu(n) => n,
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Squashfs => "liveimg",
        }
    }
}

/// Why a source cannot be used.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Cannot open or read.
    #[error("cannot read image {name}: {source}")]
    Io {
        /// The source.
        name: String,
        /// The I/O error from stat, open or read.
        source: std::io::Error,
    },
    /// Zero bytes.
    #[error("image {0} is empty")]
    Empty(String),
    /// A directory.
    #[error("image {0} is a directory")]
    Directory(String),
    /// Not a supported or safe image.
    #[error("image {name}: {reason}")]
    Unsupported {
        /// The source.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// HTTP trouble.
    #[error("cannot download {url}: {reason}")]
    Http {
        /// The URL, redacted.
        url: String,
        /// The HTTP client's error (request, status or body).
        reason: String,
    },
    /// A download larger than its target can hold.
    #[error("image {name}: the download passed {limit} bytes, more than the target {target} can take: use a larger target (or --size for a new file)")]
    TooLarge {
        /// The source, redacted.
        name: String,
        /// Bytes allowed.
        limit: u64,
        /// The target.
        target: String,
    },
}

/// Detects the format from the first bytes (pure).
pub fn detect(header: &[u8]) -> Format {
    let at = |offset: usize, magic: &[u8]| header.get(offset..offset + magic.len()) == Some(magic);
    if at(0, crate::source::qcow2::MAGIC) {
        return Format::Qemu(if header.get(7) == Some(&1) { "qcow" } else { "qcow2" });
    }
    if at(0, b"QED\0") {
        return Format::Qemu("qed");
    }
    if at(0, crate::source::vmdk::MAGIC) {
        return Format::Qemu("vmdk");
    }
    if at(0, b"vhdxfile") {
        return Format::Qemu("vhdx");
    }
    if at(0, crate::source::vpc::MAGIC) {
        return Format::Qemu("vpc");
    }
    if at(0x40, b"\x7f\x10\xda\xbe") {
        return Format::Qemu("vdi");
    }
    if at(0, b"\x1f\x8b") {
        return Format::Gzip;
    }
    if at(0, b"\xfd7zXZ\x00") {
        return Format::Xz;
    }
    if at(0, b"\x28\xb5\x2f\xfd") {
        return Format::Zstd;
    }
    if at(0, b"hsqs") {
        return Format::Squashfs;
    }
    Format::Raw
}

/// The cluster size a qcow2 header declares (log2 big-endian at byte 20), if sane; pure.
pub fn declared_cluster_bytes(format: Format, header: &[u8]) -> Option<u64> {
    match format {
        Format::Qemu("qcow2") => {
            imgforge_protocol::bytes::be32(header, 20).filter(|b| (9..=21).contains(b)).map(|b| 1 << b)
        }
        _ => None,
    }
}

/// The virtual disk size a qcow or qcow2 header declares (big-endian at byte 24); pure.
pub fn declared_virtual_size(format: Format, header: &[u8]) -> Option<u64> {
    match format {
        Format::Qemu("qcow2" | "qcow") => imgforge_protocol::bytes::be64(header, 24),
        _ => None,
    }
}

/// The bytes a squashfs occupies, from its superblock (little-endian at byte 40); pure.
pub fn squashfs_bytes_used(header: &[u8]) -> Option<u64> {
    imgforge_protocol::bytes::le64(header, 40)
}

/// True for text that a VMDK descriptor starts with (it names other files: refused).
pub fn is_vmdk_descriptor(header: &[u8]) -> bool {
    header.starts_with(b"# Disk DescriptorFile")
}

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file or block device.
    Path(PathBuf),
    /// An http(s) URL.
    Url(String),
}

impl Location {
    /// Parses the `--image` argument.
    pub fn parse(text: &str) -> Self {
        if text.starts_with("http://") || text.starts_with("https://") {
            Location::Url(text.to_owned())
        } else {
            Location::Path(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Url(u) => f.write_str(&http::redact(u)),
        }
    }
}

/// A local image opened once: the hash, the format detection and the decoding (qemu's fdset,
/// backhand) all read this one descriptor, so renaming another file over the path afterwards
/// changes nothing that is written.
pub struct LocalImage {
    /// The open image.
    pub file: std::fs::File,
    /// Its metadata, from the descriptor.
    pub meta: std::fs::Metadata,
    /// Its first bytes (up to [`HEADER_BYTES`]).
    pub header: Vec<u8>,
}

/// Opens a local image: its metadata and first bytes; refuses directories and empty files.
pub fn open_local(path: &Path) -> Result<LocalImage, SourceError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| SourceError::Io { name: name.clone(), source })?;
    LocalImage::of(file, &name)
}

impl LocalImage {
    /// The image open as `file` (shown as `name`), read from its start.
    pub fn of(file: std::fs::File, name: &str) -> Result<Self, SourceError> {
        use std::io::Seek;
        let io = |source| SourceError::Io { name: name.to_owned(), source };
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(SourceError::Directory(name.to_owned()));
        }
        let header = header_of(&file, name)?;
        // Sequential readers (raw, decompressors) start where the descriptor is.
        (&file).seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        Ok(LocalImage { file, meta, header })
    }
}

/// Reads up to [`HEADER_BYTES`] from the start of a file.
pub fn read_header(path: &Path) -> Result<Vec<u8>, SourceError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| SourceError::Io { name: name.clone(), source })?;
    header_of(&file, &name)
}

/// Reads up to [`HEADER_BYTES`] from offset 0 of `file` (its position does not matter).
fn header_of(file: &std::fs::File, name: &str) -> Result<Vec<u8>, SourceError> {
    use std::os::unix::fs::FileExt;
    let mut header = vec![0u8; HEADER_BYTES];
    let mut got = 0;
    while got < header.len() {
        match file.read_at(&mut header[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(SourceError::Io { name: name.to_owned(), source }),
        }
    }
    header.truncate(got);
    if header.is_empty() {
        return Err(SourceError::Empty(name.to_owned()));
    }
    Ok(header)
}

/// Reads exactly `expected` bytes from `inner`: fewer is a truncated download.
pub struct Exact<R> {
    inner: R,
    remaining: u64,
    url: String,
}

impl<R> Exact<R> {
    /// Wraps `inner`, which must deliver `expected` bytes; `name` is the source as shown.
    pub fn new(inner: R, expected: u64, name: &str) -> Self {
        Self { inner, remaining: expected, url: name.to_owned() }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} ended {} bytes before its Content-Length", self.url, self.remaining),
            ));
        }
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_table() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(b"\x7f\x10\xda\xbe");
        let mut qcow1 = b"QFI\xfb\0\0\0\x01".to_vec();
        qcow1.resize(512, 0);
        let cases: Vec<(Vec<u8>, Format)> = vec![
            (b"QFI\xfb\0\0\0\x03rest".to_vec(), Format::Qemu("qcow2")),
            (qcow1, Format::Qemu("qcow")),
            (b"KDMV\x01".to_vec(), Format::Qemu("vmdk")),
            (b"vhdxfile".to_vec(), Format::Qemu("vhdx")),
            (b"conectix".to_vec(), Format::Qemu("vpc")),
            (b"QED\0".to_vec(), Format::Qemu("qed")),
            (vdi, Format::Qemu("vdi")),
            (b"\x1f\x8b\x08".to_vec(), Format::Gzip),
            (b"\xfd7zXZ\x00\x00".to_vec(), Format::Xz),
            (b"\x28\xb5\x2f\xfd".to_vec(), Format::Zstd),
            (b"hsqs".to_vec(), Format::Squashfs),
            (vec![0u8; 512], Format::Raw),
            (b"QFI".to_vec(), Format::Raw),
            (b"\x1f".to_vec(), Format::Raw),
        ];
        for (header, want) in cases {
            assert_eq!(detect(&header), want, "{:?}", &header[..header.len().min(8)]);
        }
        assert!(is_vmdk_descriptor(b"# Disk DescriptorFile\nversion=1"));
    }

    #[test]
    fn declared_sizes() {
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(32, 0);
        qcow2[20..24].copy_from_slice(&16u32.to_be_bytes());
        qcow2[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        assert_eq!(declared_virtual_size(detect(&qcow2), &qcow2), Some(64 << 20));
        assert_eq!(declared_cluster_bytes(detect(&qcow2), &qcow2), Some(64 << 10));
        assert_eq!(declared_virtual_size(Format::Raw, &qcow2), None);
        assert_eq!(declared_virtual_size(Format::Qemu("qcow2"), &qcow2[..30]), None);
        qcow2[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(declared_cluster_bytes(Format::Qemu("qcow2"), &qcow2), None);
        let mut sq = b"hsqs".to_vec();
        sq.resize(48, 0);
        sq[40..48].copy_from_slice(&12345u64.to_le_bytes());
        assert_eq!(squashfs_bytes_used(&sq), Some(12345));
    }

    #[test]
    fn locations() {
        assert_eq!(Location::parse("https://x/y.img"), Location::Url("https://x/y.img".into()));
        assert_eq!(Location::parse("/srv/y.img"), Location::Path("/srv/y.img".into()));
        assert_eq!(Location::parse("ftp://x"), Location::Path("ftp://x".into()));
    }

    #[test]
    fn exact_reader_reports_short_bodies() {
        let mut r = Exact::new(&b"abc"[..], 5, "http://h/x");
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("2 bytes before"), "{err}");
        let mut ok = Exact::new(&b"abc"[..], 3, "u");
        out.clear();
        ok.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
    }

    proptest::proptest! {
        #[test]
        /// Detection looks at the header only: what follows it changes nothing.
        #[test]
        fn detection_depends_on_the_header_only(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut header = bytes;
            header.resize(HEADER_BYTES, 0);
            let format = detect(&header);
            proptest::prop_assert_eq!(detect(&[header, tail].concat()), format);
        }
    }
}
