//! `imgforge write`: any supported source onto a block device or file, streamed with direct I/O.

use crate::progress::{Event, ImageInfo, Progress};
use crate::source::squashfs_blocks::ParallelFile;
use crate::source::{self, http, Format, Location, SourceError};
use crate::stream::destination::{Destination, DestinationError, DestinationOptions};
use crate::stream::{self, StreamError, StreamOptions};
use sha2::{Digest, Sha256};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Names of the filesystem image inside a liveimg, in order of preference.
pub const LIVEIMG_ROOTFS: &[&str] = &["/LiveOS/rootfs.img", "/LiveOS/ext3fs.img"];

/// What to write where.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// The source.
    pub image: Location,
    /// The destination.
    pub target: PathBuf,
    /// Write into an existing regular file.
    pub force: bool,
    /// Size of a new file target.
    pub size: Option<u64>,
    /// Expected SHA-256 of the source (as given: the compressed file, the qcow2, ...).
    pub sha256: Option<String>,
    /// Check `sha256` over the whole source before the target is opened (a download is stored
    /// first, a file hashed first), so a mismatch leaves the target untouched; otherwise the
    /// check ends the stream, the target's first MiB held back until it passed.
    pub sha256_before_write: bool,
    /// A qcow2 backing file the user explicitly allows.
    pub backing_file: Option<PathBuf>,
    /// The qemu that reads qemu formats, and as whom.
    pub confinement: crate::vm::blockdev_qemu::Confinement,
    /// How long an http(s) source may take to connect and stay silent.
    pub http: http::HttpTimeouts,
    /// The addresses an http(s) source may connect to.
    pub reach: crate::source::reach::Reach,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Source format.
    pub format: Format,
    /// Bytes written (the raw image size).
    pub bytes: u64,
    /// True when the target now holds a bare filesystem (from a liveimg).
    pub bare_filesystem: bool,
}

/// Why an image could not be written.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The source cannot be read, or is not an image imgforge writes.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The target cannot be opened or prepared.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// Streaming failed, or was interrupted.
    #[error("{}", match .0 { StreamError::Cancelled => "interrupted; nothing was left behind".to_owned(), other => other.to_string() })]
    Stream(#[from] StreamError),
    /// The image decodes to garbage or ends early.
    #[error("image {name} ({format}) is truncated or corrupt: {source}")]
    Corrupt {
        /// The source.
        name: String,
        /// Its format's name.
        format: &'static str,
        /// The read error.
        source: std::io::Error,
    },
    /// `--sha256` does not match the source.
    #[error("image {name} does not match --sha256: expected {expected}, computed {actual}")]
    Sha256Mismatch {
        /// The source.
        name: String,
        /// What the user gave.
        expected: String,
        /// What the source hashes to.
        actual: String,
    },
    /// A download that needs random access cannot be stored.
    #[error("cannot {what} in {}: {source}", dir.display())]
    Download {
        /// `create a download file` or `store the download`.
        what: &'static str,
        /// Where.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A qemu-format image could not be opened in the confined qemu.
    #[error(transparent)]
    Qemu(#[from] crate::source::qemu::QemuSourceError),
}

/// A reader that feeds every byte into a shared SHA-256.
struct Hashing<R> {
    inner: R,
    hasher: Arc<Mutex<Sha256>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.lock().expect("hash lock").update(&buf[..n]);
        Ok(n)
    }
}

fn check_sha(name: &str, expected: &Option<String>, hasher: &Arc<Mutex<Sha256>>) -> Result<(), String> {
    let Some(expected) = expected else { return Ok(()) };
    let actual = hex::encode(hasher.lock().expect("hash lock").clone().finalize());
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(format!("image {name} does not match --sha256: expected {expected}, computed {actual}"))
    }
}

/// Hashes `file` from offset 0 with `pread`, so its position does not matter and the caller
/// goes on reading the same descriptor it verified.
pub fn sha256_of_file(file: &std::fs::File, name: &str, cancel: &AtomicBool) -> Result<String, WriteError> {
    use crate::file_digest::DigestError;
    crate::file_digest::sha256_of_file(file, cancel).map_err(|e| match e {
        DigestError::Cancelled => StreamError::Cancelled.into(),
        DigestError::Io(source) => SourceError::Io { name: name.to_owned(), source }.into(),
    })
}

/// Checks `--sha256` against a whole file first (formats read with random access).
fn verify_file_sha(
    file: &std::fs::File,
    name: &str,
    expected: &Option<String>,
    cancel: &AtomicBool,
) -> Result<(), WriteError> {
    let Some(expected) = expected else { return Ok(()) };
    let actual = sha256_of_file(file, name, cancel)?;
    if &actual != expected {
        return Err(WriteError::Sha256Mismatch { name: name.to_owned(), expected: expected.clone(), actual });
    }
    Ok(())
}

/// Checks a valid SHA-256 hex string (exit 2 otherwise).
pub fn check_sha256_arg(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!("{text:?} is not a SHA-256 (64 hex digits)"))
    }
}

/// Writes the image (blocking; run it off the async runtime).
pub fn write(req: &WriteRequest, progress: &dyn Progress, cancel: &AtomicBool) -> Result<Written, WriteError> {
    match &req.image {
        Location::Path(path) => write_path(req, path, progress, cancel),
        Location::Url(url) => write_url(req, url, progress, cancel),
    }
}

fn source_size(file: &std::fs::File, name: &str, meta: &std::fs::Metadata) -> Result<u64, WriteError> {
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let io = |source| SourceError::Io { name: name.to_owned(), source };
        let mut f = file;
        let size = f.seek(std::io::SeekFrom::End(0)).map_err(io)?;
        f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        return Ok(size);
    }
    Ok(meta.len())
}

fn stream_options<'a>(
    name: String,
    expected: Option<u64>,
    progress: &'a (dyn Fn(u64, Option<u64>) + Sync),
    cancel: &'a AtomicBool,
) -> StreamOptions<'a> {
    StreamOptions { source_name: name, expected_size: expected, progress, cancel }
}

fn write_path(
    req: &WriteRequest,
    path: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    write_opened(req, path, source::open_local(path)?, progress, cancel)
}

/// Writes the image at `path`, already open as `image`: every read below, hash included, goes
/// through that one descriptor, never through the path again.
fn write_opened(
    req: &WriteRequest,
    path: &Path,
    image: source::LocalImage,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let name = path.display().to_string();
    let source::LocalImage { file, meta, header } = image;
    if req.sha256_before_write && req.sha256.is_some() {
        verify_file_sha(&file, &name, &req.sha256, cancel)?;
        let verified = WriteRequest { sha256: None, ..req.clone() };
        return write_opened(&verified, path, source::LocalImage { file, meta, header }, progress, cancel);
    }
    if source::is_vmdk_descriptor(&header) {
        return Err(SourceError::Unsupported {
            name,
            reason: "a VMDK descriptor names other files: convert it to a single-file image first".into(),
        }
        .into());
    }
    let format = source::detect(&header);
    let report = |p: u64, t: Option<u64>| progress.emit(Event::copy_progress(p, t));
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    match format {
        Format::Raw => {
            let size = source_size(&file, &name, &meta)?;
            progress.emit(ImageInfo::source(&name, "raw", Some(size), &req.target).into());
            let dest = open_destination(req, Some(size), Some(path))?;
            let opts = stream_options(name.clone(), Some(size), &report, cancel);
            let stats = if req.sha256.is_some() {
                let mut r = stream::Stream(Hashing { inner: file, hasher: hasher.clone() });
                stream::copy_verified(&mut r, dest, &opts, &|| check_sha(&name, &req.sha256, &hasher))?
            } else {
                let mut r = stream::prefetch::raw(file, size, &name)
                    .map_err(|source| SourceError::Io { name: name.clone(), source })?;
                stream::copy(&mut r, dest, &opts)?
            };
            Ok(Written { format, bytes: stats.bytes, bare_filesystem: false })
        }
        Format::Gzip | Format::Xz | Format::Zstd => {
            let size = crate::source::decompress::uncompressed_size_of(format, &file);
            progress.emit(ImageInfo::source(&name, format.name(), size, &req.target).into());
            let dest = open_destination(req, size, Some(path))?;
            if format == Format::Xz && req.sha256.is_none() {
                let threads = std::thread::available_parallelism().map_or(1, usize::from);
                let parallel = file
                    .try_clone()
                    .map_err(|e| e.to_string())
                    .and_then(|f| crate::source::xz_blocks::ParallelXz::new(f, meta.len(), threads));
                match parallel {
                    Ok(mut r) => {
                        let opts = stream_options(name.clone(), size, &report, cancel);
                        let stats = stream::copy(&mut r, dest, &opts).map_err(|e| decode_failure(e, &name, format))?;
                        return Ok(Written { format, bytes: stats.bytes, bare_filesystem: false });
                    }
                    Err(why) => tracing::info!("{name} is decoded on one thread: {why}"),
                }
            }
            let mut r = stream::Stream(crate::source::decompress::decompressor(
                format,
                Hashing { inner: file, hasher: hasher.clone() },
            ));
            let opts = stream_options(name.clone(), size, &report, cancel);
            let stats = stream::copy_verified(&mut r, dest, &opts, &|| check_sha(&name, &req.sha256, &hasher))
                .map_err(|e| decode_failure(e, &name, format))?;
            Ok(Written { format, bytes: stats.bytes, bare_filesystem: false })
        }
        Format::Qemu(qemu_format) => {
            verify_file_sha(&file, &name, &req.sha256, cancel)?;
            if qemu_format == "qcow2" && req.backing_file.is_none() {
                match crate::source::qcow2_reader::plan(&file, meta.len()) {
                    Ok(plan) => return write_qcow2_natively(req, path, file, meta.len(), plan, progress, cancel),
                    Err(why) => tracing::info!("{name} is read through a confined qemu: {why}"),
                }
            }
            let image =
                crate::source::qemu::open(&file, &name, qemu_format, req.backing_file.as_deref(), &req.confinement)?;
            drop(file);
            let size = image.info.virtual_size;
            progress.emit(ImageInfo::source(&name, qemu_format, Some(size), &req.target).into());
            let dest = open_destination(req, Some(size), Some(path))?;
            let interrupter = image.interrupter().ok();
            let mut r = image.into_reader();
            let opts = stream_options(name.clone(), Some(size), &report, cancel);
            // A read blocked on a hung qemu returns when its socket is shut down.
            let shutdown = move || drop(interrupter.map(|s| s.shutdown(std::net::Shutdown::Both)));
            let stats = crate::cancel::watch(cancel, shutdown, || stream::copy(&mut r, dest, &opts)).map_err(|e| {
                if cancel.load(Ordering::Relaxed) {
                    as_interrupted(e.into())
                } else {
                    decode_failure(e, &name, format)
                }
            })?;
            Ok(Written { format, bytes: stats.bytes, bare_filesystem: false })
        }
        Format::Squashfs => {
            verify_file_sha(&file, &name, &req.sha256, cancel)?;
            write_liveimg(req, path, file, progress, cancel)
        }
    }
}

/// Writes a qcow2 image read in Rust ([`crate::source::qcow2_reader`]), `len` bytes long.
fn write_qcow2_natively(
    req: &WriteRequest,
    path: &Path,
    file: std::fs::File,
    len: u64,
    plan: crate::source::qcow2_reader::Qcow2Plan,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let format = Format::Qemu("qcow2");
    let name = &path.display().to_string();
    let size = plan.size();
    progress.emit(ImageInfo::source(name, "qcow2", Some(size), &req.target).into());
    let dest = open_destination(req, Some(size), Some(path))?;
    let report = |p: u64, t: Option<u64>| progress.emit(Event::copy_progress(p, t));
    let opts = stream_options(name.to_owned(), Some(size), &report, cancel);
    let mut r = stream::prefetch::Prefetch::new(stream::prefetch::SourceFile::new(file, len, name), Box::new(plan));
    let stats = stream::copy(&mut r, dest, &opts).map_err(|e| decode_failure(e, name, format))?;
    Ok(Written { format, bytes: stats.bytes, bare_filesystem: false })
}

fn decode_failure(e: StreamError, name: &str, format: Format) -> WriteError {
    match e {
        StreamError::Read { source, .. } => {
            WriteError::Corrupt { name: name.to_owned(), format: format.name(), source }
        }
        other => other.into(),
    }
}

fn open_destination(req: &WriteRequest, size: Option<u64>, source: Option<&Path>) -> Result<Destination, WriteError> {
    Ok(Destination::open(&req.target, size, source, &DestinationOptions { force: req.force, size: req.size })?)
}

/// The filesystem image inside a liveimg: its path and size.
pub fn liveimg_rootfs(fs: &backhand::FilesystemReader) -> Option<(String, u64)> {
    LIVEIMG_ROOTFS.iter().find_map(|want| {
        fs.files().find(|n| n.fullpath == Path::new(want)).and_then(|n| match &n.inner {
            backhand::InnerNode::File(f) => Some((want.to_string(), f.file_len() as u64)),
            _ => None,
        })
    })
}

fn open_squashfs(file: std::fs::File, name: &str) -> Result<backhand::FilesystemReader<'static>, WriteError> {
    crate::source::squashfs::open(BufReader::with_capacity(1 << 20, file)).map_err(|e| {
        SourceError::Unsupported { name: name.to_owned(), reason: format!("not a readable squashfs ({e})") }.into()
    })
}

fn write_liveimg(
    req: &WriteRequest,
    path: &Path,
    file: std::fs::File,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let name = path.display().to_string();
    let image_len = file.metadata().map_err(|e| SourceError::Io { name: name.clone(), source: e })?.len();
    // A second descriptor of the same file for the block decoders' preads (never the path).
    let blocks_image = file.try_clone().map_err(|e| SourceError::Io { name: name.clone(), source: e })?;
    let fs = open_squashfs(file, &name)?;
    let (inner, size) = liveimg_rootfs(&fs).ok_or_else(|| SourceError::Unsupported {
        name: name.clone(),
        reason: format!("a squashfs without {}: not a liveimg", LIVEIMG_ROOTFS.join(" or ")),
    })?;
    progress.emit(ImageInfo::source(&name, "liveimg", Some(size), &req.target).with_rootfs(&inner).into());
    let node = fs.files().find(|n| n.fullpath == Path::new(&inner)).expect("found above");
    let backhand::InnerNode::File(file) = &node.inner else { unreachable!("checked above") };
    let dest = open_destination(req, Some(size), Some(path))?;
    let report = |p: u64, t: Option<u64>| progress.emit(Event::copy_progress(p, t));
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut parallel = ParallelFile::new(&fs, file, blocks_image, image_len, threads);
    let mut plain;
    let r: &mut dyn stream::ChunkReader = match &mut parallel {
        Some(p) => p,
        None => {
            plain = stream::Stream(fs.file(file).reader());
            &mut plain
        }
    };
    let stats = stream::copy(r, dest, &stream_options(format!("{name}:{inner}"), Some(size), &report, cancel))
        .map_err(|e| decode_failure(e, &name, Format::Squashfs))?;
    Ok(Written { format: Format::Squashfs, bytes: stats.bytes, bare_filesystem: true })
}

/// How many bytes the target can take (None: a new file sized by the image).
fn target_room(req: &WriteRequest) -> Option<u64> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(&req.target) {
        Ok(m) if m.file_type().is_block_device() => {
            use std::io::Seek;
            std::fs::File::open(&req.target).and_then(|mut f| f.seek(std::io::SeekFrom::End(0))).ok()
        }
        Ok(m) if m.is_file() && req.force => Some(m.len()),
        Ok(_) => None,
        Err(_) => req.size,
    }
}

fn write_url(
    req: &WriteRequest,
    url: &str,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let client = http::Client::new(req.http, req.reach);
    let result = client.cancellable(cancel, || download_and_write(&client, req, url, progress, cancel));
    match result {
        // The cancel watcher closed the connection: the read error is the interrupt.
        Err(e) if cancel.load(Ordering::Relaxed) => Err(as_interrupted(e)),
        other => other,
    }
}

/// `e`, which came with the interrupt, as the interrupt: what it did to an existing target
/// (its start zeroed) is kept, not replaced by "nothing was left behind".
fn as_interrupted(e: WriteError) -> WriteError {
    match e {
        WriteError::Stream(StreamError::StartZeroed { target, .. }) => {
            StreamError::StartZeroed { target, source: Box::new(StreamError::Cancelled) }.into()
        }
        _ => StreamError::Cancelled.into(),
    }
}

fn download_and_write(
    client: &http::Client,
    req: &WriteRequest,
    url: &str,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let shown = http::redact(url);
    let room = target_room(req);
    let mut dl = client.get(url, cancel)?;
    let header = dl.peek(url)?;
    let format = source::detect(&header);
    // A qcow2 says how large a disk it is in its first bytes: no need to download the rest.
    if let (Some(need), Some(have)) = (source::declared_virtual_size(format, &header), room) {
        if need > have {
            return Err(DestinationError::TooSmall { path: req.target.clone(), have, need }.into());
        }
    }
    let limit = http::body_limit(format, &header, room);
    let too_large = || SourceError::TooLarge {
        name: shown.clone(),
        limit: limit.unwrap_or(u64::MAX),
        target: req.target.display().to_string(),
    };
    let length = dl.length;
    if let (Some(len), Some(limit)) = (length, limit) {
        if len > limit && format != Format::Raw {
            return Err(too_large().into());
        }
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let body: Box<dyn Read + Send> = match length {
        Some(len) => Box::new(source::Exact::new(dl.body, len, &shown)),
        None => Box::new(dl.body),
    };
    let body: Box<dyn Read + Send> = match limit {
        Some(limit) => Box::new(http::Bounded::new(body, limit, exceeded.clone())),
        None => body,
    };
    let result = write_body(req, body, (&shown, format, length), progress, cancel);
    if exceeded.load(Ordering::Relaxed) {
        return Err(too_large().into());
    }
    result
}

/// Writes a download's `body` (shown as `name`, of `format`, `length` bytes if announced).
fn write_body(
    req: &WriteRequest,
    body: Box<dyn Read + Send>,
    (name, format, length): (&str, Format, Option<u64>),
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let hashed = Hashing { inner: body, hasher: hasher.clone() };
    let streamed = matches!(format, Format::Raw | Format::Gzip | Format::Xz | Format::Zstd);
    match format {
        _ if streamed && !(req.sha256_before_write && req.sha256.is_some()) => {
            let size = if format == Format::Raw { length } else { None };
            progress.emit(ImageInfo::source(name, format.name(), size, &req.target).with_download_size(length).into());
            let dest = open_destination(req, size, None)?;
            let report = |p: u64, t: Option<u64>| progress.emit(Event::copy_progress(p, t));
            let mut r = stream::Stream(crate::source::decompress::decompressor(format, hashed));
            let stats =
                stream::copy_verified(&mut r, dest, &stream_options(name.to_owned(), size, &report, cancel), &|| {
                    check_sha(name, &req.sha256, &hasher)
                })
                .map_err(|e| decode_failure(e, name, format))?;
            Ok(Written { format, bytes: stats.bytes, bare_filesystem: false })
        }
        // qemu-img and squashfs need random access, and a checksum to be checked before the
        // target is touched the whole image: download first, next to the target.
        _ => {
            let dir = req
                .target
                .parent()
                .filter(|p| !p.as_os_str().is_empty() && p.is_dir())
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir);
            let dir = if crate::stream::destination::is_block_device(&req.target) { std::env::temp_dir() } else { dir };
            // Kept beside the target for its size (the temporary directory may be a small
            // tmpfs); what a killed imgforge left there goes first.
            crate::workdir::sweep_logged(&dir, crate::workdir::Reach::Files);
            let mut tmp = tempfile::Builder::new()
                .prefix(&crate::workdir::hidden_prefix("download"))
                .tempfile_in(&dir)
                .map_err(|source| WriteError::Download { what: "create a download file", dir: dir.clone(), source })?;
            let mut reader = hashed;
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(StreamError::Cancelled.into());
                }
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| SourceError::Http { url: name.to_owned(), reason: e.to_string() })?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(tmp.as_file_mut(), &buf[..n]).map_err(|source| WriteError::Download {
                    what: "store the download",
                    dir: dir.clone(),
                    source,
                })?;
                done += n as u64;
                progress.emit(Event::copy_progress(done, length));
            }
            check_sha(name, &req.sha256, &hasher).map_err(StreamError::Verify)?;
            // The very file that was hashed (its name sits in the target's directory, where its
            // owner may rename another file over it), opened again through the descriptor's
            // /proc link, read-only: qemu takes from an fdset only a descriptor whose access
            // mode matches its read-only open.
            let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(tmp.as_file()));
            let stored = std::fs::File::open(&link).map_err(|source| WriteError::Download {
                what: "reread the download",
                dir: dir.clone(),
                source,
            })?;
            let image = source::LocalImage::of(stored, &tmp.path().display().to_string())?;
            let local = WriteRequest { image: Location::Path(tmp.path().to_owned()), sha256: None, ..req.clone() };
            write_opened(&local, tmp.path(), image, progress, cancel).map_err(|e| named_after_url(e, name))
        }
    }
}

/// A refusal of a downloaded image names its URL, not the temporary file it was stored in.
fn named_after_url(e: WriteError, url: &str) -> WriteError {
    use crate::source::qemu::QemuSourceError;
    let rename = |source: SourceError| match source {
        SourceError::Unsupported { reason, .. } => SourceError::Unsupported { name: url.to_owned(), reason },
        other => other,
    };
    match e {
        WriteError::Source(source) => WriteError::Source(rename(source)),
        WriteError::Qemu(QemuSourceError::Image(source)) => WriteError::Qemu(QemuSourceError::Image(rename(source))),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets `cancel` at the first event: the interrupt comes once the target is open.
    struct InterruptAtOnce(Arc<AtomicBool>);

    impl Progress for InterruptAtOnce {
        fn emit(&self, _event: Event) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// A download written onto an existing file (or device) and interrupted fails saying its
    /// first MiB was zeroed (what it left), not "nothing was left behind".
    #[test]
    fn an_interrupted_download_onto_an_existing_target_says_what_it_left() {
        use std::io::Write;
        let image = vec![0x55u8; 2 << 20];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = image.clone();
        std::thread::spawn(move || {
            let Ok((mut conn, _)) = listener.accept() else { return };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&body));
        });
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("disk");
        std::fs::write(&target, vec![0xaau8; image.len()]).unwrap();
        let req = WriteRequest {
            image: Location::Url(format!("http://127.0.0.1:{port}/disk.img")),
            target: target.clone(),
            force: true,
            size: None,
            sha256: None,
            sha256_before_write: false,
            backing_file: None,
            confinement: crate::vm::blockdev_qemu::Confinement::default(),
            http: http::HttpTimeouts::default(),
            reach: crate::source::reach::Reach::Any,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let err = write(&req, &InterruptAtOnce(cancel.clone()), &cancel).unwrap_err();
        let now = std::fs::read(&target).unwrap();
        let untouched = now.iter().all(|b| *b == 0xaa);
        assert!(!untouched, "the existing target was not touched: nothing to report");
        assert!(
            !err.to_string().contains("nothing was left behind"),
            "the target's first MiB was zeroed ({} zero bytes at its start), yet: {err}",
            now.iter().take_while(|b| **b == 0).count()
        );
    }
}
