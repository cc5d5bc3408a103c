//! Streaming an image onto a destination with direct I/O.
//!
//! One reader (this thread) fills page-aligned buffers; several writer threads `pwrite` them
//! with O_DIRECT, so reads and writes overlap and several writes are in flight. Ranges the
//! source holds as zeros (holes found with SEEK_DATA/SEEK_HOLE, or all-zero buffers) are
//! skipped where the destination already reads back zeros, zeroed with BLKZEROOUT on block
//! devices, and punched on existing files — never assumed.

// Image data decides lengths and offsets here: no silent truncation.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod buffer;
pub mod destination;
pub mod direct_read;
pub mod held_start;
pub mod prefetch;

use buffer::{is_zero, AlignedBuf};
use destination::Destination;
use held_start::HeldStart;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Bytes per buffer.
pub const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Writer threads (writes in flight).
pub const WRITERS: usize = 4;
/// Buffers in circulation: enough to keep every writer busy while the reader fills more.
pub const BUFFERS: usize = WRITERS * 2 + 2;
/// How often progress is reported.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Why streaming failed.
#[derive(Debug, Error)]
pub enum StreamError {
    /// Reading the source failed.
    #[error("reading {what}: {source}")]
    Read {
        /// The source.
        what: String,
        /// The error the source's reader returned.
        source: std::io::Error,
    },
    /// Writing the destination failed.
    #[error("writing {what}: {source}")]
    Write {
        /// The destination.
        what: String,
        /// The write, zeroing or commit error, or the image outgrowing the destination.
        source: std::io::Error,
    },
    /// The source ended early or ran long.
    #[error("{what} is truncated or corrupt: expected {expected} bytes, got {got}")]
    Length {
        /// The source.
        what: String,
        /// Size announced.
        expected: u64,
        /// Size read.
        got: u64,
    },
    /// The source holds more than the size it announced (its header or index lies).
    #[error("{what} is corrupt: it holds more than the {expected} bytes it announces; nothing was written past them")]
    Overrun {
        /// The source.
        what: String,
        /// Size announced.
        expected: u64,
    },
    /// The source holds more than the target can: refused before the byte that does not fit.
    #[error(
        "the image {what} is larger than target {target} ({capacity} bytes): nothing was written past its end; \
         use a larger target"
    )]
    TooLarge {
        /// The source.
        what: String,
        /// The target.
        target: String,
        /// The target's size.
        capacity: u64,
    },
    /// The final check before the destination is committed failed (e.g. --sha256).
    #[error("{0}")]
    Verify(String),
    /// Stopped on request.
    #[error("interrupted")]
    Cancelled,
    /// Streaming onto a device or existing file failed; its start was left zeroed.
    #[error("{source}; the first MiB of {target} was zeroed so it does not boot a partial image")]
    StartZeroed {
        /// The target.
        target: String,
        /// Why streaming failed.
        source: Box<StreamError>,
    },
}

impl StreamError {
    /// The failure itself, whatever was done to the target afterwards.
    pub fn cause(&self) -> &StreamError {
        match self {
            StreamError::StartZeroed { source, .. } => source.cause(),
            other => other,
        }
    }
}

/// `n`, but at most `limit`: how much of a `limit`-byte buffer a stretch of `n` bytes fills.
pub(crate) fn at_most(n: u64, limit: usize) -> usize {
    usize::try_from(n).map_or(limit, |n| n.min(limit))
}

/// Everything `reader` yields, holes as zeros: through buffers it may swap (`next_into`), or
/// through a plain slice (`next`) when `copied`. For the readers' tests.
#[cfg(test)]
pub(crate) fn read_back(reader: &mut dyn ChunkReader, copied: bool) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = AlignedBuf::new(CHUNK_BYTES);
    loop {
        let piece = if copied { reader.next(buf.as_mut_full())? } else { reader.next_into(&mut buf)? };
        match piece {
            Piece::End => return Ok(got),
            Piece::Hole(n) => got.resize(got.len() + usize::try_from(n).unwrap(), 0),
            Piece::Data(n) => got.extend_from_slice(&buf.as_mut_full()[..n]),
        }
    }
}

/// What the next stretch of the source is.
pub enum Piece {
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// The next `n` bytes are zero and were not read.
    Hole(u64),
    /// The source is exhausted.
    End,
}

/// A source of image bytes, read sequentially.
pub trait ChunkReader: Send {
    /// Fills `buf` (completely unless at the end) or reports a hole.
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece>;

    /// Like [`Self::next`], for a reader that fills buffers of its own ahead of the caller:
    /// it may swap the filled one with `buf` instead of copying.
    fn next_into(&mut self, buf: &mut AlignedBuf) -> std::io::Result<Piece> {
        self.next(buf.as_mut_full())
    }
}

/// How far ahead of its reads a [`RawFile`] asks the kernel to read: the reader waits on one
/// `pread` at a time, so without it the disk sees little more than the kernel's read-ahead
/// window while the writes compete for it.
pub const READ_AHEAD_BYTES: u64 = 32 << 20;

/// A raw image file, whose holes are skipped without reading (SEEK_DATA/SEEK_HOLE).
pub struct RawFile {
    file: std::fs::File,
    pos: u64,
    size: u64,
    /// Where the read-ahead asked for so far ends.
    advised: u64,
}

impl RawFile {
    /// Reads `file` of `size` bytes from the start.
    pub fn new(file: std::fs::File, size: u64) -> Self {
        Self { file, pos: 0, size, advised: 0 }
    }

    /// Asks the kernel to start reading up to [`READ_AHEAD_BYTES`] past `pos`, a chunk at a
    /// time (advice only: a failure changes nothing but speed).
    fn read_ahead(&mut self) {
        let until = self.pos.saturating_add(READ_AHEAD_BYTES).min(self.size);
        let from = self.advised.max(self.pos);
        if until < from.saturating_add(CHUNK_BYTES as u64) && until < self.size {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(until - from)) else { return };
        // SAFETY: advice on a descriptor this value owns.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
        self.advised = until;
    }

    fn seek(&self, whence: i32) -> Option<u64> {
        // SAFETY: valid fd.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), self.pos as i64, whence) };
        (r >= 0).then_some(r as u64)
    }
}

impl ChunkReader for RawFile {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
        use std::os::unix::fs::FileExt;
        if self.pos >= self.size {
            return Ok(Piece::End);
        }
        // A filesystem without SEEK_DATA support reports everything as data: still correct.
        let data_at = self.seek(libc::SEEK_DATA).unwrap_or(self.size).min(self.size);
        if data_at > self.pos {
            let hole = data_at - self.pos;
            self.pos = data_at;
            return Ok(Piece::Hole(hole));
        }
        let hole_at = self.seek(libc::SEEK_HOLE).unwrap_or(self.size).min(self.size);
        self.read_ahead();
        let want = at_most(hole_at - self.pos, buf.len());
        let mut got = 0;
        while got < want {
            let n = self.file.read_at(&mut buf[got..want], self.pos + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(Piece::End);
        }
        self.pos += got as u64;
        Ok(Piece::Data(got))
    }
}

/// Any byte stream (decompressors, HTTP bodies, files inside squashfs).
pub struct Stream<R>(pub R);

impl<R: Read + Send> ChunkReader for Stream<R> {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
        let mut got = 0;
        while got < buf.len() {
            match self.0.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(if got == 0 { Piece::End } else { Piece::Data(got) })
    }
}

/// How a stream should run.
pub struct StreamOptions<'a> {
    /// Source name for messages.
    pub source_name: String,
    /// Expected number of bytes, if known (a short or long source is an error).
    pub expected_size: Option<u64>,
    /// Called with (bytes done, total) every [`PROGRESS_INTERVAL`].
    pub progress: &'a (dyn Fn(u64, Option<u64>) + Sync),
    /// Set to stop early.
    pub cancel: &'a AtomicBool,
}

/// What was written.
#[derive(Debug, Clone, Copy)]
pub struct StreamStats {
    /// Total bytes of the image.
    pub bytes: u64,
    /// Bytes written as data.
    pub data_bytes: u64,
    /// Bytes handled as zeros.
    pub zero_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

enum Job {
    Data { offset: u64, buf: AlignedBuf },
    Zero { offset: u64, len: u64 },
}

/// Streams everything `reader` yields onto `dest`, then commits it.
pub fn copy(reader: &mut dyn ChunkReader, dest: Destination, opts: &StreamOptions) -> Result<StreamStats, StreamError> {
    copy_verified(reader, dest, opts, &|| Ok(()))
}

/// Like [`copy`], with `verify` deciding, after the last byte and before the commit, whether
/// the destination may be committed (a failed check leaves no new file behind).
///
/// Nothing is written past the destination's capacity, nor past the size the source
/// announced: the stream stops at the first piece that would not fit. On a device or an
/// existing file, the first MiB is written as zeros and the image's own first MiB last, once
/// every check passed; a failure leaves that start zeroed ([`StreamError::StartZeroed`]).
pub fn copy_verified(
    reader: &mut dyn ChunkReader,
    dest: Destination,
    opts: &StreamOptions,
    verify: &dyn Fn() -> Result<(), String>,
) -> Result<StreamStats, StreamError> {
    let started = Instant::now();
    let dest_name = dest.path.display().to_string();
    let mut held = (!dest.is_new_file()).then(|| HeldStart::new(dest.capacity));
    if let Some(held) = &held {
        // Zeroed first and flushed: even a kill mid-stream leaves a start that does not boot.
        dest.write_at(&AlignedBuf::new(held.len()).data_full()[..held.len()], 0)
            .and_then(|()| dest.direct.sync_data())
            .and_then(|()| dest.buffered.sync_data())
            .map_err(|source| StreamError::Write { what: dest_name.clone(), source })?;
    }
    let checked = stream_checked(reader, &dest, opts, verify, held.as_mut());
    let read = match checked {
        Ok(read) => read,
        Err(e) if held.is_some() => return Err(StreamError::StartZeroed { target: dest_name, source: Box::new(e) }),
        Err(e) => return Err(e),
    };
    (opts.progress)(read.bytes, Some(read.bytes));
    dest.commit(read.bytes, held.as_ref().map(HeldStart::data))
        .map_err(|source| StreamError::Write { what: dest_name, source })?;
    Ok(StreamStats {
        bytes: read.bytes,
        data_bytes: read.data_bytes,
        zero_bytes: read.bytes - read.data_bytes,
        elapsed: started.elapsed(),
    })
}

/// Streams the source onto `dest` and runs the checks between the last write and the commit:
/// the announced size, then `verify`.
fn stream_checked(
    reader: &mut dyn ChunkReader,
    dest: &Destination,
    opts: &StreamOptions,
    verify: &dyn Fn() -> Result<(), String>,
    held: Option<&mut HeldStart>,
) -> Result<ReadTotals, StreamError> {
    let state = WriteState {
        dest,
        zeros: AlignedBuf::new(CHUNK_BYTES),
        done: AtomicU64::new(0),
        failed: Mutex::new(None),
        abort: AtomicBool::new(false),
    };
    let read = pump(reader, &state, opts, held)?;
    if let Some(e) = state.failed.into_inner().expect("error lock") {
        return Err(StreamError::Write { what: dest.path.display().to_string(), source: e });
    }
    if let Some(expected) = opts.expected_size {
        if read.bytes != expected {
            return Err(StreamError::Length { what: opts.source_name.clone(), expected, got: read.bytes });
        }
    }
    verify().map_err(StreamError::Verify)?;
    // The last moment to stop: a signal that came while the writes drained or the check ran
    // (after the reader's last look) would otherwise end in a committed image and a success
    // the person who sent it did not ask for. Once the commit starts, it finishes.
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(StreamError::Cancelled);
    }
    Ok(read)
}

/// What the writer threads share with the reader and with each other.
struct WriteState<'a> {
    /// Where every job writes.
    dest: &'a Destination,
    /// Zeros for ranges the destination cannot zero by itself.
    zeros: AlignedBuf,
    /// Bytes written or zeroed so far, for progress.
    done: AtomicU64,
    /// The first write error.
    failed: Mutex<Option<std::io::Error>>,
    /// Set on the first write error: the reader stops and the writers drop what is queued.
    abort: AtomicBool,
}

/// How much of the source the reader handed to the writers.
struct ReadTotals {
    /// Every byte, holes and zeros included.
    bytes: u64,
    /// The bytes sent as data.
    data_bytes: u64,
}

/// Reads on this thread while [`WRITERS`] threads write and one reports progress; returns when
/// the source ended (or a write failed) and every queued job is done.
fn pump(
    reader: &mut dyn ChunkReader,
    state: &WriteState,
    opts: &StreamOptions,
    held: Option<&mut HeldStart>,
) -> Result<ReadTotals, StreamError> {
    let progress_stop = AtomicBool::new(false);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(BUFFERS);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..BUFFERS {
        free_tx.send(AlignedBuf::new(CHUNK_BYTES)).expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for _ in 0..WRITERS {
            let (job_rx, free_tx) = (job_rx.clone(), free_tx.clone());
            workers.push(scope.spawn(move || write_jobs(&job_rx, &free_tx, state)));
        }
        let progress_stop = &progress_stop;
        let progress = scope.spawn(move || report_progress(opts, &state.done, progress_stop));
        let limits = Limits { expected: opts.expected_size, capacity: state.dest.capacity, held };
        let read_result = read_jobs(reader, opts, limits, &job_tx, &free_rx, &free_tx, state);
        drop(job_tx);
        for w in workers {
            let _ = w.join();
        }
        progress_stop.store(true, Ordering::Relaxed);
        progress.thread().unpark();
        let _ = progress.join();
        read_result
    })
}

/// One writer thread: carries out jobs until the reader hangs up, returning every buffer to
/// `free`; after a failure it only drains the queue.
fn write_jobs(jobs: &Mutex<mpsc::Receiver<Job>>, free: &mpsc::Sender<AlignedBuf>, state: &WriteState) {
    loop {
        let job = match jobs.lock().expect("job lock").recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        if state.abort.load(Ordering::Relaxed) {
            if let Job::Data { buf, .. } = job {
                let _ = free.send(buf);
            }
            continue;
        }
        let (result, len) = match job {
            Job::Data { offset, buf } => {
                let r = state.dest.write_at(buf.data(), offset);
                let len = buf.len as u64;
                let _ = free.send(buf);
                (r, len)
            }
            Job::Zero { offset, len } => (state.dest.zero_range(offset, len, state.zeros.data_full()), len),
        };
        match result {
            Ok(()) => {
                state.done.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                state.abort.store(true, Ordering::Relaxed);
                state.failed.lock().expect("error lock").get_or_insert(e);
            }
        }
    }
}

/// Calls the progress callback every [`PROGRESS_INTERVAL`] (or when unparked) until `stop`.
fn report_progress(opts: &StreamOptions, done: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        (opts.progress)(done.load(Ordering::Relaxed), opts.expected_size);
        std::thread::park_timeout(PROGRESS_INTERVAL);
    }
}

/// Where the reader must stop, and what it must hold back.
struct Limits<'h> {
    /// The size the source announced.
    expected: Option<u64>,
    /// The destination's size.
    capacity: u64,
    /// The destination's start, held back until the commit.
    held: Option<&'h mut HeldStart>,
}

impl Limits<'_> {
    /// Refuses a piece of `len` bytes at `offset` that would go past the announced size or
    /// the destination's end: checked before the piece becomes a job, so nothing of it is
    /// written.
    fn admit(&self, offset: u64, len: u64, opts: &StreamOptions, dest: &Destination) -> Result<(), StreamError> {
        let end = offset.saturating_add(len);
        if let Some(expected) = self.expected.filter(|e| end > *e) {
            return Err(StreamError::Overrun { what: opts.source_name.clone(), expected });
        }
        if end > self.capacity {
            return Err(StreamError::TooLarge {
                what: opts.source_name.clone(),
                target: dest.path.display().to_string(),
                capacity: self.capacity,
            });
        }
        Ok(())
    }
}

/// Reads the source into jobs: non-zero buffers as data, zero buffers and holes merged into
/// zero ranges. Stops early, without error, when a writer failed (`abort`).
fn read_jobs(
    reader: &mut dyn ChunkReader,
    opts: &StreamOptions,
    mut limits: Limits,
    jobs: &mpsc::SyncSender<Job>,
    free_rx: &mpsc::Receiver<AlignedBuf>,
    free_tx: &mpsc::Sender<AlignedBuf>,
    state: &WriteState,
) -> Result<ReadTotals, StreamError> {
    let abort = &state.abort;
    let mut offset = 0u64;
    let mut data_bytes = 0u64;
    let mut pending_zero: Option<(u64, u64)> = None;
    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(StreamError::Cancelled);
        }
        if abort.load(Ordering::Relaxed) {
            return Ok(ReadTotals { bytes: offset, data_bytes });
        }
        let mut buf = free_rx.recv().expect("buffers circulate");
        let piece = reader
            .next_into(&mut buf)
            .map_err(|source| StreamError::Read { what: opts.source_name.clone(), source })?;
        match piece {
            Piece::End => {
                let _ = free_tx.send(buf);
                break;
            }
            Piece::Hole(len) => {
                let _ = free_tx.send(buf);
                limits.admit(offset, len, opts, state.dest)?;
                pending_zero = Some(merge_zero(pending_zero, offset, len, jobs));
                offset += len;
            }
            Piece::Data(n) => {
                if let Err(e) = limits.admit(offset, n as u64, opts, state.dest) {
                    let _ = free_tx.send(buf);
                    return Err(e);
                }
                if let Some(held) = limits.held.as_deref_mut() {
                    held.capture(offset, &mut buf.as_mut_full()[..n]);
                }
                buf.len = n;
                if is_zero(buf.data()) {
                    let _ = free_tx.send(buf);
                    pending_zero = Some(merge_zero(pending_zero, offset, n as u64, jobs));
                } else {
                    if let Some((o, l)) = pending_zero.take() {
                        let _ = jobs.send(Job::Zero { offset: o, len: l });
                    }
                    data_bytes += n as u64;
                    let _ = jobs.send(Job::Data { offset, buf });
                }
                offset += n as u64;
            }
        }
    }
    if let Some((o, l)) = pending_zero.take() {
        let _ = jobs.send(Job::Zero { offset: o, len: l });
    }
    Ok(ReadTotals { bytes: offset, data_bytes })
}

/// Extends a pending zero range, or flushes it and starts a new one.
fn merge_zero(pending: Option<(u64, u64)>, offset: u64, len: u64, jobs: &mpsc::SyncSender<Job>) -> (u64, u64) {
    match pending {
        Some((o, l)) if o + l == offset => (o, l + len),
        Some((o, l)) => {
            let _ = jobs.send(Job::Zero { offset: o, len: l });
            (offset, len)
        }
        None => (offset, len),
    }
}

impl AlignedBuf {
    /// The whole buffer (for a zero buffer shared read-only).
    fn data_full(&self) -> &[u8] {
        // SAFETY: reading within capacity; the buffer was zero-initialized.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.capacity()) }
    }
}

#[cfg(test)]
mod tests {
    use super::destination::DestinationOptions;
    use super::*;

    /// Yields its pieces in turn: `Some(bytes)` as data, `None` as a hole of `HOLE_BYTES`.
    struct Pieces(std::vec::IntoIter<Option<Vec<u8>>>);

    const HOLE_BYTES: u64 = 3 * 4096;

    impl ChunkReader for Pieces {
        fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
            Ok(match self.0.next() {
                None => Piece::End,
                Some(None) => Piece::Hole(HOLE_BYTES),
                Some(Some(data)) => {
                    buf[..data.len()].copy_from_slice(&data);
                    Piece::Data(data.len())
                }
            })
        }
    }

    /// Data, an all-zero buffer, a hole, more data, a short tail: what every test streams.
    fn pieces() -> (Pieces, Vec<u8>) {
        let list = vec![
            Some(vec![1u8; CHUNK_BYTES]),
            Some(vec![0u8; CHUNK_BYTES]),
            None,
            Some((0..CHUNK_BYTES).map(|i| (i % 251) as u8).collect()),
            Some(vec![9u8; 1000]),
        ];
        let image = list.iter().flat_map(|p| p.clone().unwrap_or_else(|| vec![0; HOLE_BYTES as usize])).collect();
        (Pieces(list.into_iter()), image)
    }

    fn options<'a>(expected_size: Option<u64>, cancel: &'a AtomicBool) -> StreamOptions<'a> {
        StreamOptions { source_name: "test source".into(), expected_size, progress: &|_, _| {}, cancel }
    }

    /// A raw file read in chunks: its bytes and holes come back, and the read-ahead asked of
    /// the kernel keeps at least a window minus a chunk ahead of the reads, never past the end.
    #[test]
    fn raw_files_read_back_with_the_read_ahead_in_front() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        let file = std::fs::File::create(&path).unwrap();
        let size = READ_AHEAD_BYTES * 2 + 12_345;
        file.set_len(size).unwrap();
        let data: Vec<u8> = (0..READ_AHEAD_BYTES + 5000).map(|i| (i % 249) as u8 + 1).collect();
        file.write_all_at(&data, 0).unwrap();
        file.write_all_at(b"tail", size - 4).unwrap();
        let mut reader = RawFile::new(std::fs::File::open(&path).unwrap(), size);
        let mut got = Vec::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            match reader.next(&mut buf).unwrap() {
                Piece::End => break,
                Piece::Hole(n) => got.resize(got.len() + usize::try_from(n).unwrap(), 0),
                Piece::Data(n) => {
                    got.extend_from_slice(&buf[..n]);
                    let ahead = (reader.pos + READ_AHEAD_BYTES - CHUNK_BYTES as u64).min(size);
                    assert!(reader.advised >= ahead, "advised to {} at {}", reader.advised, reader.pos);
                    assert!(reader.advised <= size);
                }
            }
        }
        assert_eq!(got.len() as u64, size);
        assert!(got[..data.len()] == data[..]);
        assert!(got[data.len()..got.len() - 4].iter().all(|b| *b == 0));
        assert_eq!(&got[got.len() - 4..], b"tail");
    }

    #[test]
    fn data_holes_and_zeros_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, image) = pieces();
        let existing = dir.path().join("existing");
        std::fs::write(&existing, vec![0xffu8; image.len() + 4096]).unwrap();
        let force = DestinationOptions { force: true, size: None };
        let dest = Destination::open(&existing, Some(image.len() as u64), None, &force).unwrap();
        let cancel = AtomicBool::new(false);
        let stats = copy(&mut reader, dest, &options(Some(image.len() as u64), &cancel)).unwrap();
        assert_eq!(stats.bytes, image.len() as u64);
        assert_eq!(stats.data_bytes, 2 * CHUNK_BYTES as u64 + 1000);
        assert_eq!(stats.zero_bytes, CHUNK_BYTES as u64 + HOLE_BYTES);
        assert_eq!(std::fs::read(&existing).unwrap()[..image.len()], image[..]);

        let (mut reader, _) = pieces();
        let new = dir.path().join("new");
        let dest = Destination::open(&new, None, None, &DestinationOptions::default()).unwrap();
        copy(&mut reader, dest, &options(None, &cancel)).unwrap();
        assert_eq!(std::fs::read(&new).unwrap(), image);
    }

    #[test]
    fn failures_leave_no_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        let cancel = AtomicBool::new(false);
        let open = || Destination::open(&path, None, None, &DestinationOptions::default()).unwrap();

        let (mut reader, image) = pieces();
        let err = copy_verified(&mut reader, open(), &options(None, &cancel), &|| Err("digest differs".into()));
        assert!(matches!(err, Err(StreamError::Verify(m)) if m == "digest differs"));

        let (mut reader, _) = pieces();
        let err = copy(&mut reader, open(), &options(Some(image.len() as u64 + 1), &cancel));
        assert!(matches!(err, Err(StreamError::Length { got, .. }) if got == image.len() as u64));

        let (mut reader, _) = pieces();
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(copy(&mut reader, open(), &options(None, &cancel)), Err(StreamError::Cancelled)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a file was left behind");
    }

    /// A signal after the last piece was read but before the commit (here: while the check
    /// runs) still stops the write: no new file, and an existing target's start zeroed.
    #[test]
    fn an_interrupt_after_the_last_read_stops_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = AtomicBool::new(false);
        let signal_now = || {
            cancel.store(true, Ordering::Relaxed);
            Ok(())
        };
        let new = dir.path().join("new");
        let (mut reader, image) = pieces();
        let dest = Destination::open(&new, None, None, &DestinationOptions::default()).unwrap();
        let err = copy_verified(&mut reader, dest, &options(None, &cancel), &signal_now);
        assert!(matches!(err, Err(StreamError::Cancelled)), "{err:?}");
        assert!(!new.exists(), "an interrupted write left its file");

        cancel.store(false, Ordering::Relaxed);
        let existing = dir.path().join("existing");
        std::fs::write(&existing, vec![0xffu8; image.len()]).unwrap();
        let (mut reader, _) = pieces();
        let force = DestinationOptions { force: true, size: None };
        let dest = Destination::open(&existing, None, None, &force).unwrap();
        let err = copy_verified(&mut reader, dest, &options(None, &cancel), &signal_now).unwrap_err();
        assert!(matches!(err.cause(), StreamError::Cancelled), "{err}");
        let data = std::fs::read(&existing).unwrap();
        assert!(data[..held_start::HELD_BYTES].iter().all(|b| *b == 0), "the image's start reached the target");
    }

    /// An image larger than an existing file, than a new file's --size, or than the size it
    /// announced: refused at the first piece that does not fit, the file keeping its size.
    #[test]
    fn nothing_is_written_past_a_target_or_an_announced_size() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = AtomicBool::new(false);
        let existing = dir.path().join("existing");
        std::fs::write(&existing, vec![0xffu8; 1 << 20]).unwrap();
        let force = DestinationOptions { force: true, size: None };
        let (mut reader, _) = pieces();
        let dest = Destination::open(&existing, None, None, &force).unwrap();
        let err = copy(&mut reader, dest, &options(None, &cancel)).unwrap_err();
        assert!(matches!(err.cause(), StreamError::TooLarge { capacity, .. } if *capacity == 1 << 20), "{err}");
        assert_eq!(std::fs::metadata(&existing).unwrap().len(), 1 << 20, "the target grew");

        let sized = DestinationOptions { force: false, size: Some(1 << 20) };
        let new = dir.path().join("new");
        let (mut reader, _) = pieces();
        let err = copy(&mut reader, Destination::open(&new, None, None, &sized).unwrap(), &options(None, &cancel));
        assert!(matches!(err, Err(StreamError::TooLarge { .. })), "{err:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a new file was left behind");

        let (mut reader, _) = pieces();
        let dest = Destination::open(&new, Some(4096), None, &DestinationOptions::default()).unwrap();
        let err = copy(&mut reader, dest, &options(Some(4096), &cancel));
        assert!(matches!(err, Err(StreamError::Overrun { expected: 4096, .. })), "{err:?}");
        assert!(!new.exists());
    }

    /// On an existing target the image's first MiB is written last: a failed check leaves it
    /// zeroed (and says so), a passed one leaves the image byte for byte.
    #[test]
    fn a_failed_check_leaves_the_start_of_an_existing_target_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = AtomicBool::new(false);
        let (_, image) = pieces();
        let existing = dir.path().join("existing");
        let force = DestinationOptions { force: true, size: None };
        std::fs::write(&existing, vec![0xffu8; image.len()]).unwrap();
        let (mut reader, _) = pieces();
        let dest = Destination::open(&existing, None, None, &force).unwrap();
        let err =
            copy_verified(&mut reader, dest, &options(None, &cancel), &|| Err("digest differs".into())).unwrap_err();
        assert!(matches!(err.cause(), StreamError::Verify(_)), "{err}");
        assert!(err.to_string().contains("the first MiB of") && err.to_string().contains("was zeroed"), "{err}");
        let data = std::fs::read(&existing).unwrap();
        assert!(data[..held_start::HELD_BYTES].iter().all(|b| *b == 0), "the image's start reached the target");
        assert_eq!(data[held_start::HELD_BYTES..], image[held_start::HELD_BYTES..]);

        let (mut reader, _) = pieces();
        let dest = Destination::open(&existing, None, None, &force).unwrap();
        copy_verified(&mut reader, dest, &options(None, &cancel), &|| Ok(())).unwrap();
        assert_eq!(std::fs::read(&existing).unwrap(), image);
    }
}
