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

/// Decodes one squashfs block (or metadata block) compressed with `compressor` into `out`.
pub fn decode(bytes: &[u8], out: &mut Vec<u8>, compressor: Compressor) -> Result<(), BackhandError> {
    // squashfs blocks are at most 1 MiB uncompressed, metadata blocks 8 KiB: cap what a
    // hostile block can make us allocate.
    const MAX_BLOCK: u64 = 1 << 20;
    out.clear();
    match compressor {
        Compressor::Xz => {
            lzma_rust2::XzReader::new_mem_limit(bytes, false, 64 << 10)
                .take(MAX_BLOCK + 1)
                .read_to_end(out)
                .map_err(|e| corrupt("xz", e))?;
        }
        Compressor::Zstd => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(bytes).map_err(|e| corrupt("zstd", e))?;
            d.by_ref().take(MAX_BLOCK + 1).read_to_end(out).map_err(|e| corrupt("zstd", e))?;
        }
        Compressor::Gzip => {
            flate2::read::ZlibDecoder::new(bytes)
                .take(MAX_BLOCK + 1)
                .read_to_end(out)
                .map_err(|e| corrupt("gzip", e))?;
        }
        // lz4 (lz4_flex) and anything else backhand decodes itself without C code, or refuses.
        Compressor::Lz4 => return DefaultCompressor.decompress(bytes, out, compressor),
        other => return Err(BackhandError::UnsupportedCompression(format!("{other:?}"))),
    }
    if out.len() as u64 > MAX_BLOCK {
        return Err(corrupt("oversized", format!("more than {MAX_BLOCK} bytes")));
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
            let image = dir.path().join(format!("{comp}.img"));
            let ok = Command::new("mksquashfs")
                .arg(&tree)
                .arg(&image)
                .args(["-comp", comp, "-noappend", "-quiet", "-no-progress"])
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

    #[test]
    fn garbage_blocks_are_errors() {
        let mut out = Vec::new();
        for c in [Compressor::Xz, Compressor::Zstd, Compressor::Gzip] {
            assert!(decode(b"definitely not compressed", &mut out, c).is_err(), "{c:?}");
        }
    }
}
