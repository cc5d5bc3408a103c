//! An xz image's blocks decoded on worker threads ahead of the writer, handed over in order.
//! `xz -T` writes an image in independent blocks of a few MiB (24 MiB at `-6`), listed with
//! their sizes in the index at the end of the file; lzma-rust2's one-thread reader decoded
//! them one after the other on one core, and checked each block's CRC64 a byte at a time.
//!
//! Before a byte is written, the whole layout is checked: one stream (header, blocks, index,
//! footer, nothing else), the index's records and CRC32, and every block's header (its CRC32,
//! a single LZMA2 filter, sizes agreeing with the index). A block may decode to at most
//! [`MAX_BLOCK_BYTES`], and its dictionary is never larger than that: a block cannot refer
//! further back than its own start. At most [`WINDOW_BYTES`] of decoded blocks are dispatched
//! and not yet consumed. Each block must decode to exactly the length the index records, end
//! where its compressed data ends, and match its check (CRC32, CRC64 or SHA-256). Anything
//! else (several streams, other filters, larger blocks, a single-block file) is read by the
//! one-thread reader as before ([`ParallelXz::new`] says why).

use crate::source::decompress::{varint, xz_index_len};
use crate::source::ordered_decode::OrderedDecoders;
use crate::stream::{at_most, ChunkReader, Piece};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

/// The most decoder threads, whatever the machine has.
pub const MAX_THREADS: usize = 4;
/// The most blocks a file may have for this reader.
pub const MAX_BLOCKS: usize = 1 << 20;
/// The most bytes one block may decode to here (`xz -T -7` makes 48 MiB blocks).
pub const MAX_BLOCK_BYTES: u64 = 48 << 20;
/// Decoded bytes the dispatched blocks may hold at once (at least one block is dispatched).
pub const WINDOW_BYTES: u64 = 96 << 20;
/// Stream header and footer.
const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\x00";
const FOOTER_MAGIC: &[u8; 2] = b"YZ";
const LZMA2_FILTER: u64 = 0x21;

/// What checks each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Crc32,
    Crc64,
    Sha256,
}

impl Check {
    fn of(flags: [u8; 2]) -> Option<Check> {
        match flags {
            [0, 0] => Some(Check::None),
            [0, 1] => Some(Check::Crc32),
            [0, 4] => Some(Check::Crc64),
            [0, 10] => Some(Check::Sha256),
            _ => None,
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Check::None => 0,
            Check::Crc32 => 4,
            Check::Crc64 => 8,
            Check::Sha256 => 32,
        }
    }

    /// Whether `data`'s check is `stored` (pure).
    fn matches(self, data: &[u8], stored: &[u8]) -> bool {
        match self {
            Check::None => stored.is_empty(),
            Check::Crc32 => stored == crc32(data).to_le_bytes(),
            Check::Crc64 => stored == crc64(data).to_le_bytes(),
            Check::Sha256 => {
                use sha2::Digest;
                stored == sha2::Sha256::digest(data).as_slice()
            }
        }
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// CRC-64/XZ (ECMA-182, reflected), eight bytes at a time.
pub fn crc64(data: &[u8]) -> u64 {
    static TABLES: OnceLock<Box<[[u64; 256]; 8]>> = OnceLock::new();
    let t = TABLES.get_or_init(|| {
        const POLY: u64 = 0xc96c_5795_d787_0f42;
        let mut t = Box::new([[0u64; 256]; 8]);
        for i in 0..256 {
            let mut c = i as u64;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            t[0][i] = c;
        }
        for k in 1..8 {
            for i in 0..256 {
                t[k][i] = (t[k - 1][i] >> 8) ^ t[0][(t[k - 1][i] & 0xff) as usize];
            }
        }
        t
    });
    let mut crc = !0u64;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let v = crc ^ u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let b = |n: u32| ((v >> (8 * n)) & 0xff) as usize;
        crc = t[7][b(0)] ^ t[6][b(1)] ^ t[5][b(2)] ^ t[4][b(3)] ^ t[3][b(4)] ^ t[2][b(5)] ^ t[1][b(6)] ^ t[0][b(7)];
    }
    for &byte in chunks.remainder() {
        crc = t[0][((crc ^ u64::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// One block of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    /// Where it starts in the file.
    offset: u64,
    /// Its header, compressed data and check (the index's unpadded size).
    unpadded: u64,
    /// What it decodes to.
    len: u64,
    /// Its header's length.
    header: u64,
    /// Its LZMA2 dictionary, capped at `len`.
    dict: u32,
}

impl Block {
    /// Header, data, padding and check.
    fn stored(&self) -> u64 {
        (self.unpadded + 3) & !3
    }
}

/// What a block header says (pure): (header length, LZMA2 dictionary size, compressed size
/// and uncompressed size if recorded). Only a single LZMA2 filter is taken.
fn block_header(b: &[u8]) -> Result<(u64, u32, Option<u64>, Option<u64>), String> {
    let size = usize::from(*b.first().ok_or("an empty block")?);
    if size == 0 {
        return Err("an index where a block should be".into());
    }
    let len = (size + 1) * 4;
    let h = b.get(..len).ok_or("a block header past the end of the block")?;
    if crc32(&h[..len - 4]).to_le_bytes() != h[len - 4..] {
        return Err("a block header whose CRC32 does not match".into());
    }
    let flags = h[1];
    if flags & 0x3c != 0 {
        return Err("a block header with reserved flags set".into());
    }
    if flags & 3 != 0 {
        return Err("a block with filters besides LZMA2".into());
    }
    let body = &h[..len - 4];
    let mut pos = 2;
    let compressed =
        if flags & 0x40 != 0 { Some(varint(body, &mut pos).ok_or("a bad compressed size")?) } else { None };
    let uncompressed =
        if flags & 0x80 != 0 { Some(varint(body, &mut pos).ok_or("a bad uncompressed size")?) } else { None };
    let id = varint(body, &mut pos).ok_or("a bad filter id")?;
    let props = varint(body, &mut pos).ok_or("a bad filter property size")?;
    if id != LZMA2_FILTER || props != 1 {
        return Err(format!("a block with filter {id:#x}, not LZMA2 alone"));
    }
    let d = *body.get(pos).ok_or("a short block header")?;
    pos += 1;
    if d > 40 {
        return Err(format!("an LZMA2 dictionary byte of {d}"));
    }
    if body.get(pos..).is_some_and(|pad| pad.iter().any(|b| *b != 0)) {
        return Err("a block header with non-zero padding".into());
    }
    let dict = if d == 40 { u32::MAX } else { (2 | (u32::from(d) & 1)) << (d / 2 + 11) };
    Ok((len as u64, dict, compressed, uncompressed))
}

/// The blocks of the xz file `file` (`len` bytes, one stream) and its check, checked as the
/// module says; or why this reader does not take it.
fn layout(file: &std::fs::File, len: u64) -> Result<(Check, Vec<Block>), String> {
    let io = |e: std::io::Error| format!("reading it: {e}");
    let mut head = [0u8; 12];
    let mut foot = [0u8; 12];
    if len < 32 {
        return Err("it is too short".into());
    }
    file.read_exact_at(&mut head, 0).map_err(io)?;
    file.read_exact_at(&mut foot, len - 12).map_err(io)?;
    if &head[..6] != XZ_MAGIC || crc32(&head[6..8]).to_le_bytes() != head[8..12] {
        return Err("its stream header is not one this reader takes".into());
    }
    let check = Check::of([head[6], head[7]]).ok_or("its check type is not one this reader takes")?;
    if &foot[10..] != FOOTER_MAGIC || foot[8..10] != head[6..8] || crc32(&foot[4..10]).to_le_bytes() != foot[..4] {
        return Err("it is not one stream ending at the end of the file".into());
    }
    let index_len = xz_index_len(&foot).ok_or("a bad stream footer")?;
    let index_at = len.checked_sub(12 + index_len).filter(|at| *at >= 12).ok_or("an index larger than the file")?;
    let mut index = vec![0u8; usize::try_from(index_len).map_err(|e| e.to_string())?];
    file.read_exact_at(&mut index, index_at).map_err(io)?;
    let n = index.len();
    if n < 8 || crc32(&index[..n - 4]).to_le_bytes() != index[n - 4..] || index[0] != 0 {
        return Err("its index does not match its CRC32".into());
    }
    let mut pos = 1;
    let records = varint(&index, &mut pos).ok_or("a bad index")?;
    if records < 2 || records > (n as u64) / 2 || records > MAX_BLOCKS as u64 {
        return Err(format!("{records} blocks (one block cannot be split between threads)"));
    }
    let mut blocks = Vec::with_capacity(usize::try_from(records).map_err(|e| e.to_string())?);
    let mut offset = 12u64;
    for _ in 0..records {
        let unpadded = varint(&index, &mut pos).ok_or("a bad index record")?;
        let out = varint(&index, &mut pos).ok_or("a bad index record")?;
        if out > MAX_BLOCK_BYTES {
            return Err(format!("blocks of {out} bytes, more than {MAX_BLOCK_BYTES} decoded at once here"));
        }
        let block = Block { offset, unpadded, len: out, header: 0, dict: 0 };
        // Incompressible data grows a little under LZMA2; more than this is not a block of it.
        if unpadded < 5 || unpadded > out + out / 16 + (64 << 10) + 1024 + 32 {
            return Err(format!("a block of {unpadded} bytes stored for {out}"));
        }
        offset = offset.checked_add(block.stored()).filter(|end| *end <= index_at).ok_or("blocks past the index")?;
        blocks.push(block);
    }
    if offset != index_at || pos > n - 4 || index[pos..n - 4].iter().any(|b| *b != 0) {
        return Err("an index that does not match its blocks".into());
    }
    for block in &mut blocks {
        let mut h = vec![0u8; at_most(block.unpadded.min(1024), 1024)];
        file.read_exact_at(&mut h, block.offset).map_err(io)?;
        let (header, dict, compressed, uncompressed) = block_header(&h)?;
        let data = block.unpadded.checked_sub(header + check.bytes()).filter(|d| *d > 0).ok_or("a block too short")?;
        if compressed.is_some_and(|c| c != data) || uncompressed.is_some_and(|u| u != block.len) {
            return Err("a block header that does not match the index".into());
        }
        block.header = header;
        block.dict = dict.min(u32::try_from(block.len.max(4096)).unwrap_or(u32::MAX));
    }
    Ok((check, blocks))
}

/// What the workers need: owned, shared.
struct Plan {
    file: std::fs::File,
    blocks: Vec<Block>,
    check: Check,
}

impl Plan {
    /// Block `i`, decoded and checked, exactly as long as the index says.
    fn decode(&self, i: usize, stored: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        let block = self.blocks[i];
        let bad = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("xz block {i} at byte {}: {why}", block.offset),
            )
        };
        stored.resize(at_most(block.stored(), usize::MAX), 0);
        self.file.read_exact_at(stored, block.offset)?;
        // The header once more: the file may have changed since it was checked.
        let (header, ..) = block_header(stored).map_err(|e| bad(&e))?;
        if header != block.header {
            return Err(bad("its header changed"));
        }
        let data_end = at_most(block.unpadded - self.check.bytes(), usize::MAX);
        let check_at = stored.len() - at_most(self.check.bytes(), usize::MAX);
        let mut input = stored.get(at_most(header, usize::MAX)..data_end).ok_or_else(|| bad("too short"))?;
        let len = at_most(block.len, usize::MAX);
        let mut out = Vec::with_capacity(len);
        {
            let decoder = lzma_rust2::Lzma2Reader::new(&mut input, block.dict, None);
            decoder.take(block.len + 1).read_to_end(&mut out).map_err(|e| bad(&format!("it does not decode: {e}")))?;
        }
        if out.len() != len {
            return Err(bad(&format!("it decodes to {} bytes, not the {len} its index records", out.len())));
        }
        if !input.is_empty() || stored[data_end..check_at].iter().any(|b| *b != 0) {
            return Err(bad("its compressed data does not end where the index says"));
        }
        if !self.check.matches(&out, &stored[check_at..]) {
            return Err(bad("its check does not match: the image is corrupt"));
        }
        Ok(out)
    }
}

/// An xz file's blocks decoded ahead on worker threads (see the module).
pub struct ParallelXz {
    plan: Arc<Plan>,
    decoders: OrderedDecoders,
    /// Next block to dispatch, and the decoded bytes dispatched and not consumed yet.
    next_dispatch: usize,
    ahead_bytes: u64,
    /// Next block to hand over, and the decoded ones that arrived before their turn.
    next_take: usize,
    current: Vec<u8>,
    current_pos: usize,
}

impl ParallelXz {
    /// Reads the xz file `file` of `len` bytes with at most `threads` decoders, or says why
    /// this reader does not take it (then the one-thread reader does).
    pub fn new(file: std::fs::File, len: u64, threads: usize) -> Result<Self, String> {
        let (check, blocks) = layout(&file, len)?;
        let threads = threads.clamp(1, MAX_THREADS);
        let plan = Arc::new(Plan { file, blocks, check });
        let decoding = plan.clone();
        let decoders =
            OrderedDecoders::start(threads, "xz block", Arc::new(move |i, stored| decoding.decode(i, stored)));
        let mut me = Self {
            plan,
            decoders,
            next_dispatch: 0,
            ahead_bytes: 0,
            next_take: 0,
            current: Vec::new(),
            current_pos: 0,
        };
        me.dispatch();
        Ok(me)
    }

    /// Hands blocks to the workers until the window is full (one block at least).
    fn dispatch(&mut self) {
        while let Some(block) = self.plan.blocks.get(self.next_dispatch) {
            if self.ahead_bytes > 0 && self.ahead_bytes + block.len > WINDOW_BYTES {
                return;
            }
            if !self.decoders.send(self.next_dispatch) {
                return;
            }
            self.ahead_bytes += block.len;
            self.next_dispatch += 1;
        }
    }

    /// Makes the next block the current one; false after the last.
    fn take_block(&mut self) -> std::io::Result<bool> {
        let i = self.next_take;
        let Some(block) = self.plan.blocks.get(i).copied() else { return Ok(false) };
        self.next_take += 1;
        let decoded = self.decoders.take(i);
        self.ahead_bytes -= block.len;
        self.dispatch();
        self.current = decoded?;
        self.current_pos = 0;
        Ok(true)
    }
}

impl ChunkReader for ParallelXz {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
        let mut got = 0;
        while got < buf.len() {
            if self.current_pos < self.current.len() {
                let n = (self.current.len() - self.current_pos).min(buf.len() - got);
                buf[got..got + n].copy_from_slice(&self.current[self.current_pos..self.current_pos + n]);
                self.current_pos += n;
                got += n;
            } else if !self.take_block()? {
                break;
            }
        }
        Ok(if got == 0 { Piece::End } else { Piece::Data(got) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn crc64_of_the_check_string() {
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
        assert_eq!(crc64(b""), 0);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        // Eight at a time and one at a time agree.
        let mut crc = !0u64;
        for &b in &long {
            crc ^= u64::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xc96c_5795_d787_0f42 } else { crc >> 1 };
            }
        }
        assert_eq!(crc64(&long), !crc);
    }

    fn read_all(r: &mut dyn ChunkReader) -> std::io::Result<Vec<u8>> {
        crate::stream::read_back(r, true)
    }

    fn xz(dir: &std::path::Path, name: &str, data: &[u8], args: &[&str]) -> std::path::PathBuf {
        let plain = dir.join(format!("{name}.raw"));
        std::fs::write(&plain, data).unwrap();
        let status = Command::new("xz").args(args).arg("-k").arg("-f").arg(&plain).status().expect("xz is installed");
        assert!(status.success());
        dir.join(format!("{name}.raw.xz"))
    }

    fn open(path: &std::path::Path) -> Result<ParallelXz, String> {
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        ParallelXz::new(file, len, 3)
    }

    /// Multi-block files made by xz with each check decode to their bytes; one-block files,
    /// BCJ filters and blocks past the cap are left to the one-thread reader.
    #[test]
    fn blocks_decode_in_order_and_odd_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..(5 << 20) + 12_345)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if (i / 100_000) % 2 == 0 {
                    state as u8
                } else {
                    (i % 7) as u8
                }
            })
            .collect();
        for check in ["none", "crc32", "crc64", "sha256"] {
            let name = format!("c-{check}");
            let path = xz(dir.path(), &name, &data, &["-T2", "--block-size=1MiB", &format!("--check={check}")]);
            let got = read_all(&mut open(&path).unwrap_or_else(|e| panic!("{check}: {e}"))).unwrap();
            assert!(got == data, "{check}: decoded bytes differ");
        }
        let one = xz(dir.path(), "one", &data, &["-T1"]);
        assert!(open(&one).err().unwrap().contains("1 blocks"));
        let bcj = xz(dir.path(), "bcj", &data, &["--x86", "--lzma2=preset=1", "--block-size=1MiB"]);
        assert!(open(&bcj).err().unwrap().contains("filters besides LZMA2"));
        let big = xz(dir.path(), "big", &vec![1u8; 50 << 20], &["-T2", "--block-size=49MiB", "-0"]);
        assert!(open(&big).err().unwrap().contains("more than"));
    }

    /// Corrupt files: a flipped byte inside a block's data, a changed check, a cut file; an
    /// error naming the block (or a refusal before anything is read), never wrong bytes.
    #[test]
    fn corrupt_blocks_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| ((i / 3) % 251) as u8).collect();
        let path = xz(dir.path(), "ok", &data, &["-T2", "--block-size=1MiB", "--check=crc64"]);
        let bytes = std::fs::read(&path).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (_, blocks) = layout(&file, bytes.len() as u64).unwrap();
        assert_eq!(blocks.len(), 3);
        let second = blocks[1];
        for (what, at) in [
            ("data", second.offset + second.header + 5),
            ("check", second.offset + second.stored() - 1),
            ("header", second.offset + 2),
        ] {
            let mut broken = bytes.clone();
            broken[usize::try_from(at).unwrap()] ^= 0x40;
            let p = dir.path().join(format!("broken-{what}.xz"));
            std::fs::write(&p, &broken).unwrap();
            match open(&p) {
                Err(why) => assert_eq!(what, "header", "{what}: refused up front: {why}"),
                Ok(mut r) => {
                    let Err(e) = read_all(&mut r) else { panic!("{what}: corrupt block read without error") };
                    assert!(e.to_string().contains("xz block 1"), "{what}: {e}");
                }
            }
        }
        let cut = dir.path().join("cut.xz");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        assert!(open(&cut).is_err());
    }

    #[test]
    fn block_headers() {
        // LZMA2 alone, dictionary byte 22 (8 MiB), padded to 12 bytes with the CRC32.
        let mut h = vec![2u8, 0, 0x21, 1, 22, 0, 0, 0];
        h.extend_from_slice(&crc32(&h).to_le_bytes());
        assert_eq!(block_header(&h), Ok((12, 8 << 20, None, None)));
        let mut bad = h.clone();
        bad[4] = 41;
        let fix = |b: &mut Vec<u8>| {
            let c = crc32(&b[..8]).to_le_bytes();
            b[8..].copy_from_slice(&c);
        };
        fix(&mut bad);
        assert!(block_header(&bad).is_err());
        let mut delta = h.clone();
        delta[2] = 3;
        fix(&mut delta);
        assert!(block_header(&delta).unwrap_err().contains("not LZMA2"));
        assert!(block_header(&h[..11]).is_err());
        assert!(block_header(&[0]).is_err());
        assert!(block_header(&[]).is_err());
        for n in 0..=255u8 {
            let _ = block_header(&[n, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        }
    }
}
