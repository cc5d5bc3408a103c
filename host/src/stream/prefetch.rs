//! A local image read ahead on worker threads: a planner (this thread) says how each stretch
//! of the image is made — holes, file ranges to read, compressed clusters to decode — and
//! [`READS_IN_FLIGHT`] workers fill whole buffers from the file with `pread`, handed over in
//! order without a copy. One reader thread waiting on one `pread` at a time left the disk
//! idle between its requests while the writes competed for it, and did every page-cache copy
//! on one core.
//!
//! Large aligned reads of bytes not cached go around the page cache ([`super::direct_read`]).
//!
//! The other reads — compressed clusters, a file's unaligned tail — go through the page
//! cache, and their file ranges are handed, [`READ_AHEAD_BYTES`] ahead of the workers, to a
//! thread that asks the kernel to read them into it (`POSIX_FADV_WILLNEED`): without it the
//! disk read no further ahead than the writes. (When every read went through the page cache,
//! that read-ahead halved the raw write: 2.5 s with a stretch planned ahead, 1.1-1.2 s with 64
//! or 256 MiB, on a loaded machine.)
//!
//! Memory is bounded: at most [`READS_IN_FLIGHT`] buffers are being filled or wait to be taken,
//! at most [`MAX_QUEUED`] stretches are planned ahead, and the page cache holds at most
//! [`READ_AHEAD_BYTES`] read ahead (the kernel's to reclaim).

use super::buffer::AlignedBuf;
use super::direct_read::DirectReads;
use super::{at_most, ChunkReader, Piece, CHUNK_BYTES};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Buffers being filled (or filled and waiting their turn) at once.
pub const READS_IN_FLIGHT: usize = 4;
/// Stretches planned ahead of the one handed over, holes included.
pub const MAX_QUEUED: usize = 64;
/// Holes planned one after the other are merged up to this length.
const MAX_MERGED_HOLE: u64 = 256 << 20;
/// File bytes planned, and asked of the kernel, ahead of the stretches handed to the workers.
pub const READ_AHEAD_BYTES: u64 = 256 << 20;
/// The most one WILLNEED asks for: the kernel's default read-ahead window, the least a device
/// reads of one (see [`advise_in_pieces`]); 256 MiB in 128 KiB pieces cost 0.23 s of calls
/// against 0.24 s in 4 MiB pieces, the reads done as soon.
const ADVICE_PIECE_BYTES: u64 = 128 << 10;

/// One part of a stretch, placed right after the previous one in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `len` bytes of the file at `offset`.
    Read {
        /// Where in the file.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// `len` zero bytes.
    Zero(usize),
    /// A raw-deflate stream stored in up to `stored` bytes at `offset` (fewer where the file
    /// ends first) that must decode to at least `whole` bytes, of which the first `len` are
    /// kept.
    Deflate {
        /// Where in the file.
        offset: u64,
        /// Bytes that may hold the stream.
        stored: usize,
        /// Bytes kept.
        len: usize,
        /// Bytes the stream must make (a whole cluster, even where the disk ends inside it;
        /// at least `len`).
        whole: usize,
    },
}

impl Part {
    /// The bytes the part makes in its buffer.
    fn len(&self) -> usize {
        match *self {
            Part::Read { len, .. } | Part::Zero(len) | Part::Deflate { len, .. } => len,
        }
    }
}

/// How the next stretch of the image is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stretch {
    /// Zeros, nothing read.
    Hole(u64),
    /// Its parts, at most [`CHUNK_BYTES`] in all.
    Fill(Vec<Part>),
}

/// Says, front to back, how the image is made of its file's bytes.
pub trait Planner: Send {
    /// The next stretch; None at the end of the image.
    fn next(&mut self) -> std::io::Result<Option<Stretch>>;
}

/// The image file as the workers read it.
pub struct SourceFile {
    file: std::fs::File,
    /// The reads that go around the page cache; None where the file cannot be opened so.
    direct: Option<DirectReads>,
    /// Its length when opened (reads past it are a changed file).
    len: u64,
    /// For messages.
    name: String,
}

impl SourceFile {
    /// `file` (shown as `name`), `len` bytes long.
    pub fn new(file: std::fs::File, len: u64, name: &str) -> Self {
        let direct = DirectReads::open(&file, len);
        Self { file, direct, len, name: name.to_owned() }
    }

    /// Whether the reads of `part`, `at` bytes into its (page-aligned) buffer, go through the
    /// page cache where it does not hold them (so reading ahead helps them).
    fn reads_cached(&self, part: &Part, at: usize) -> bool {
        match *part {
            Part::Read { offset, len } => !self.direct.as_ref().is_some_and(|d| d.may_read(at, offset, len)),
            Part::Deflate { .. } => true,
            Part::Zero(_) => false,
        }
    }

    /// Reads exactly `out.len()` bytes at `offset`.
    fn read_exact_at(&self, out: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            let (room, at) = (&mut out[got..], offset + got as u64);
            let direct =
                self.direct.as_ref().and_then(|d| d.for_read(room.as_ptr() as usize, at, room.len()).map(|f| (d, f)));
            let file = direct.map_or(&self.file, |(_, f)| f);
            match file.read_at(room, at) {
                Ok(0) => return Err(self.ended(at)),
                Ok(n) => {
                    if let Some((d, _)) = direct {
                        d.count(n);
                    }
                    got += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => match direct {
                    // Refused around the page cache (EINVAL: a device wanting a larger
                    // alignment; EOPNOTSUPP: ntfs3's compressed files; ...): no more direct
                    // reads, and this one again through the page cache, whose error, if any,
                    // is the one reported.
                    Some((d, _)) => d.refuse(),
                    None => return Err(e),
                },
            }
        }
        Ok(())
    }

    fn ended(&self, at: u64) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "{} ended at byte {at}, inside the {} bytes it held when opened: was it changed while being written?",
                self.name, self.len
            ),
        )
    }

    /// Asks the kernel to read `len` bytes at `offset` into the page cache (advice only: a
    /// failure changes nothing but speed).
    fn advise(&self, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        // SAFETY: advice on a descriptor this value owns.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
    }

    /// Fills `out` from `parts`; returns how many bytes they make.
    fn fill(&self, parts: &[Part], out: &mut [u8], stored: &mut Vec<u8>) -> std::io::Result<usize> {
        let mut at = 0usize;
        for part in parts {
            let n = part.len();
            let room = at
                .checked_add(n)
                .and_then(|end| out.get_mut(at..end))
                .ok_or_else(|| std::io::Error::other(format!("a stretch of {} larger than a buffer", self.name)))?;
            match *part {
                Part::Zero(_) => room.fill(0),
                Part::Read { offset, .. } => self.read_exact_at(room, offset)?,
                Part::Deflate { offset, stored: most, whole, .. } => {
                    // The stream may be stored short of its rounded-up length at the file's end.
                    let have = at_most(self.len.saturating_sub(offset), most);
                    if have == 0 {
                        return Err(self.ended(offset));
                    }
                    stored.resize(have, 0);
                    self.read_exact_at(stored, offset)?;
                    // Only the disk's last cluster keeps less than it decodes to (once an image).
                    let decoded = if whole > n {
                        let mut all = vec![0u8; whole];
                        inflate_exactly(stored, &mut all).map(|()| room.copy_from_slice(&all[..n]))
                    } else {
                        inflate_exactly(stored, room)
                    };
                    decoded.map_err(|why| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("the compressed cluster at byte {offset} of {} {why}", self.name),
                        )
                    })?;
                }
            }
            at += n;
        }
        Ok(at)
    }
}

/// Decodes the raw-deflate stream at the start of `stored` until `out` is full, as qemu
/// does: the stream must make at least `out.len()` bytes; what it holds past them is not
/// decoded. Never writes past `out`.
pub fn inflate_exactly(stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut inflater = flate2::Decompress::new(false);
    loop {
        let (read, written) = (inflater.total_in(), inflater.total_out());
        let (Some(input), Some(output)) = (
            usize::try_from(read).ok().and_then(|r| stored.get(r..)),
            usize::try_from(written).ok().and_then(|w| out.get_mut(w..)),
        ) else {
            return Err("is corrupt".into());
        };
        if output.is_empty() {
            return Ok(());
        }
        let status = inflater
            .decompress(input, output, flate2::FlushDecompress::Finish)
            .map_err(|e| format!("does not decompress: {e}"))?;
        let progress = inflater.total_in() != read || inflater.total_out() != written;
        if status == flate2::Status::StreamEnd && inflater.total_out() < out.len() as u64 || !progress {
            return Err(format!("decompresses to {} bytes, not {}", inflater.total_out(), out.len()));
        }
    }
}

/// A stretch's buffer on its way.
struct Job {
    seq: u64,
    parts: Vec<Part>,
    buf: AlignedBuf,
}

type Done = (u64, std::io::Result<usize>, AlignedBuf);

/// What comes next, in image order.
enum Slot {
    Hole(u64),
    Fill(u64),
}

/// The file range a part reads, if any.
fn file_range(part: &Part) -> Option<(u64, u64)> {
    match *part {
        Part::Read { offset, len } => Some((offset, len as u64)),
        Part::Deflate { offset, stored, .. } => Some((offset, stored as u64)),
        Part::Zero(_) => None,
    }
}

/// The file ranges a stretch reads: its reads and its compressed clusters.
fn file_ranges(parts: &[Part]) -> impl Iterator<Item = (u64, u64)> + '_ {
    parts.iter().filter_map(file_range)
}

/// The image read ahead on worker threads (see the module).
pub struct Prefetch {
    planner: Box<dyn Planner>,
    /// The file, shared with the workers (asked which reads bypass the cache).
    source: Arc<SourceFile>,
    jobs: Option<mpsc::Sender<Job>>,
    results: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// Ranges for the read-ahead thread (the last of `workers`).
    advice: Option<mpsc::Sender<(u64, u64)>>,
    /// Set when the reader is dropped: the read-ahead thread stops between two pieces.
    advice_stop: Arc<AtomicBool>,
    /// Stretches planned (their ranges advised) but not yet handed to the workers.
    planned: VecDeque<Stretch>,
    /// File bytes the stretches in `planned` read.
    planned_bytes: u64,
    /// Stretches handed over, in image order.
    queue: VecDeque<Slot>,
    arrived: HashMap<u64, (std::io::Result<usize>, AlignedBuf)>,
    spare: Vec<AlignedBuf>,
    in_flight: usize,
    next_seq: u64,
    planned_all: bool,
}

impl Prefetch {
    /// Reads `source` as `planner` says, with [`READS_IN_FLIGHT`] workers.
    pub fn new(source: SourceFile, planner: Box<dyn Planner>) -> Self {
        let source = Arc::new(source);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, results) = mpsc::channel::<Done>();
        let mut workers: Vec<JoinHandle<()>> = (0..READS_IN_FLIGHT)
            .map(|_| {
                let (source, job_rx, done_tx) = (source.clone(), job_rx.clone(), done_tx.clone());
                std::thread::spawn(move || fill_jobs(&source, &job_rx, &done_tx))
            })
            .collect();
        let (advice, advice_rx) = mpsc::channel::<(u64, u64)>();
        let advice_stop = Arc::new(AtomicBool::new(false));
        let stop = advice_stop.clone();
        let advised = source.clone();
        workers.push(std::thread::spawn(move || advise_ranges(&advised, &advice_rx, &stop)));
        Self {
            planner,
            source,
            jobs: Some(jobs),
            results,
            workers,
            advice: Some(advice),
            advice_stop,
            planned: VecDeque::new(),
            planned_bytes: 0,
            queue: VecDeque::new(),
            arrived: HashMap::new(),
            spare: Vec::new(),
            in_flight: 0,
            next_seq: 0,
            planned_all: false,
        }
    }

    /// Plans up to [`READ_AHEAD_BYTES`] ahead, advising what it plans, then dispatches.
    fn plan_ahead(&mut self) -> std::io::Result<()> {
        while !self.planned_all && self.planned_bytes < READ_AHEAD_BYTES && self.planned.len() < MAX_QUEUED {
            match self.planner.next()? {
                None => self.planned_all = true,
                Some(Stretch::Hole(0)) => {}
                Some(Stretch::Fill(parts)) => {
                    self.planned_bytes += file_ranges(&parts).map(|(_, n)| n).sum::<u64>();
                    let mut at = 0usize;
                    for part in &parts {
                        if let Some(range) = file_range(part).filter(|_| self.source.reads_cached(part, at)) {
                            // The thread is gone only if it panicked: reads go on unadvised.
                            let _ = self.advice.as_ref().map(|a| a.send(range));
                        }
                        at = at.wrapping_add(part.len());
                    }
                    self.planned.push_back(Stretch::Fill(parts));
                }
                Some(hole) => self.planned.push_back(hole),
            }
        }
        self.dispatch()
    }

    /// Hands planned stretches to the workers, in order, until they are all busy or enough is
    /// queued.
    fn dispatch(&mut self) -> std::io::Result<()> {
        while self.queue.len() < MAX_QUEUED {
            match self.planned.front() {
                None => break,
                Some(Stretch::Fill(_)) if self.in_flight >= READS_IN_FLIGHT => break,
                Some(_) => {}
            }
            match self.planned.pop_front() {
                None => break,
                Some(Stretch::Hole(n)) => match self.queue.back_mut() {
                    Some(Slot::Hole(m)) if *m < MAX_MERGED_HOLE => *m += n,
                    _ => self.queue.push_back(Slot::Hole(n)),
                },
                Some(Stretch::Fill(parts)) => {
                    self.planned_bytes -= file_ranges(&parts).map(|(_, n)| n).sum::<u64>();
                    let buf = self.spare.pop().unwrap_or_else(|| AlignedBuf::new(CHUNK_BYTES));
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let sent = self.jobs.as_ref().is_some_and(|j| j.send(Job { seq, parts, buf }).is_ok());
                    if !sent {
                        return Err(std::io::Error::other("the image reader threads stopped"));
                    }
                    self.in_flight += 1;
                    self.queue.push_back(Slot::Fill(seq));
                }
            }
        }
        Ok(())
    }

    /// The next piece, its bytes in a buffer of the reader's; the caller gives it back.
    fn take(&mut self) -> std::io::Result<Option<(Piece, Option<AlignedBuf>)>> {
        self.plan_ahead()?;
        let Some(slot) = self.queue.pop_front() else { return Ok(None) };
        let seq = match slot {
            Slot::Hole(n) => return Ok(Some((Piece::Hole(n), None))),
            Slot::Fill(seq) => seq,
        };
        let (result, buf) = loop {
            if let Some(done) = self.arrived.remove(&seq) {
                break done;
            }
            let (s, r, b) =
                self.results.recv().map_err(|_| std::io::Error::other("the image reader threads stopped"))?;
            self.arrived.insert(s, (r, b));
        };
        self.in_flight -= 1;
        match result {
            Ok(n) => Ok(Some((Piece::Data(n), Some(buf)))),
            Err(e) => {
                self.spare.push(buf);
                Err(e)
            }
        }
    }
}

/// The read-ahead thread: advises the ranges it is sent until the reader hangs up or `stop` is
/// set.
fn advise_ranges(source: &SourceFile, ranges: &mpsc::Receiver<(u64, u64)>, stop: &AtomicBool) {
    while let Ok((offset, len)) = ranges.recv() {
        advise_in_pieces(source, offset, len, stop);
    }
}

/// Advises `len` bytes at `offset` [`ADVICE_PIECE_BYTES`] at a time: the kernel reads no more
/// than the device's read-ahead window (or its largest request) of each WILLNEED and drops
/// the rest, so the window's stretches, planned at once and merged into one range, were read
/// for their first 8 MiB only (measured: 256 MiB advised as one range, 8 MiB cached; as 4 MiB
/// pieces, all). Pieces make merging contiguous ranges pointless: each range is advised alone.
///
/// Each piece may wait for the device to take its reads: a reader dropped (an error, SIGINT)
/// sets `stop` so the thread it joins does not first ask for up to [`READ_AHEAD_BYTES`] more.
fn advise_in_pieces(source: &SourceFile, mut offset: u64, mut len: u64, stop: &AtomicBool) {
    while len > 0 && !stop.load(Ordering::Relaxed) {
        let piece = len.min(ADVICE_PIECE_BYTES);
        source.advise(offset, piece);
        offset = offset.saturating_add(piece);
        len -= piece;
    }
}

/// One worker: fills the buffers it is sent until the reader hangs up.
fn fill_jobs(source: &SourceFile, jobs: &Mutex<mpsc::Receiver<Job>>, done: &mpsc::Sender<Done>) {
    let mut stored = Vec::new();
    loop {
        let Ok(mut job) = jobs.lock().map_err(drop).and_then(|rx| rx.recv().map_err(drop)) else { return };
        // A decoder's panic on hostile bytes must still answer for the buffer.
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            source.fill(&job.parts, job.buf.as_mut_full(), &mut stored)
        }))
        .unwrap_or_else(|_| Err(std::io::Error::other(format!("decoding {} failed", source.name))));
        if done.send((job.seq, filled, job.buf)).is_err() {
            return;
        }
    }
}

impl ChunkReader for Prefetch {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
        match self.take()? {
            None => Ok(Piece::End),
            Some((Piece::Data(n), Some(filled))) => {
                let room = buf.get_mut(..n).ok_or_else(|| std::io::Error::other("a buffer smaller than a stretch"))?;
                room.copy_from_slice(filled.data_full_of(n));
                self.spare.push(filled);
                // A worker is free and a buffer spare: no need to wait for the next call.
                self.dispatch()?;
                Ok(Piece::Data(n))
            }
            Some((piece, _)) => Ok(piece),
        }
    }

    /// Hands over the filled buffer itself and keeps `buf` for a later stretch.
    fn next_into(&mut self, buf: &mut AlignedBuf) -> std::io::Result<Piece> {
        match self.take()? {
            None => Ok(Piece::End),
            Some((Piece::Data(n), Some(mut filled))) if buf.capacity() >= CHUNK_BYTES => {
                std::mem::swap(buf, &mut filled);
                self.spare.push(filled);
                // A worker is free and a buffer spare: no need to wait for the next call.
                self.dispatch()?;
                Ok(Piece::Data(n))
            }
            Some((Piece::Data(n), Some(filled))) => {
                let room = buf
                    .as_mut_full()
                    .get_mut(..n)
                    .ok_or_else(|| std::io::Error::other("a buffer smaller than a stretch"))?;
                room.copy_from_slice(filled.data_full_of(n));
                self.spare.push(filled);
                // A worker is free and a buffer spare: no need to wait for the next call.
                self.dispatch()?;
                Ok(Piece::Data(n))
            }
            Some((piece, _)) => Ok(piece),
        }
    }
}

impl AlignedBuf {
    /// The first `n` bytes, whatever `len` says.
    fn data_full_of(&self, n: usize) -> &[u8] {
        let n = n.min(self.capacity());
        // SAFETY: within capacity; the buffer was zero-initialized.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), n) }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Workers finish the buffer they hold, find the queue closed, and return.
        drop(self.jobs.take());
        drop(self.advice.take());
        self.advice_stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw image: its data read as it lies in the file, its holes (SEEK_DATA/SEEK_HOLE) skipped.
pub struct RawPlan {
    file: std::fs::File,
    pos: u64,
    size: u64,
    /// Where the data run `pos` is in ends.
    data_end: u64,
}

impl RawPlan {
    /// Plans `file` (another descriptor of the image) of `size` bytes from its start.
    pub fn new(file: std::fs::File, size: u64) -> Self {
        Self { file, pos: 0, size, data_end: 0 }
    }

    fn seek(&self, whence: i32) -> Option<u64> {
        let pos = i64::try_from(self.pos).ok()?;
        // SAFETY: lseek on a descriptor this value owns; the workers read with pread.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos, whence) };
        u64::try_from(r).ok()
    }
}

impl Planner for RawPlan {
    fn next(&mut self) -> std::io::Result<Option<Stretch>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        if self.pos >= self.data_end {
            // A filesystem without SEEK_DATA reports everything as data: still correct. No data
            // past `pos` is a hole to the end, unless the file was cut shorter meanwhile.
            let data_at = match self.seek(libc::SEEK_DATA) {
                Some(at) => at.min(self.size),
                None => {
                    let now = self.file.metadata()?;
                    if now.is_file() && now.len() < self.size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!(
                                "the image is {} bytes long now, not the {} it was when opened: was it changed while being written?",
                                now.len(),
                                self.size
                            ),
                        ));
                    }
                    self.size
                }
            };
            if data_at > self.pos {
                let hole = data_at - self.pos;
                self.pos = data_at;
                return Ok(Some(Stretch::Hole(hole)));
            }
            self.data_end = self.seek(libc::SEEK_HOLE).unwrap_or(self.size).clamp(self.pos + 1, self.size);
        }
        let len = at_most(self.data_end - self.pos, CHUNK_BYTES);
        let read = Part::Read { offset: self.pos, len };
        self.pos += len as u64;
        Ok(Some(Stretch::Fill(vec![read])))
    }
}

/// A raw image file of `size` bytes, read ahead (see the module); `name` for messages.
pub fn raw(file: std::fs::File, size: u64, name: &str) -> std::io::Result<Prefetch> {
    let planner = RawPlan::new(file.try_clone()?, size);
    Ok(Prefetch::new(SourceFile::new(file, size, name), Box::new(planner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(reader: &mut dyn ChunkReader) -> std::io::Result<Vec<u8>> {
        crate::stream::read_back(reader, false)
    }

    /// Plans every stretch as the same chunk of the file, counting how many it planned.
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);

    impl Planner for Counting {
        fn next(&mut self) -> std::io::Result<Option<Stretch>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Some(Stretch::Fill(vec![Part::Read { offset: 0, len: CHUNK_BYTES }])))
        }
    }

    /// The first stretches taken have [`READ_AHEAD_BYTES`] planned (and advised) behind them,
    /// no more: the workers' reads alone would keep the disk no further ahead than the writes.
    #[test]
    fn the_read_ahead_plans_its_window_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, vec![3u8; CHUNK_BYTES]).unwrap();
        let planned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let source = SourceFile::new(std::fs::File::open(&path).unwrap(), CHUNK_BYTES as u64, "raw");
        let mut reader = Prefetch::new(source, Box::new(Counting(planned.clone())));
        let mut buf = AlignedBuf::new(CHUNK_BYTES);
        for _ in 0..3 {
            assert!(matches!(reader.next_into(&mut buf).unwrap(), Piece::Data(n) if n == CHUNK_BYTES));
            assert!(buf.data_full_of(CHUNK_BYTES).iter().all(|b| *b == 3));
        }
        let window = usize::try_from(READ_AHEAD_BYTES).unwrap() / CHUNK_BYTES;
        let planned = planned.load(std::sync::atomic::Ordering::Relaxed);
        assert!(planned >= window && planned <= window + 3 + READS_IN_FLIGHT, "{planned} stretches planned");
    }

    /// Bytes of `file` (`len` bytes long) in the page cache.
    fn resident(file: &std::fs::File, len: usize) -> usize {
        // SAFETY: a read-only shared mapping of a file this test owns, only asked about.
        let map =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert!(map != libc::MAP_FAILED);
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `pages` has one byte per page of the mapping.
        assert_eq!(unsafe { libc::mincore(map, len, pages.as_mut_ptr()) }, 0);
        // SAFETY: mapped above, no longer used.
        unsafe { libc::munmap(map, len) };
        pages.iter().filter(|p| **p & 1 != 0).count() * 4096
    }

    /// A window's worth of contiguous ranges sent at once is all read into the page cache: the
    /// kernel reads only its read-ahead window (8 MiB here, 128 KiB by default) of each
    /// WILLNEED, so those ranges merged into one were read for their first MiBs only.
    #[test]
    fn merged_advice_reaches_the_whole_range() {
        let len = 48 << 20;
        let (_dir, file) = on_disk(&vec![5u8; len]);
        let source = SourceFile::new(file.try_clone().unwrap(), len as u64, "raw");
        let (tx, rx) = mpsc::channel();
        for at in (0..len as u64).step_by(CHUNK_BYTES) {
            tx.send((at, CHUNK_BYTES as u64)).unwrap();
        }
        drop(tx);
        advise_ranges(&source, &rx, &AtomicBool::new(false));
        let asked = std::time::Instant::now();
        while resident(&file, len) < len && asked.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(resident(&file, len), len, "bytes read ahead of {len} advised");
    }

    /// A stopped read-ahead thread asks for nothing more, however much it was sent: a dropped
    /// reader joins it at once.
    #[test]
    fn a_stopped_read_ahead_returns_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let source = SourceFile::new(std::fs::File::open(&path).unwrap(), 4096, "raw");
        let (tx, rx) = mpsc::channel();
        // An exabyte, 128 KiB at a time, would take years.
        tx.send((0, 1 << 60)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        let thread_stop = stop.clone();
        std::thread::spawn(move || {
            advise_ranges(&source, &rx, &thread_stop);
            let _ = done_tx.send(());
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        drop(tx);
        assert!(done.recv_timeout(std::time::Duration::from_secs(5)).is_ok(), "the read-ahead went on");
    }

    /// A raw file with data, a hole, an unaligned tail: read back byte for byte, through
    /// buffers swapped and buffers copied.
    #[test]
    fn raw_files_read_back() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        let file = std::fs::File::create(&path).unwrap();
        let size = 5 * CHUNK_BYTES as u64 * 2 + 12_345;
        file.set_len(size).unwrap();
        let data: Vec<u8> = (0..3 * CHUNK_BYTES + 5000).map(|i| (i % 249) as u8 + 1).collect();
        file.write_all_at(&data, 4096).unwrap();
        file.write_all_at(b"tail", size - 4).unwrap();
        let mut want = vec![0u8; usize::try_from(size).unwrap()];
        want[4096..4096 + data.len()].copy_from_slice(&data);
        want[usize::try_from(size).unwrap() - 4..].copy_from_slice(b"tail");
        let got = read_all(&mut raw(std::fs::File::open(&path).unwrap(), size, "raw").unwrap()).unwrap();
        assert!(got == want);
        let mut reader = raw(std::fs::File::open(&path).unwrap(), size, "raw").unwrap();
        let copied = crate::stream::read_back(&mut reader, true).unwrap();
        assert!(copied == want);
    }

    /// A file on the build's disk (tmpfs would keep every page it holds in memory).
    fn on_disk(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
        std::fs::create_dir_all(target).unwrap();
        let dir = tempfile::tempdir_in(target).unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advice on a descriptor this test owns: drop the clean pages just written.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        assert!(resident(&file, bytes.len()) < bytes.len() / 4, "the test file stayed in the page cache");
        (dir, file)
    }

    /// Aligned reads of bytes not cached go from the disk to the buffers without the page
    /// cache (no copy, and no image evicting what the host had cached); the unaligned tail
    /// through it; every byte read back.
    #[test]
    fn aligned_reads_of_what_is_not_cached_go_around_the_page_cache() {
        let len = 4 * CHUNK_BYTES + 1000;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
        let (_dir, file) = on_disk(&bytes);
        let mut reader = raw(file.try_clone().unwrap(), len as u64, "raw").unwrap();
        assert!(reader.source.direct.is_some(), "the build's filesystem refused O_DIRECT");
        assert!(read_all(&mut reader).unwrap() == bytes);
        assert_eq!(reader.source.direct.as_ref().unwrap().direct_bytes(), 4 * CHUNK_BYTES as u64);
        drop(reader);
        assert!(resident(&file, len) <= 8192, "{} bytes went through the page cache", resident(&file, len));
        // Once a direct read is refused, every read goes through the cache, whole.
        let (_dir, file) = on_disk(&bytes);
        let mut reader = raw(file.try_clone().unwrap(), len as u64, "raw").unwrap();
        reader.source.direct.as_ref().unwrap().refuse();
        assert!(read_all(&mut reader).unwrap() == bytes);
        assert_eq!(reader.source.direct.as_ref().unwrap().direct_bytes(), 0);
        assert!(resident(&file, len) >= 4 * CHUNK_BYTES, "the refused reads went around the cache");
    }

    /// Bytes the page cache holds (an image just built) are copied from it, not read from the
    /// disk again: all of them, or the stretches cached where only some are.
    #[test]
    fn cached_bytes_are_read_from_the_cache() {
        let len = 4 * CHUNK_BYTES;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let (_dir, file) = on_disk(&bytes);
        let mut warm = vec![0u8; len];
        file.read_exact_at(&mut warm, 0).unwrap();
        let mut reader = raw(file.try_clone().unwrap(), len as u64, "raw").unwrap();
        assert!(read_all(&mut reader).unwrap() == bytes);
        assert_eq!(reader.source.direct.as_ref().unwrap().direct_bytes(), 0, "cached bytes read from the disk");

        let (_dir, file) = on_disk(&bytes);
        let mut half = vec![0u8; 2 * CHUNK_BYTES];
        file.read_exact_at(&mut half, 2 * CHUNK_BYTES as u64).unwrap();
        let mut reader = raw(file.try_clone().unwrap(), len as u64, "raw").unwrap();
        assert!(read_all(&mut reader).unwrap() == bytes);
        assert_eq!(reader.source.direct.as_ref().unwrap().direct_bytes(), 2 * CHUNK_BYTES as u64);
    }

    /// Only reads aligned in memory, offset and length may go direct; advice is for the others.
    #[test]
    fn only_aligned_reads_go_direct() {
        let (_dir, file) = on_disk(&[1u8; 8192]);
        let source = SourceFile::new(file, 8192, "raw");
        let direct = source.direct.as_ref().unwrap();
        let big = super::super::direct_read::DIRECT_MIN_BYTES;
        assert!(direct.may_read(4096, 4096, big));
        assert!(!direct.may_read(4097, 4096, big));
        assert!(!direct.may_read(4096, 4095, big));
        assert!(!direct.may_read(4096, 4096, big + 100));
        assert!(!direct.may_read(4096, 4096, 4096), "smaller than a direct read");
        assert!(!source.reads_cached(&Part::Read { offset: 0, len: CHUNK_BYTES }, 0));
        assert!(source.reads_cached(&Part::Read { offset: 0, len: CHUNK_BYTES }, 512), "off a page in its buffer");
        assert!(source.reads_cached(&Part::Read { offset: 0, len: 1000 }, 0));
        assert!(source.reads_cached(&Part::Deflate { offset: 0, stored: 4096, len: 4096, whole: 4096 }, 0));
        direct.refuse();
        assert!(!direct.may_read(4096, 4096, big));
    }

    /// What a direct read returns is what a buffered read returns, byte for byte and error for
    /// error: offsets, lengths and memory aligned or not, across a hole, up to and past an end
    /// that is not a multiple of 4096 (a direct read that comes back short there goes on
    /// through the page cache and ends in the same error), and after another descriptor left
    /// dirty pages behind (the direct read sees them, not the stale disk).
    #[test]
    fn direct_and_buffered_reads_agree() {
        use super::super::direct_read::DIRECT_MIN_BYTES as BIG;
        let len = 3 * BIG + 1234;
        let (_dir, writer) = on_disk(&vec![0u8; len]);
        let path = std::fs::read_link(format!("/proc/self/fd/{}", writer.as_raw_fd())).unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut want = vec![0u8; len];
        for (at, n, seed) in [(0usize, 5000usize, 1u8), (BIG + 7, BIG / 2, 2), (len - 1234, 1234, 3)] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ seed).collect();
            writer.write_all_at(&bytes, at as u64).unwrap();
            want[at..at + n].copy_from_slice(&bytes);
        }
        writer.sync_all().unwrap();
        // SAFETY: advice on a descriptor this test owns: the reads start from the disk.
        unsafe { libc::posix_fadvise(writer.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let direct = SourceFile::new(std::fs::File::open(&path).unwrap(), len as u64, "raw");
        let buffered = SourceFile::new(std::fs::File::open(&path).unwrap(), len as u64, "raw");
        buffered.direct.as_ref().unwrap().refuse();
        let check = |want: &[u8]| {
            let (mut a, mut b) = (AlignedBuf::new(4 * BIG), AlignedBuf::new(4 * BIG));
            let ends = [0u64, 512, 4096, BIG as u64, 2 * BIG as u64, 3 * BIG as u64, len as u64 - 1234, len as u64];
            for offset in ends {
                for n in [BIG, BIG + 4096, 1000, 2 * BIG, 3 * BIG] {
                    for skew in [0usize, 512, 1] {
                        let (x, y) = (&mut a.as_mut_full()[skew..skew + n], &mut b.as_mut_full()[skew..skew + n]);
                        x.fill(0xee);
                        y.fill(0xdd);
                        let what = format!("{n} bytes at {offset} into memory {skew} past a page");
                        match (direct.read_exact_at(x, offset), buffered.read_exact_at(y, offset)) {
                            (Ok(()), Ok(())) => {
                                assert!(x == y, "{what}: direct and buffered differ");
                                let at = usize::try_from(offset).unwrap();
                                assert!(x == &want[at..at + n], "{what}: not the file's bytes");
                            }
                            (Err(e), Err(f)) => {
                                assert_eq!(e.to_string(), f.to_string(), "{what}");
                                assert!(offset + n as u64 > len as u64, "{what}: {e}");
                            }
                            (d, b) => panic!("{what}: direct {d:?}, buffered {b:?}"),
                        }
                    }
                }
            }
        };
        check(&want);
        assert!(direct.direct.as_ref().unwrap().direct_bytes() > 0, "no read went direct");
        // Dirty pages another descriptor left (not flushed): a direct read sees them.
        let fresh: Vec<u8> = (0..BIG + 100).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        writer.write_all_at(&fresh, 4096).unwrap();
        want[4096..4096 + fresh.len()].copy_from_slice(&fresh);
        check(&want);
        assert!(!direct.direct.as_ref().unwrap().refused(), "a direct read was refused");
    }

    /// The second descriptor is the file the first one opened, whatever became of its name:
    /// opened through a symlink, the name then renamed over, or unlinked and made again.
    #[test]
    fn the_direct_descriptor_reads_the_opened_file_not_its_name() {
        use super::super::direct_read::DIRECT_MIN_BYTES as BIG;
        let (dir, _) = on_disk(&[0u8; 4096]);
        let (path, link, other) = (dir.path().join("img"), dir.path().join("link"), dir.path().join("other"));
        std::fs::write(&path, vec![1u8; BIG]).unwrap();
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let opened = std::fs::File::open(&link).unwrap();
        std::fs::write(&other, vec![2u8; BIG]).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let source = SourceFile::new(opened, BIG as u64, "img");
        let mut buf = AlignedBuf::new(BIG);
        source.read_exact_at(&mut buf.as_mut_full()[..BIG], 0).unwrap();
        assert!(buf.data_full_of(BIG).iter().all(|b| *b == 1), "read the file renamed over the name");

        let opened = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![3u8; BIG]).unwrap();
        let source = SourceFile::new(opened, BIG as u64, "img");
        assert!(source.direct.is_some(), "an unlinked file is still opened again through its descriptor");
        source.read_exact_at(&mut buf.as_mut_full()[..BIG], 0).unwrap();
        assert!(buf.data_full_of(BIG).iter().all(|b| *b == 2), "read the file made under the name");
    }

    /// A direct read refused for whatever reason (ntfs3 answers EOPNOTSUPP to every direct
    /// read of a compressed file, which it reads through the page cache; simulated with a
    /// write-only descriptor: EBADF) is read again through the page cache, and direct reads
    /// end; a read the page cache refuses too (an offset pread refuses) is that error, once.
    #[test]
    fn a_refused_direct_read_is_read_through_the_page_cache() {
        use super::super::direct_read::{DirectReads, DIRECT_MIN_BYTES as BIG};
        let (dir, file) = on_disk(&vec![4u8; BIG]);
        let refusing = std::fs::OpenOptions::new().write(true).open(dir.path().join("raw")).unwrap();
        let source =
            SourceFile { file, direct: Some(DirectReads::through(refusing)), len: BIG as u64, name: "raw".into() };
        let mut buf = AlignedBuf::new(BIG);
        source.read_exact_at(&mut buf.as_mut_full()[..BIG], 0).unwrap();
        assert!(buf.data_full_of(BIG).iter().all(|b| *b == 4));
        assert!(source.direct.as_ref().unwrap().refused());

        let (_dir, file) = on_disk(&vec![1u8; BIG]);
        let source = SourceFile::new(file, BIG as u64, "raw");
        let err = source.read_exact_at(&mut buf.as_mut_full()[..BIG], 1 << 63).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        source.read_exact_at(&mut buf.as_mut_full()[..BIG], 0).unwrap();
        assert!(buf.data_full_of(BIG).iter().all(|b| *b == 1));
    }

    /// Plans the stretches it holds, then ends.
    struct Stretches(VecDeque<Vec<Part>>);

    impl Planner for Stretches {
        fn next(&mut self) -> std::io::Result<Option<Stretch>> {
            Ok(self.0.pop_front().map(Stretch::Fill))
        }
    }

    /// Every part read through the page cache is asked ahead, also one whose offset and
    /// length are aligned but that lands off a page in its buffer (after a 512-byte qcow2
    /// cluster); one read direct is not.
    #[test]
    fn every_part_read_through_the_page_cache_is_advised() {
        use super::super::direct_read::DIRECT_MIN_BYTES as BIG;
        let (_dir, file) = on_disk(&vec![1u8; 4 * BIG]);
        let source = SourceFile::new(file, 4 * BIG as u64, "raw");
        let plan = Stretches(VecDeque::from([
            vec![Part::Read { offset: 2 * BIG as u64, len: BIG }],
            vec![Part::Zero(512), Part::Read { offset: BIG as u64, len: BIG }],
        ]));
        let mut reader = Prefetch::new(source, Box::new(plan));
        let (tx, rx) = mpsc::channel();
        reader.advice = Some(tx);
        reader.plan_ahead().unwrap();
        let advised: Vec<(u64, u64)> = rx.try_iter().collect();
        assert_eq!(advised, vec![(BIG as u64, BIG as u64)], "the ranges advised");
        let mut buf = AlignedBuf::new(CHUNK_BYTES);
        assert!(matches!(reader.next_into(&mut buf).unwrap(), Piece::Data(n) if n == BIG));
        assert!(matches!(reader.next_into(&mut buf).unwrap(), Piece::Data(n) if n == BIG + 512));
        let got = buf.data_full_of(BIG + 512);
        assert!(got[..512].iter().all(|b| *b == 0) && got[512..].iter().all(|b| *b == 1));
    }

    /// A FIFO given as the source is not opened again (that open would wait for a writer).
    #[test]
    fn a_fifo_source_is_not_opened_again() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let source = SourceFile::new(file, 0, "fifo");
            let _ = tx.send(source.direct.is_some());
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(2));
        if got.is_err() {
            // A writer releases the blocked open.
            let _writer = std::fs::OpenOptions::new().write(true).open(&fifo);
            let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        }
        assert_eq!(got, Ok(false), "SourceFile::new blocked opening a FIFO again");
    }

    /// A file cut shorter than it was when opened: an error naming it, not a short image.
    #[test]
    fn a_file_cut_while_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, vec![7u8; 3 * CHUNK_BYTES]).unwrap();
        let reader = raw(std::fs::File::open(&path).unwrap(), 3 * CHUNK_BYTES as u64, "cut.img");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(CHUNK_BYTES as u64 + 10).unwrap();
        let Err(err) = read_all(&mut reader.unwrap()) else { panic!("the cut went unnoticed") };
        assert!(err.to_string().contains("was it changed while being written"), "{err}");
        // Cut behind the stretches read ahead: the reads that follow come up short.
        let chunks = 2 * READS_IN_FLIGHT + 2;
        std::fs::write(&path, vec![7u8; chunks * CHUNK_BYTES]).unwrap();
        let mut reader = raw(std::fs::File::open(&path).unwrap(), (chunks * CHUNK_BYTES) as u64, "cut.img").unwrap();
        let mut buf = AlignedBuf::new(CHUNK_BYTES);
        assert!(matches!(reader.next_into(&mut buf).unwrap(), Piece::Data(n) if n == CHUNK_BYTES));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(10).unwrap();
        let Err(err) = read_all(&mut reader) else { panic!("the cut went unnoticed") };
        assert!(err.to_string().contains("cut.img ended at byte"), "{err}");
    }

    /// Deflate streams decode to exactly the room given: short ones and garbage are refused.
    #[test]
    fn inflating_exactly() {
        use std::io::Write;
        let plain: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&plain).unwrap();
        let stream = enc.finish().unwrap();
        let mut out = vec![0u8; plain.len()];
        inflate_exactly(&[stream.clone(), vec![0xaa; 300]].concat(), &mut out).unwrap();
        assert!(out == plain);
        let mut half = vec![0u8; plain.len() / 2];
        inflate_exactly(&stream, &mut half).unwrap();
        assert!(half[..] == plain[..plain.len() / 2]);
        let mut more = vec![0u8; plain.len() + 1];
        assert!(inflate_exactly(&stream, &mut more).unwrap_err().contains("not 65537"));
        assert!(inflate_exactly(&stream[..stream.len() / 2], &mut out).is_err());
        assert!(inflate_exactly(&[0xff; 64], &mut out).is_err());
        assert!(inflate_exactly(&[], &mut out).is_err());
    }
}
