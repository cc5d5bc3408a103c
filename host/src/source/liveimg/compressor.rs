//! Squashfs block compression on every core. backhand compresses a file's blocks one after the
//! other on the thread that writes the image; for the filesystem image (nearly all of a liveimg)
//! worker threads compress its blocks ahead of backhand, in file order, and each result is handed
//! over when backhand asks for exactly that block. Anything else backhand compresses (other
//! files, fragments, metadata) is compressed on the spot.
//!
//! xz blocks are compressed here rather than by backhand, the way mksquashfs does it: one
//! single-threaded xz stream per block (backhand starts a two-thread encoder for every block),
//! trying plain LZMA2 and each BCJ filter the source was made with and keeping the smallest.

use crate::source::squashfs::RustDecoder;
use backhand::compression::{CompressionAction, DefaultCompressor};
use backhand::{BackhandError, FilesystemCompressor};
use imgforge_protocol::bytes::{le16, le32};
use liblzma::stream::{Action, Check, Filters, LzmaOptions, Status, Stream};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Blocks read ahead per worker thread: enough to keep every worker busy while the writer waits.
const AHEAD_PER_WORKER: usize = 4;

/// A block of the filesystem image and where its compressed form will arrive.
struct Pending {
    input: Arc<[u8]>,
    output: Receiver<Result<Vec<u8>, BackhandError>>,
}

/// The blocks compressed ahead, in the order backhand will ask for them.
struct Ahead {
    head: Option<Pending>,
    rest: Receiver<Pending>,
}

/// How blocks are compressed: xz by us, anything else by backhand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// xz with this dictionary size and the squashfs BCJ filter bits of the source.
    Xz { dict_size: u32, filters: u32 },
    /// backhand's own compressor (gzip, zstd, lz4, …).
    Backhand,
}

/// The squashfs superblock flag "compression options follow the superblock".
const COMPRESSOR_OPTIONS: u16 = 0x0400;
/// The squashfs compressor id of xz.
const XZ_ID: u16 = 4;
/// Size of the squashfs 4.0 superblock.
const SUPERBLOCK_LEN: usize = 96;

impl Codec {
    /// The codec of a squashfs from its first bytes (superblock and compression options).
    pub fn of_squashfs(head: &[u8]) -> Codec {
        let (u16_at, u32_at) = (|o| le16(head, o), |o| le32(head, o));
        if head.get(..4) != Some(b"hsqs") || u16_at(20) != Some(XZ_ID) {
            return Codec::Backhand;
        }
        let Some(block_size) = u32_at(12) else { return Codec::Backhand };
        let flags = u16_at(24).unwrap_or(0);
        if flags & COMPRESSOR_OPTIONS == 0 {
            return Codec::Xz { dict_size: block_size, filters: 0 };
        }
        // The options are a metadata block stored uncompressed: a 2-byte header, then the fields.
        match (u32_at(SUPERBLOCK_LEN + 2), u32_at(SUPERBLOCK_LEN + 6)) {
            (Some(dict_size), Some(filters)) => Codec::Xz { dict_size, filters },
            _ => Codec::Backhand,
        }
    }
}

/// Appends one filter to a chain.
type AddFilter = fn(&mut Filters) -> &mut Filters;

/// The BCJ filters of squashfs-tools' `-Xbcj`, by their bit in the xz compression options.
const BCJ: [(u32, AddFilter); 6] = [
    (1, Filters::x86),
    (2, Filters::powerpc),
    (4, Filters::ia64),
    (8, Filters::arm),
    (16, Filters::arm_thumb),
    (32, Filters::sparc),
];

/// One squashfs block as an xz stream (CRC32 check, preset 6, as mksquashfs): the smallest of
/// plain LZMA2 and LZMA2 after each BCJ filter in `filters`.
fn xz_block(bytes: &[u8], dict_size: u32, filters: u32) -> Result<Vec<u8>, BackhandError> {
    let xz_error = |e: liblzma::stream::Error| BackhandError::StdIo(std::io::Error::other(format!("xz: {e}")));
    let mut opts = LzmaOptions::new_preset(6).map_err(xz_error)?;
    opts.dict_size(dict_size);
    let chains = std::iter::once(None).chain(BCJ.iter().filter(|(bit, _)| filters & bit != 0).map(|(_, f)| Some(f)));
    let mut best: Option<Vec<u8>> = None;
    for bcj in chains {
        let mut chain = Filters::new();
        if let Some(add) = bcj {
            add(&mut chain);
        }
        chain.lzma2(&opts);
        let mut stream = Stream::new_stream_encoder(&chain, Check::Crc32).map_err(xz_error)?;
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16 + 256);
        loop {
            let consumed = crate::stream::at_most(stream.total_in(), bytes.len());
            match stream.process_vec(&bytes[consumed..], &mut out, Action::Finish).map_err(xz_error)? {
                Status::StreamEnd => break,
                _ => out.reserve(out.capacity().max(4096)),
            }
        }
        if best.as_ref().is_none_or(|b| out.len() < b.len()) {
            best = Some(out);
        }
    }
    Ok(best.unwrap_or_default())
}

/// Compresses one block with `codec`.
fn compress_block(
    codec: Codec,
    bytes: &[u8],
    fc: FilesystemCompressor,
    block_size: u32,
) -> Result<Vec<u8>, BackhandError> {
    match codec {
        Codec::Xz { dict_size, filters } => xz_block(bytes, dict_size, filters),
        Codec::Backhand => DefaultCompressor.compress(bytes, fc, block_size),
    }
}

/// The repack's block compressor, answering from blocks compressed ahead when it can.
pub struct AheadCompressor {
    ahead: Mutex<Option<Ahead>>,
    codec: Mutex<Codec>,
}

/// The one instance: backhand takes a `&'static` compressor.
pub static AHEAD: AheadCompressor = AheadCompressor { ahead: Mutex::new(None), codec: Mutex::new(Codec::Backhand) };

impl AheadCompressor {
    /// Starts compressing `file`'s blocks the way backhand's data writer will ask for them: every
    /// full block that is not all zeros (zero blocks become holes, a short tail becomes a
    /// fragment). Replaces whatever an earlier run left.
    pub fn start(&self, file: &Path, codec: Codec, fc: FilesystemCompressor, block_size: u32) -> std::io::Result<()> {
        let mut file = File::open(file)?;
        *self.codec.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = codec;
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let (ordered_tx, ordered_rx) = sync_channel::<Pending>(workers * AHEAD_PER_WORKER);
        let (job_tx, job_rx) = sync_channel::<(Arc<[u8]>, SyncSender<_>)>(workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            std::thread::spawn(move || loop {
                let job = job_rx.lock().map(|rx| rx.recv());
                let Ok(Ok((input, done))) = job else { return };
                let _ = done.send(compress_block(codec, &input, fc, block_size));
            });
        }
        std::thread::spawn(move || {
            let mut block = vec![0u8; block_size as usize];
            while read_full(&mut file, &mut block) == block.len() {
                if block.iter().all(|b| *b == 0) {
                    continue;
                }
                let input: Arc<[u8]> = Arc::from(block.as_slice());
                let (done_tx, done_rx) = sync_channel(1);
                if ordered_tx.send(Pending { input: Arc::clone(&input), output: done_rx }).is_err()
                    || job_tx.send((input, done_tx)).is_err()
                {
                    return;
                }
            }
        });
        *self.lock() = Some(Ahead { head: None, rest: ordered_rx });
        Ok(())
    }

    /// Drops what is left (threads end when their channels close).
    pub fn stop(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Ahead>> {
        self.ahead.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The compressed form of `bytes` if it is the next block compressed ahead.
    fn take_ahead(&self, bytes: &[u8]) -> Option<Result<Vec<u8>, BackhandError>> {
        let mut guard = self.lock();
        let ahead = guard.as_mut()?;
        if ahead.head.is_none() {
            ahead.head = ahead.rest.recv().ok();
        }
        if ahead.head.as_ref().is_some_and(|p| *p.input == *bytes) {
            let pending = ahead.head.take()?;
            drop(guard);
            return pending.output.recv().ok();
        }
        None
    }
}

/// Reads until `buf` is full or the file ends; a read error ends the file here too (backhand,
/// reading the same file, reports it).
fn read_full(file: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    filled
}

impl AheadCompressor {
    /// One block for backhand's writer: the one compressed ahead if it is this block, else
    /// compressed now.
    fn compress(&self, bytes: &[u8], fc: FilesystemCompressor, block_size: u32) -> Result<Vec<u8>, BackhandError> {
        match self.take_ahead(bytes) {
            Some(result) => result,
            None => {
                let codec = *self.codec.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                compress_block(codec, bytes, fc, block_size)
            }
        }
    }
}

/// The [`CompressionAction`] of the repack: Rust decoders, blocks from [`AHEAD`].
pub static REPACK: RustDecoder = RustDecoder::new(|bytes, fc, block_size| AHEAD.compress(bytes, fc, block_size));

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(compressor: u16, flags: u16, options: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_LEN];
        b[..4].copy_from_slice(b"hsqs");
        b[12..16].copy_from_slice(&131072u32.to_le_bytes());
        b[20..22].copy_from_slice(&compressor.to_le_bytes());
        b[24..26].copy_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(options);
        b
    }

    #[test]
    fn codec_from_superblock() {
        let opts = [&[8u8, 0x80][..], &65536u32.to_le_bytes(), &1u32.to_le_bytes()].concat();
        let cases: Vec<(Vec<u8>, Codec)> = vec![
            (superblock(XZ_ID, 0, &[]), Codec::Xz { dict_size: 131072, filters: 0 }),
            (superblock(XZ_ID, COMPRESSOR_OPTIONS, &opts), Codec::Xz { dict_size: 65536, filters: 1 }),
            (superblock(XZ_ID, COMPRESSOR_OPTIONS, &opts[..5]), Codec::Backhand),
            (superblock(6, 0, &[]), Codec::Backhand),
            (superblock(1, COMPRESSOR_OPTIONS, &opts), Codec::Backhand),
            (b"hsq".to_vec(), Codec::Backhand),
            (vec![], Codec::Backhand),
        ];
        for (head, want) in cases {
            assert_eq!(Codec::of_squashfs(&head), want, "{head:02x?}");
        }
    }

    #[test]
    fn xz_blocks_decode_to_the_input_and_bcj_never_grows_them() {
        let block: Vec<u8> = (0..131072u32).map(|i| (i * 7 / 13 % 251) as u8).collect();
        let plain = xz_block(&block, 131072, 0).unwrap();
        let with_bcj = xz_block(&block, 131072, 1 | 8).unwrap();
        assert!(with_bcj.len() <= plain.len());
        for packed in [plain, with_bcj] {
            let mut out = Vec::with_capacity(block.len());
            crate::source::squashfs::decode(&packed, &mut out, backhand::compression::Compressor::Xz).unwrap();
            assert_eq!(out, block);
        }
    }
}
