//! Compressed raw images decoded in Rust: gzip (flate2's Rust backend), xz (lzma-rust2), zstd
//! (ruzstd). Their uncompressed sizes come from the formats' own records, parsed here too: the
//! xz index at the end of the file, the zstd frame header. No C decoder sees image data.

use crate::source::Format;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Memory one xz block may use while decoding (LZMA2 dictionaries of `xz -9` need 64 MiB).
const XZ_MEM_LIMIT_KIB: u32 = 1 << 20;

/// An xz stream header's length (magic, flags, CRC32).
const XZ_HEADER_BYTES: u64 = 12;
/// An xz stream footer's length (CRC32, backward size, flags, magic).
const XZ_FOOTER_BYTES: u64 = 12;
/// The fewest bytes an xz index record takes (two one-byte varints).
const XZ_MIN_RECORD_BYTES: u64 = 2;

/// A reader of `inner`'s decompressed bytes.
pub fn decompressor<'a, R: Read + Send + 'a>(format: Format, inner: R) -> Box<dyn Read + Send + 'a> {
    let buffered = BufReader::with_capacity(1 << 20, inner);
    match format {
        Format::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Format::Xz => Box::new(lzma_rust2::XzReader::new_mem_limit(buffered, true, XZ_MEM_LIMIT_KIB)),
        Format::Zstd => match ruzstd::decoding::StreamingDecoder::new(buffered) {
            Ok(d) => Box::new(MultiFrame(Some(d))),
            Err(e) => Box::new(FailingReader(Some(std::io::Error::other(format!("zstd: {e}"))))),
        },
        _ => Box::new(buffered),
    }
}

/// Every zstd frame of the file, one after the other (as `zstd -d` reads concatenated frames).
struct MultiFrame<R: std::io::BufRead>(Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>);

impl<R: std::io::BufRead> Read for MultiFrame<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(d) = self.0.as_mut() else { return Ok(0) };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame is done: another may follow.
            let (mut source, decoder) = self.0.take().expect("present").into_parts();
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let next = ruzstd::decoding::StreamingDecoder::new_with_decoder(source, decoder)
                .map_err(|e| std::io::Error::other(format!("zstd: {e}")))?;
            self.0 = Some(next);
        }
    }
}

struct FailingReader(Option<std::io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(self.0.take().unwrap_or_else(|| std::io::Error::other("decoder failed")))
    }
}

/// The uncompressed size of a compressed file, when its format records it.
pub fn uncompressed_size(format: Format, path: &Path) -> Option<u64> {
    uncompressed_size_of(format, &std::fs::File::open(path).ok()?)
}

/// [`uncompressed_size`] of an open file, leaving its position where it was (the caller then
/// decodes the same descriptor). None also when the position cannot be restored.
pub fn uncompressed_size_of(format: Format, file: &std::fs::File) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut position = file;
    let at = position.stream_position().ok()?;
    let size = declared_size(format, file);
    position.seek(SeekFrom::Start(at)).ok()?;
    size
}

fn declared_size(format: Format, file: &std::fs::File) -> Option<u64> {
    let len = file.metadata().ok()?.len();
    match format {
        Format::Xz => {
            let mut footer = [0u8; 12];
            file.read_exact_at(&mut footer, len.checked_sub(XZ_FOOTER_BYTES)?).ok()?;
            let index_len = xz_index_len(&footer)?;
            // The footer's backward size is image data: it must fit in the file (behind a
            // stream header) before anything is allocated for it.
            if index_len > len.checked_sub(XZ_HEADER_BYTES + XZ_FOOTER_BYTES)? {
                return None;
            }
            let mut index = vec![0u8; usize::try_from(index_len).ok()?];
            file.read_exact_at(&mut index, len.checked_sub(XZ_FOOTER_BYTES + index_len)?).ok()?;
            let (uncompressed, blocks) = xz_index_sizes(&index)?;
            // One stream exactly (header, blocks, index, footer): else the size is unknown.
            (XZ_HEADER_BYTES.checked_add(blocks)?.checked_add(index_len)?.checked_add(XZ_FOOTER_BYTES)? == len)
                .then_some(uncompressed)
        }
        Format::Zstd => zstd_total_size(file, len),
        _ => None,
    }
}

/// The xz index length from the stream footer (pure).
pub fn xz_index_len(footer: &[u8; 12]) -> Option<u64> {
    if &footer[10..] != b"YZ" {
        return None;
    }
    let backward = u32::from_le_bytes(footer[4..8].try_into().ok()?);
    Some((u64::from(backward) + 1) * 4)
}

/// The xz variable-length integer at `pos`, moving `pos` past it (pure).
pub(crate) fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// (uncompressed bytes, bytes of the blocks as stored) from an xz index (pure).
pub fn xz_index_sizes(index: &[u8]) -> Option<(u64, u64)> {
    if index.first() != Some(&0) {
        return None;
    }
    let mut pos = 1;
    let records = varint(index, &mut pos)?;
    // A count the index cannot hold is a lie: refuse it before looping over it.
    if records > (index.len() as u64) / XZ_MIN_RECORD_BYTES {
        return None;
    }
    let (mut uncompressed, mut stored) = (0u64, 0u64);
    for _ in 0..records {
        let unpadded = varint(index, &mut pos)?;
        uncompressed = uncompressed.checked_add(varint(index, &mut pos)?)?;
        stored = stored.checked_add(unpadded.checked_add(3)? & !3)?;
        if pos > index.len() {
            return None;
        }
    }
    Some((uncompressed, stored))
}

/// Longest zstd frame header: magic, descriptor, window, dictionary id, content size.
const ZSTD_MAX_HEADER_BYTES: usize = 18;

/// The sum of the content sizes every frame of a zstd file declares; unknown when one frame
/// declares none or the frames do not end exactly at the end of the file. Every frame counts:
/// `zstd -d` decodes them all, so the first frame's size alone would let a small file announce
/// a small image and deliver a large one.
fn zstd_total_size(file: &std::fs::File, len: u64) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut r = BufReader::with_capacity(1 << 16, file);
    let (mut pos, mut total, mut frames) = (0u64, 0u64, 0u32);
    let mut header = [0u8; ZSTD_MAX_HEADER_BYTES];
    while pos < len {
        r.seek(SeekFrom::Start(pos)).ok()?;
        let n = read_up_to(&mut r, &mut header)?;
        match zstd_frame(&header[..n])? {
            ZstdFrame::Skippable { bytes } => pos = pos.checked_add(bytes)?,
            ZstdFrame::Data { header_bytes, content_size, checksum } => {
                total = total.checked_add(content_size?)?;
                frames += 1;
                pos = pos.checked_add(header_bytes)?;
                r.seek(SeekFrom::Start(pos)).ok()?;
                loop {
                    let mut block = [0u8; 3];
                    r.read_exact(&mut block).ok()?;
                    let (last, stored) = zstd_block(block)?;
                    pos = pos.checked_add(3 + stored)?;
                    if last {
                        break;
                    }
                    r.seek_relative(i64::try_from(stored).ok()?).ok()?;
                }
                pos = pos.checked_add(if checksum { 4 } else { 0 })?;
            }
        }
    }
    // An empty file, or skippable frames alone, is not a zstd image.
    (pos == len && frames > 0).then_some(total)
}

/// Fills as much of `buf` as the reader has left; the count, or None on an I/O error.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Option<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).ok()? {
            0 => break,
            n => got += n,
        }
    }
    Some(got)
}

/// What a zstd file holds at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
pub enum ZstdFrame {
    /// A frame of data: its header's length, the content size it declares, and whether a
    /// 4-byte checksum follows its last block.
    Data {
        /// Bytes of the frame header.
        header_bytes: u64,
        /// Declared content size.
        content_size: Option<u64>,
        /// A content checksum follows the blocks.
        checksum: bool,
    },
    /// A skippable frame of `bytes` bytes in all.
    Skippable {
        /// Its whole length, header included.
        bytes: u64,
    },
}

/// Parses the frame that starts `h` (pure).
pub fn zstd_frame(h: &[u8]) -> Option<ZstdFrame> {
    let magic = u32::from_le_bytes(h.get(..4)?.try_into().ok()?);
    if magic & 0xffff_fff0 == 0x184d_2a50 {
        let size = u32::from_le_bytes(h.get(4..8)?.try_into().ok()?);
        return Some(ZstdFrame::Skippable { bytes: 8 + u64::from(size) });
    }
    if magic != 0xfd2f_b528 {
        return None;
    }
    let fhd = *h.get(4)?;
    if fhd & 0x08 != 0 {
        return None;
    }
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0u64, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 => u64::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    Some(ZstdFrame::Data {
        header_bytes: 5 + u64::from(!single_segment) + dict_len + fcs_len,
        content_size: zstd_content_size(h),
        checksum: fhd & 0x04 != 0,
    })
}

/// (last block, bytes stored after the header) from a zstd block header (pure).
pub fn zstd_block(h: [u8; 3]) -> Option<(bool, u64)> {
    let v = u32::from_le_bytes([h[0], h[1], h[2], 0]);
    let size = u64::from(v >> 3);
    let stored = match (v >> 1) & 3 {
        0 | 2 => size,
        1 => 1,
        _ => return None,
    };
    Some((v & 1 != 0, stored))
}

/// The content size a zstd frame header declares, if it declares one (pure).
pub fn zstd_content_size(h: &[u8]) -> Option<u64> {
    if h.get(..4)? != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = *h.get(4)?;
    let single_segment = fhd & 0x20 != 0;
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 if single_segment => 1,
        0 => return None,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let at = 5 + usize::from(!single_segment) + dict_len;
    let field = h.get(at..at + fcs_len)?;
    let mut bytes = [0u8; 8];
    bytes[..fcs_len].copy_from_slice(field);
    let value = u64::from_le_bytes(bytes);
    Some(if fcs_len == 2 { value + 256 } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) {
        let ok = Command::new("sh").arg("-c").arg(script).status().expect("sh");
        assert!(ok.success(), "{script}");
    }

    fn decoded(format: Format, path: &Path) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decompressor(format, std::fs::File::open(path)?).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Files made by the real xz, zstd and gzip tools (several streams and frames, a cut one):
    /// decoded byte for byte, sizes read from their indexes and headers, truncation an error.
    #[test]
    fn real_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 3 % 251) as u8 ^ (i >> 17) as u8).collect();
        std::fs::write(dir.path().join("raw"), &data).unwrap();
        sh(&format!(
            "cd {d} && xz -kc raw > one.xz && (xz -c raw; xz -c raw) > two.xz && zstd -qc raw > one.zst && \
             (zstd -qc raw; zstd -qc raw) > two.zst && gzip -c raw > one.gz && head -c $(($(stat -c %s one.xz) / 2)) one.xz > cut.xz && \
             head -c $(($(stat -c %s one.zst) / 2)) one.zst > cut.zst && head -c -20 one.xz > nofooter.xz"
        ));
        let twice = [data.clone(), data.clone()].concat();
        for (name, format, want, size) in [
            ("one.xz", Format::Xz, &data, Some(data.len() as u64)),
            ("two.xz", Format::Xz, &twice, None),
            ("one.zst", Format::Zstd, &data, Some(data.len() as u64)),
            ("two.zst", Format::Zstd, &twice, Some(twice.len() as u64)),
            ("one.gz", Format::Gzip, &data, None),
        ] {
            let path = dir.path().join(name);
            assert!(decoded(format, &path).unwrap() == *want, "{name} decodes wrong");
            assert_eq!(uncompressed_size(format, &path), size, "{name}");
        }
        assert!(decoded(Format::Xz, &dir.path().join("cut.xz")).is_err());
        assert!(decoded(Format::Xz, &dir.path().join("nofooter.xz")).is_err());
        assert!(decoded(Format::Zstd, &dir.path().join("cut.zst")).is_err());
    }

    #[test]
    fn headers() {
        let mut footer = [0u8; 12];
        footer[4..8].copy_from_slice(&3u32.to_le_bytes());
        footer[10..].copy_from_slice(b"YZ");
        assert_eq!(xz_index_len(&footer), Some(16));
        assert_eq!(xz_index_len(&[0u8; 12]), None);
        // One record: 100 bytes stored (unpadded 98), 1000 uncompressed.
        assert_eq!(xz_index_sizes(&[0, 1, 98, 0xe8, 0x07, 0, 0, 0]), Some((1000, 100)));
        assert_eq!(xz_index_sizes(&[0, 2, 98]), None);
        assert_eq!(xz_index_sizes(&[1, 0]), None);
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x20, 42]), Some(42));
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0xa0, 0x10, 0, 0, 0]), Some(16));
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]), None);
        assert_eq!(zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x40, 0x58, 1, 0]), Some(257));
        assert_eq!(zstd_content_size(b"not zstd"), None);
        assert_eq!(
            zstd_frame(&[0x28, 0xb5, 0x2f, 0xfd, 0x24, 42]),
            Some(ZstdFrame::Data { header_bytes: 6, content_size: Some(42), checksum: true })
        );
        assert_eq!(
            zstd_frame(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]),
            Some(ZstdFrame::Data { header_bytes: 6, content_size: None, checksum: false })
        );
        assert_eq!(zstd_frame(&[0x5a, 0x2a, 0x4d, 0x18, 10, 0, 0, 0]), Some(ZstdFrame::Skippable { bytes: 18 }));
        assert_eq!(zstd_frame(&[0x28, 0xb5, 0x2f, 0xfd, 0x08]), None, "reserved bit");
        // Last RLE block of 128 KiB: one byte stored.
        assert_eq!(
            zstd_block(((128 << 10) << 3 | 1 << 1 | 1u32).to_le_bytes()[..3].try_into().unwrap()),
            Some((true, 1))
        );
        assert_eq!(zstd_block([0x06, 0, 0]), None, "reserved block type");
    }

    /// A file whose first frame declares 4 KiB and whose next frames (declaring nothing, or
    /// lying) deliver 64 MiB: its size is not the first frame's.
    #[test]
    fn zstd_size_counts_every_frame() {
        let dir = tempfile::tempdir().unwrap();
        let rle = |declared: Option<u32>, blocks: u32, block_bytes: u32| -> Vec<u8> {
            let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
            match declared {
                Some(n) => {
                    f.push(0xa0);
                    f.extend(n.to_le_bytes());
                }
                None => f.extend([0x00, 0x58]),
            }
            for i in 0..blocks {
                let last = u32::from(i + 1 == blocks);
                f.extend(&(block_bytes << 3 | 1 << 1 | last).to_le_bytes()[..3]);
                f.push(0xab);
            }
            f
        };
        let first = rle(Some(4096), 1, 4096);
        let path = dir.path().join("x.zst");
        for (rest, want) in [
            (vec![], Some(4096)),
            (rle(None, 512, 128 << 10), None),
            (rle(Some(4096), 512, 128 << 10), Some(8192)),
            (vec![0x28, 0xb5], None),
        ] {
            std::fs::write(&path, [first.clone(), rest].concat()).unwrap();
            assert_eq!(uncompressed_size(Format::Zstd, &path), want);
            // The caller goes on decoding the same descriptor: its position is kept.
            let mut file = std::fs::File::open(&path).unwrap();
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(3)).unwrap();
            assert_eq!(uncompressed_size_of(Format::Zstd, &file), want);
            assert_eq!(std::io::Seek::stream_position(&mut file).unwrap(), 3);
        }
        // Nothing, or a skippable frame alone, declares no image.
        for alone in [vec![], vec![0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 0xaa, 0xbb]] {
            std::fs::write(&path, alone).unwrap();
            assert_eq!(uncompressed_size(Format::Zstd, &path), None);
        }
    }

    proptest::proptest! {
        #[test]
        /// What the parsers accept is consistent: stored xz blocks are padded to 4 bytes, an
        /// index holds no more records than its bytes can, a zstd size needs the magic, an
        /// index length is a multiple of 4.
        fn parsers_accept_consistent_values(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Some((_, stored)) = xz_index_sizes(&bytes) {
                proptest::prop_assert_eq!(stored % 4, 0);
                let mut pos = 1;
                let records = varint(&bytes, &mut pos).unwrap_or(0);
                proptest::prop_assert!(records <= bytes.len() as u64 / XZ_MIN_RECORD_BYTES);
            }
            if zstd_content_size(&bytes).is_some() {
                proptest::prop_assert!(bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
            }
            let mut f = [0u8; 12];
            let n = bytes.len().min(12);
            f[..n].copy_from_slice(&bytes[..n]);
            if let Some(len) = xz_index_len(&f) {
                proptest::prop_assert!(len % 4 == 0 && len >= 4 && &f[10..] == b"YZ");
            }
        }
    }
}
