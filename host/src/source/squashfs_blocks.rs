//! A file inside a squashfs (a liveimg's filesystem image) read with its data blocks decoded on
//! several threads ahead of the writer, handed over in order. backhand's own reader decodes a
//! batch of blocks at a time and waits for the whole batch while the caller copies nothing, so
//! on this path the cores took turns instead of working together.
//!
//! The blocks are independent: each worker reads one block's stored bytes with `pread` and
//! decodes it with [`squashfs::decode`] (the same bounded Rust decoders backhand calls), and
//! must get back exactly the bytes that block holds. At most [`window`] blocks are dispatched
//! and not yet consumed, so memory stays bounded whatever the image says. Sparse blocks are
//! handed over as holes without a thread; the file's tail in a fragment block, if any, is read
//! through backhand.

use crate::source::ordered_decode::OrderedDecoders;
use crate::source::squashfs::{self, MAX_BLOCK_BYTES};
use crate::stream::{at_most, ChunkReader, Piece};
use backhand::compression::Compressor;
use backhand::{FilesystemReader, SquashfsFileReader, SquashfsReadFile};
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The most decoder threads, whatever the machine has.
pub const MAX_THREADS: usize = 4;
/// The most blocks a file may have for this reader (its plan takes 24 bytes a block: at most
/// 24 MiB, for a file of 128 GiB in 128 KiB blocks). A larger one is read by backhand, whose
/// own list of the blocks takes 4 bytes each: a small hostile image claiming a huge file is
/// not made more expensive to refuse.
pub const MAX_BLOCKS: usize = 1 << 20;
/// Decoded bytes the dispatched blocks may hold at once (plus as much again for their stored
/// bytes while they decode).
pub const WINDOW_BYTES: u64 = 16 << 20;

/// One whole data block of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    /// Where its stored bytes start in the image.
    offset: u64,
    /// How many bytes are stored (0: a sparse block of zeros, nothing stored).
    stored: u32,
    /// Stored as it is, not compressed.
    uncompressed: bool,
    /// How many bytes it must decode to.
    len: usize,
}

/// What the workers need: owned, shared.
struct Plan {
    image: std::fs::File,
    blocks: Vec<Block>,
    block_size: usize,
    compressor: Compressor,
}

/// Blocks dispatched and not yet consumed, for a block size of `block_size` and `threads`
/// workers: enough to keep every worker busy, at most [`WINDOW_BYTES`] decoded.
pub fn window(block_size: usize, threads: usize) -> usize {
    let fit = usize::try_from(WINDOW_BYTES).unwrap_or(usize::MAX) / block_size.max(1);
    fit.max(2 * threads).min(64)
}

/// The whole blocks of a file of `file_len` bytes whose blocks start at `blocks_start` and are
/// stored with `sizes` (`(stored bytes, uncompressed)`), in an image of `image_len` bytes; the
/// tail past them is in a fragment when `fragment`. None when the layout is not one this reader
/// takes (backhand then reads the file, and reports what is wrong with it).
fn layout(
    sizes: &[(u32, bool)],
    blocks_start: u64,
    file_len: u64,
    block_size: usize,
    fragment: bool,
    image_len: u64,
) -> Option<Vec<Block>> {
    if block_size == 0 || block_size as u64 > MAX_BLOCK_BYTES || sizes.len() > MAX_BLOCKS {
        return None;
    }
    let bs = block_size as u64;
    let whole = if fragment { file_len / bs } else { file_len.div_ceil(bs) };
    if u64::try_from(sizes.len()).ok()? != whole {
        return None;
    }
    let mut offset = blocks_start;
    let mut blocks = Vec::with_capacity(sizes.len());
    for (i, &(stored, uncompressed)) in sizes.iter().enumerate() {
        if u64::from(stored) > bs {
            return None;
        }
        let end = offset.checked_add(u64::from(stored))?;
        if end > image_len {
            return None;
        }
        let start = (i as u64).checked_mul(bs)?;
        let len = at_most(file_len.checked_sub(start)?, block_size);
        blocks.push(Block { offset, stored, uncompressed, len });
        offset = end;
    }
    Some(blocks)
}

impl Plan {
    /// The decoded bytes of block `i` (not sparse), exactly as many as it holds.
    fn decode(&self, i: usize, stored: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        let block = self.blocks[i];
        stored.resize(block.stored as usize, 0);
        self.image.read_exact_at(stored, block.offset).map_err(|e| {
            std::io::Error::other(format!("reading data block {i} at byte {} of the squashfs: {e}", block.offset))
        })?;
        let out = if block.uncompressed {
            stored.clone()
        } else {
            // The capacity bounds what the decoder may produce (see `squashfs::block_limit`).
            let mut out = Vec::with_capacity(self.block_size);
            squashfs::decode(stored, &mut out, self.compressor)
                .map_err(|e| std::io::Error::other(format!("data block {i} of the squashfs: {e}")))?;
            out
        };
        if out.len() != block.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "data block {i} of the squashfs holds {} bytes, not {}: the image is corrupt",
                    out.len(),
                    block.len
                ),
            ));
        }
        Ok(out)
    }
}

/// One file of a squashfs, its blocks decoded ahead on worker threads (see the module).
pub struct ParallelFile<'a, 'b: 'a> {
    plan: Arc<Plan>,
    decoders: OrderedDecoders,
    window: usize,
    /// Next block to dispatch, and how many dispatched blocks are not consumed yet.
    next_dispatch: usize,
    in_flight: usize,
    /// Next block to hand over, and the decoded ones that arrived before their turn.
    next_take: usize,
    /// The block being handed over and how much of it went.
    current: Vec<u8>,
    current_pos: usize,
    /// Zeros of sparse blocks not handed over yet.
    zeros: u64,
    /// The file's tail in a fragment block: backhand's reader, placed at the tail.
    tail: Option<SquashfsReadFile<'a, 'b>>,
}

impl<'a, 'b: 'a> ParallelFile<'a, 'b> {
    /// Reads `file` of `fs`, whose image is `image` (another descriptor of the same file) of
    /// `image_len` bytes, with at most `threads` decoders. None when this reader does not take
    /// the file (no data compressor, or a layout backhand should judge): read it with
    /// backhand's reader then.
    pub fn new(
        fs: &'a FilesystemReader<'b>,
        file: &'a SquashfsFileReader,
        image: std::fs::File,
        image_len: u64,
        threads: usize,
    ) -> Option<Self> {
        let compressor: Compressor = fs.compressor?.into();
        let block_size = usize::try_from(fs.block_size).ok()?;
        let fragment = file.frag_index() != 0xffff_ffff;
        if file.block_sizes().len() > MAX_BLOCKS {
            return None;
        }
        let sizes: Vec<(u32, bool)> = file.block_sizes().iter().map(|s| (s.size(), s.uncompressed())).collect();
        let file_len = u64::try_from(file.file_len()).ok()?;
        let blocks = layout(&sizes, file.blocks_start(), file_len, block_size, fragment, image_len)?;
        let tail_at = u64::try_from(blocks.len()).ok()?.checked_mul(block_size as u64)?;
        let tail = if tail_at < file_len {
            let mut reader = fs.file(file).reader();
            reader.seek(std::io::SeekFrom::Start(tail_at)).ok()?;
            Some(reader)
        } else {
            None
        };
        let threads = threads.clamp(1, MAX_THREADS);
        let plan = Arc::new(Plan { image, blocks, block_size, compressor });
        let decoding = plan.clone();
        let decoders = OrderedDecoders::start(
            threads,
            "squashfs data block",
            Arc::new(move |i, stored| decoding.decode(i, stored)),
        );
        let mut me = Self {
            plan,
            decoders,
            window: window(block_size, threads),
            next_dispatch: 0,
            in_flight: 0,
            next_take: 0,
            current: Vec::new(),
            current_pos: 0,
            zeros: 0,
            tail,
        };
        me.dispatch();
        Some(me)
    }

    /// Hands blocks to the workers until the window is full.
    fn dispatch(&mut self) {
        while self.in_flight < self.window && self.next_dispatch < self.plan.blocks.len() {
            if self.plan.blocks[self.next_dispatch].stored != 0 {
                if !self.decoders.send(self.next_dispatch) {
                    return;
                }
                self.in_flight += 1;
            }
            self.next_dispatch += 1;
        }
    }

    /// Makes the next block the current one (or adds its zeros); false at the end of the blocks.
    fn take_block(&mut self) -> std::io::Result<bool> {
        let i = self.next_take;
        let Some(block) = self.plan.blocks.get(i).copied() else { return Ok(false) };
        self.next_take += 1;
        if block.stored == 0 {
            self.zeros += block.len as u64;
            return Ok(true);
        }
        let decoded = self.decoders.take(i);
        self.in_flight -= 1;
        self.dispatch();
        self.current = decoded?;
        self.current_pos = 0;
        Ok(true)
    }
}

impl ChunkReader for ParallelFile<'_, '_> {
    fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Piece> {
        let mut got = 0;
        while got < buf.len() {
            if self.current_pos < self.current.len() {
                let n = (self.current.len() - self.current_pos).min(buf.len() - got);
                buf[got..got + n].copy_from_slice(&self.current[self.current_pos..self.current_pos + n]);
                self.current_pos += n;
                got += n;
            } else if self.zeros > 0 {
                if got == 0 {
                    // A run of sparse blocks at the start of a buffer: one hole, nothing filled.
                    while self.plan.blocks.get(self.next_take).is_some_and(|b| b.stored == 0) {
                        self.take_block()?;
                    }
                    return Ok(Piece::Hole(std::mem::take(&mut self.zeros)));
                }
                if self.zeros >= (buf.len() - got) as u64 {
                    // The rest of this buffer would be zeros: hand over the data, the zeros as a
                    // hole next time (as a raw file's data ends where its hole starts).
                    break;
                }
                let n = at_most(self.zeros, buf.len() - got);
                buf[got..got + n].fill(0);
                self.zeros -= n as u64;
                got += n;
            } else if self.take_block()? {
                continue;
            } else if let Some(tail) = &mut self.tail {
                match tail.read(&mut buf[got..]) {
                    Ok(0) => self.tail = None,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            } else {
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
    fn layouts() {
        let c = |stored| (stored, false);
        // Two whole blocks and a 100-byte tail in a fragment; the same file without one.
        let with_fragment = layout(&[c(10), c(20)], 96, 8292, 4096, true, 1000).unwrap();
        assert_eq!(
            with_fragment,
            [
                Block { offset: 96, stored: 10, uncompressed: false, len: 4096 },
                Block { offset: 106, stored: 20, uncompressed: false, len: 4096 }
            ]
        );
        let without = layout(&[c(10), c(0), c(30)], 96, 8292, 4096, false, 1000).unwrap();
        assert_eq!(
            without.iter().map(|b| (b.offset, b.len)).collect::<Vec<_>>(),
            [(96, 4096), (106, 4096), (106, 100)]
        );
        for (sizes, len, fragment, image, why) in [
            (vec![c(10)], 8292, true, 1000, "fewer blocks than the size needs"),
            (vec![c(10), c(10), c(10), c(10)], 8292, false, 1000, "more blocks than the size needs"),
            (vec![c(10), c(4097)], 8292, true, 100_000, "a block stored larger than a block"),
            (vec![c(10), c(900)], 8292, true, 1000, "a block past the image's end"),
            (vec![(u32::MAX >> 1, true)], 4096, false, u64::MAX, "a block larger than the block size"),
        ] {
            assert!(layout(&sizes, 96, len, 4096, fragment, image).is_none(), "{why}");
        }
        assert!(layout(&[c(10)], u64::MAX - 5, 4096, 4096, false, u64::MAX).is_none(), "offsets overflow");
        assert!(layout(&[c(10)], 0, 4096, 2 << 20, false, 1000).is_none(), "block size over 1 MiB");
        let many = vec![c(0); MAX_BLOCKS + 1];
        let len = 4096 * many.len() as u64;
        assert!(layout(&many, 0, len, 4096, false, 1000).is_none(), "more blocks than the plan may hold");
        assert_eq!(layout(&many[1..], 0, len - 4096, 4096, false, 1000).map(|b| b.len()), Some(MAX_BLOCKS));
    }

    /// A block must decode to exactly the bytes it holds: a short or long one is corrupt.
    #[test]
    fn a_block_of_the_wrong_length_is_an_error() {
        use std::io::Write;
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&[7u8; 5000]).unwrap();
        let long = zlib.finish().unwrap();
        let mut image = tempfile::tempfile().unwrap();
        image.write_all(&[1u8; 100]).unwrap();
        image.write_all(&long).unwrap();
        let block = |offset, stored, uncompressed, len| Block { offset, stored, uncompressed, len };
        let plan = Plan {
            image,
            blocks: vec![
                block(0, 100, true, 4096),
                block(100, u32::try_from(long.len()).unwrap(), false, 4096),
                block(0, 100, true, 100),
                block(100, u32::try_from(long.len()).unwrap(), false, 5000),
            ],
            block_size: 8192,
            compressor: Compressor::Gzip,
        };
        let mut stored = Vec::new();
        for (i, want) in [(0, "holds 100 bytes, not 4096"), (1, "holds 5000 bytes, not 4096")] {
            let err = plan.decode(i, &mut stored).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        assert_eq!(plan.decode(2, &mut stored).unwrap(), [1u8; 100]);
        assert_eq!(plan.decode(3, &mut stored).unwrap(), [7u8; 5000]);
    }

    #[test]
    fn the_window_is_bounded() {
        assert!(std::mem::size_of::<Block>() * MAX_BLOCKS <= 24 << 20, "the plan outgrew its bound");
        assert_eq!(window(128 << 10, 2), 64);
        assert_eq!(window(1 << 20, 2), 16);
        assert_eq!(window(1 << 20, 4), 16);
        assert_eq!(window(4096, 4), 64);
        assert!(window(1 << 20, MAX_THREADS) as u64 * MAX_BLOCK_BYTES <= WINDOW_BYTES);
    }

    /// Everything `reader` yields, holes as zeros, and how many holes there were.
    fn drain(reader: &mut dyn ChunkReader, buf_len: usize) -> std::io::Result<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut holes = 0;
        let mut buf = vec![0u8; buf_len];
        loop {
            match reader.next(&mut buf)? {
                Piece::End => return Ok((out, holes)),
                Piece::Hole(n) => {
                    holes += 1;
                    out.resize(out.len() + usize::try_from(n).unwrap(), 0);
                }
                Piece::Data(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn mksquashfs(tree: &std::path::Path, image: &std::path::Path, args: &[&str]) {
        let ok = Command::new("mksquashfs")
            .arg(tree)
            .arg(image)
            .args(args)
            .args(["-noappend", "-quiet", "-no-progress"])
            .status()
            .expect("squashfs-tools are installed by scripts/setup.sh");
        assert!(ok.success());
    }

    /// A file with data, zero runs (sparse blocks), incompressible stretches (stored blocks)
    /// and an odd tail, packed by mksquashfs with every compressor, tails in fragments or not:
    /// read back byte for byte, in buffers smaller and larger than a block, with the zeros
    /// handed over as holes.
    #[test]
    fn reads_every_block_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("LiveOS")).unwrap();
        let mut data: Vec<u8> = (0..3_000_123u32).map(|i| (i / 7 % 251) as u8 ^ (i >> 15) as u8).collect();
        data[300_000..1_500_000].fill(0);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut data[2_000_000..2_400_000] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        // Written around a hole, as the liveimgs' filesystem images are (mksquashfs stores
        // the zero blocks of a sparse file as sparse blocks).
        let rootfs = std::fs::File::create(tree.join("LiveOS/rootfs.img")).unwrap();
        rootfs.write_all_at(&data[..300_000], 0).unwrap();
        rootfs.write_all_at(&data[1_500_000..], 1_500_000).unwrap();
        drop(rootfs);
        for (comp, extra) in [
            ("xz", &["-b", "64K"][..]),
            ("zstd", &["-no-fragments"][..]),
            ("gzip", &["-b", "4K"][..]),
            ("lz4", &[][..]),
        ] {
            let image = dir.path().join(format!("{comp}.img"));
            let mut args = vec!["-comp", comp];
            args.extend_from_slice(extra);
            mksquashfs(&tree, &image, &args);
            let fs = squashfs::open(std::io::BufReader::new(std::fs::File::open(&image).unwrap())).unwrap();
            let node = fs.files().find(|n| n.fullpath == std::path::Path::new("/LiveOS/rootfs.img")).unwrap();
            let backhand::InnerNode::File(f) = &node.inner else { panic!("a file") };
            let len = std::fs::metadata(&image).unwrap().len();
            for (threads, buf_len) in [(1, 4 << 20), (3, 100_000)] {
                let file = std::fs::File::open(&image).unwrap();
                let mut reader = ParallelFile::new(&fs, f, file, len, threads).expect("a layout it takes");
                let (got, holes) = drain(&mut reader, buf_len).unwrap();
                assert!(got == data, "{comp} {extra:?} threads {threads}: differs");
                // A zero run longer than what is left of a buffer is a hole, not filled zeros.
                assert!(buf_len > 1_200_000 || holes > 0, "{comp}: the sparse blocks were not holes");
            }
        }
    }

    /// Every single-byte change to the stored blocks of a real image: an error or the bytes a
    /// block decodes to, never a panic, a hang or a wrong length, and the same verdict as
    /// decoding that block alone.
    #[test]
    fn damaged_blocks_are_errors_not_wrong_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8 + (i / 5000) as u8).collect();
        std::fs::write(tree.join("f"), &data).unwrap();
        let image = dir.path().join("gz.img");
        mksquashfs(&tree, &image, &["-comp", "gzip", "-b", "16K", "-no-fragments"]);
        let clean = std::fs::read(&image).unwrap();
        let fs = squashfs::open(std::io::Cursor::new(clean.clone())).unwrap();
        let node = fs.files().find(|n| n.fullpath == std::path::Path::new("/f")).unwrap();
        let backhand::InnerNode::File(f) = &node.inner else { panic!("a file") };
        let start = usize::try_from(f.blocks_start()).unwrap();
        let stored: usize = f.block_sizes().iter().map(|s| s.size() as usize).sum();
        let mut errors = 0;
        for at in (start..start + stored).step_by(7) {
            let mut bad = clean.clone();
            bad[at] ^= 0x5a;
            let path = dir.path().join("bad.img");
            std::fs::write(&path, &bad).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let mut reader = ParallelFile::new(&fs, f, file, bad.len() as u64, 2).unwrap();
            match drain(&mut reader, 1 << 20) {
                Ok((got, _)) => assert_eq!(got.len(), data.len(), "byte {at}: a wrong length passed"),
                Err(e) => {
                    assert!(e.to_string().contains("data block"), "byte {at}: {e}");
                    errors += 1;
                }
            }
        }
        assert!(errors > 0, "no damaged block was noticed");
        // Cut short: the last block is past the end.
        let file = std::fs::File::open(&image).unwrap();
        assert!(ParallelFile::new(&fs, f, file, (start + stored - 1) as u64, 2).is_none());
    }
}
