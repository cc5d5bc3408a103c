//! squashfs images (liveimgs) read with backhand, their blocks decoded in Rust: xz with
//! lzma-rust2, zstd with ruzstd, gzip with flate2's Rust backend, lz4 with lz4_flex. backhand's
//! default decoders for xz and zstd are C libraries, which must not see image data on the host.

use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};
use backhand::{BackhandError, FilesystemCompressor, FilesystemReader, SuperBlock};
use std::io::Read;

/// How one block is compressed for backhand's writer: `(block, filesystem compressor, block
/// size)`, as [`CompressionAction::compress`] is called.
pub type BlockCompress = fn(&[u8], FilesystemCompressor, u32) -> Result<Vec<u8>, BackhandError>;

/// The [`CompressionAction`] of every squashfs imgforge reads or writes: Rust decoders, and
/// `compress` for the blocks it writes.
pub struct RustDecoder {
    compress: BlockCompress,
}

impl RustDecoder {
    /// Rust decoders, and `compress` for written blocks.
    pub const fn new(compress: BlockCompress) -> Self {
        Self { compress }
    }
}

/// The instance that reads: backhand takes a `&'static` compressor.
pub static RUST_DECODER: RustDecoder =
    RustDecoder::new(|bytes, fc, block_size| DefaultCompressor.compress(bytes, fc, block_size));

/// The instance that writes every block stored, uncompressed (the payload disk: its files are
/// mostly compressed already, it never leaves the host, and the helper under TCG would spend
/// more time decompressing than reading). It declines each block as backhand expects of a
/// compressor whose output would be larger; the superblock still names a compressor, as the
/// kernel requires.
pub static STORE_ONLY: RustDecoder =
    // Longer than the input: backhand stores the block as it is.
    RustDecoder::new(|bytes, _, _| Ok(vec![0; bytes.len() + 1]));

/// Opens a squashfs with [`RustDecoder`] (squashfs 4.0, little-endian: what mksquashfs makes).
pub fn open<'b>(reader: impl backhand::BufReadSeek + 'b) -> Result<FilesystemReader<'b>, BackhandError> {
    let kind = backhand::kind::Kind::new_v4_with_const(&RUST_DECODER, backhand::kind::LE_V4_0);
    FilesystemReader::from_reader_with_offset_and_kind(reader, 0, kind)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> BackhandError {
    BackhandError::StdIo(std::io::Error::other(format!("{what} block: {e}")))
}

/// The most a data block holds uncompressed (squashfs's largest block size).
pub const MAX_BLOCK_BYTES: u64 = 1 << 20;
/// The most a metadata block holds uncompressed (by the format: 8 KiB).
pub const METADATA_BLOCK_BYTES: u64 = 8 << 10;

/// The most a block handed to [`decode`] in an `out` of `capacity` may decode to. backhand passes every block in
/// an empty `out` reserved for the most it may hold: exactly 8 KiB for a metadata block, the
/// block size for a data block (its own decoders fill exactly that capacity, as its
/// `CompressionAction::decompress` documents). It does not tell a custom decoder which kind of
/// block it is, and a hostile metadata block decoded to 1 MiB, a thousand of them held at once,
/// is how a 52 KB image took 1 GB.
pub fn block_limit(capacity: usize) -> u64 {
    (capacity as u64).clamp(METADATA_BLOCK_BYTES, MAX_BLOCK_BYTES)
}

/// Decodes one squashfs block (or metadata block) compressed with `compressor` into `out`, at
/// most [`block_limit`] bytes.
pub fn decode(bytes: &[u8], out: &mut Vec<u8>, compressor: Compressor) -> Result<(), BackhandError> {
    out.clear();
    let max_block = block_limit(out.capacity());
    match compressor {
        Compressor::Xz => {
            lzma_rust2::XzReader::new_mem_limit(bytes, false, 64 << 10)
                .take(max_block + 1)
                .read_to_end(out)
                .map_err(|e| corrupt("xz", e))?;
        }
        Compressor::Zstd => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(bytes).map_err(|e| corrupt("zstd", e))?;
            d.by_ref().take(max_block + 1).read_to_end(out).map_err(|e| corrupt("zstd", e))?;
        }
        Compressor::Gzip => {
            flate2::read::ZlibDecoder::new(bytes)
                .take(max_block + 1)
                .read_to_end(out)
                .map_err(|e| corrupt("gzip", e))?;
        }
        // lz4 (lz4_flex) and anything else backhand decodes itself without C code, or refuses.
        Compressor::Lz4 => return DefaultCompressor.decompress(bytes, out, compressor),
        other => return Err(BackhandError::UnsupportedCompression(format!("{other:?}"))),
    }
    if out.len() as u64 > max_block {
        return Err(corrupt("oversized", format!("more than {max_block} bytes")));
    }
    Ok(())
}

impl CompressionAction for RustDecoder {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(&self, bytes: &[u8], out: &mut Vec<u8>, compressor: Compressor) -> Result<(), BackhandError> {
        decode(bytes, out, compressor)
    }

    fn compress(&self, bytes: &[u8], fc: FilesystemCompressor, block_size: u32) -> Result<Vec<u8>, BackhandError> {
        (self.compress)(bytes, fc, block_size)
    }

    fn compression_options(
        &self,
        superblock: &mut SuperBlock,
        kind: &backhand::kind::Kind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Real squashfs images of every compressor mksquashfs has here: each file reads back byte
    /// for byte through the Rust decoders.
    #[test]
    fn reads_what_mksquashfs_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("LiveOS")).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i / 5 % 253) as u8 ^ (i >> 13) as u8).collect();
        std::fs::write(tree.join("LiveOS/rootfs.img"), &data).unwrap();
        std::fs::write(tree.join("small"), b"a fragment").unwrap();
        for comp in ["xz", "zstd", "gzip", "lz4"] {
            // The smallest and the largest block size too: data blocks must not be held to
            // the metadata block limit, nor cut at 1 MiB.
            let block_size = match comp {
                "xz" => "4K",
                "zstd" => "1M",
                _ => "128K",
            };
            let image = dir.path().join(format!("{comp}.img"));
            let ok = Command::new("mksquashfs")
                .arg(&tree)
                .arg(&image)
                .args(["-comp", comp, "-b", block_size, "-noappend", "-quiet", "-no-progress"])
                .status()
                .expect("squashfs-tools are installed by scripts/setup.sh");
            assert!(ok.success(), "{comp}");
            let fs = open(std::io::BufReader::new(std::fs::File::open(&image).unwrap())).unwrap();
            for (path, want) in [("/LiveOS/rootfs.img", &data[..]), ("/small", b"a fragment")] {
                let node = fs.files().find(|n| n.fullpath == std::path::Path::new(path)).unwrap();
                let backhand::InnerNode::File(f) = &node.inner else { panic!("{path} is a file") };
                let mut got = Vec::new();
                fs.file(f).reader().read_to_end(&mut got).unwrap();
                assert!(got == want, "{comp}: {path} differs");
            }
        }
    }

    /// A zstd frame of 1 MiB of zeros: refused as a metadata block (backhand's 8 KiB `out`),
    /// taken as a 1 MiB data block.
    #[test]
    fn metadata_blocks_decode_to_at_most_8_kib() {
        let zeros = vec![0u8; 1 << 20];
        let frame = ruzstd::encoding::compress_to_vec(&zeros[..], ruzstd::encoding::CompressionLevel::Fastest);
        let mut metadata = Vec::with_capacity(METADATA_BLOCK_BYTES as usize);
        let err = decode(&frame, &mut metadata, Compressor::Zstd).unwrap_err();
        assert!(err.to_string().contains("more than 8192 bytes"), "{err}");
        let mut small = Vec::new();
        assert!(decode(&frame, &mut small, Compressor::Zstd).is_err(), "an unreserved out is a metadata block");
        let mut data = Vec::with_capacity(MAX_BLOCK_BYTES as usize);
        decode(&frame, &mut data, Compressor::Zstd).unwrap();
        assert!(data == zeros);
        let over =
            ruzstd::encoding::compress_to_vec(&[0u8; (1 << 20) + 1][..], ruzstd::encoding::CompressionLevel::Fastest);
        let mut big = Vec::with_capacity(4 << 20);
        assert!(decode(&over, &mut big, Compressor::Zstd).is_err(), "no block holds over 1 MiB");
    }

    #[test]
    fn garbage_blocks_are_errors() {
        let mut out = Vec::new();
        for c in [Compressor::Xz, Compressor::Zstd, Compressor::Gzip] {
            assert!(decode(b"definitely not compressed", &mut out, c).is_err(), "{c:?}");
        }
    }
}
